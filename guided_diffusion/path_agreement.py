"""How closely a faster sampling path follows the exact one, step by step (teacher-forced).

Both paths start every DDIM step from the *same* x_t (the exact path's trajectory), so the
figures measure one step's error, not the drift of two diverging trajectories:

- ``mask_agreement``: fraction of SAG mask positions (batch x pixels) that are equal (None for
  PAG / SEG, which have no mask);
- ``eps_rel_err``: ``||eps_fast - eps_exact|| / ||eps_exact||`` of the first (unperturbed)
  pass, the network's own numerical error on an identical input;
- ``eps_max_rel_err``: ``max|eps_fast - eps_exact| / max|eps_exact|`` of that pass;
- ``second_eps_rel_err``: the same norm-relative error for the second pass (SAG: on the degraded
  input; PAG / SEG: the perturbed network);
- ``guided_eps_rel_err``: the norm-relative error of the guided eps,
  ``eps_2 + s * (eps - eps_2)``. For SAG it adds the effect of mask positions that flip (a
  flipped key blurs, or stops blurring, a whole patch); for PAG / SEG it is the two passes'
  errors amplified by the scale.

Used by ``scripts/compare_fast_path.py`` (figures for docs/benchmarks.md) and by the tests.
"""

import contextlib

import torch as th

from .sag import SelfAttentionGuidance

_EXACT = "exact"
# The intermediates each guidance keeps (keep_intermediates=True): its key in the step outputs
# and the name of its second pass's eps there.
_INTERMEDIATES = {"sag": "degraded_eps", "pag": "perturbed_eps"}


def _norm_rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def compare_guided_steps(diffusion, exact, candidates, noise, model_kwargs=None, steps=None):
    """Run ``steps`` DDIM steps (default: all) of ``diffusion`` from ``noise`` on the exact path
    and, from the same x_t at every step, on each candidate path.

    A path is ``(model, guidance)`` or ``(model, guidance, context)``, where ``context()`` is
    entered around that path's step (e.g. a TF32 setting). Every guidance (SAG, PAG or SEG, the
    same kind on every path) must be active on each compared step and keep its intermediates
    (``keep_intermediates=True``).

    :param exact: the reference path; its samples drive the trajectory.
    :param candidates: ``{name: path}``.
    :return: ``{name: [one dict per step]}``, each with ``step`` (respaced index) and the
        figures in the module doc.
    """
    for name, path in [(_EXACT, exact), *candidates.items()]:
        if not getattr(path[1], "keep_intermediates", False):
            raise ValueError(f"path {name!r}: build its guidance with keep_intermediates=True")
    indices = list(range(diffusion.num_timesteps))[::-1][:steps]
    x, rows = noise, {name: [] for name in candidates}
    with th.no_grad():
        for i in indices:
            t = th.full((x.shape[0],), i, device=x.device, dtype=th.long)
            ref = _guided_step(diffusion, exact, x, t, i, model_kwargs, _EXACT)
            for name, path in candidates.items():
                got = _guided_step(diffusion, path, x, t, i, model_kwargs, name)
                if got["kind"] != ref["kind"]:
                    raise ValueError(f"path {name!r} runs {got['kind']}, the exact path {ref['kind']}")
                mask = None if ref["kind"] != "sag" else (ref["mask"] == got["mask"]).double().mean().item()
                rows[name].append(dict(
                    step=i,
                    mask_agreement=mask,
                    eps_rel_err=_norm_rel(got["eps"], ref["eps"]),
                    eps_max_rel_err=_max_rel(got["eps"], ref["eps"]),
                    second_eps_rel_err=_norm_rel(got["second_eps"], ref["second_eps"]),
                    guided_eps_rel_err=_norm_rel(got["guided_eps"], ref["guided_eps"]),
                ))
            x = ref["sample"]
    return rows


compare_sag_steps = compare_guided_steps  # its name from before PAG / SEG


def _guided_step(diffusion, path, x, t, i, model_kwargs, name):
    """One DDIM step of ``path`` at (x, t): the guidance's intermediates, its kind (``sag`` /
    ``pag``), the second pass's eps as ``second_eps``, and ``sample``."""
    model, guidance = path[:2]
    context = path[2] if len(path) > 2 else contextlib.nullcontext
    guidance.step_hint = (t, i)
    with context():
        out = diffusion.ddim_sample(model, x, t, model_kwargs=model_kwargs, guidance=guidance)
    kind = next((key for key in _INTERMEDIATES if key in out), None)
    if kind is None:
        what = ("SAG was not active at step {i} (needs guide_start > {i} and guide_scale != 1)"
                if isinstance(guidance, SelfAttentionGuidance) else
                "the guidance was not active at step {i} (needs it in the window and guide_scale != 1)")
        raise ValueError(f"path {name!r}: " + what.format(i=i))
    return dict(out[kind], kind=kind, second_eps=out[kind][_INTERMEDIATES[kind]], sample=out["sample"])


def summarize(rows):
    """Over the steps: mean and min mask agreement (the mean is the share of equal positions
    over the whole trajectory; None without a mask), and the worst step of each error."""
    masks = [r["mask_agreement"] for r in rows if r["mask_agreement"] is not None]
    return dict(
        steps=len(rows),
        min_mask_agreement=min(masks) if masks else None,
        mean_mask_agreement=sum(masks) / len(masks) if masks else None,
        max_eps_rel_err=max(r["eps_rel_err"] for r in rows),
        max_eps_max_rel_err=max(r["eps_max_rel_err"] for r in rows),
        max_second_eps_rel_err=max(r["second_eps_rel_err"] for r in rows),
        max_guided_eps_rel_err=max(r["guided_eps_rel_err"] for r in rows),
    )
