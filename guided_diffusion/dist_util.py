"""Ranks, devices and the little communication the scripts need (OpenAI's API: setup_dist, dev,
load_state_dict, sync_params).

Launchers, recognised from the environment of each process:

    mpiexec / mpirun, srun --mpi=pmi2|pmix   MPI via mpi4py (PMI_*, OMPI_*, PMIX_* variables)
    torchrun                                 RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    srun without MPI                         SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID
    none of these                            one process

Without MPI, the collectives (:func:`broadcast_object`, :func:`barrier`) go through a
torch.distributed ``TCPStore``, created on first use with a timeout: torchrun's own store, or one
hosted by rank 0 at MASTER_ADDR:MASTER_PORT (under srun by default the step's first node and a
port derived from the job id).  Every rank posts a heartbeat there; a waiting rank exits when a
peer reports a failure (:func:`abort`) or stops beating, instead of waiting for ever.

:func:`init_ranks` (sampling) starts no torch.distributed process group; :func:`setup_dist`
(training) adds one (gloo on CPU, NCCL on GPU), with a timeout.  Each process uses the GPU of its
node-local rank (:func:`cuda_index`).  An MPI launcher with an mpi4py that cannot load MPI is a
one-line error (every rank running as rank 0 would write the same files).
"""

import datetime
import io
import os
import pickle
import re
import socket
import threading
import time
import warnings

import torch as th
import torch.distributed as dist

# Set by mpiexec/mpirun (MPICH, Open MPI, PMIx, Intel MPI) and by srun --mpi=pmi2/pmix.
_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALRANKID")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

STORE_TIMEOUT = datetime.timedelta(minutes=10)  # reaching the rendezvous store at start-up
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)  # training's process group
# A peer without a heartbeat for this long is taken for dead (SAG_ADM_PEER_TIMEOUT, seconds).
PEER_SILENCE_SECONDS = float(os.environ.get("SAG_ADM_PEER_TIMEOUT", "180"))
HEARTBEAT_SECONDS = min(5.0, PEER_SILENCE_SECONDS / 6)

_GROUP = None
_DEVICE = None


def launcher_variable():
    """The environment variable showing that an MPI launcher started this process, or None."""
    return next((v for v in _LAUNCHER_VARS if v in os.environ), None)


def launcher():
    """Who started this process: "mpi", "torchrun", "srun" (without MPI) or None."""
    if launcher_variable():
        return "mpi"
    if all(v in os.environ for v in _TORCHRUN_VARS):
        return "torchrun"
    # A batch script has SLURM_PROCID and SLURM_NTASKS too; only srun's tasks have a step size.
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return "srun"
    return None


def env_rank():
    """This process's rank as its launcher's environment tells it (no MPI import; 0 if none)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    kind = launcher()
    if kind == "torchrun":
        return int(os.environ["RANK"])
    if kind == "srun":
        return int(os.environ["SLURM_PROCID"])
    return 0


def mpi_unavailable_message(exc):
    """One line for an mpi4py that fails to import under an MPI launcher, naming the fix."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"started by an MPI launcher ({launcher_variable()} is set) but mpi4py cannot load "
            f"MPI ({reason}); install an MPI runtime (pip install mpich) or run without mpiexec")


# ----------------------------------------------------------------------------- rank groups


class _Single:
    """One process."""

    rank, size, local_rank = 0, 1, 0

    def bcast(self, obj, root=0):
        return obj

    def barrier(self, tick=None):
        pass

    def abort(self, reason):
        pass


class _Mpi:
    """MPI.COMM_WORLD (mpi4py)."""

    def __init__(self, comm):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.local_rank = None  # set by init_ranks (a collective call)

    def set_local_rank(self):
        from mpi4py import MPI

        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.single_node = node.Get_rank(), node.Get_size() == self.size
        node.Free()

    def bcast(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def barrier(self, tick=None):
        # A non-blocking barrier polled with short sleeps: MPI's blocking barrier busy-waits.
        request, polls = self.comm.Ibarrier(), 0
        while not request.Test():
            time.sleep(0.05)
            polls += 1
            if tick is not None and polls % 20 == 0:
                tick()

    def abort(self, reason):
        self.comm.Abort(1)


class _Store:
    """Ranks from torchrun's or srun's environment; collectives through a TCPStore."""

    def __init__(self, rank, size, local_rank, host, port, agent_store, prefix):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self._address, self._agent_store, self._prefix = (host, port), agent_store, prefix
        self._store, self._seq, self._last_beats = None, 0, {}

    def _connect(self, host_store):
        return dist.TCPStore(self._address[0], self._address[1], world_size=self.size,
                             is_master=host_store, timeout=STORE_TIMEOUT, wait_for_workers=False)

    def _key(self, name):
        return self._prefix + name

    @property
    def store(self):
        if self._store is None:
            try:
                self._store = self._connect(self.rank == 0 and not self._agent_store)
                beat = self._connect(False)  # the heartbeat thread's own connection
            except (RuntimeError, OSError, ValueError) as exc:  # DistStoreError is a RuntimeError
                raise SystemExit(f"error: rank {self.rank} cannot reach the rendezvous store at "
                                 f"{self._address[0]}:{self._address[1]} ({str(exc).strip().splitlines()[0]}); "
                                 "check MASTER_ADDR/MASTER_PORT") from None
            threading.Thread(target=self._heartbeat, args=(beat,), daemon=True).start()
        return self._store

    def _heartbeat(self, store):
        while True:
            try:
                store.add(self._key(f"beat/{self.rank}"), 1)
            except Exception:  # the store is gone: the waiting side notices
                return
            time.sleep(HEARTBEAT_SECONDS)

    def _check_peers(self, store):
        now = time.monotonic()
        for peer in range(self.size):
            count = store.add(self._key(f"beat/{peer}"), 0)
            last = self._last_beats.get(peer)
            # A peer still starting up (no beat yet) gets as long as reaching the store may take.
            allowed = PEER_SILENCE_SECONDS if count else STORE_TIMEOUT.total_seconds()
            if last is None or last[0] != count:
                self._last_beats[peer] = (count, now)
            elif now - last[1] > allowed:
                raise SystemExit(f"error: stopping rank {self.rank}: rank {peer} stopped responding "
                                 f"(no heartbeat for {allowed:.0f} s)")

    def _raised(self, flag):
        """Whether counter ``flag`` was raised (counters, not key checks: torch 2.1 has no check())."""
        return self.store.add(self._key(flag), 0) > 0

    def _raise(self, flag):
        self.store.add(self._key(flag), 1)

    def _wait(self, flag, tick=None):
        """Block until ``flag`` is raised; exit if a peer aborted or went silent, or the store is gone."""
        store, pause, next_check = self.store, 0.01, 0.0
        try:
            while not self._raised(flag):
                if self._raised("abort"):
                    reason = store.get(self._key("abort/reason")).decode()
                    raise SystemExit(f"error: stopping rank {self.rank}: {reason}")
                if time.monotonic() >= next_check:
                    self._check_peers(store)
                    next_check = time.monotonic() + HEARTBEAT_SECONDS
                    if tick is not None:
                        tick()
                time.sleep(pause)
                pause = min(2 * pause, 0.5)
        except RuntimeError as exc:  # the store's host (rank 0, or torchrun's agent) is gone
            raise SystemExit(f"error: stopping rank {self.rank}: lost the rendezvous store "
                             f"({str(exc).strip().splitlines()[0]})") from None

    def bcast(self, obj, root=0):
        self._seq += 1
        key = f"bcast/{self._seq}"
        if self.rank == root:
            self.store.set(self._key(key), pickle.dumps(obj))
            self._raise(f"{key}/ready")
            return obj
        self._wait(f"{key}/ready")
        return pickle.loads(self.store.get(self._key(key)))

    def barrier(self, tick=None):
        self._seq += 1
        key = f"barrier/{self._seq}"
        if self.store.add(self._key(key), 1) == self.size:
            self._raise(f"{key}/done")
        self._wait(f"{key}/done", tick)

    def abort(self, reason):
        try:
            self.store.set(self._key("abort/reason"), f"rank {self.rank} failed: {reason}".encode())
            self._raise("abort")
        except Exception:
            pass


def first_host(nodelist):
    """The first host of a SLURM hostlist: "gpu[03-05,9],cpu1" -> "gpu03"."""
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
    return prefix + (re.split(r"[,-]", ranges)[0] if ranges else "") + suffix


def _store_group(kind):
    env = os.environ
    if kind == "torchrun":
        rank, size, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
        host, port = env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500"))
        agent = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        # torchrun's store outlives a restart of the workers: one key space per attempt.
        prefix = f"sag_adm/{env.get('TORCHELASTIC_RUN_ID', '')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    else:
        rank, size = int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])
        local = int(env.get("SLURM_LOCALID", "0"))
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        host = env.get("MASTER_ADDR") or first_host(nodes)
        job = int(env.get("SLURM_JOB_ID", "0")) + int(env.get("SLURM_STEP_ID", "0") or 0)
        port = int(env.get("MASTER_PORT") or 20000 + job % 20000)
        agent, prefix = False, "sag_adm/"
    return _Store(rank, size, local, host, port, agent, prefix)


def _launched_size():
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    return None


def _group():
    """The rank group of this process (created on first use; see init_ranks)."""
    global _GROUP
    if _GROUP is None:
        kind = launcher()
        if kind == "mpi":
            try:
                from mpi4py import MPI
            except (ImportError, RuntimeError) as exc:  # binary wheel without an MPI library
                raise SystemExit(f"error: {mpi_unavailable_message(exc)}") from None
            _GROUP = _Mpi(MPI.COMM_WORLD)
            expected = _launched_size()
            if expected and expected != _GROUP.size:
                raise SystemExit(f"error: the launcher started {expected} processes but MPI sees "
                                 f"{_GROUP.size}: mpi4py's MPI library does not speak this launcher's "
                                 "protocol (e.g. srun --mpi=pmix with a pip-installed MPICH); use its "
                                 "matching mpiexec, or srun --mpi=none (ranks from SLURM's variables)")
        elif kind in ("torchrun", "srun"):
            _GROUP = _store_group(kind)
        else:
            _GROUP = _Single()
    return _GROUP


def get_rank():
    return _group().rank


def get_world_size():
    return _group().size


def local_rank():
    """Rank of this process among the processes on its node."""
    group = _group()
    if group.local_rank is None:
        group.set_local_rank()
    return group.local_rank


# ----------------------------------------------------------------------------- devices


def cuda_index(local_rank, world_size, device_count, gpu=None, gpu_offset=None):
    """The CUDA device of a process: ``gpu`` for a single process, ``gpu_offset + local_rank``
    under a launcher, by default ``local_rank`` modulo the node's devices."""
    if world_size == 1 and gpu is not None:
        index = gpu
    elif gpu_offset is not None:
        index = gpu_offset + local_rank
    else:
        index = local_rank % device_count
    if not 0 <= index < device_count:
        raise ValueError(f"CUDA device {index} does not exist (this node has {device_count}; local rank "
                         f"{local_rank}, --gpu {gpu}, --gpu_offset {gpu_offset})")
    return index


def init_ranks(gpu=None, gpu_offset=None):
    """Find this process's rank and node-local rank and choose its device.  Starts no process
    group: sampling communicates only through :func:`broadcast_object` and :func:`barrier`."""
    global _DEVICE
    group = _group()
    if group.local_rank is None:
        group.set_local_rank()
    if th.cuda.is_available():
        index = cuda_index(group.local_rank, group.size, th.cuda.device_count(), gpu, gpu_offset)
        th.cuda.set_device(index)
        _DEVICE = th.device("cuda", index)
    else:
        _DEVICE = th.device("cpu")


def setup_dist(gpu=None, gpu_offset=None, timeout=PROCESS_GROUP_TIMEOUT):
    """:func:`init_ranks`, plus (for more than one rank) a torch.distributed process group for
    training's DDP and :func:`sync_params`, set up once with ``timeout``."""
    if dist.is_available() and dist.is_initialized():
        return
    init_ranks(gpu, gpu_offset)
    group = _group()
    if group.size == 1 or not dist.is_available():
        return
    if isinstance(group, _Mpi):
        addr = "127.0.0.1" if group.single_node else socket.gethostbyname(socket.getfqdn())
        os.environ["MASTER_ADDR"] = group.bcast(addr)
        os.environ["MASTER_PORT"] = str(group.bcast(_find_free_port() if group.rank == 0 else None))
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(group.rank), str(group.size)
        init = "env://"
    elif launcher() == "torchrun":
        init = "env://"
    else:  # srun without MPI: the address our store would use, one port up
        host, port = group._address
        init = f"tcp://{host}:{port + 1}"
    backend = "nccl" if th.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, init_method=init, rank=group.rank,
                            world_size=group.size, timeout=timeout)


def dev():
    """The device this process should use."""
    if _DEVICE is not None:
        return _DEVICE
    if th.cuda.is_available():
        return th.device("cuda", th.cuda.current_device())
    return th.device("cpu")


# ----------------------------------------------------------------------------- collectives


def barrier(tick=None):
    """Wait for every rank (no-op for a single process); ``tick()`` is called about once a
    second (or every few seconds) while waiting, e.g. to move a progress bar."""
    group = _group()
    if group.size == 1:
        return
    if not isinstance(group, _Mpi) and dist.is_available() and dist.is_initialized():
        dist.barrier()
    else:
        group.barrier(tick)


def broadcast_object(obj, root=0):
    """Rank ``root``'s ``obj`` on every rank (picklable objects)."""
    group = _group()
    if group.size == 1:
        return obj
    if not isinstance(group, _Mpi) and dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=root)
        return box[0]
    return group.bcast(obj, root=root)


def abort(reason):
    """Make the other ranks stop instead of waiting for this one (which is about to exit):
    MPI_Abort under MPI, an abort notice in the store otherwise."""
    group = _GROUP
    if group is not None and group.size > 1:
        group.abort(reason)


# ----------------------------------------------------------------------------- checkpoints


def load_state_dict(path, **kwargs):
    """Load a torch checkpoint (kwargs go to ``torch.load``), reading the file once per node.

    Local files are memory-mapped, so the processes of one node share the OS page cache.  Only
    tensors and plain containers are unpickled (``weights_only``).  Other paths (blobfile URLs)
    are read by rank 0 and broadcast over MPI in chunks (each rank reads them itself without MPI).
    """
    kwargs.setdefault("map_location", "cpu")
    kwargs.setdefault("weights_only", True)  # torch >= 2.6's default, explicit for older releases
    with warnings.catch_warnings():  # torch 2.1-2.2 warn about their own internal TypedStorage use
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        if not os.path.exists(path):
            return th.load(io.BytesIO(_read_broadcast(path)), **kwargs)
        try:
            return th.load(path, mmap=True, **kwargs)
        except TypeError:  # torch < 2.1: no mmap argument
            return th.load(path, **kwargs)
        except RuntimeError as exc:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            return th.load(path, **kwargs)


def _read_url(path):
    import blobfile as bf

    with bf.BlobFile(path, "rb") as f:
        return f.read()


def _read_broadcast(path, chunk_size=2**30):
    group = _group()
    if not isinstance(group, _Mpi) or group.size == 1:
        return _read_url(path)
    comm = group.comm
    data = _read_url(path) if group.rank == 0 else None
    num_chunks = comm.bcast(None if data is None else (len(data) + chunk_size - 1) // chunk_size)
    parts = [comm.bcast(data[i * chunk_size : (i + 1) * chunk_size] if group.rank == 0 else None)
             for i in range(num_chunks)]
    return b"".join(parts) if group.rank else data


def sync_params(params):
    """Broadcast rank 0's parameters to every rank (no-op without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for p in params:
        with th.no_grad():
            dist.broadcast(p, 0)


def _find_free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return s.getsockname()[1]
