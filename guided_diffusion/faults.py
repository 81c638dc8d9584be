"""Fault injection for tests: crash a sampling run at a named point, as a node failure would.

Test hook, not a user feature.  Nothing happens unless ``SAG_ADM_FAULT`` is set:

    SAG_ADM_FAULT=POINT[@N]     SIGKILL this process the N-th time (default 1st) it reaches POINT
    SAG_ADM_FAULT_RANK=R        only on rank R (default: every rank)
    SAG_ADM_FAULT_MODE=raise    raise RuntimeError instead (a crash in Python code, e.g. CUDA OOM)
    SAG_ADM_FAULT_MODE=stop     SIGSTOP instead (a run that hangs, or is alive but slow: SIGCONT
                                lets it go on)

Points of the sampling driver (guided_diffusion/sampling.py, run_dir.py):

    step           after each denoising step of a batch (a kill mid-batch)
    shard_written  a shard's temp file is written and fsync-ed, not yet renamed
    merging        the final .npz temp file is half written
    merged         the final .npz is in place with its checksum, the shards not yet removed
"""

import os
import signal

ENV = "SAG_ADM_FAULT"
_hits = {}


def point(name):
    """Crash here if ``SAG_ADM_FAULT`` names this point (see the module docstring)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    rank = os.environ.get(f"{ENV}_RANK")
    if rank is not None:
        from . import dist_util

        if int(rank) != dist_util.get_rank():
            return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != int(nth or 1):
        return
    mode = os.environ.get(f"{ENV}_MODE", "kill")
    if mode == "raise":
        raise RuntimeError(f"{ENV}: injected failure at {name!r}")
    os.kill(os.getpid(), signal.SIGSTOP if mode == "stop" else signal.SIGKILL)
