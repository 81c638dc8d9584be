"""One-pass .npz reading: stored and compressed members read identically, every byte of a
stored arr_0 once (counted), slices read only themselves, npy 1.0/2.0/3.0 headers, Fortran
order, CRC-32 checks, truncated and corrupt files as one clear error."""
import io
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import eval_helpers  # noqa: E402,F401  (puts the repository on sys.path)

from evaluations import npz_io  # noqa: E402
from evaluations.errors import EvalError  # noqa: E402
from evaluations.npz_io import NpzImages, crc32_combine  # noqa: E402


class ReadLog:
    """Every open and every (offset, length) read through npz_io._open_binary."""

    def __init__(self):
        self.opens, self.reads = 0, []

    def bytes_in(self, start, stop) -> np.ndarray:
        """How many times each byte of [start, stop) was read."""
        count = np.zeros(stop - start, np.int64)
        for off, n in self.reads:
            a, b = max(off, start), min(off + n, stop)
            if a < b:
                count[a - start : b - start] += 1
        return count

    def total(self) -> int:
        return sum(n for _, n in self.reads)


class CountingFile(io.RawIOBase):
    def __init__(self, path, log: ReadLog):
        self.f, self.log, self.name = open(path, "rb", buffering=0), log, str(path)
        log.opens += 1

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, b):
        pos = self.f.tell()
        n = self.f.readinto(b)
        self.log.reads.append((pos, n or 0))
        return n

    def seek(self, *args):
        return self.f.seek(*args)

    def tell(self):
        return self.f.tell()

    def close(self):
        self.f.close()
        super().close()


@pytest.fixture
def log(monkeypatch):
    log = ReadLog()
    monkeypatch.setattr(npz_io, "_open_binary", lambda path: CountingFile(path, log))
    return log


def _images(n=150, side=16, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, (n, side, side, 3), dtype=np.uint8)


def _member_data_start(path, info):
    """Offset of a zip member's (compressed) data: after its local header."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    return info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")


def _data_region(path):
    """Byte range of arr_0's array data in the file (stored member)."""
    r = NpzImages(path)
    return r.data_offset + r.header_len, r.data_offset + r.info.file_size


def test_stored_and_compressed_read_identically_in_one_pass(tmp_path, log):
    arr = _images()
    np.savez(tmp_path / "s.npz", arr, np.arange(len(arr)))
    np.savez_compressed(tmp_path / "c.npz", arr, np.arange(len(arr)))
    start, stop = _data_region(tmp_path / "s.npz")

    for name in ("s.npz", "c.npz"):
        log.__init__()
        reader = NpzImages(tmp_path / name)
        batches = list(reader.batches(64))
        assert [len(b) for b in batches] == [64, 64, 22]
        np.testing.assert_array_equal(np.concatenate(batches), arr)
        assert log.opens == 2  # the directory + header when opened, then the one pass
        size = (tmp_path / name).stat().st_size
        if name == "s.npz":
            assert (log.bytes_in(start, stop) == 1).all()  # every image byte exactly once
            assert log.total() - (stop - start) < 4096  # zip directory and npy header only
        else:  # compressed bytes once, except the first block (decompressed for the header)
            begin = _member_data_start(tmp_path / name, reader.info)
            assert (log.bytes_in(begin + 8192, begin + reader.info.compress_size) == 1).all()
            assert log.total() < reader.info.compress_size + 16384 < size + 16384


def test_a_slice_reads_only_itself(tmp_path, log):
    """What an MPI rank does: one seek to its first image, then forward reads."""
    arr = _images(200)
    np.savez(tmp_path / "s.npz", arr)
    start, stop = _data_region(tmp_path / "s.npz")
    row = arr[0].nbytes
    reader = NpzImages(tmp_path / "s.npz")
    log.__init__()
    got = np.concatenate(list(reader.batches(64, 70, 130)))
    np.testing.assert_array_equal(got, arr[70:130])
    seen = log.bytes_in(start, stop)
    assert (seen[70 * row : 130 * row] == 1).all() and seen.sum() == 60 * row
    assert log.opens == 1


def test_slices_of_several_readers_cover_the_file_once_and_check_its_crc(tmp_path, log):
    arr = _images(150)
    np.savez(tmp_path / "s.npz", arr)
    start, stop = _data_region(tmp_path / "s.npz")
    pieces = []
    for a, b in ((0, 50), (50, 100), (100, 150)):  # three "ranks"
        r = NpzImages(tmp_path / "s.npz")
        list(r.batches(16, a, b))
        pieces.append(r.slice_checksum)
    assert (log.bytes_in(start, stop) == 1).all()
    NpzImages(tmp_path / "s.npz").verify_slices(pieces + [None])
    bad = list(pieces)
    bad[1] = (bad[1][0], bad[1][1], bad[1][2] ^ 1)
    with pytest.raises(EvalError, match="corrupt"):
        NpzImages(tmp_path / "s.npz").verify_slices(bad)


def _zip_with_member(path, member_bytes, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr("arr_0.npy", member_bytes)


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_npy_header_versions(tmp_path, version, compression):
    arr = _images(70, 8)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=version)
    _zip_with_member(tmp_path / "v.npz", buf.getvalue(), compression)
    reader = NpzImages(tmp_path / "v.npz")
    assert reader.streaming and reader.version == version
    assert reader.reader_class == ("StreamingNpzArrayReader" if version != (3, 0) else "MemoryNpzArrayReader")
    np.testing.assert_array_equal(np.concatenate(list(reader.batches(64))), arr)


def test_fortran_order_is_read_whole_once(tmp_path, log):
    arr = _images(100)
    np.savez(tmp_path / "f.npz", np.asfortranarray(arr))
    reader = NpzImages(tmp_path / "f.npz")
    log.__init__()
    assert not reader.streaming and reader.reader_class == "MemoryNpzArrayReader"
    np.testing.assert_array_equal(np.concatenate(list(reader.batches(64, 10, 90))), arr[10:90])
    np.testing.assert_array_equal(reader.read(95, 100), arr[95:])
    assert log.opens == 1  # loaded once, then served from memory


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "compressed"])
def test_corrupt_image_data_is_one_clear_error_after_the_pass(tmp_path, save):
    arr = _images(150)
    save(tmp_path / "x.npz", arr)
    reader = NpzImages(tmp_path / "x.npz")
    offset = (reader.data_offset + reader.header_len + 100 * arr[0].nbytes
              if save is np.savez else reader.info.header_offset + 200 + reader.info.compress_size // 2)
    _flip_byte(tmp_path / "x.npz", offset)
    with pytest.raises(EvalError, match=r"corrupt|CRC|Error") as e:
        list(NpzImages(tmp_path / "x.npz").batches(64))
    assert "\n" not in str(e.value) and "x.npz" in str(e.value)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "compressed"])
def test_truncated_files_fail_when_opened(tmp_path, save):
    save(tmp_path / "x.npz", _images(150))
    data = (tmp_path / "x.npz").read_bytes()
    for keep in (len(data) // 2, len(data) - 10, 100):
        (tmp_path / "t.npz").write_bytes(data[:keep])
        with pytest.raises(EvalError, match="truncated or corrupt"):
            NpzImages(tmp_path / "t.npz")


def test_member_shorter_than_its_header_says(tmp_path):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, _images(10, 8))
    _zip_with_member(tmp_path / "short.npz", buf.getvalue()[:-700])
    with pytest.raises(EvalError, match=r"truncated: its header announces 10 images .* \(6 whole images\)"):
        NpzImages(tmp_path / "short.npz")


def test_bad_contents_messages(tmp_path):
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(EvalError, match="empty file"):
        NpzImages(tmp_path / "empty.npz")
    np.savez(tmp_path / "none.npz", np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(EvalError, match="holds no images"):
        NpzImages(tmp_path / "none.npz")
    np.savez(tmp_path / "f32.npz", np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(EvalError, match="must be uint8"):
        NpzImages(tmp_path / "f32.npz")
    np.savez(tmp_path / "rank3.npz", np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(EvalError, match=r"NHWC .* got shape \(4, 8, 8\)"):
        NpzImages(tmp_path / "rank3.npz")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3), mu_s=np.zeros(2), sigma_s=np.eye(2))
    with pytest.raises(EvalError, match="statistics .* but no images"):
        NpzImages(tmp_path / "stats.npz")


def test_crc32_combine_matches_zlib():
    rng = np.random.RandomState(0)
    for la, lb in ((0, 5), (5, 0), (1, 1), (1000, 12345), (3, 1 << 20)):
        a, b = rng.bytes(la), rng.bytes(lb)
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), lb) == zlib.crc32(a + b)


def test_stopping_early_closes_the_reader(tmp_path):
    np.savez(tmp_path / "s.npz", _images(300))
    gen = NpzImages(tmp_path / "s.npz").batches(16)
    next(gen)
    gen.close()  # the prefetching worker finishes and the file is closed; no error
