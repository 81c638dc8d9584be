"""MPI sharding helpers. mpi4py is imported only when launched by an MPI launcher
(PMI_/OMPI_/PMIX_ rank variables present); a plain ``python`` run is one rank without MPI."""
from __future__ import annotations

import numpy as np

from guided_diffusion.dist_util import launcher, launcher_variable

from .errors import EvalError


class _SingleComm:
    rank, size = 0, 1

    def gather(self, obj, root=0):
        return [obj]

    def bcast(self, obj, root=0):
        return obj

    def Barrier(self):
        pass


class Comm:
    def __init__(self):
        if launcher_variable():
            from mpi4py import MPI  # ImportError, or RuntimeError when no MPI library loads

            self._c = MPI.COMM_WORLD
            self.rank, self.size = self._c.Get_rank(), self._c.Get_size()
        elif launcher() in ("torchrun", "srun"):
            # Without MPI every task would evaluate everything and write the same report.
            raise EvalError(f"the evaluator shards over MPI only, but {launcher()} started it: run it "
                            "under mpiexec (or srun --mpi=pmix), or as one process")
        else:
            self._c = _SingleComm()
            self.rank, self.size = 0, 1

    def shard(self, n: int):
        """Contiguous slice [start, stop) of n items for this rank."""
        return self.rank * n // self.size, (self.rank + 1) * n // self.size

    def gather_concat(self, arrays: dict):
        """Rank 0 gets each key's arrays concatenated in rank order; other ranks get None.
        A rank with nothing to contribute passes an empty dict."""
        parts = self._c.gather(arrays, root=0)
        if self.rank != 0:
            return None
        parts = [p for p in parts if p]
        return {k: np.concatenate([p[k] for p in parts], 0) for k in parts[0]}

    def gather(self, obj):
        """Rank 0 gets the list of every rank's obj (rank order); other ranks get None."""
        return self._c.gather(obj, root=0)

    def bcast(self, obj):
        return self._c.bcast(obj, root=0)

    def barrier(self):
        self._c.Barrier()
