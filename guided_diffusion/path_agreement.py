"""How closely a faster sampling path follows the exact one, step by step (teacher-forced).

Both paths start every DDIM step from the *same* x_t (the exact path's trajectory), so the
figures measure one step's error, not the drift of two diverging trajectories:

- ``mask_agreement``: fraction of SAG mask positions (batch x pixels) that are equal;
- ``eps_rel_err``: ``||eps_fast - eps_exact|| / ||eps_exact||`` of the first (probed) pass,
  the network's own numerical error on an identical input;
- ``eps_max_rel_err``: ``max|eps_fast - eps_exact| / max|eps_exact|`` of that pass;
- ``guided_eps_rel_err``: the norm-relative error of the guided eps,
  ``eps_deg + s * (eps - eps_deg)``. It adds the effect of mask positions that flip (a flipped
  key blurs, or stops blurring, a whole patch), so it is larger than the network's error.

Used by ``scripts/compare_fast_path.py`` (figures for docs/benchmarks.md) and by the tests.
"""

import contextlib

import torch as th

_EXACT = "exact"


def _norm_rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def compare_sag_steps(diffusion, exact, candidates, noise, model_kwargs=None, steps=None):
    """Run ``steps`` DDIM steps (default: all) of ``diffusion`` from ``noise`` on the exact path
    and, from the same x_t at every step, on each candidate path.

    A path is ``(model, guidance)`` or ``(model, guidance, context)``, where ``context()`` is
    entered around that path's step (e.g. a TF32 setting). Every guidance must be active on
    each compared step and keep its intermediates (``keep_intermediates=True``).

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
                rows[name].append(dict(
                    step=i,
                    mask_agreement=(ref["mask"] == got["mask"]).double().mean().item(),
                    eps_rel_err=_norm_rel(got["eps"], ref["eps"]),
                    eps_max_rel_err=_max_rel(got["eps"], ref["eps"]),
                    guided_eps_rel_err=_norm_rel(got["guided_eps"], ref["guided_eps"]),
                ))
            x = ref["sample"]
    return rows


def _guided_step(diffusion, path, x, t, i, model_kwargs, name):
    """One DDIM step of ``path`` at (x, t): the SAG intermediates plus ``sample``."""
    model, guidance = path[:2]
    context = path[2] if len(path) > 2 else contextlib.nullcontext
    guidance.step_hint = (t, i)
    with context():
        out = diffusion.ddim_sample(model, x, t, model_kwargs=model_kwargs, guidance=guidance)
    if "sag" not in out:
        raise ValueError(f"path {name!r}: SAG was not active at step {i} "
                         f"(needs guide_start > {i} and guide_scale != 1)")
    return dict(out["sag"], sample=out["sample"])


def summarize(rows):
    """Over the steps: mean and min mask agreement (the mean is the share of equal positions
    over the whole trajectory), and the worst step of each error."""
    return dict(
        steps=len(rows),
        min_mask_agreement=min(r["mask_agreement"] for r in rows),
        mean_mask_agreement=sum(r["mask_agreement"] for r in rows) / len(rows),
        max_eps_rel_err=max(r["eps_rel_err"] for r in rows),
        max_eps_max_rel_err=max(r["eps_max_rel_err"] for r in rows),
        max_guided_eps_rel_err=max(r["guided_eps_rel_err"] for r in rows),
    )
