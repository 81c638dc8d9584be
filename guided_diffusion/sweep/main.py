"""``scripts/sweep.py``: command line and orchestration (plan, sample, evaluate, report, plot)."""

import argparse
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass

from .execute import (SweepError, SweepFolder, evaluate, finished_samples, read_first_images,
                      sample_command, sample_points)
from .derived import DERIVED, derive
from .grid import GridError, grid_points, load_grid_file
from .plan import PlanError, Planner, make_base, parse_baseline
from .report import point_rows, write_reports

EXAMPLE = """examples:
  python scripts/sweep.py --preset digits --out runs/sweep --ref datasets/digits32.npz \\
      --features classifier --grid guide_scale=1.5,2,3 --grid blur_sigma=1,3 -- --num_samples 64
  python scripts/sweep.py --script image --grid_file grid.yaml --out runs/lsun --ref REF.npz \\
      --nproc 8 -- --model_path models/lsun_cat.pt ...      (sampling flags go after --)
  ... --dry_run      print each point's sampling command (e.g. for cluster array jobs)
  ... --evaluate_only   evaluate and tabulate the points that exist
"""


def parse_args(argv):
    if "--" in argv:
        cut = argv.index("--")
        own, base = argv[:cut], argv[cut + 1:]
    else:
        own, base = argv, []
    p = argparse.ArgumentParser(
        prog="sweep.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLE,
        description="Sample every point of a grid of sampling-script flags into its own folder "
        "(resumable, same seed everywhere), evaluate all of them in one evaluator run, and write "
        "sweep.csv / sweep.json / sweep.md and figures. Sampling flags of the base command go after --.")
    g = p.add_argument_group("what to sweep")
    g.add_argument("--preset", default="", help="base command from configs/NAME.sh (or a path to a preset)")
    g.add_argument("--script", choices=("image", "classifier"), default="",
                   help="sampling script when no preset is given (image_sample.py / classifier_sample.py)")
    g.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="one axis (repeat for a product); values split at commas outside brackets/quotes")
    g.add_argument("--grid_file", default="", help="YAML/JSON grid with product, zip, union and nested axes "
                   "(docs/sweeps.md); combined with --grid as a product")
    g.add_argument("--baseline", action="append", default=None, metavar="KEY=VALUE",
                   help="flags of the unguided baseline point (default: guide_scale=1.0); repeatable")
    g.add_argument("--no_baseline", action="store_true", help="no baseline point")
    g.add_argument("--seed", type=int, default=0, help="--seed of every point (unless the grid sweeps seed)")
    r = p.add_argument_group("how to run")
    r.add_argument("--out", default="", help="sweep folder (required): points/, logs/, tables, figures")
    r.add_argument("--nproc", type=int, default=1, help="sample each point under mpiexec -n NPROC")
    r.add_argument("--mpiexec", default="", help="mpiexec to use (default: beside python, else on PATH)")
    r.add_argument("--keep_going", action="store_true", help="continue with the next point when one fails")
    r.add_argument("--dry_run", action="store_true", help="print each point's sampling command; run nothing")
    r.add_argument("--evaluate_only", action="store_true", help="sample nothing; evaluate what is finished")
    e = p.add_argument_group("evaluation and output")
    e.add_argument("--ref", default="", help="reference batch (.npz) for evaluations/evaluator.py")
    e.add_argument("--features", choices=("inception", "classifier"), default="inception",
                   help="classifier: the base command's classifier as feature network (bundled digits model)")
    e.add_argument("--eval_flags", default="", help="extra evaluator flags, one string (e.g. '--batch_size 256')")
    e.add_argument("--eval_nproc", type=int, default=1, help="run the evaluator under mpiexec -n N")
    e.add_argument("--metrics", default="", help="metrics in the figures, e.g. fid,precision,recall (default: all)")
    e.add_argument("--sheet_images", type=int, default=8, help="samples per row of the sample sheet (0: none)")
    e.add_argument("--no_figures", action="store_true", help="tables only")
    e.add_argument("--x_axis", action="append", default=[], choices=sorted(DERIVED),
                   help="also draw fig_<COLUMN>.png: the metrics against a derived column (nfe: UNet "
                   "passes per image), one line per setting of the other swept keys; repeatable")

    def error(message):  # one line, not the usage block
        if message.startswith("unrecognized arguments"):
            message += " (flags of the sampling script go after --)"
        print(f"error: {message}; see python scripts/sweep.py --help", file=sys.stderr)
        sys.exit(2)

    p.error = error
    args = p.parse_args(own)
    if not args.out:
        p.error("--out is required (the sweep folder)")
    return args, base


def find_mpiexec(given):
    if given:
        return given
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


def evaluator_flags(args, planner):
    flags = shlex.split(args.eval_flags)
    if args.features == "classifier":
        b = planner.base_args
        if not getattr(b, "classifier_path", ""):
            raise PlanError("--features classifier takes the classifier from the base command, which has no "
                            "--classifier_path; add it (classifier_sample.py) or pass --eval_flags")
        from guided_diffusion.script_util import classifier_defaults

        flags = ["--features", "classifier", "--classifier_path", b.classifier_path] + [
            tok for k in classifier_defaults() if hasattr(b, k) for tok in (f"--{k}", str(getattr(b, k)))] + flags
    return flags


def _features(flags):
    return flags[flags.index("--features") + 1] if "--features" in flags[:-1] else "inception"


@dataclass
class Sweep:
    """Everything decided before anything runs."""

    planner: Planner
    points: list  # every point to sample, the baseline first when it is a point of its own
    baseline: object  # the baseline Point, or None
    swept: list  # the grid's keys
    eval_flags: list
    mpiexec: str
    metrics: list  # metrics in the figures (empty: all)
    folder: SweepFolder

    @property
    def kind(self):
        return self.planner.base.kind

    def command(self, point, args):
        return sample_command(point, self.kind, args.nproc, self.mpiexec or "mpiexec")


def plan_sweep(args, base_argv):
    """Check everything (raises PlanError/GridError on bad input) without writing anything."""
    if args.nproc < 1 or args.eval_nproc < 1:
        raise PlanError("--nproc and --eval_nproc must be at least 1")
    file_node, file_base = load_grid_file(args.grid_file) if args.grid_file else (None, [])
    planner = Planner(make_base(args.preset, args.script, file_base + base_argv), args.seed)
    raw = grid_points(args.grid, file_node, os.path.basename(args.grid_file))
    baseline = None if args.no_baseline else parse_baseline(args.baseline or ["guide_scale=1.0"])
    everyone, _, base_point, swept = planner.plan(raw, baseline)
    eval_flags = evaluator_flags(args, planner)
    if not args.dry_run and not args.ref:
        raise PlanError("--ref REF.npz is required (the reference batch every point is evaluated against)")
    if args.ref and not os.path.isfile(args.ref):
        raise PlanError(f"--ref {args.ref}: no such file")
    mpiexec = None
    if args.nproc > 1 or args.eval_nproc > 1:
        mpiexec = find_mpiexec(args.mpiexec)
        if not mpiexec:
            raise PlanError("--nproc/--eval_nproc > 1 needs mpiexec (pip install mpich) or --mpiexec PATH")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    folder = SweepFolder(args.out)
    folder.check_base(planner.base.kind, planner.base_args, planner.defaults(),
                      write=not (args.dry_run or args.evaluate_only))
    folder.assign_dirs(everyone)
    return Sweep(planner, everyone, base_point, swept, eval_flags, mpiexec, metrics, folder)


def main(argv=None):
    args, base_argv = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        sweep = plan_sweep(args, base_argv)
        if args.dry_run:
            return dry_run(args, sweep)
        status = {}
        if not args.evaluate_only:
            print(f"sweep: {len(sweep.points)} point(s) of {sweep.planner.script} ({sweep.planner.base.source}), "
                  f"{sweep.planner.base_args.num_samples} samples each, seed {args.seed}"
                  f"{f', mpiexec -n {args.nproc}' if args.nproc > 1 else ''}; folder {sweep.folder.out}", flush=True)
            status = sample_points(sweep.points, sweep.kind, sweep.folder, args.nproc, sweep.mpiexec, args.keep_going)
        return finish(args, sweep, status)
    except (PlanError, GridError, SweepError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume (finished points are kept)",
              file=sys.stderr, flush=True)
        return 130


def dry_run(args, sweep):
    for p in sweep.points:
        print(f"# {p.name} ({'finished' if finished_samples(p) else 'to sample'})", file=sys.stderr, flush=True)
        print(shlex.join(sweep.command(p, args)), flush=True)
    print(f"# {len(sweep.points)} point(s); once they are sampled (in any order, on any machine sharing "
          f"{sweep.folder.out}), the same sweep command with --evaluate_only writes the tables and figures",
          file=sys.stderr)
    return 0


def finish(args, sweep, status):
    """Evaluate the finished points (one evaluator run for the new ones), write tables and figures."""
    done = [p for p in sweep.points if finished_samples(p)]
    missing = [p for p in sweep.points if p not in done]
    if missing:
        print(f"{len(missing)} point(s) without finished samples, left out: "
              + ", ".join(p.name for p in missing[:6]) + (" ..." if len(missing) > 6 else ""), flush=True)
    if not done:
        raise SweepError("no point has finished samples yet; run the sweep without --evaluate_only first")
    files = {p.name: finished_samples(p) for p in done}
    by_file = evaluate(list(files.values()), args.ref, sweep.eval_flags, sweep.folder, args.eval_nproc, sweep.mpiexec)
    results = {name: by_file[f] for name, f in files.items()}
    rows, all_metrics = point_rows(done, results, files, sweep.swept, sweep.folder.out)
    unknown = [m for m in sweep.metrics if m not in all_metrics]
    if unknown:
        raise PlanError(f"--metrics {','.join(unknown)}: not in the evaluator's results ({', '.join(all_metrics)})")
    b = sweep.planner.base_args
    meta = {
        "script": sweep.planner.script, "base": sweep.planner.base.source,
        "model": os.path.splitext(os.path.basename(b.model_path))[0] or "model", "model_path": b.model_path,
        "num_samples": b.num_samples, "image_size": b.image_size, "seed": args.seed,
        "reference": args.ref, "features": _features(sweep.eval_flags), "evaluator_flags": sweep.eval_flags,
        "base_command": sweep.planner.base.argv, "grid": args.grid, "grid_file": args.grid_file,
        "baseline": sweep.baseline.name if sweep.baseline in done else None,
        "baseline_flags": args.baseline or ([] if args.no_baseline else ["guide_scale=1.0"]),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    points_json = [{
        "name": p.name, "label": p.label, "settings": p.settings, "baseline": p.baseline,
        "same_as": p.aliases, "dir": os.path.relpath(p.dir, sweep.folder.out),
        "status": status.get(p.name, "cached"), "derived": derive(p.args), "metrics": {m: results[p.name].get(m) for m in all_metrics},
        "samples": os.path.relpath(files[p.name], sweep.folder.out), "command": shlex.join(sweep.command(p, args)),
    } for p in done]
    paths = write_reports(sweep.folder.out, rows, all_metrics, sweep.swept, meta, points_json)
    if not args.no_figures:
        paths += figures(args, sweep, done, results, sweep.metrics or all_metrics, meta)
    with open(paths[2]) as f:
        print("\n" + f.read())
    print("wrote " + ", ".join(_shown(p) for p in paths), flush=True)
    failed = [name for name, s in status.items() if s == "failed"]
    if failed:
        raise SweepError(f"{len(failed)} point(s) failed: {', '.join(failed)}; see {sweep.folder.logs}")
    return 0


def _shown(path):
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def figures(args, sweep, done, results, metrics, meta):
    """Metric figures and the sample sheet; a line (not an error) when matplotlib is missing."""
    try:
        from .plots import derived_figure, metric_figures, sample_sheet
    except ImportError:
        print("figures skipped: they need matplotlib (pip install matplotlib, or pip install -e '.[sweep]')",
              flush=True)
        return []

    def record(p):
        return {"settings": p.settings, "metrics": results[p.name], "label": p.label, "seed": p.args.seed,
                "derived": derive(p.args)}

    title = (f"{meta['model']} ({meta['script']}), {meta['num_samples']} samples per point, seed {meta['seed']}, "
             f"{meta['features']} features")
    lines = [record(p) for p in done if not p.baseline]
    baseline = [record(p) for p in done if p.baseline]
    label = ", ".join(meta["baseline_flags"])
    paths = metric_figures(sweep.folder.out, lines, sweep.swept, metrics, baseline, label, args.seed, title) if lines else []
    for column in dict.fromkeys(args.x_axis):
        path = derived_figure(sweep.folder.out, column, lines, sweep.swept, metrics, baseline, label, args.seed, title)
        if path is None:
            print(f"fig_{column}.png skipped: no point has a {column} value", flush=True)
        else:
            paths.append(path)
    if args.sheet_images > 0:
        rows = []
        for p in done:
            images, labels = read_first_images(finished_samples(p), args.sheet_images)
            rows.append((p.label + (" (baseline)" if p.baseline else ""), images, labels))
        sheet_title = (f"{meta['model']}: the first {args.sheet_images} samples of each point "
                       f"(same seed {meta['seed']} unless swept)")
        paths.append(sample_sheet(os.path.join(sweep.folder.out, "sample_sheet.png"), rows, sheet_title))
    return paths


if __name__ == "__main__":
    sys.exit(main())
