"""Which sampler a sampling script runs: the ``--sampler`` flags, their validation, and the loop
they select (DDPM, DDIM, or a multistep solver of ``multistep.py``).

    --sampler ddpm|ddim|dpm++|unipc   default: ddim with --use_ddim True, else ddpm
    --sampler_steps N                 model evaluations (solvers: default 20; ddim: the ddimN
                                      timesteps instead of --timestep_respacing; ddpm: refused)
    --solver_order 1|2|3              default 2
    --solver_type                     dpm++: midpoint (default) | heun; unipc: bh2 (default) | bh1
    --solver_spacing                  linspace (default) | leading | trailing | ddim | ddimN |
                                      an explicit list "999,800,..."
    --solver_final zero|sigma_min     default zero

How the original flags interact: ``--use_ddim`` and ``--timestep_respacing`` keep their meaning
for DDPM and DDIM. An explicit ``--sampler`` wins over ``--use_ddim``. ``--sampler_steps`` wins
over ``--timestep_respacing`` (DDIM then uses guided-diffusion's ``ddimN`` timesteps), and the
solvers always run on the model's full schedule, so ``--timestep_respacing`` (e.g. a preset's
250) does not change a solver run. The ``--solver_*`` flags are read by the solvers only, but
their values are checked whatever the sampler.

A driver calls :func:`add_solver_arguments` on its parser, :func:`validate_solver_args` before
anything is built or written (ValueError with one line), and :func:`sampling_loop` to get the
loop for a batch; :func:`describe_sampler` is a line for the run's log.
"""

import functools

from .multistep import (
    DPM_SOLVER_TYPES,
    FINALS,
    MAX_ORDER,
    SPACINGS,
    UNIPC_SOLVER_TYPES,
    DPMSolverPP,
    SolverPlan,
    UniPC,
)

SAMPLERS = ("ddpm", "ddim", "dpm++", "unipc")
SOLVERS = {"dpm++": DPMSolverPP, "unipc": UniPC}
DEFAULT_SOLVER_STEPS = 20
DEFAULT_SOLVER_ORDER = 2
DEFAULT_SOLVER_TYPES = {"dpm++": DPM_SOLVER_TYPES[0], "unipc": UNIPC_SOLVER_TYPES[0]}


def add_solver_arguments(parser):
    """Add the sampler flags (defaults: None = "not given", resolved by :func:`resolve_sampler`)."""
    group = parser.add_argument_group(
        "sampler (DDPM, DDIM, or the multistep solvers DPM-Solver++ and UniPC on the full schedule)")
    group.add_argument("--sampler", default=None, metavar="ddpm|ddim|dpm++|unipc",
                       help="sampler (default: ddim with --use_ddim True, else ddpm); wins over --use_ddim")
    group.add_argument("--sampler_steps", type=int, default=None, metavar="N",
                       help="model evaluations: solvers (default 20) and ddim (the ddimN timesteps, "
                       "instead of --timestep_respacing); not for ddpm (use --timestep_respacing)")
    group.add_argument("--solver_order", type=int, default=None, metavar="1|2|3",
                       help="solver order (default 2: DPM-Solver++(2M), UniPC-2; 3 suits unguided runs)")
    group.add_argument("--solver_type", default=None, metavar="TYPE",
                       help="dpm++: midpoint (default) or heun; unipc: bh2 (default) or bh1")
    group.add_argument("--solver_spacing", default="linspace", metavar="SPACING",
                       help="solver timesteps: linspace (default), leading, trailing, ddim (DDIM's), "
                       "ddimN, or a list 999,800,...")
    group.add_argument("--solver_final", default="zero", metavar="zero|sigma_min",
                       help="solver's last step: to x_0 (zero, default) or to timestep 0's noise level")
    return parser


def resolve_sampler(args):
    """The sampler name and its settings from the flags, checked: a dict with ``sampler`` and,
    for the solvers, ``steps``, ``order``, ``solver_type``, ``spacing``, ``final`` (for ddim:
    ``steps`` or None). Raises ValueError with one line naming the flag and the fix."""
    sampler = args.sampler if args.sampler is not None else ("ddim" if args.use_ddim else "ddpm")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown --sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if args.solver_order is not None and args.solver_order not in range(1, MAX_ORDER + 1):
        raise ValueError(f"--solver_order must be 1, 2 or 3, got {args.solver_order}")
    known_types = DPM_SOLVER_TYPES + UNIPC_SOLVER_TYPES
    if args.solver_type is not None and args.solver_type not in known_types:
        raise ValueError(f"unknown --solver_type {args.solver_type!r}: dpm++ takes "
                         f"{' or '.join(DPM_SOLVER_TYPES)}, unipc {' or '.join(UNIPC_SOLVER_TYPES)}")
    if args.solver_final not in FINALS:
        raise ValueError(f"unknown --solver_final {args.solver_final!r}: choose {' or '.join(FINALS)}")
    steps = args.sampler_steps
    if steps is not None and not 1 <= steps <= args.diffusion_steps:
        raise ValueError(f"--sampler_steps must be between 1 and the schedule's {args.diffusion_steps} "
                         f"steps (--diffusion_steps), got {steps}")
    if sampler == "ddpm":
        if steps is not None:
            raise ValueError("--sampler_steps does not apply to --sampler ddpm: DDPM takes its steps "
                             "from --timestep_respacing (e.g. --timestep_respacing 250)")
        _check_spacing_form(args.solver_spacing)
        return {"sampler": sampler}
    if sampler == "ddim":
        if steps is not None:
            _ddim_timesteps_exist(args, steps)
        _check_spacing_form(args.solver_spacing)
        return {"sampler": sampler, "steps": steps}
    choice = {
        "sampler": sampler,
        "steps": DEFAULT_SOLVER_STEPS if steps is None else steps,
        "order": DEFAULT_SOLVER_ORDER if args.solver_order is None else args.solver_order,
        "solver_type": DEFAULT_SOLVER_TYPES[sampler] if args.solver_type is None else args.solver_type,
        "spacing": args.solver_spacing,
        "final": args.solver_final,
    }
    method_class = SOLVERS[sampler]
    if choice["solver_type"] not in method_class.solver_types:
        raise ValueError(f"--solver_type {choice['solver_type']} is not a {method_class.name} type: use "
                         f"{' or '.join(method_class.solver_types)} with --sampler {sampler}")
    fixed = _fixed_step_count(args.solver_spacing)
    if fixed is not None and steps is not None and fixed != steps:
        raise ValueError(f"--solver_spacing {args.solver_spacing} has {fixed} timesteps but "
                         f"--sampler_steps is {steps}: give one of them, or make them agree")
    if fixed is not None:
        choice["steps"] = fixed
    plan = _plan(args, choice)  # checks the timesteps (range, repeats, order, sigma_min)
    choice["timesteps"] = [int(t) for t in plan.levels.timesteps]
    return choice


def validate_solver_args(args):
    """Check the sampler flags before anything is built or written (ValueError, one line)."""
    resolve_sampler(args)


def sampling_loop(diffusion, args, progressive=False):
    """The loop a batch runs, called like ``diffusion.p_sample_loop`` (model, shape, noise=,
    clip_denoised=, model_kwargs=, cond_fn=, device=, progress=, guidance=); with
    ``progressive`` the ``..._progressive`` form that yields every step's outputs.

    ``diffusion`` is the one built from the flags (respaced by --timestep_respacing): DDPM and
    DDIM use it; DDIM with --sampler_steps N and the solvers use a diffusion built from the same
    flags (ddimN, or the model's full schedule).
    """
    suffix = "_progressive" if progressive else ""
    choice = resolve_sampler(args)
    sampler = choice["sampler"]
    if sampler == "ddpm":
        return getattr(diffusion, "p_sample_loop" + suffix)
    if sampler == "ddim":
        if choice["steps"] is not None:
            diffusion = _diffusion(_diffusion_flags(args), f"ddim{choice['steps']}")
        return getattr(diffusion, "ddim_sample_loop" + suffix)
    base = _diffusion(_diffusion_flags(args), "")
    name = "dpm_solver_sample_loop" if sampler == "dpm++" else "unipc_sample_loop"
    return functools.partial(getattr(base, name + suffix), steps=choice["steps"], order=choice["order"],
                             solver_type=choice["solver_type"], spacing=choice["spacing"],
                             final=choice["final"])


def describe_sampler(args):
    """One line for the run's log, e.g. 'sampler: dpm++ (order 2, midpoint), 20 steps at
    timesteps 999, 949, ..., 50; final zero'."""
    choice = resolve_sampler(args)
    sampler = choice["sampler"]
    if sampler == "ddpm":
        return f"sampler: ddpm, timestep respacing {args.timestep_respacing or 'none'}"
    if sampler == "ddim":
        if choice["steps"] is None:
            return f"sampler: ddim (eta 0), timestep respacing {args.timestep_respacing or 'none'}"
        return f"sampler: ddim (eta 0), {choice['steps']} steps (ddim{choice['steps']})"
    ts = choice["timesteps"]
    shown = ", ".join(map(str, ts)) if len(ts) <= 6 else f"{ts[0]}, {ts[1]}, ..., {ts[-1]}"
    return (f"sampler: {sampler} (order {choice['order']}, {choice['solver_type']}), "
            f"{len(ts)} steps at timesteps {shown}; final {choice['final']}")


# ----------------------------------------------------------------------------- helpers


def _check_spacing_form(spacing):
    """Syntax of --solver_spacing when no solver reads it (the count is checked by the solvers)."""
    if spacing in SPACINGS or spacing == "ddim" or _fixed_step_count(spacing) is not None:
        return
    raise ValueError(f"unknown --solver_spacing {spacing!r}: use {', '.join(SPACINGS)}, ddim, ddimN "
                     "or a comma-separated list of timesteps")


def _fixed_step_count(spacing):
    """The step count a spacing fixes itself ("ddimN", an explicit list), else None."""
    if spacing.startswith("ddim") and spacing[4:].isdigit():
        return int(spacing[4:])
    items = [s for s in spacing.replace(" ", "").split(",") if s]
    if items and all(s.lstrip("-").isdigit() for s in items):
        return len(items)
    return None


def _diffusion_flags(args):
    return dict(steps=args.diffusion_steps, learn_sigma=args.learn_sigma, noise_schedule=args.noise_schedule,
                use_kl=args.use_kl, predict_xstart=args.predict_xstart, rescale_timesteps=args.rescale_timesteps,
                rescale_learned_sigmas=args.rescale_learned_sigmas)


def _diffusion(flags, timestep_respacing):
    return _cached_diffusion(tuple(sorted(flags.items())), timestep_respacing)


@functools.lru_cache(maxsize=8)
def _cached_diffusion(flag_items, timestep_respacing):
    from .script_util import create_gaussian_diffusion

    return create_gaussian_diffusion(**dict(flag_items), timestep_respacing=timestep_respacing)


def _ddim_timesteps_exist(args, steps):
    from .respace import space_timesteps

    try:
        space_timesteps(args.diffusion_steps, f"ddim{steps}")
    except ValueError as exc:
        raise ValueError(f"--sampler ddim --sampler_steps {steps}: {exc}; choose another step count") from None


def _plan(args, choice):
    try:
        base = _diffusion(_diffusion_flags(args), "")
    except (ValueError, NotImplementedError, AssertionError) as exc:
        raise ValueError(f"invalid diffusion flags: {exc}") from None
    method = SOLVERS[choice["sampler"]](choice["order"], choice["solver_type"])
    try:
        return SolverPlan.build(base, method, choice["steps"], choice["spacing"], choice["final"])
    except ValueError as exc:
        raise ValueError(f"--sampler {choice['sampler']}: {exc}") from None

