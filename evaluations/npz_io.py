"""Reading OpenAI-style sample/reference ``.npz`` batches in one sequential pass.

Images come only from ``arr_0`` (uint8 NHWC, 3 channels); everything is validated when the file
is opened (before any work), so a bad file fails with one line naming the problem.

``NpzImages.batches(start, stop)`` reads images [start, stop) in ONE forward pass: it positions
once at ``start`` and then reads sequentially (a background thread reads the next batch while
the current one is processed). A stored member (``np.savez``) is read straight from the file at
its offset, so MPI ranks reading contiguous slices read every byte once in total; a compressed
member (``np.savez_compressed``) cannot be entered in the middle, so a rank decompresses from
the start of the member and discards the bytes before its slice. The CRC-32 recorded in the zip
is checked: by the reader after a full pass, or by rank 0 from the slices' CRCs (stored) or by
the last rank (compressed) under MPI. npy format 1.0, 2.0 and 3.0 headers stream; Fortran-order
arrays are loaded whole (one read of the member) and served from memory.
"""
from __future__ import annotations

import ast
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import EvalError

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header (30 bytes)
_NPY_MAGIC = b"\x93NUMPY"
_SKIP_CHUNK = 1 << 24
RECREATE = "re-create it (e.g. np.savez(path, images) with uint8 NHWC images)"


def _open_binary(path):
    """Every byte the reader takes from a file comes through this object (tests count them)."""
    return open(path, "rb", buffering=0)


# ----------------------------------------------------------------- CRC-32


def _gf2_apply(matrix, vector: int) -> int:
    """Matrix (list of 32 column bit-vectors) times vector over GF(2)."""
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _gf2_square(matrix):
    return [_gf2_apply(matrix, column) for column in matrix]


def _zero_byte_operator():
    """How the (reflected, polynomial 0xEDB88320) CRC-32 register changes over one zero byte:
    the one-zero-bit shift ``crc >> 1 ^ (poly if crc & 1)`` applied eight times."""
    op = [0xEDB88320] + [1 << i for i in range(31)]
    for _ in range(3):
        op = _gf2_square(op)
    return op


_ZERO_BYTE = _zero_byte_operator()


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A + B from crc(A), crc(B) and len(B): the CRC is affine in the data, so
    crc(A + B) = crc(A) carried through len(B) zero bytes, xor crc(B)."""
    op = _ZERO_BYTE
    while len2 > 0:
        if len2 & 1:
            crc1 = _gf2_apply(op, crc1)
        len2 >>= 1
        if len2:
            op = _gf2_square(op)
    return crc1 ^ crc2


# ----------------------------------------------------------------- npy header


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("file ends inside the .npy header")
    return data


def _parse_npy_header(f):
    """(version, header bytes, shape, fortran_order, dtype) of a .npy stream at its start."""
    magic = _read_exact(f, 8)
    if magic[:6] != _NPY_MAGIC:
        raise ValueError("no .npy magic string")
    version = (magic[6], magic[7])
    if version == (1, 0):
        raw_len = _read_exact(f, 2)
        length, encoding = struct.unpack("<H", raw_len)[0], "latin1"
    elif version in ((2, 0), (3, 0)):
        raw_len = _read_exact(f, 4)
        length, encoding = struct.unpack("<I", raw_len)[0], "latin1" if version == (2, 0) else "utf8"
    else:
        raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    text = _read_exact(f, length)
    d = ast.literal_eval(text.decode(encoding))
    if not isinstance(d, dict) or not {"descr", "fortran_order", "shape"} <= set(d):
        raise ValueError(f"malformed .npy header {text[:80]!r}")
    dtype = np.lib.format.descr_to_dtype(d["descr"])
    return version, magic + raw_len + text, tuple(d["shape"]), bool(d["fortran_order"]), dtype


# ----------------------------------------------------------------- streams


class _StoredStream:
    """Bytes of a stored member, read straight from the file at their offset."""

    def __init__(self, images: "NpzImages", offset: int):
        self.f = _open_binary(images.path)
        self.f.seek(images.data_offset + offset)
        self.crc = 0

    def read_into(self, buf: np.ndarray) -> int:
        view = memoryview(buf).cast("B")
        got = 0
        while got < len(view):
            n = self.f.readinto(view[got:])
            if not n:
                break
            got += n
        self.crc = zlib.crc32(view[:got], self.crc)
        return got

    def close(self):
        self.f.close()


class _DeflatedStream:
    """Bytes of a compressed member, decompressed from the member's start."""

    def __init__(self, images: "NpzImages", offset: int):
        self.f = _open_binary(images.path)
        self.zf = zipfile.ZipFile(self.f)
        self.member = self.zf.open(images.member)
        while offset > 0:  # a deflate stream cannot be entered in the middle
            skipped = len(self.member.read(min(offset, _SKIP_CHUNK)))
            if not skipped:
                break
            offset -= skipped

    def read_into(self, buf: np.ndarray) -> int:
        view = memoryview(buf).cast("B")
        got = 0
        while got < len(view):
            data = self.member.read(len(view) - got)
            if not data:
                break
            view[got : got + len(data)] = data
            got += len(data)
        return got

    def close(self):
        self.member.close()
        self.zf.close()
        self.f.close()


# ----------------------------------------------------------------- images


class NpzImages:
    """Validated view of ``arr_0``: ``.shape``, ``.batches(...)``, ``.read(start, stop)``."""

    def __init__(self, path, key: str = "arr_0"):
        self.path = Path(path)
        self.key = key
        self.member = key + ".npy"
        self._memory = None
        self.slice_checksum = None  # (offset in member, length, crc) of the last partial pass
        if not self.path.is_file():
            raise EvalError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        if size == 0:
            raise EvalError(f"{self.path}: empty file (0 bytes) - an interrupted write? {RECREATE}")
        try:
            with _open_binary(self.path) as f, zipfile.ZipFile(f) as zf:
                names = zf.namelist()
                if self.member not in names:
                    raise EvalError(self._missing_key_message(names))
                self.info = zf.getinfo(self.member)
                self._check_member(size)
                self.fingerprint_items = sorted(
                    (i.filename, i.CRC, i.file_size, i.compress_type) for i in zf.infolist())
                if self.info.compress_type == zipfile.ZIP_STORED:  # header read in place
                    f.seek(self.info.header_offset)
                    local = _LOCAL_HEADER.unpack(_read_exact(f, _LOCAL_HEADER.size))
                    if local[0] != b"PK\x03\x04":
                        raise zipfile.BadZipFile("bad local file header")
                    self.data_offset = self.info.header_offset + _LOCAL_HEADER.size + local[10] + local[11]
                    if self.data_offset + self.info.compress_size > size:
                        raise EvalError(f"{self.path}: truncated file ({size} bytes, {self.member} "
                                        f"needs {self.data_offset + self.info.compress_size}); {RECREATE}")
                    f.seek(self.data_offset)
                    version, header, shape, fortran, dtype = _parse_npy_header(f)
                else:
                    with zf.open(self.member) as m:
                        version, header, shape, fortran, dtype = _parse_npy_header(m)
        except EvalError:
            raise
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, SyntaxError, OSError,
                EOFError, zlib.error, struct.error) as e:
            raise EvalError(f"{self.path}: cannot read it as an .npz (zip) file - truncated or corrupt? "
                            f"({type(e).__name__}: {e}); {RECREATE}") from None
        self.version, self.header_len, self.header_crc = version, len(header), zlib.crc32(header)
        self.shape, self.dtype, self.fortran = shape, dtype, fortran
        self.streaming = not fortran and not dtype.hasobject
        self._validate()

    def _missing_key_message(self, names) -> str:
        msg = f"{self.path}: missing {self.key} in npz file"
        if all(k + ".npy" in names for k in STAT_KEYS):
            return (msg + ": it holds statistics (mu, sigma, mu_s, sigma_s) but no images; "
                    "precision and recall need the reference images - use a batch with arr_0 "
                    "(OpenAI's VIRTUAL_*.npz reference batches have both)")
        keys = sorted(n[:-4] for n in names if n.endswith(".npy"))
        return msg + f" (its arrays: {keys or 'none'}); save the images as the first array: np.savez(path, images)"

    def _check_member(self, size: int):
        if self.info.flag_bits & 0x1:
            raise EvalError(f"{self.path}: {self.member} is encrypted")
        if self.info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise EvalError(f"{self.path}: {self.member} uses zip compression method "
                            f"{self.info.compress_type}; use np.savez or np.savez_compressed")
        if self.info.header_offset + self.info.compress_size > size:
            raise EvalError(f"{self.path}: truncated file ({size} bytes); {RECREATE}")

    @property
    def reader_class(self) -> str:
        """Name of the reader the original would use (for tests/diagnostics)."""
        original_streams = self.streaming and self.version in ((1, 0), (2, 0))
        return "StreamingNpzArrayReader" if original_streams else "MemoryNpzArrayReader"

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:])) * self.dtype.itemsize

    def _validate(self):
        where = f"{self.path}: {self.key}"
        if self.dtype != np.uint8:
            raise EvalError(f"{where} must be uint8 images in [0, 255], got dtype {self.dtype}; {RECREATE}")
        if len(self.shape) != 4 or self.shape[3] != 3:
            raise EvalError(f"{where} must be NHWC images with 3 channels [N, H, W, 3], "
                            f"got shape {self.shape}; {RECREATE}")
        if self.shape[0] == 0 or self.shape[1] == 0 or self.shape[2] == 0:
            raise EvalError(f"{where} holds no images (shape {self.shape})")
        expected = self.header_len + self.shape[0] * self.row_bytes
        if self.info.file_size < expected:
            whole = (self.info.file_size - self.header_len) // self.row_bytes
            raise EvalError(f"{where} is truncated: its header announces {self.shape[0]} images "
                            f"({expected} bytes) but the file holds {self.info.file_size} bytes "
                            f"({max(whole, 0)} whole images); {RECREATE}")

    def __len__(self):
        return self.shape[0]

    def fingerprint(self) -> str:
        """Identifies the file's content without reading it: every member's name, CRC-32,
        size and compression, as recorded in the zip directory."""
        return repr(self.fingerprint_items)

    def _bad_data(self, e: Exception) -> EvalError:
        return EvalError(f"{self.path}: cannot read {self.key}: corrupt or truncated file "
                         f"({type(e).__name__}: {e}); {RECREATE}")

    def _load_whole(self) -> np.ndarray:
        if self._memory is None:
            try:
                with _open_binary(self.path) as f, np.load(f, allow_pickle=False) as z:
                    self._memory = np.ascontiguousarray(z[self.key])
            except Exception as e:
                raise self._bad_data(e) from None
        return self._memory

    def batches(self, batch_size: int = 64, start: int = 0, stop: int | None = None):
        """uint8 batches of images [start, stop), from one sequential pass."""
        stop = len(self) if stop is None else min(stop, len(self))
        bounds = [(i, min(i + batch_size, stop)) for i in range(start, stop, batch_size)]
        if not bounds:
            return
        if not self.streaming:
            whole = self._load_whole()
            for a, b in bounds:
                yield whole[a:b]
            return
        offset = self.header_len + start * self.row_bytes
        try:
            stream = (_StoredStream if self.info.compress_type == zipfile.ZIP_STORED
                      else _DeflatedStream)(self, offset)
        except Exception as e:
            raise self._bad_data(e) from None
        try:
            # one worker reads batch i+1 while the caller processes batch i
            with ThreadPoolExecutor(1, thread_name_prefix="npz-read") as pool:
                pending = pool.submit(self._read_batch, stream, *bounds[0])
                for nxt in bounds[1:] + [None]:
                    batch = pending.result()
                    if nxt is not None:
                        pending = pool.submit(self._read_batch, stream, *nxt)
                    yield batch
            self._finish(stream, start, stop)
        finally:
            stream.close()

    def _read_batch(self, stream, a: int, b: int) -> np.ndarray:
        buf = np.empty((b - a,) + self.shape[1:], dtype=self.dtype)
        try:
            got = stream.read_into(buf)
        except Exception as e:
            raise self._bad_data(e) from None
        if got != buf.nbytes:
            raise EvalError(f"{self.path}: truncated {self.key} (the file ends inside image {a + got // self.row_bytes}); "
                            f"{RECREATE}")
        return buf

    def _finish(self, stream, start: int, stop: int):
        """Checksum: verified here after a full pass, else kept for ``verify_slices``."""
        try:
            if stop == len(self):  # the bytes after the last image belong to the last slice
                tail = np.empty(self.info.file_size - self.header_len - stop * self.row_bytes, np.uint8)
                if stream.read_into(tail) != tail.nbytes:
                    raise EvalError(f"{self.path}: truncated {self.key}; {RECREATE}")
                if isinstance(stream, _DeflatedStream) and stream.member.read(1):
                    raise EvalError(f"{self.path}: {self.key} is longer than its zip entry says; {RECREATE}")
        except EvalError:
            raise
        except Exception as e:  # zipfile's own CRC check fires at the end of a compressed member
            raise self._bad_data(e) from None
        if isinstance(stream, _StoredStream):
            offset = self.header_len + start * self.row_bytes
            length = (self.info.file_size if stop == len(self) else self.header_len + stop * self.row_bytes) - offset
            self.slice_checksum = (offset, length, stream.crc)
            if start == 0 and stop == len(self):
                self.verify_slices([self.slice_checksum])

    def verify_slices(self, pieces):
        """Check the member's CRC-32 from the (offset, length, crc) of contiguous slices read by
        one or several processes (None entries: nothing to add, e.g. a compressed member)."""
        pieces = sorted(p for p in pieces if p is not None)
        if not pieces or self.info.compress_type != zipfile.ZIP_STORED:
            return
        crc, end = self.header_crc, self.header_len
        for offset, length, piece_crc in pieces:
            if offset != end:
                return  # slices do not tile the member (partial read): nothing to verify
            crc, end = crc32_combine(crc, piece_crc, length), end + length
        if end == self.info.file_size and crc != self.info.CRC:
            raise EvalError(f"{self.path}: {self.key} is corrupt (CRC-32 {crc:08x} does not match the "
                            f"zip entry's {self.info.CRC:08x}); {RECREATE}")

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, len(self))
        if stop <= start:
            return np.empty((0,) + self.shape[1:], self.dtype)
        return next(self.batches(stop - start, start, stop))

    def labels(self):
        """The class labels ``arr_1`` stored beside the images, or None."""
        try:
            with _open_binary(self.path) as f, np.load(f, allow_pickle=False) as z:
                return np.asarray(z["arr_1"]) if "arr_1" in z.files else None
        except Exception as e:
            raise EvalError(f"{self.path}: cannot read labels ({type(e).__name__}: {e})") from None


def read_stored_statistics(path):
    """((mu, sigma), (mu_s, sigma_s)) stored in the npz, or None when there is no ``mu``
    (the original's switch; ``mu`` without the spatial pair is an error)."""
    try:
        with _open_binary(path) as f, np.load(f, allow_pickle=False) as z:
            if "mu" not in z.files:
                return None
            missing = [k for k in STAT_KEYS if k not in z.files]
            if missing:
                raise EvalError(f"{path}: has 'mu' but lacks {missing}; store all of "
                                f"{list(STAT_KEYS)} or none")
            stats = (z["mu"], z["sigma"]), (z["mu_s"], z["sigma_s"])
    except EvalError:
        raise
    except Exception as e:
        raise EvalError(f"{path}: cannot read stored statistics ({type(e).__name__}: {e})") from None
    for (mu, sigma), name in zip(stats, ("mu/sigma", "mu_s/sigma_s")):
        d = np.atleast_1d(mu).shape
        if len(d) != 1 or np.atleast_2d(sigma).shape != (d[0], d[0]):
            raise EvalError(f"{path}: stored {name} have shapes {np.shape(mu)} / {np.shape(sigma)}; "
                            "expected (D,) and (D, D)")
    return stats
