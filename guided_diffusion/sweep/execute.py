"""Sampling the points of a sweep (resumable) and evaluating them in one evaluator run.

Layout of a sweep folder ``OUT``:

    OUT/points/<name>/        one sampling run directory per point (the scripts' own format)
    OUT/points.json           point identity -> directory (a renamed point keeps its samples)
    OUT/base.json             the base command the folder was made with (a different one is refused)
    OUT/evaluations.json      cached evaluator results per sample file
    OUT/logs/<name>.log       each point's sampling output; evaluate.log, eval-report.json
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np

from .. import durable, run_dir
from .plan import REPO, PlanError

SAMPLE_SCRIPT = os.path.join(REPO, "scripts", "{kind}_sample.py")
EVALUATOR = os.path.join(REPO, "evaluations", "evaluator.py")


class SweepError(RuntimeError):
    """A point or the evaluation failed (reported as one line)."""


# ----------------------------------------------------------------------------- small file helpers


def read_json(path, default):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as exc:
        raise SweepError(f"cannot read {path}: {exc}; move it away to start over")


def write_json(path, data):
    durable.write_text(path, json.dumps(data, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- finished or not


def samples_path(point):
    """Where the sampling script puts a finished run's samples."""
    return os.path.join(point.dir, run_dir.npz_name(point.args.num_samples, point.args.image_size))


def finished_samples(point):
    """The point's final samples file if its run is complete, else None.

    The one place that decides "finished": the final ``.npz`` exists and its ``arr_0`` header says
    ``num_samples`` uint8 images of the right size (the file appears atomically when the run
    ends; a truncated or foreign file does not count, and re-running the script repairs or
    refuses it). Reads the zip directory and the array header, not the images."""
    path = samples_path(point)
    a = point.args
    expected = (a.num_samples, a.image_size, a.image_size, 3)
    try:
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as member:
            version = np.lib.format.read_magic(member)
            shape, fortran, dtype = _read_header(member, version)
            complete = zf.getinfo("arr_0.npy").file_size == member.tell() + int(np.prod(expected))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return path if complete and tuple(shape) == expected and dtype == np.uint8 and not fortran else None


def _read_header(member, version):
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    return np.lib.format.read_array_header_2_0(member)


def read_first_images(path, count):
    """The first ``count`` images (uint8 NHWC) and labels (or None) of a samples file, without
    reading the rest of ``arr_0``."""
    with zipfile.ZipFile(path) as zf:
        with zf.open("arr_0.npy") as member:
            version = np.lib.format.read_magic(member)
            shape, _, dtype = _read_header(member, version)
            count = min(count, shape[0])
            per_image = int(np.prod(shape[1:])) * dtype.itemsize
            images = np.frombuffer(member.read(count * per_image), dtype=dtype).reshape((count,) + tuple(shape[1:]))
        labels = None
        if "arr_1.npy" in zf.namelist():
            with zf.open("arr_1.npy") as member:
                labels = np.lib.format.read_array(member)[:count]
    return images, labels


# ----------------------------------------------------------------------------- the sweep folder


class SweepFolder:
    def __init__(self, out):
        self.out = os.path.abspath(out)
        self.points_dir = os.path.join(self.out, "points")
        self.logs = os.path.join(self.out, "logs")

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def check_base(self, kind, base_args, defaults, write):
        """Refuse a folder made with another base command or seed; record ours (when ``write``).

        Flags the scripts gained since the folder was made count as equal while at their default."""
        mine = {"script": f"{kind}_sample.py",
                "args": {k: v for k, v in sorted(vars(base_args).items()) if k not in ("output_dir",)}}
        mine = json.loads(json.dumps(mine, default=str))
        defaults = json.loads(json.dumps(defaults, default=str))
        theirs = read_json(self.path("base.json"), None)
        if theirs is not None:
            ta, ma = theirs.get("args", {}), mine["args"]
            diff = sorted(k for k in ma if (ta[k] if k in ta else defaults.get(k)) != ma[k])
            if diff or theirs.get("script") != mine["script"]:
                what = ", ".join(f"--{k} {ta.get(k, defaults.get(k))!r} there vs {ma.get(k)!r} now" for k in diff[:3])
                if theirs.get("script") != mine["script"]:
                    what = f"{theirs.get('script')} there vs {mine['script']} now" + (f"; {what}" if what else "")
                raise PlanError(f"{self.out} holds a sweep with another base command or seed ({what}); "
                                "use the same base command and --seed to extend it, or choose another --out")
        if write and theirs is None:
            os.makedirs(self.out, exist_ok=True)
            write_json(self.path("base.json"), mine)

    def assign_dirs(self, points):
        """Each point's directory: the one recorded for its identity, else points/<name>."""
        known = read_json(self.path("points.json"), {})
        for p in points:
            recorded = known.get(p.identity)
            if recorded and os.path.isdir(os.path.join(self.points_dir, recorded)):
                p.dir = os.path.join(self.points_dir, recorded)
            else:
                p.dir = os.path.join(self.points_dir, p.name)

    def record_dir(self, point):
        known = read_json(self.path("points.json"), {})
        known[point.identity] = os.path.basename(point.dir)
        write_json(self.path("points.json"), known)


# ----------------------------------------------------------------------------- sampling


def sample_command(point, kind, nproc=1, mpiexec="mpiexec"):
    """The full command that samples one point."""
    cmd = [sys.executable, SAMPLE_SCRIPT.format(kind=kind), *point_argv(point)]
    return ([mpiexec, "-n", str(nproc)] + cmd) if nproc > 1 else cmd


def point_argv(point):
    """The script's flags for a point: base, the point's own, seed, output folder (last wins)."""
    argv = list(point.base_argv) + list(point.tokens)
    if "--seed" not in point.tokens:
        argv += ["--seed", str(point.args.seed)]
    return argv + ["--output_dir", point.dir, "--progress", "False"]


def _die_with_parent():
    """Linux: the child gets SIGTERM if the sweep dies (even by SIGKILL), so no orphan keeps
    sampling; mpiexec passes it on to its ranks."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def child_env(nproc):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if nproc > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return env


def run_logged(cmd, log_path, env):
    """Run ``cmd`` with its output appended to ``log_path``; returns (exit code, last error line)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                                preexec_fn=_die_with_parent)
        try:
            code = proc.wait()
        except BaseException:
            _stop(proc)
            raise
    return code, last_error_line(log_path)


def _stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def last_error_line(log_path):
    try:
        with open(log_path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error:") or "Error" in line.split(":")[0]]
    return (errors or lines or [""])[-1]


def _duration(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """One line per point (cached / running / done / failed) and an overall ETA."""

    def __init__(self, total, stream=None):
        self.total, self.stream = total, stream or sys.stdout
        self.times = []  # seconds of each point sampled in this run

    def line(self, index, status, point, extra=""):
        text = f"[{index:>{len(str(self.total))}}/{self.total}] {status:<8} {point.name}"
        print(text + (f"  {extra}" if extra else ""), file=self.stream, flush=True)

    def eta(self, left):
        if not self.times or not left:
            return ""
        return f"ETA {_duration(sum(self.times) / len(self.times) * left)} ({left} point(s) left)"


def sample_points(points, kind, folder, nproc=1, mpiexec="mpiexec", keep_going=False, stream=None):
    """Sample every unfinished point in order; returns {name: status}."""
    progress = Progress(len(points), stream)
    todo = [p for p in points if finished_samples(p) is None]
    status = {}
    for i, p in enumerate(points, 1):
        if finished_samples(p) is not None:
            status[p.name] = "cached"
            progress.line(i, "cached", p, "finished earlier, not sampled again")
            continue
        resumed = " (resuming)" if os.path.isdir(p.dir) else ""
        progress.line(i, "running", p, f"{progress.eta(len(todo))}{resumed}".strip())
        os.makedirs(folder.points_dir, exist_ok=True)
        folder.record_dir(p)
        start = time.time()
        log = os.path.join(folder.logs, f"{os.path.basename(p.dir)}.log")
        code, error = run_logged(sample_command(p, kind, nproc, mpiexec), log, child_env(nproc))
        todo.remove(p)
        if code != 0 or finished_samples(p) is None:
            status[p.name] = "failed"
            why = error or f"exit status {code}"
            progress.line(i, "failed", p, f"{why} (log: {log})")
            if not keep_going:
                raise SweepError(f"point {p.name} failed: {why}; full log: {log}")
            continue
        progress.times.append(time.time() - start)
        status[p.name] = "done"
        progress.line(i, "done", p, f"{time.time() - start:.1f}s  {progress.eta(len(todo))}".rstrip())
    return status


# ----------------------------------------------------------------------------- evaluation


def _stamp(path, folder=None):
    """A file's name (relative to the sweep folder when inside it, so a moved sweep keeps its
    cache), size and modification time."""
    st = os.stat(path)
    name = os.path.realpath(path)
    if folder is not None and name.startswith(os.path.realpath(folder.out) + os.sep):
        name = os.path.relpath(name, os.path.realpath(folder.out))
    return [name, st.st_size, st.st_mtime_ns]


def evaluation_key(samples, ref, eval_argv, folder):
    return json.dumps({"samples": _stamp(samples, folder), "ref": _stamp(ref), "flags": list(eval_argv)},
                      sort_keys=True)


def evaluate(files, ref, eval_argv, folder, nproc=1, mpiexec="mpiexec", stream=None):
    """Evaluator results for each samples file, from the cache or from ONE evaluator run over the
    files not evaluated yet (same reference, same flags). Returns {file: row}."""
    stream = stream or sys.stdout
    cache_path = folder.path("evaluations.json")
    cache = read_json(cache_path, {})
    keys = {f: evaluation_key(f, ref, eval_argv, folder) for f in files}
    missing = [f for f in files if keys[f] not in cache]
    cached = len(files) - len(missing)
    if missing:
        print(f"evaluating {len(missing)} sample file(s) in one evaluator run"
              f"{f' ({cached} cached)' if cached else ''} against {ref}", file=stream, flush=True)
        report = folder.path("logs", "eval-report.json")
        if os.path.exists(report):
            os.remove(report)
        cmd = [sys.executable, EVALUATOR, ref, *missing, "--report", report, "--no_progress", *eval_argv]
        if nproc > 1:
            cmd = [mpiexec, "-n", str(nproc)] + cmd
        start = time.time()
        log = folder.path("logs", "evaluate.log")
        code, error = run_logged(cmd, log, child_env(nproc))
        if code != 0 or not os.path.exists(report):
            raise SweepError(f"evaluation failed: {error or f'exit status {code}'}; full log: {log}")
        rows = read_json(report, {}).get("results", [])
        by_path = {os.path.realpath(r.get("sample", "")): r for r in rows}
        for f in missing:
            row = by_path.get(os.path.realpath(f))
            if row is None:
                raise SweepError(f"the evaluator's report {report} has no row for {f}")
            cache[keys[f]] = row
        write_json(cache_path, cache)
        print(f"evaluated in {time.time() - start:.1f}s (log: {log})", file=stream, flush=True)
    else:
        print(f"all {len(files)} evaluation(s) cached", file=stream, flush=True)
    return {f: cache[keys[f]] for f in files}

