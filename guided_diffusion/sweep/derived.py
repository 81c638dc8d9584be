"""Columns a sweep derives from each point's parsed flags, beside the evaluator's metrics.

``nfe``: UNet evaluations per image, the cost axis on which samplers are compared. It is the
number of sampling steps plus one more pass for every step a two-pass guidance (SAG, PAG, SEG)
guides: such a step runs the UNet twice. Classifier guidance's gradient is a pass of the
classifier, not of the UNet, and is not counted.

* steps: DDPM - the respaced schedule (``--timestep_respacing``, all ``--diffusion_steps``
  when empty); DDIM - ``--sampler_steps`` (ddimN) or the respaced schedule; DPM-Solver++ and
  UniPC - their timesteps (one model evaluation each; UniPC's corrector reuses the next step's).
* guided steps: none with ``--guide_scale 1``; else the steps whose respaced index (N-1 down to
  0; a solver's step k has index N-1-k) is inside the guidance's window: SAG's
  ``index < --guide_start``, or the inclusive window of ``--guidance_strategies``.

A derived column names the swept keys it stands for (``replaces``): a figure against it draws
one line per setting of the other keys.
"""

from dataclasses import dataclass


def sampling_steps(args):
    """Sampling steps (model evaluations without guidance) of the run the flags describe."""
    from guided_diffusion.respace import space_timesteps
    from guided_diffusion.sampler_choice import resolve_sampler

    choice = resolve_sampler(args)
    if choice["sampler"] in ("dpm++", "unipc"):
        return len(choice["timesteps"])
    if choice["sampler"] == "ddim" and choice["steps"] is not None:
        return choice["steps"]
    respacing = args.timestep_respacing
    if not respacing:
        return args.diffusion_steps
    return len(space_timesteps(args.diffusion_steps, respacing))


def guided_steps(args, steps):
    """How many of ``steps`` a two-pass guidance guides (each costs a second UNet pass)."""
    if float(args.guide_scale) == 1.0:
        return 0
    strategies = getattr(args, "guidance_strategies", None)
    if strategies is not None:
        from guided_diffusion.pag import parse_strategies

        _, (start, end) = parse_strategies(strategies)
        return sum(1 for i in range(steps) if start >= i >= end)
    return sum(1 for i in range(steps) if i < args.guide_start)


def model_evaluations(args):
    """UNet passes per image: the sampling steps plus the guided ones."""
    steps = sampling_steps(args)
    return steps + guided_steps(args, steps)


@dataclass(frozen=True)
class Derived:
    compute: object  # parsed flags -> number
    label: str  # axis label
    replaces: tuple  # swept keys this column stands for on its axis
    log: bool = False  # log-scaled axis


DERIVED = {
    "nfe": Derived(model_evaluations, "NFE: UNet passes per image (a guided step counts 2)",
                   ("timestep_respacing", "sampler_steps", "solver_spacing"), log=True),
}


def derive(args):
    """``{column: value}`` for the flags ``args``; None where a value cannot be derived."""
    out = {}
    for name, spec in DERIVED.items():
        try:
            out[name] = spec.compute(args)
        except (AttributeError, TypeError, ValueError):
            out[name] = None
    return out
