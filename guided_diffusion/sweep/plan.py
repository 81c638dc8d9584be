"""From a base command and grid points to validated sampling command lines.

The sampling scripts are used as black boxes: their own argument parser (imported from wherever
it currently lives) checks every point's full command line before anything is sampled, so any
flag the scripts gain (other guidances, solvers, list- or JSON-valued flags) is sweepable.
"""

import argparse
import difflib
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KINDS = ("image", "classifier")
# Flags the sweep sets itself for every point (where the scripts have them).
OWNED = ("output_dir", "results_root_dir", "results_dir")
# Flags that change nothing in the samples (not part of a point's identity).
HARMLESS = ("output_dir", "progress", "step_progress", "save_grid", "results_root_dir", "results_dir")
PRESET_VARIABLES = ("SAG_FLAGS", "MODEL_FLAGS", "CLASSIFIER_FLAGS", "MODEL_PATH", "SAMPLE_FLAGS")


class PlanError(ValueError):
    """A base command, grid or flag value the sampling scripts would reject (one line)."""


# ----------------------------------------------------------------------------- the scripts' flags


def _flag_module():
    """The module holding the sampling scripts' ``create_argparser`` (it is moving)."""
    try:
        from guided_diffusion import sample_flags as module
    except ImportError:
        module = None
    if module is None or not hasattr(module, "create_argparser"):
        from guided_diffusion import sampling as module
    return module


def sampling_parser(kind):
    """The sampling script's parser, raising PlanError instead of printing usage and exiting."""
    parser = _flag_module().create_argparser(kind)

    def error(message):
        raise PlanError(message)

    parser.error = error
    return parser


def _validator():
    """The scripts' own value checks beyond argparse (``validate_args``), if they have them."""
    for name in ("sample_flags", "sampling"):
        try:
            module = __import__(f"guided_diffusion.{name}", fromlist=["validate_args"])
        except ImportError:
            continue
        if hasattr(module, "validate_args"):
            return module.validate_args, getattr(module, "UsageError", ValueError)
    return None, ValueError


def flag_action(parser, key):
    return parser._option_string_actions.get(f"--{key}")


def takes_list(action):
    return action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)


# ----------------------------------------------------------------------------- base command


@dataclass
class Base:
    """The command every point starts from: a script kind and its flags."""

    kind: str
    argv: list
    source: str  # e.g. "preset digits" or "classifier_sample.py"


def read_preset(preset):
    """``(kind, flags)`` of a ``configs/*.sh`` preset: its variables, word-split as the preset does."""
    path = preset if os.path.sep in preset or preset.endswith(".sh") else os.path.join(REPO, "configs", f"{preset}.sh")
    if not os.path.isfile(path):
        names = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
                       if f.endswith(".sh") and not f.startswith("_"))
        raise PlanError(f"--preset {preset}: no such preset; choose one of {', '.join(names)} or give a path")
    with open(path) as f:
        match = re.search(r"run_preset\s+(\w+)_sample\.py", f.read())
    if not match or match.group(1) not in KINDS:
        raise PlanError(f"--preset {preset}: {path} does not call run_preset image_sample.py/classifier_sample.py")
    # Sourcing (with $0 != the preset) only sets and exports the variables; see configs/_run.sh.
    script = 'source "$1" >/dev/null || exit 3; printf "%s\\0" ' + " ".join(f'"${{{v}:-}}"' for v in PRESET_VARIABLES)
    proc = subprocess.run(["bash", "-c", script, "sweep", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PlanError(f"--preset {preset}: sourcing {path} failed: {proc.stderr.strip()[:200]}")
    values = dict(zip(PRESET_VARIABLES, proc.stdout.split("\0")))
    argv = (values["SAG_FLAGS"].split() + values["MODEL_FLAGS"].split() + values["CLASSIFIER_FLAGS"].split()
            + (["--model_path", values["MODEL_PATH"]] if values["MODEL_PATH"] else []) + values["SAMPLE_FLAGS"].split())
    return match.group(1), argv


def make_base(preset, script, extra_argv):
    """The base command from ``--preset`` and/or ``--script`` plus the flags after ``--``."""
    if preset:
        kind, argv = read_preset(preset)
        source = f"preset {os.path.basename(preset)[:-3] if preset.endswith('.sh') else preset}"
        if script and script != kind:
            raise PlanError(f"--script {script} contradicts --preset {preset}, which runs {kind}_sample.py")
    elif script:
        kind, argv, source = script, [], f"{script}_sample.py"
    else:
        raise PlanError("no base command: give --preset NAME (configs/NAME.sh) or --script image|classifier")
    for token in extra_argv:
        key = token[2:].split("=", 1)[0] if token.startswith("--") else None
        if key in OWNED:
            raise PlanError(f"base command: --{key} is set by the sweep (each point samples into "
                            "OUT/points/<name>); drop it and choose the sweep's folder with --out")
        if key == "seed":
            raise PlanError("base command: give the seed with the sweep's own --seed (before --); "
                            "every point uses it unless the grid sweeps seed")
    return Base(kind, argv + list(extra_argv), source)


# ----------------------------------------------------------------------------- values and names


def scalar_token(value):
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        return "inf" if value == math.inf else "-inf" if value == -math.inf else repr(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    if value is None:
        raise PlanError("a grid value is empty (null)")
    return str(value)


def value_tokens(key, action, value):
    """Command-line tokens after ``--key`` for one grid value (lists for list-valued flags)."""
    if action.nargs == 0:  # store_true / store_false style switches
        if not isinstance(value, bool) and str(value).lower() not in ("true", "false"):
            raise PlanError(f"--{key} is a switch: its grid values must be true or false, got {value!r}")
        on = value if isinstance(value, bool) else str(value).lower() == "true"
        return [f"--{key}"] if on else []
    if takes_list(action):
        if isinstance(value, (list, tuple)):
            tokens = [scalar_token(v) for v in value]
        elif isinstance(value, str):
            tokens = shlex.split(value)
        else:
            tokens = [scalar_token(value)]
        if not tokens and action.nargs == "+":
            raise PlanError(f"--{key}: a grid value is an empty list")
        return [f"--{key}", *tokens]
    return [f"--{key}", scalar_token(value)]


def format_value(value):
    """Compact text of a parsed flag value (names, labels, tables)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "+".join(format_value(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _safe(text):
    return re.sub(r"[^A-Za-z0-9._+=-]", "-", text)


def point_name(settings, identity):
    """Directory name from the settings: ``key=value__key2=value2`` (a hash is appended when the
    text had to be changed to be a safe file name, or is very long)."""
    if not settings:
        return "base"
    text = "__".join(f"{k}={format_value(v)}" for k, v in settings.items())
    safe = _safe(text)
    if safe != text or len(safe) > 120:
        safe = f"{safe[:100]}-{identity[:8]}"
    return safe


# ----------------------------------------------------------------------------- points


@dataclass(eq=False)
class Point:
    name: str
    settings: dict  # swept key -> parsed value (the grid's keys, in grid order)
    tokens: list  # the point's own flags
    args: argparse.Namespace
    identity: str
    base_argv: list = field(default_factory=list)
    baseline: bool = False
    dir: str = ""
    aliases: list = field(default_factory=list)

    @property
    def label(self):
        return ", ".join(f"{k}={format_value(v)}" for k, v in self.settings.items()) or "base command"


def identity_of(args, ignore=()):
    """Hash of everything that changes the samples (what the scripts compare on resume)."""
    record = {k: v for k, v in sorted(vars(args).items()) if k not in HARMLESS and k not in ignore}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Planner:
    """Parses the base command once and every point's full command line with the script's parser."""

    def __init__(self, base, seed):
        self.base, self.seed = base, seed
        self.parser = sampling_parser(base.kind)
        self.validate, self.usage_error = _validator()
        self.base_args = self.parse(base.argv, "base command")

    @property
    def script(self):
        return f"{self.base.kind}_sample.py"

    def defaults(self):
        """Every flag's default value (dest -> value)."""
        return {a.dest: a.default for a in self.parser._actions if a.option_strings and a.dest != "help"}

    def parse(self, tokens, what):
        argv = list(tokens)
        if "--seed" not in argv:
            argv += ["--seed", str(self.seed)]
        try:
            args = self.parser.parse_args(argv)
        except PlanError as exc:
            raise PlanError(f"{what}: {self.script} rejects it: {exc}")
        if self.validate is not None:
            try:
                self.validate(args)
            except self.usage_error as exc:
                raise PlanError(f"{what}: {self.script} rejects it: {exc}")
        return args

    def check_key(self, key):
        action = flag_action(self.parser, key)
        if action is None or not action.option_strings:
            flags = [a.dest for a in self.parser._actions if a.option_strings and a.dest != "help"]
            near = difflib.get_close_matches(key, flags, n=1)
            hint = f" (did you mean {near[0]}?)" if near else f"; see python scripts/{self.script} --help"
            raise PlanError(f"grid key '{key}' is not a flag of {self.script}{hint}")
        if key in OWNED:
            raise PlanError(f"grid key '{key}': the sweep sets --{key} for each point; it cannot be swept")
        return action

    def tokens(self, point):
        tokens = []
        for key, value in point.items():
            tokens += value_tokens(key, self.check_key(key), value)
        return tokens

    def values(self, args, keys):
        """Parsed values of the flags ``keys`` (grid keys are flag names, not always dests)."""
        return {k: getattr(args, flag_action(self.parser, k).dest) for k in keys}

    def point(self, raw, what):
        """A Point from a grid point ``{key: value}``, named after its own settings."""
        tokens = self.tokens(raw)
        shown = " ".join(shlex.quote(t) for t in tokens)
        args = self.parse(self.base.argv + tokens, f"{what} ({shown})")
        identity = identity_of(args)
        return Point(point_name(self.values(args, raw), identity), {}, tokens, args, identity,
                     list(self.base.argv))

    def plan(self, raw_points, baseline=None):
        """``(everyone, grid points, baseline point, swept keys)``: validated, de-duplicated points
        in grid order; the baseline is one of them or a point of its own (first in ``everyone``),
        or None when not wanted. Points equal to the baseline but for the seed are marked
        ``baseline`` too (its repeats).

        Every key is checked before any value, so a misspelt flag is reported as such."""
        for raw in list(raw_points) + ([baseline] if baseline else []):
            for key in raw:
                self.check_key(key)
        swept = list(dict.fromkeys(k for raw in raw_points for k in raw))
        points, by_identity = [], {}
        for i, raw in enumerate(raw_points):
            p = self.point(raw, f"grid point {i + 1} of {len(raw_points)}")
            if p.identity in by_identity:
                by_identity[p.identity].aliases.append(p.name)
                continue
            by_identity[p.identity] = p
            points.append(p)
        everyone = list(points)
        base_point = None
        if baseline is not None:
            b = self.point(baseline, "baseline (--baseline)")
            base_point = by_identity.get(b.identity)
            if base_point is None:
                b.name = f"baseline__{b.name}"
                base_point = b
                everyone.insert(0, b)
            # The baseline and its repeats with other seeds.
            same = identity_of(base_point.args, ignore=("seed",))
            for p in everyone:
                p.baseline = identity_of(p.args, ignore=("seed",)) == same
        names = [p.name for p in everyone]
        for p in everyone:
            # Every point shows every swept key (union grids leave some at the base's value).
            p.settings = self.values(p.args, swept)
            if names.count(p.name) > 1:  # distinct runs whose settings read alike
                p.name = f"{p.name}-{p.identity[:8]}"
        return everyone, points, base_point, swept


def parse_baseline(items):
    """``--baseline key=value`` items -> ``{key: value}`` (one value each)."""
    from .grid import GridError, parse_cli_axis

    out = {}
    for item in items:
        try:
            key, values = parse_cli_axis(item)
        except GridError as exc:
            raise PlanError(str(exc).replace("--grid", "--baseline"))
        if len(values) != 1:
            raise PlanError(f"--baseline {item!r}: one value per key")
        out[key] = values[0]
    return out

