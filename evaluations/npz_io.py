"""Reading OpenAI-style sample/reference ``.npz`` batches.

Images come only from ``arr_0`` (uint8 NHWC, 3 channels). The ``arr_0.npy`` member is streamed
(``np.savez`` and ``np.savez_compressed``, npy 1.0/2.0) so that an MPI rank reads only its
contiguous slice; Fortran-ordered or object arrays fall back to loading the whole array.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .errors import EvalError

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class NpzImages:
    """Lazy view of ``arr_0``: ``.shape`` and ``.read(start, stop)`` -> uint8 NHWC array."""

    def __init__(self, path, key: str = "arr_0"):
        self.path = Path(path)
        self.key = key
        self._memory = None
        if not self.path.is_file():
            raise EvalError(f"{self.path}: no such file")
        try:
            with zipfile.ZipFile(self.path) as zf:
                names = zf.namelist()
                if key + ".npy" not in names:
                    raise EvalError(f"{self.path}: missing {key} in npz file")
                with zf.open(key + ".npy") as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        hdr = np.lib.format.read_array_header_1_0(f)
                    else:
                        hdr = np.lib.format.read_array_header_2_0(f)
                    shape, fortran, dtype = hdr
                    self.header_len = f.tell()
        except EvalError:
            raise
        except Exception as e:
            raise EvalError(f"{self.path}: cannot read npz file ({type(e).__name__}: {e})") from None
        self.shape, self.dtype = tuple(shape), dtype
        self.streaming = not fortran and not dtype.hasobject
        self._validate()

    @property
    def reader_class(self) -> str:
        """Name of the equivalent reader in the original (for tests/diagnostics)."""
        return "StreamingNpzArrayReader" if self.streaming else "MemoryNpzArrayReader"

    def _validate(self):
        if self.dtype != np.uint8:
            raise EvalError(f"{self.path}: {self.key} must be uint8 images, got dtype {self.dtype}")
        if len(self.shape) != 4 or self.shape[3] != 3:
            raise EvalError(
                f"{self.path}: {self.key} must be NHWC with 3 channels, got shape {self.shape}"
            )

    def __len__(self):
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, len(self))
        count = max(stop - start, 0)
        try:
            if not self.streaming:
                if self._memory is None:
                    with np.load(self.path, allow_pickle=False) as z:
                        self._memory = np.ascontiguousarray(z[self.key])
                return self._memory[start:stop]
            row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
            with zipfile.ZipFile(self.path) as zf, zf.open(self.key + ".npy") as f:
                f.seek(self.header_len + start * row)
                buf = bytearray(f.read(count * row))  # writable, for torch.as_tensor
        except Exception as e:
            raise EvalError(f"{self.path}: cannot read images ({type(e).__name__}: {e})") from None
        if len(buf) != count * row:
            raise EvalError(f"{self.path}: truncated {self.key} (file corrupt?)")
        return np.frombuffer(buf, dtype=self.dtype).reshape((count,) + self.shape[1:])

    def labels(self):
        """The class labels ``arr_1`` stored beside the images, or None."""
        try:
            with np.load(self.path, allow_pickle=False) as z:
                return np.asarray(z["arr_1"]) if "arr_1" in z.files else None
        except Exception as e:
            raise EvalError(f"{self.path}: cannot read labels ({type(e).__name__}: {e})") from None

    def batches(self, batch_size: int = 64, start: int = 0, stop: int | None = None):
        stop = len(self) if stop is None else stop
        for i in range(start, stop, batch_size):
            yield self.read(i, min(i + batch_size, stop))


def read_stored_statistics(path):
    """((mu, sigma), (mu_s, sigma_s)) stored in the npz, or None when there is no ``mu``
    (the original's switch; ``mu`` without the spatial pair is an error)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z.files:
                return None
            missing = [k for k in STAT_KEYS if k not in z.files]
            if missing:
                raise EvalError(f"{path}: has 'mu' but lacks {missing}")
            return (z["mu"], z["sigma"]), (z["mu_s"], z["sigma_s"])
    except EvalError:
        raise
    except Exception as e:
        raise EvalError(f"{path}: cannot read npz file ({type(e).__name__}: {e})") from None
