"""On-disk cache of reference batches, one ``ref-<key>.npz`` per (reference file, extractor).

The key hashes the reference file's content fingerprint - every zip member's name, CRC-32, size
and compression as recorded in the zip directory, so looking it up costs no pass over the
images - together with the extractor's cache key (name, preprocessing, weights hash) and the
cache format. What is stored: see ``reference.Reference``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from guided_diffusion import durable

FORMAT = "v2"  # v2: + eigendecompositions and k-NN radii; v1 entries are simply not found
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sag-adm"


def cache_path(cache_dir, ref, extractor_key: str) -> Path:
    """``ref``: an ``NpzImages`` of the reference batch."""
    key = hashlib.sha256(f"{ref.fingerprint()}|{extractor_key}|{FORMAT}".encode()).hexdigest()[:32]
    return Path(cache_dir).expanduser() / f"ref-{key}.npz"


def load(path: Path):
    """The stored arrays, or None when the entry is absent or unreadable (then recomputed)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:
        return None


def save(path: Path, arrays: dict):
    """Write one entry durably (temp file, fsync, rename, fsync directory): a crash never leaves a
    partial entry under its name."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    durable.save_npz(str(path), **arrays)
