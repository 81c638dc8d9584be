"""Durable file writes: a file appears under its name complete or not at all, and stays so after
a crash, a killed process or a power loss.

Every writer in the project goes through :func:`atomic_write`: the data goes to a hidden temp
file in the target's directory (``.NAME.tmp-PID-XXXXXXXX``), is flushed and ``fsync``-ed, the temp
file is renamed over the target (``os.replace``, atomic within a file system) and the directory
is ``fsync``-ed so that the rename itself survives a power loss.  A writer that fails or is
interrupted removes its temp file; one that is killed leaves it behind, and the owner of the
directory can find such leftovers with :func:`stale_temps`.

    with atomic_write(path) as f:      # any writer that takes a binary file object
        np.savez(f, **arrays)          # or torch.save(obj, f), zipfile.ZipFile(f, "w"), ...
    write_bytes(path, data); write_text(path, text); save_npz(path, **arrays)
"""

import contextlib
import glob
import os
import secrets

TEMP_MARK = ".tmp-"


def temp_path(path):
    """A fresh hidden temp name beside ``path`` (unique per process and call)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(directory):
    """Make the entries of ``directory`` (new names, renames, removals) durable."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:  # a platform or file system that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # some network file systems refuse fsync on directories; nothing to add there
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode="wb", before_replace=None):
    """Yield a file object (``mode`` "wb" or "w") whose content replaces ``path`` durably on a
    clean exit; on an exception the temp file is removed and ``path`` is left as it was.

    ``before_replace(temp_path)`` (optional) runs when the data is on disk, not yet renamed; an
    exception there leaves ``path`` as it was.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write writes whole files ('wb' or 'w'), not {mode!r}")
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, as for open()
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_bytes(path, data):
    with atomic_write(path) as f:
        f.write(data)


def write_text(path, text):
    with atomic_write(path, "w") as f:
        f.write(text)


def save_npz(path, **arrays):
    """``np.savez`` made durable (the file gets exactly the name given: no ``.npz`` is added)."""
    import numpy as np

    with atomic_write(path) as f:
        np.savez(f, **arrays)


def remove(path):
    """Remove ``path`` (if there) durably."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def stale_temps(directory):
    """Temp files of :func:`atomic_write` left in ``directory`` by writers that were killed.

    Only the owner of the directory may remove them (a live writer's temp looks the same).
    """
    return sorted(glob.glob(os.path.join(glob.escape(directory), f".*{TEMP_MARK}*")))
