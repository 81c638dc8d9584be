"""The on-disk protocol of a sampling run directory: what is in it, who may write it, and when a
run counts as complete.

    DIR/args.json, config.yaml     the run's identity: the arguments that made it
    DIR/run.lock                   the live run's host, pid and start time (one run per directory)
    DIR/shards/batch_{b:06d}.npz   finished global batch b (arr_0 images, arr_1 labels)
    DIR/samples_{N}x{H}x{W}x3.npz  the final file, merged from the shards in global order
    DIR/samples_...npz.sha256      its checksum, recorded at merge (``sha256sum -c`` format)

Every file appears atomically and durably (guided_diffusion/durable.py).  A run counts as
complete only when the final file verifies (readable, ``arr_0`` and ``arr_1`` headers with the
expected dtype and shape, the recorded checksum, or the zip CRCs for files without one); the
shards are removed only after that.  A final file that fails verification is removed with a
warning and rebuilt from the shards, or the missing batches are sampled again.

The lock: a second run on a directory held by a live run is refused with one line naming the
first.  A lock whose process is gone (same host: pid not running, rebooted, or the pid reused by
another process; or an earlier incarnation of the same requeued SLURM job) is taken over with a
warning.  A lock from another host cannot be checked from here: ``--force_unlock`` breaks it.
"""

import datetime
import glob
import hashlib
import json
import os
import socket
import sys
import zipfile
from dataclasses import dataclass

import numpy as np

from . import durable, faults
from .image_io import write_npz_stream

RUN_FILE = "args.json"
CONFIG_FILE = "config.yaml"
LOCK_FILE = "run.lock"
SHARD_DIR = "shards"
# Arguments that change nothing in the samples: a resumed run may use other values.  Any other
# argument (every flag in vars(args)) is part of the run's identity.
HARMLESS_ARGS = ("output_dir", "progress", "step_progress", "save_grid", "force_unlock",
                 # the PAG scripts' device, output-location and picture flags
                 "gpu", "gpu_offset", "results_root_dir", "results_dir", "save_png", "visualize",
                 "seed_everything")


class RunDirError(Exception):
    """A run directory that cannot be used as asked: reported as one line, exit status 1."""


def _stderr(msg):
    print(msg, file=sys.stderr, flush=True)


def default_output_dir():
    """``RESULTS/<UTC %Y_%m_%d-%I%M%S_%p>``, as the original scripts name their runs."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y_%m_%d-%I%M%S_%p")
    return os.path.join("RESULTS", stamp)


def npz_name(num_samples, image_size):
    return f"samples_{num_samples}x{image_size}x{image_size}x3.npz"


@dataclass(frozen=True)
class Layout:
    """Where a run's files live and what its final file must hold."""

    directory: str
    num_samples: int
    batch_size: int
    image_size: int
    with_labels: bool

    @classmethod
    def from_args(cls, args, with_labels):
        return cls(args.output_dir, args.num_samples, args.batch_size, args.image_size, with_labels)

    @property
    def num_batches(self):
        return -(-self.num_samples // self.batch_size)

    @property
    def final_path(self):
        return os.path.join(self.directory, npz_name(self.num_samples, self.image_size))

    @property
    def checksum_path(self):
        return self.final_path + ".sha256"

    @property
    def shard_dir(self):
        return os.path.join(self.directory, SHARD_DIR)

    def shard_path(self, batch):
        return os.path.join(self.shard_dir, f"batch_{batch:06d}.npz")

    def finished_batches(self):
        """Global indices of the batches whose shard exists (shards appear atomically)."""
        return [b for b in range(self.num_batches) if os.path.exists(self.shard_path(b))]

    def missing_batches(self):
        return [b for b in range(self.num_batches) if not os.path.exists(self.shard_path(b))]

    def shard_files(self):
        """Every shard file (and shard temp file, also of older versions) in the shard dir."""
        shards = glob.glob(os.path.join(glob.escape(self.shard_dir), "batch_*"))
        return shards + durable.stale_temps(self.shard_dir)

    def members(self):
        """(name, dtype, shape) of each array the final file holds."""
        size = self.image_size
        out = [("arr_0", np.dtype(np.uint8), (self.num_samples, size, size, 3))]
        if self.with_labels:
            out.append(("arr_1", np.dtype(np.int64), (self.num_samples,)))
        return out


# ----------------------------------------------------------------------------- identity


def _identity(record, ignore_seed):
    ignored = set(HARMLESS_ARGS) | ({"seed"} if ignore_seed else set())
    return {k: v for k, v in record["args"].items() if k not in ignored}, record.get("script")


def check_identity(directory, kind, args):
    """Check that ``directory`` is new or holds this run (script ``kind``, arguments ``args``,
    a dict; ``args["seed"]`` None means "any seed").  Reads only.

    Returns the seed recorded there (None for a new directory).  Raises RunDirError when the
    directory holds another run's arguments or samples of an unknown run.
    """
    run_file = os.path.join(directory, RUN_FILE)
    if not os.path.exists(run_file):
        leftovers = glob.glob(os.path.join(glob.escape(directory), "samples_*.npz")) + glob.glob(
            os.path.join(glob.escape(directory), SHARD_DIR, "batch_*.npz"))
        if leftovers:
            raise RunDirError(f"output dir {directory} holds samples of an unknown run (no {RUN_FILE}); "
                              "choose another --output_dir")
        return None
    try:
        with open(run_file) as f:
            stored = json.load(f)
        stored_seed = stored["args"].get("seed")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RunDirError(f"cannot read {run_file}: {exc}; choose another --output_dir")
    any_seed = args.get("seed") is None
    mine, theirs = _identity({"script": kind, "args": args}, any_seed), _identity(stored, any_seed)
    if mine != theirs:
        a, b = mine[0], theirs[0]
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        what = ", ".join(f"--{k} {b.get(k)!r} there vs {a.get(k)!r} now" for k in diff[:3])
        if stored.get("script") != kind:
            what = f"it was made by {stored.get('script')}_sample.py" + (f"; {what}" if what else "")
        raise RunDirError(f"output dir {directory} holds a run with other arguments ({what}); "
                          "use the same arguments to resume or choose another --output_dir")
    return stored_seed


def write_identity(directory, kind, args):
    """Record the run's arguments (args.json; config.yaml like the original) if not yet there."""
    run_file = os.path.join(directory, RUN_FILE)
    if not os.path.exists(run_file):
        durable.write_text(run_file, json.dumps({"script": kind, "args": args}, indent=2, sort_keys=True))
    yaml_file = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(yaml_file):
        import yaml

        durable.write_text(yaml_file, yaml.dump(args))


# ----------------------------------------------------------------------------- lock


def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _process_start(pid):
    """Start time of process ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _this_process():
    now = datetime.datetime.now(datetime.timezone.utc)
    return dict(host=socket.gethostname(), pid=os.getpid(), started=now.strftime("%Y-%m-%d %H:%M:%S UTC"),
                boot_id=_boot_id(), process_start=_process_start(os.getpid()),
                slurm_job_id=os.environ.get("SLURM_JOB_ID"),
                slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
                command=" ".join(sys.argv)[:1000])


def read_lock(directory):
    """The lock's record (dict), None when there is no lock, "unreadable" for a damaged one."""
    try:
        with open(os.path.join(directory, LOCK_FILE)) as f:
            record = json.load(f)
        return record if isinstance(record, dict) and "host" in record and "pid" in record else "unreadable"
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "unreadable"


def _holder_is_gone(holder):
    """Why the lock's process certainly no longer runs, or None when it may (or does) run."""
    me = _this_process()
    job = holder.get("slurm_job_id")
    restarts = int(holder.get("slurm_restart_count") or 0)
    if job and job == me["slurm_job_id"] and me["slurm_restart_count"] > restarts:
        return f"SLURM job {job} was requeued since"
    if holder["host"] != me["host"]:
        return None
    if holder.get("boot_id") and me["boot_id"] and holder["boot_id"] != me["boot_id"]:
        return "this host was rebooted since"
    pid = int(holder["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "its process is gone"
    except PermissionError:  # a process of another user: alive
        return None
    if holder.get("process_start") is not None and _process_start(pid) not in (None, holder["process_start"]):
        return "its process is gone (the pid now belongs to another process)"
    return None


def _describe(holder, directory):
    return (f"pid {holder['pid']} on host {holder['host']}, started {holder.get('started', '?')}; "
            f"lock {os.path.join(directory, LOCK_FILE)}")


def _judge(directory, holder, force):
    """("held", error line) or ("stale", warning line) for an existing lock."""
    path = os.path.join(directory, LOCK_FILE)
    if holder == "unreadable":
        if force:
            return "stale", f"warning: --force_unlock: removing the unreadable lock {path}"
        return "held", (f"output dir {directory} has an unreadable lock {path}; if no run uses this "
                        "directory, re-run with --force_unlock")
    gone = _holder_is_gone(holder)
    if gone:
        return "stale", (f"warning: taking over the lock of an earlier run ({gone}): "
                         f"{_describe(holder, directory)}")
    same_host = holder["host"] == socket.gethostname()
    if holder["pid"] == os.getpid() and same_host:
        return "held", f"output dir {directory} is already locked by this process"
    if force and not same_host:
        return "stale", (f"warning: --force_unlock: breaking the lock of the run on host {holder['host']} "
                         f"({_describe(holder, directory)})")
    if same_host:
        return "held", (f"output dir {directory} is in use by another run ({_describe(holder, directory)}); "
                        "wait for it to finish or choose another --output_dir")
    return "held", (f"output dir {directory} is locked by a run on another host "
                    f"({_describe(holder, directory)}); if that run no longer runs, re-run with --force_unlock")


def check_lock(directory, force=False):
    """Raise RunDirError if a live (or unverifiable) run holds ``directory``.  Reads only."""
    holder = read_lock(directory)
    if holder is not None:
        verdict, line = _judge(directory, holder, force)
        if verdict == "held":
            raise RunDirError(line)


class RunLock:
    """This process's lock on a run directory; :meth:`release` (or ``with``) gives it back."""

    def __init__(self, directory, record):
        self.directory, self.record = directory, record

    def release(self):
        if read_lock(self.directory) == self.record:
            durable.remove(os.path.join(self.directory, LOCK_FILE))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _create_lock(path, record):
    """Create ``path`` holding ``record`` unless it exists; the content appears with the name."""
    data = json.dumps(record, indent=1).encode()
    tmp = durable.temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: exclusive create, then write
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        os.remove(tmp)
    durable.fsync_dir(os.path.dirname(path))
    return True


def _break_lock(path, holder):
    """Remove the lock judged stale, unless another run replaced it in the meantime."""
    aside = durable.temp_path(path)
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        with open(aside) as f:
            moved = json.load(f)
    except (OSError, ValueError):
        moved = "unreadable"
    if moved != holder:  # not the lock we judged: put it back
        try:
            os.link(aside, path)
        except OSError:
            pass
    os.remove(aside)


def acquire_lock(directory, force=False, warn=_stderr):
    """Take the lock of ``directory`` (created if needed) for this process.

    Raises RunDirError (one line naming the holder) when a live run holds it; takes over a stale
    lock with a warning (``warn(line)``); ``force`` breaks a lock held on another host.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_FILE)
    record = _this_process()
    for _ in range(5):
        if _create_lock(path, record):
            return RunLock(directory, record)
        holder = read_lock(directory)
        if holder is None:
            continue  # released in the meantime
        verdict, line = _judge(directory, holder, force)
        if verdict == "held":
            raise RunDirError(line)
        warn(line)
        _break_lock(path, holder)
    raise RunDirError(f"could not take the lock {path}: other runs keep taking it; choose another --output_dir")


# ----------------------------------------------------------------------------- shards, merge, verification


def write_shard(layout, batch, images, labels):
    """Write one finished batch, atomically and durably."""
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    crash_point = lambda tmp: faults.point("shard_written")  # noqa: E731  (test hook)
    with durable.atomic_write(layout.shard_path(batch), before_replace=crash_point) as f:
        np.savez(f, **arrays)


def file_sha256(path, chunk=1 << 24):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return digest.hexdigest()
            digest.update(block)


def recorded_checksum(layout):
    try:
        with open(layout.checksum_path) as f:
            return f.read().split()[0]
    except (OSError, IndexError):
        return None


def _check_headers(zf, layout):
    """Problem with the members' names, dtypes, shapes and sizes (central directory and npy
    headers only), or None."""
    expected = layout.members()
    names = sorted(zf.namelist())
    if names != sorted(f"{name}.npy" for name, _, _ in expected):
        return f"holds {names}, expected {[f'{name}.npy' for name, _, _ in expected]}"
    for name, dtype, shape in expected:
        info = zf.getinfo(f"{name}.npy")
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            got_shape, fortran, got_dtype = read_header(f)
            header_len = f.tell()
        if got_dtype != dtype or tuple(got_shape) != shape or fortran:
            return f"{name} is {got_dtype} {tuple(got_shape)}, expected {dtype} {shape}"
        if info.file_size != header_len + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            return f"{name} holds {info.file_size - header_len} data bytes, expected {dtype} {shape}"
    return None


def _check_crcs(zf):
    for info in zf.infolist():
        with zf.open(info) as f:
            while f.read(1 << 24):  # zipfile checks the CRC at the end of each member
                pass


def verify_final(layout, path=None):
    """Why the final file (or ``path``) is not a complete result of this run, or None if it is."""
    path = path or layout.final_path
    if not os.path.exists(path):
        return "missing"
    try:
        with zipfile.ZipFile(path) as zf:
            problem = _check_headers(zf, layout)
            if problem:
                return problem
            recorded = recorded_checksum(layout) if path == layout.final_path else None
            if recorded is None:
                _check_crcs(zf)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        return f"unreadable: {type(exc).__name__}: {exc}"
    if recorded is not None and file_sha256(path) != recorded:
        return f"its sha256 differs from the one recorded at merge in {os.path.basename(layout.checksum_path)}"
    return None


def is_complete(layout):
    """The final file verifies and no shards are left: nothing to do.  Reads only."""
    return not layout.shard_files() and verify_final(layout) is None


def open_run(layout, warn=_stderr):
    """Under the lock, before sampling: remove what killed writers left, drop a final file that
    fails verification (with a warning), and return the batches still to sample."""
    os.makedirs(layout.shard_dir, exist_ok=True)
    for tmp in durable.stale_temps(layout.directory) + durable.stale_temps(layout.shard_dir):
        os.remove(tmp)
    if not os.path.exists(layout.final_path):
        return layout.missing_batches()
    problem = verify_final(layout)
    if problem is None:
        return []
    missing = layout.missing_batches()
    action = (f"sampling its {len(missing)} missing batch(es) again" if missing
              else "rebuilding it from the shards")
    warn(f"warning: {layout.final_path} fails verification ({problem}); {action}")
    durable.remove(layout.final_path)
    durable.remove(layout.checksum_path)
    return missing


def merge(layout):
    """Stream the shards, in global order, into the final file (exactly ``num_samples`` images),
    recording its checksum before it appears."""
    def chunks(key):
        left = layout.num_samples
        for b in range(layout.num_batches):
            path = layout.shard_path(b)
            try:
                with np.load(path) as shard:
                    part = shard[key][:left]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
                raise RunDirError(f"shard {path} is unreadable ({type(exc).__name__}: {exc}); delete "
                                  "it and re-run to sample that batch again")
            left -= len(part)
            yield part
            faults.point("merging")

    def record_checksum(tmp):
        problem = verify_final(layout, path=tmp)
        if problem:
            raise RunDirError(f"the merged file fails verification ({problem}); the shards are kept")
        durable.write_text(layout.checksum_path, f"{file_sha256(tmp)}  {os.path.basename(layout.final_path)}\n")

    members = [(name, dtype, shape, chunks(name)) for name, dtype, shape in layout.members()]
    write_npz_stream(layout.final_path, members, before_replace=record_checksum)


def remove_shards(layout):
    for path in layout.shard_files():
        os.remove(path)
    try:
        os.rmdir(layout.shard_dir)
    except OSError:  # absent, or holding files that are not ours
        pass
    durable.fsync_dir(layout.directory)


def finalize(layout):
    """Under the lock, after sampling: merge the shards (unless the final file already
    verifies), verify the result, then remove the shards.  Returns the final file's path."""
    if verify_final(layout) is not None:
        missing = layout.missing_batches()
        if missing:
            raise RunDirError(f"shards missing after sampling: {missing[:5]}; re-run to resume")
        merge(layout)
        problem = verify_final(layout)
        if problem:
            raise RunDirError(f"{layout.final_path} fails verification after the merge ({problem}); "
                              "the shards are kept, re-run to rebuild it")
    faults.point("merged")
    remove_shards(layout)
    return layout.final_path


def first_images(layout, count):
    """The first ``count`` images of the (verified) final file, read without loading the rest."""
    size = layout.image_size
    with zipfile.ZipFile(layout.final_path) as zf, zf.open("arr_0.npy") as f:
        version = np.lib.format.read_magic(f)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
        data = f.read(count * size * size * 3)
    return np.frombuffer(data, np.uint8).reshape(-1, size, size, 3)
