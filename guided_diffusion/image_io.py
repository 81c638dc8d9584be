"""Image output: sample tensors to uint8, a streaming .npz writer, grids and a zlib-only PNG writer."""

import io
import struct
import zipfile
import zlib

import numpy as np

from . import durable


def to_uint8_nhwc(x):
    """Model output in [-1, 1] (NCHW tensor) -> uint8 NHWC numpy, exactly as OpenAI's scripts do.

    ``((x + 1) * 127.5).clamp(0, 255)`` then a cast to uint8 (truncation, not rounding).
    """
    import torch as th

    x = ((x + 1) * 127.5).clamp(0, 255).to(th.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def write_npz_stream(path, members, before_replace=None):
    """Write an ``np.load``-compatible .npz without holding whole arrays in memory.

    ``members`` is a list of ``(name, dtype, shape, chunks)``; ``chunks`` yields C-ordered arrays
    whose concatenation along axis 0 has exactly ``shape``.  Entries are stored uncompressed (as
    ``np.savez`` does) with a fixed timestamp, so equal arrays give byte-identical files.  The file
    appears atomically and durably (``durable.atomic_write``, which also takes ``before_replace``).
    """
    with durable.atomic_write(path, before_replace=before_replace) as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, dtype, shape, chunks in members:
                _write_npy_member(zf, name, np.dtype(dtype), tuple(shape), chunks)


def _write_npy_member(zf, name, dtype, shape, chunks):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = len(header.getvalue()) + expected  # lets zipfile pick zip64 when needed
    written = 0
    with zf.open(info, "w") as f:
        f.write(header.getvalue())
        for chunk in chunks:
            data = np.ascontiguousarray(chunk, dtype=dtype)
            f.write(memoryview(data).cast("B"))
            written += data.nbytes
    if written != expected:
        raise ValueError(f"{name}: wrote {written} bytes, expected {expected} for shape {shape}")


def make_grid(images, ncols=None, pad=2, fill=0):
    """Tile uint8 images (N, H, W, C) into one (rows*H + pad.., cols*W + pad.., C) array."""
    images = np.asarray(images, dtype=np.uint8)
    n, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), fill, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def upscale_nearest(image, factor):
    """Enlarge an (H, W, C) image ``factor`` times by pixel repetition (crisp small samples)."""
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1) if factor > 1 else image


def _chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def encode_png(image):
    """Encode a uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array as PNG bytes (8-bit)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"PNG writer expects uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    h, w, c = image.shape
    color_type = {1: 0, 3: 2, 4: 6}[c]
    # Each scanline is prefixed with filter type 0 (None).
    raw = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * c)], axis=1)
    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + _chunk(b"IEND", b"")
    )


def write_png(path, image):
    """Write ``image`` to ``path`` as PNG, atomically and durably."""
    durable.write_bytes(path, encode_png(image))


def read_png(path):
    """Decode PNGs written by :func:`write_png` (8-bit, filter 0 only); used by tests."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    pos, idat, w = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            w, h, _, color_type = struct.unpack(">IIBB", body[:10])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    c = {0: 1, 2: 3, 6: 4}[color_type]
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * c)
    assert not rows[:, 0].any(), "only filter type 0 supported"
    return rows[:, 1:].reshape(h, w, c)
