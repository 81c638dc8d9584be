"""On-disk cache of reference features/statistics, keyed by the ref file's content hash,
the extractor's cache key (name + preprocessing + weights hash). Files: <dir>/ref-<key>.npz."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .features import file_sha256

DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sag-adm"


def cache_path(cache_dir, ref_path, extractor_key: str) -> Path:
    key = hashlib.sha256(f"{file_sha256(ref_path)}|{extractor_key}|v1".encode()).hexdigest()[:32]
    return Path(cache_dir).expanduser() / f"ref-{key}.npz"


def load(path: Path):
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:
        return None  # absent or unreadable: recompute


def save(path: Path, arrays: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
