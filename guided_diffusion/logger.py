"""Key/value and text logging with OpenAI's ``logger`` API (baselines-style).

``configure(dir, format_strs)`` picks the output directory (``dir`` > ``$OPENAI_LOGDIR`` > a new
folder under the temp dir) and the outputs: ``stdout`` (a table per ``dumpkvs``), ``log``
(``log.txt``), ``csv`` (``progress.csv``) and ``json`` (``progress.json``). Rank 0 defaults to
``$OPENAI_LOG_FORMAT`` or ``stdout,log,csv``; other MPI ranks default to
``$OPENAI_LOG_FORMAT_MPI`` or ``log`` and write to files with a ``-rankNNN`` suffix.
"""

import contextlib
import csv
import datetime
import json
import os
import sys
import tempfile
import time
from collections import defaultdict

DEBUG, INFO, WARN, ERROR, DISABLED = 10, 20, 30, 40, 50


class KVWriter:
    def writekvs(self, kvs):
        raise NotImplementedError


class SeqWriter:
    def writeseq(self, seq):
        raise NotImplementedError


def _fmt(v):
    return "%-8.3g" % v if hasattr(v, "__float__") and not isinstance(v, (int, bool)) else str(v)


class HumanOutputFormat(KVWriter, SeqWriter):
    """A ``| key | value |`` table per dump, plain lines for ``log``; to a path or a stream."""

    def __init__(self, target):
        self.own = isinstance(target, str)
        self.file = open(target, "a") if self.own else target

    def writekvs(self, kvs):
        rows = [(k[:30] + ("..." if len(k) > 30 else ""), _fmt(v)[:30]) for k, v in sorted(kvs.items())]
        if not rows:
            return
        kw, vw = max(len(k) for k, _ in rows), max(len(v) for _, v in rows)
        dashes = "-" * (kw + vw + 7)
        lines = [dashes] + ["| %s | %s |" % (k.ljust(kw), v.ljust(vw)) for k, v in rows] + [dashes]
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()

    def writeseq(self, seq):
        self.file.write(" ".join(str(s) for s in seq) + "\n")
        self.file.flush()

    def close(self):
        if self.own:
            self.file.close()


class JSONOutputFormat(KVWriter):
    def __init__(self, path):
        self.file = open(path, "a")

    def writekvs(self, kvs):
        clean = {k: (float(v) if hasattr(v, "dtype") else v) for k, v in kvs.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


class CSVOutputFormat(KVWriter):
    """CSV whose header grows when new keys appear (the file is rewritten with empty cells).
    An existing file is continued (a resumed run logging into the same folder appends)."""

    def __init__(self, path):
        self.path, self.keys = path, []
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path) as f:
                self.keys = next(csv.reader(f), [])
        else:
            open(path, "w").close()

    def writekvs(self, kvs):
        new = [k for k in sorted(kvs) if k not in self.keys]
        if new:
            self.keys += new
            with open(self.path) as f:
                old = list(csv.reader(f))[1:]
            with open(self.path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(self.keys)
                w.writerows(r + [""] * (len(self.keys) - len(r)) for r in old)
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([kvs.get(k, "") for k in self.keys])

    def close(self):
        pass


def make_output_format(fmt, ev_dir, log_suffix=""):
    os.makedirs(ev_dir, exist_ok=True)
    if fmt == "stdout":
        return HumanOutputFormat(sys.stdout)
    if fmt == "log":
        return HumanOutputFormat(os.path.join(ev_dir, "log%s.txt" % log_suffix))
    if fmt == "json":
        return JSONOutputFormat(os.path.join(ev_dir, "progress%s.json" % log_suffix))
    if fmt == "csv":
        return CSVOutputFormat(os.path.join(ev_dir, "progress%s.csv" % log_suffix))
    raise ValueError("Unknown format specified: %s" % (fmt,))


class Logger:
    """Accumulates values between dumps; ``logkv_mean`` values are averaged (over MPI ranks too
    when a ``comm`` is given, weighted by how many values each rank logged)."""

    CURRENT = None

    def __init__(self, dir, output_formats, comm=None):
        self.name2val = defaultdict(float)
        self.name2cnt = defaultdict(int)
        self.level = INFO
        self.dir = dir
        self.output_formats = output_formats
        self.comm = comm

    def logkv(self, key, val):
        self.name2val[key] = val

    def logkv_mean(self, key, val):
        n = self.name2cnt[key]
        self.name2val[key] = (self.name2val[key] * n + float(val)) / (n + 1)
        self.name2cnt[key] = n + 1

    def dumpkvs(self):
        d = dict(self.name2val)
        if self.comm is not None:
            d = _mpi_weighted_mean(self.comm, {k: (v, self.name2cnt.get(k, 1)) for k, v in d.items()})
            if self.comm.rank != 0:
                d["dummy"] = 1  # non-zero ranks write nothing meaningful
        for fmt in self.output_formats:
            if isinstance(fmt, KVWriter):
                fmt.writekvs(d)
        self.name2val.clear()
        self.name2cnt.clear()
        return d

    def log(self, *args, level=INFO):
        if self.level <= level:
            for fmt in self.output_formats:
                if isinstance(fmt, SeqWriter):
                    fmt.writeseq(args)

    def set_level(self, level):
        self.level = level

    def set_comm(self, comm):
        self.comm = comm

    def get_dir(self):
        return self.dir

    def close(self):
        for fmt in self.output_formats:
            fmt.close()


def _mpi_weighted_mean(comm, name2valcount):
    all_items = comm.gather(name2valcount)
    if comm.rank != 0:
        return {}
    sums, counts = defaultdict(float), defaultdict(float)
    for items in all_items:
        for k, (v, c) in items.items():
            try:
                sums[k] += float(v) * c
                counts[k] += c
            except (TypeError, ValueError):
                pass
    return {k: sums[k] / counts[k] for k in sums}


def get_rank_without_mpi_import():
    """The rank from the launcher's environment (mpiexec, torchrun, srun; 0 without one)."""
    from .dist_util import env_rank

    return env_rank()


def configure(dir=None, format_strs=None, comm=None, log_suffix=""):
    """Start logging into ``dir`` (see the module docstring for the defaults)."""
    if dir is None:
        dir = os.getenv("OPENAI_LOGDIR")
    if dir is None:
        stamp = datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f")
        dir = os.path.join(tempfile.gettempdir(), stamp)
    dir = os.path.expanduser(dir)
    os.makedirs(dir, exist_ok=True)
    rank = get_rank_without_mpi_import()
    if rank > 0:
        log_suffix = log_suffix + "-rank%03i" % rank
    if format_strs is None:
        env = "OPENAI_LOG_FORMAT" if rank == 0 else "OPENAI_LOG_FORMAT_MPI"
        format_strs = os.getenv(env, "stdout,log,csv" if rank == 0 else "log").split(",")
    formats = [make_output_format(f, dir, log_suffix) for f in format_strs if f]
    Logger.CURRENT = Logger(dir=dir, output_formats=formats, comm=comm)
    if formats:
        log("Logging to %s" % dir)


def get_current():
    if Logger.CURRENT is None:
        Logger.CURRENT = _DEFAULT
    return Logger.CURRENT


def logkv(key, val):
    """Record a value for this iteration (the last call before ``dumpkvs`` wins)."""
    get_current().logkv(key, val)


def logkv_mean(key, val):
    """Record a value to be averaged with the other values of this iteration."""
    get_current().logkv_mean(key, val)


def logkvs(d):
    for k, v in d.items():
        logkv(k, v)


def dumpkvs():
    """Write all recorded values to the key/value outputs and clear them."""
    return get_current().dumpkvs()


def getkvs():
    return get_current().name2val


def log(*args, level=INFO):
    """Write a line (the args joined by spaces) to the text outputs."""
    get_current().log(*args, level=level)


def debug(*args):
    log(*args, level=DEBUG)


def info(*args):
    log(*args, level=INFO)


def warn(*args):
    log(*args, level=WARN)


def error(*args):
    log(*args, level=ERROR)


def set_level(level):
    get_current().set_level(level)


def set_comm(comm):
    get_current().set_comm(comm)


def get_dir():
    """The logging directory (checkpoints are written here), or None before ``configure``."""
    return get_current().get_dir()


record_tabular = logkv
dump_tabular = dumpkvs


@contextlib.contextmanager
def profile_kv(scopename):
    """Add the time spent in the block to ``wait_<scopename>``."""
    key = "wait_" + scopename
    start = time.time()
    try:
        yield
    finally:
        get_current().name2val[key] += time.time() - start


def reset():
    if Logger.CURRENT is not _DEFAULT:
        Logger.CURRENT.close()
        Logger.CURRENT = _DEFAULT
        log("Reset logger")


@contextlib.contextmanager
def scoped_configure(dir=None, format_strs=None, comm=None):
    """Log into ``dir`` inside the block, then restore the previous logger."""
    prev = Logger.CURRENT
    configure(dir=dir, format_strs=format_strs, comm=comm)
    try:
        yield
    finally:
        Logger.CURRENT.close()
        Logger.CURRENT = prev


_DEFAULT = Logger(dir=None, output_formats=[HumanOutputFormat(sys.stdout)])
