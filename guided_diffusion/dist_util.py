"""Process-group helpers (OpenAI API: setup_dist, dev, load_state_dict, sync_params).

Ranks come from MPI (mpi4py) when it loads; without it everything runs as a single process,
unless an MPI launcher started this process: then a missing or broken mpi4py is a one-line error
(every rank running as rank 0 would write the same files).  torch.distributed (gloo on CPU,
NCCL on GPU) is initialised only when there is more than one rank.  Each process uses the GPU
of its node-local rank.
"""

import io
import os
import socket
import time

import torch as th
import torch.distributed as dist

_COMM = None  # MPI.COMM_WORLD, or False when MPI is unavailable
_LOCAL_RANK = 0
# Set by mpiexec/mpirun (MPICH, Open MPI, PMIx, Intel MPI) and by srun --mpi=pmi2/pmix.
_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALRANKID")


def launcher_variable():
    """The environment variable showing that an MPI launcher started this process, or None."""
    return next((v for v in _LAUNCHER_VARS if v in os.environ), None)


def _comm():
    """MPI.COMM_WORLD, or None when mpi4py cannot be used (single process).

    mpi4py's binary wheels import but raise RuntimeError when no MPI library is installed, so
    that counts as unavailable too.  Under an MPI launcher, unavailable MPI is fatal.
    """
    global _COMM
    if _COMM is None:
        try:
            from mpi4py import MPI

            _COMM = MPI.COMM_WORLD
        except (ImportError, RuntimeError) as exc:
            _COMM = False
            if launcher_variable():
                raise SystemExit(f"error: {mpi_unavailable_message(exc)}") from None
    return _COMM or None


def mpi_unavailable_message(exc):
    """One line for an mpi4py that fails to import under an MPI launcher, naming the fix."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"started by an MPI launcher ({launcher_variable()} is set) but mpi4py cannot load "
            f"MPI ({reason}); install an MPI runtime (pip install mpich) or run without mpiexec")


def get_rank():
    comm = _comm()
    return comm.Get_rank() if comm else 0


def get_world_size():
    comm = _comm()
    return comm.Get_size() if comm else 1


def local_rank():
    """Rank of this process among the processes on its node."""
    return _LOCAL_RANK


def setup_dist(cuda_index=None):
    """Set up ranks, the per-process GPU and (for >1 rank) a torch.distributed process group.

    :param cuda_index: None (the node-local rank's GPU) or ``f(local_rank, device_count)`` giving
        the CUDA device index (the samplers' ``--gpu`` / ``--gpu_offset``).
    """
    global _LOCAL_RANK
    if dist.is_available() and dist.is_initialized():
        return
    comm = _comm()
    if comm is not None:
        from mpi4py import MPI

        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        _LOCAL_RANK = node.Get_rank()
        single_node = node.Get_size() == comm.Get_size()
        node.Free()
    else:
        single_node = True
    if th.cuda.is_available():
        count = th.cuda.device_count()
        th.cuda.set_device(_LOCAL_RANK % count if cuda_index is None else cuda_index(_LOCAL_RANK, count))
    if get_world_size() == 1 or not dist.is_available():
        return
    addr = "127.0.0.1" if single_node else socket.gethostbyname(socket.getfqdn())
    os.environ["MASTER_ADDR"] = comm.bcast(addr, root=0)
    os.environ["MASTER_PORT"] = str(comm.bcast(_find_free_port() if get_rank() == 0 else None, root=0))
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(get_rank()), str(get_world_size())
    backend = "nccl" if th.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, init_method="env://")


def dev():
    """The device this process should use."""
    if th.cuda.is_available():
        return th.device("cuda", th.cuda.current_device())
    return th.device("cpu")


def barrier(poll_seconds=0.05):
    """Wait for every rank (no-op for a single process).

    Polls a non-blocking barrier with short sleeps, so a waiting rank does not spin a CPU core
    (MPI's blocking barrier busy-waits) while the others still work.
    """
    comm = _comm()
    if comm is None or comm.Get_size() == 1:
        return
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(poll_seconds)


def broadcast_object(obj, root=0):
    """Rank ``root``'s ``obj`` on every rank (picklable objects)."""
    comm = _comm()
    if comm is None or comm.Get_size() == 1:
        return obj
    return comm.bcast(obj, root=root)


def load_state_dict(path, **kwargs):
    """Load a torch checkpoint (kwargs go to ``torch.load``), reading the file once per node.

    Local files are memory-mapped, so the processes of one node share the OS page cache.  Other
    paths (blobfile URLs) are read by rank 0 and broadcast over MPI in chunks.
    """
    kwargs.setdefault("map_location", "cpu")
    if os.path.exists(path):
        try:
            return th.load(path, mmap=True, **kwargs)
        except RuntimeError as exc:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            return th.load(path, **kwargs)
    return th.load(io.BytesIO(_read_broadcast(path)), **kwargs)


def _read_broadcast(path, chunk_size=2**30):
    comm = _comm()
    if get_rank() == 0:
        import blobfile as bf

        with bf.BlobFile(path, "rb") as f:
            data = f.read()
    else:
        data = None
    if comm is None or comm.Get_size() == 1:
        return data
    num_chunks = comm.bcast(None if data is None else (len(data) + chunk_size - 1) // chunk_size)
    parts = [comm.bcast(data[i * chunk_size : (i + 1) * chunk_size] if get_rank() == 0 else None)
             for i in range(num_chunks)]
    return b"".join(parts) if get_rank() else data


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
