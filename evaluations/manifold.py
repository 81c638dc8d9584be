"""Improved precision / recall (Kynkäänniemi et al.) with the distance arithmetic of OpenAI's
evaluator, at the cost of one float32 GEMM per distance tile.

OpenAI's ``DistanceBlock`` computes squared distances in float16 (both inputs cast to float16,
``max((|u|^2 - 2 u.v) + |v|^2, 0)`` with every step rounded to float16, the whole 10000 x 10000
block recomputed in float32 when any entry is non-finite). ``Fp16Emulation`` reproduces that on
any device: float32 products of the float16-rounded inputs, rounded to float16 after every step.

Doing that rounding on every entry costs more than the GEMM itself on a CPU. The fast path
(``manifold_radii`` / ``precision_recall_from_radii``) therefore computes the float32 GEMM of the
rounded inputs - the very values the emulation rounds - and decides from ``|u|^2 + |v|^2 - 2 u.v``
with a bound on how far the float16 rounding can move it (``Arithmetic.margin``). Only the
decisions that bound leaves open get the emulation, on values gathered from the same GEMM tile,
so every decision equals the emulation's (``*_reference`` functions, kept for tests and
benchmarks):

* radii (k-th neighbour, the point itself at position 0): per row, only the candidates whose
  lower bound does not exceed an upper bound of the radius are emulated (group minima prune the
  tile first); tiles of one set are computed once for both orientations (u.v is symmetric);
* precision / recall: per tile, the largest margin per sample column / reference row says
  "certainly inside", "certainly outside" or "open"; open columns/rows are emulated, and tiles
  whose columns and rows are all decided already are skipped.

Inputs whose float16 arithmetic could overflow anywhere (norms near 65504) and non-finite
features take the reference path, which has the original's per-block float32 fallback.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations

import numpy as np
import torch
from tqdm import tqdm

from . import linalg
from .tensors import as_tensor

ROW_BATCH = 10000  # the original ManifoldEstimator's row/col block size
COL_BATCH = 10000
TILE = 5000  # fast path: largest GEMM tile (decisions do not depend on it)
MIN_SHARED_TILE = 256  # tiles at least this large share one GEMM for both orientations
CHUNK = 128  # rows per elementwise pass, so the pass stays in cache
GROUP = 64  # columns per group minimum in the radius candidate search (at most)
DENSE_FRACTION = 1 / 4  # more candidates than this fraction of a chunk: emulate it whole



# ------------------------------------------------------------------ arithmetic


class Arithmetic:
    """Squared-distance arithmetic of one DistanceBlock flavour."""

    unit: float  # unit round-off of the format the distance is rounded to
    limit: float  # largest finite value of that format

    def points(self, x: torch.Tensor):
        """(inputs as the GEMM sees them, their squared norms as the distance uses them)."""
        raise NotImplementedError

    def distance(self, nu, nv, g):
        """Elementwise distance from row norms, column norms and the float32 GEMM value."""
        raise NotImplementedError

    def margin(self, nu, nv, y_abs, dim: int):
        """Upper bound on |distance - (nu + nv - 2 g)| (before the max with 0) for a pair with
        squared norms at most nu (row), nv (column) whose distance is at most y_abs, plus the
        float32 rounding of the fast path's own filters.

        The distance rounds 2g, x = nu - 2g = a - nv and y = x + nv (a = nu + nv - 2g), each to
        within ``unit`` relative: |2g| <= 2 |u||v|, |x| <= max(nv, y_abs) for 0 <= a <= y_abs."""
        growth = 1 + 2.0 ** -9 + dim * 2.0 ** -24  # norm rounding and GEMM error vs |u||v|
        two_g = 2 * torch.sqrt(nu * nv) * growth
        rounded = two_g + torch.maximum(torch.as_tensor(nv), torch.as_tensor(y_abs)) + y_abs
        return self.unit * 1.05 * rounded + 2.0 ** -20 * (rounded + nu + nv) + 1e-5

    def safe(self, norms_max: float, dim: int) -> bool:
        """No intermediate can overflow: |u|^2 + |v|^2 + 2|u||v| stays below the limit."""
        growth = 1 + 2.0 ** -9 + dim * 2.0 ** -24
        return math.isfinite(norms_max) and 4 * norms_max * growth * 1.01 < self.limit


class Fp16Emulation(Arithmetic):
    unit, limit = 2.0 ** -11, 65504.0

    def points(self, x):
        x16 = x.half().float()
        return x16, (x16 * x16).sum(1).half().float()

    def distance(self, nu, nv, g):
        g2 = (g.half().float() * 2).half().float()
        return torch.clamp_min(((nu - g2).half().float() + nv).half().float(), 0)


class Fp32(Arithmetic):
    unit, limit = 2.0 ** -24, 3.0e38

    def points(self, x):
        x = x.float()
        return x, (x * x).sum(1)

    def distance(self, nu, nv, g):
        return torch.clamp_min((nu - 2 * g) + nv, 0)


FP16, FP32 = Fp16Emulation(), Fp32()


def _arith(fp16: bool) -> Arithmetic:
    return FP16 if fp16 else FP32


# ------------------------------------------------------------ reference path


def _gemm(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """u @ v.T in float32; the one product both paths use, so they see the same numbers."""
    return linalg.matmul(u, v.t())


def _dist_block(u: torch.Tensor, v: torch.Tensor, fp16: bool = True) -> torch.Tensor:
    """Squared distances exactly as the original DistanceBlock (see module docstring):
    float16 emulation, recomputed in float32 from the unrounded inputs when any entry is
    non-finite."""
    if fp16:
        (u16, nu), (v16, nv) = FP16.points(u), FP16.points(v)
        d = FP16.distance(nu[:, None], nv[None, :], _gemm(u16, v16))
        if bool(torch.isfinite(d).all()):
            return d
    (u32, nu), (v32, nv) = FP32.points(u), FP32.points(v)
    return FP32.distance(nu[:, None], nv[None, :], _gemm(u32, v32))


def manifold_radii_reference(feats, k: int = 3, fp16: bool = True, device=None,
                             row_batch: int = ROW_BATCH, col_batch: int = COL_BATCH):
    """Straightforward radii: every block emulated in full (the original's block structure)."""
    f = as_tensor(feats, device, torch.float32)
    out = []
    for r in range(0, len(f), row_batch):
        rows = f[r : r + row_batch]
        best = None
        for c in range(0, len(f), col_batch):
            d = _dist_block(rows, f[c : c + col_batch], fp16)
            cand = d if best is None else torch.cat([best, d], 1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        out.append(best[:, k])
    return torch.cat(out)


def precision_recall_from_radii_reference(ref, ref_radii, sample, sample_radii, fp16: bool = True,
                                          device=None, row_batch: int = ROW_BATCH,
                                          col_batch: int = COL_BATCH):
    """Straightforward decisions: every block emulated in full, ref rows / sample columns."""
    r = as_tensor(ref, device, torch.float32)
    s = as_tensor(sample, r.device, torch.float32)
    rr, sr = as_tensor(ref_radii, r.device).float(), as_tensor(sample_radii, r.device).float()
    sample_in = torch.zeros(len(s), dtype=torch.bool, device=r.device)
    ref_in = torch.zeros(len(r), dtype=torch.bool, device=r.device)
    for i in range(0, len(r), row_batch):
        for j in range(0, len(s), col_batch):
            d = _dist_block(r[i : i + row_batch], s[j : j + col_batch], fp16)
            sample_in[j : j + col_batch] |= (d <= rr[i : i + row_batch, None]).any(0)
            ref_in[i : i + row_batch] |= (d <= sr[None, j : j + col_batch]).any(1)
    return float(sample_in.double().mean()), float(ref_in.double().mean())


# ----------------------------------------------------------------- fast path


class _Workers:
    """Runs the per-chunk passes of a tile as tasks on ``n`` threads, each torch operation on a
    single CPU thread (they release the GIL). The passes are small and cache-resident, and
    OpenMP's fork/join per operation costs more than they do (ten times more on a busy
    machine). On a GPU the tasks run in order on the calling thread."""

    def __init__(self, device: torch.device):
        self.cpu = device.type == "cpu"
        self.n = max(1, torch.get_num_threads()) if self.cpu else 1
        self.local = threading.local()

    def __enter__(self):
        self.pool = ThreadPoolExecutor(self.n, thread_name_prefix="pr") if self.n > 1 else None
        if self.cpu:
            self.threads = torch.get_num_threads()
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown()
        if self.cpu:
            torch.set_num_threads(self.threads)

    def run(self, tasks):
        """Call every task (writing disjoint outputs); re-raise the first error."""
        if self.pool is None:
            for task in tasks:
                task()
            return
        for future in [self.pool.submit(task) for task in tasks]:
            future.result()

    def buffer(self, rows: int, cols: int, device) -> torch.Tensor:
        """This thread's scratch buffer of at least rows x cols floats."""
        buf = getattr(self.local, "buf", None)
        if buf is None or buf.numel() < rows * cols or buf.device != device:
            buf = self.local.buf = torch.empty(rows * cols, device=device)
        return buf[: rows * cols].view(rows, cols)


def _spans(n: int, block: int, tile: int):
    """GEMM tiles: each of the reference path's blocks split into near-equal tiles of at most
    ``tile`` rows, so every tile either is a block or a large part of one (same float32 GEMM
    values as the reference path's block)."""
    out = []
    for a in range(0, n, block):
        b = min(a + block, n)
        parts = -(-(b - a) // tile)
        cuts = [a + (b - a) * i // parts for i in range(parts + 1)]
        out += list(zip(cuts[:-1], cuts[1:]))
    return out


def _chunks(n: int, size: int):
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


def _merge_smallest(best: torch.Tensor, rows: torch.Tensor, vals: torch.Tensor):
    """best[r] keeps the best.shape[1] smallest values seen for row r; add (rows, vals)."""
    if rows.numel() == 0:
        return
    uniq, inv, counts = torch.unique(rows, return_inverse=True, return_counts=True)
    order = torch.argsort(inv, stable=True)
    inv_sorted = inv[order]
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(len(rows), device=rows.device) - start[inv_sorted]
    dense = torch.full((len(uniq), int(counts.max())), math.inf, device=best.device)
    dense[inv_sorted, pos] = vals[order]
    merged = torch.cat([best[uniq], dense], 1)
    best[uniq] = torch.topk(merged, best.shape[1], dim=1, largest=False).values


class _PointSet:
    """One feature set prepared for distance tiles: the inputs as the GEMM sees them, their
    squared norms as the distance uses them, and the original features (reference path)."""

    def __init__(self, feats, arith: Arithmetic, device=None):
        self.raw = as_tensor(feats, device, torch.float32)
        self.arith = arith
        self.x, self.norms = arith.points(self.raw)
        self.dim = self.x.shape[1]

    def __len__(self):
        return self.x.shape[0]

    def fast_ok(self) -> bool:
        """Finite features (a non-finite one makes its norm non-finite), no possible overflow."""
        return bool(torch.isfinite(self.norms).all()) and self.arith.safe(float(self.norms.max()), self.dim)


class _RadiusSearch:
    """k-th smallest emulated distance per row of one set against itself."""

    def __init__(self, pts: _PointSet, k: int, chunk: int, workers: _Workers):
        self.pts, self.k, self.arith, self.chunk, self.workers = pts, k, pts.arith, chunk, workers
        self.best = torch.full((len(pts), k + 1), math.inf, device=pts.x.device)
        self.norm_max = pts.norms.max()

    def _margin(self, nu, radius_bound):
        y_abs = torch.where(torch.isfinite(radius_bound), radius_bound.abs(),
                            nu + self.norm_max + 2 * torch.sqrt(nu * self.norm_max))
        return self.arith.margin(nu, self.norm_max, y_abs, self.pts.dim)

    def _merge_dense(self, best, d, dim: int, rows):
        """Merge the k+1 smallest of a fully emulated block d along ``dim`` into best[rows]."""
        kk = min(self.k + 1, d.shape[dim])
        vals = torch.topk(d, kk, dim=dim, largest=False).values
        index = rows.repeat_interleave(kk) if dim == 1 else rows.repeat(kk)
        _merge_smallest(best, index, vals.reshape(-1))

    def rows(self, r0: int, c0: int, g: torch.Tensor, first: bool):
        """Rows r0.. against columns c0.. of the set, g = their GEMM tile."""
        width = g.shape[1]
        group = max(4, min(GROUP, width // 64))  # enough groups for a selective k-th minimum
        self.workers.run([lambda rs=rs: self._rows_chunk(r0, c0, g[rs], rs.start, group, first)
                          for rs in _chunks(g.shape[0], self.chunk)])

    def _rows_chunk(self, r0, c0, gc, a, group, first):
        n, width = gc.shape
        rows = slice(r0 + a, r0 + a + n)
        nu, nv = self.pts.norms[rows], self.pts.norms[c0 : c0 + width]
        padded = -(-width // group) * group
        buf = self.workers.buffer(n, padded, gc.device)
        buf[:, width:] = math.inf
        torch.sub(nv, gc, alpha=2, out=buf[:, :width])  # distance - nu
        groups = buf.view(n, -1, group).amin(2)
        bound = self.best[rows].amax(1)  # upper bound of the radius so far
        if first and groups.shape[1] > self.k:
            # the k+1 smallest group minima are k+1 distinct entries: their largest, plus the
            # rounding margin (y <= a + margin(|y|), so y <= a + 1.01 margin(|a|)), bounds the
            # k-th neighbour's emulated distance
            a_kth = nu + torch.topk(groups, self.k + 1, dim=1, largest=False).values[:, -1]
            bound = torch.minimum(bound, a_kth + 1.01 * self._margin(nu, a_kth))
        thr = bound - nu + self._margin(nu, bound)
        gr, gg = (groups <= thr[:, None]).nonzero(as_tuple=True)
        local = torch.arange(n, device=gc.device)
        if len(gr) > DENSE_FRACTION * groups.numel() or not bool(torch.isfinite(thr).all()):
            self._merge_dense(self.best[rows], self.arith.distance(nu[:, None], nv[None, :], gc), 1, local)
            return
        si, off = (buf.view(n, -1, group)[gr, gg] <= thr[gr, None]).nonzero(as_tuple=True)
        ri, cj = gr[si], gg[si] * group + off
        _merge_smallest(self.best[rows], ri, self.arith.distance(nu[ri], nv[cj], gc[ri, cj]))

    def columns(self, c0: int, r0: int, g: torch.Tensor):
        """Rows c0.. of the set (the tile's columns) against columns r0.. (the tile's rows),
        read from the same tile g without transposing it; one task per band of columns."""
        band = -(-g.shape[1] // self.workers.n)
        self.workers.run([lambda cs=cs: self._columns_band(c0, r0, g, cs)
                          for cs in _chunks(g.shape[1], band)])

    def _columns_band(self, c0, r0, g, cs: slice):
        cols = slice(c0 + cs.start, c0 + cs.stop)
        nu_q = self.pts.norms[cols]
        bound = self.best[cols].amax(1)
        thr = bound - nu_q + self._margin(nu_q, bound)
        for rs in _chunks(g.shape[0], self.chunk):
            gc = g[rs, cs]
            nv_p = self.pts.norms[r0 + rs.start : r0 + rs.stop]
            t = torch.sub(nv_p[:, None], gc, alpha=2, out=self.workers.buffer(*gc.shape, gc.device))
            open_cols = (t.amin(0) <= thr).nonzero(as_tuple=True)[0]
            if len(open_cols) == 0:
                continue
            ri, ci = (t[:, open_cols] <= thr[open_cols]).nonzero(as_tuple=True)
            if len(ri) > DENSE_FRACTION * t.shape[0] * len(open_cols):
                d = self.arith.distance(nu_q[None, open_cols], nv_p[:, None], gc[:, open_cols])
                self._merge_dense(self.best[cols], d, 0, open_cols)
                continue
            cj = open_cols[ci]
            _merge_smallest(self.best[cols], cj, self.arith.distance(nu_q[cj], nv_p[ri], gc[ri, cj]))

    def radii(self) -> torch.Tensor:
        return self.best.amax(1)


def _fast_radii(pts: _PointSet, k: int, spans, chunk: int, bar):
    with _Workers(pts.x.device) as workers:
        search = _RadiusSearch(pts, k, chunk, workers)
        for a, b in spans:  # diagonal tiles first: every row gets a finite bound from its own tile
            search.rows(a, a, _gemm(pts.x[a:b], pts.x[a:b]), first=True)
            bar.update(1)
        for (a, b), (c, d) in combinations(spans, 2):
            g = _gemm(pts.x[a:b], pts.x[c:d])
            search.rows(a, c, g, first=False)
            if min(b - a, d - c) >= MIN_SHARED_TILE:  # u.v of large tiles is bitwise symmetric
                search.columns(c, a, g)
            else:
                search.rows(c, a, _gemm(pts.x[c:d], pts.x[a:b]), first=False)
            bar.update(1)
        return search.radii()


class _CrossSide:
    """One of the two decisions on a ref x sample tile: "sample j lies in some reference ball"
    (precision, balls on the rows) or "reference i lies in some sample ball" (recall, balls on
    the columns). ``inside`` accumulates over tiles."""

    def __init__(self, inside, balls_on_rows: bool):
        self.inside, self.balls_on_rows = inside, balls_on_rows

    def thresholds(self, arith, dim, nu, nv, rr, sr, start):
        """Candidate pairs have g - shift >= threshold; anything else is certainly outside.
        distance <= r  <=>  g - (n_ball - r) / 2 >= n_point / 2, up to margin / 2."""
        if self.balls_on_rows:
            self.shift, self.radius = ((nu - rr) / 2)[:, None], rr[:, None]
            half = arith.margin(nu.max(), nv, rr.max(), dim) / 2
            thr = (nv / 2 - half)[None, :]
        else:
            self.shift, self.radius = ((nv - sr) / 2)[None, :], sr[None, :]
            half = arith.margin(nu, nv.max(), sr.max(), dim) / 2
            thr = (nu / 2 - half)[:, None]
        decided = self.inside[start : start + thr.numel()].view(thr.shape)
        self.thr = torch.where(decided, math.inf, thr)
        self.start = start
        return bool(torch.isfinite(self.thr).any())

    def decide(self, arith, gc, rows: slice, nu, nv, buf):
        """Candidates of the rows ``rows`` of the tile (gc = their GEMM values), emulated."""
        shift = self.shift[rows] if self.balls_on_rows else self.shift
        thr = self.thr if self.balls_on_rows else self.thr[rows]
        radius = self.radius[rows] if self.balls_on_rows else self.radius
        e = torch.sub(gc, shift, out=buf)
        if self.balls_on_rows:  # columns whose best margin reaches their threshold, then pairs
            cols = (e.amax(0) >= thr[0]).nonzero(as_tuple=True)[0]
            ri, ci = (e[:, cols] >= thr[:, cols]).nonzero(as_tuple=True)
            cj = cols[ci]
        else:
            hit_rows = (e.amax(1) >= thr[:, 0]).nonzero(as_tuple=True)[0]
            rj, cj = (e[hit_rows] >= thr[hit_rows]).nonzero(as_tuple=True)
            ri = hit_rows[rj]
        nu_c = nu[rows]
        if len(ri) > DENSE_FRACTION * gc.numel():
            hit = arith.distance(nu_c[:, None], nv[None, :], gc) <= radius
            ri, cj = hit.nonzero(as_tuple=True)
        else:
            d = arith.distance(nu_c[ri], nv[cj], gc[ri, cj])
            keep = d <= (radius[ri, 0] if self.balls_on_rows else radius[0, cj])
            ri, cj = ri[keep], cj[keep]
        if self.balls_on_rows:  # concurrent tasks only ever write True here
            self.inside[self.start + cj] = True
        else:
            self.inside[self.start + rows.start + ri] = True


def _fast_cross(ref: _PointSet, ref_radii, smp: _PointSet, smp_radii, ref_spans, smp_spans,
                chunk: int, bar):
    arith, dev = ref.arith, ref.x.device
    precision = _CrossSide(torch.zeros(len(smp), dtype=torch.bool, device=dev), True)
    recall = _CrossSide(torch.zeros(len(ref), dtype=torch.bool, device=dev), False)

    def chunk_task(g, rows, sides, nu, nv):
        buf = workers.buffer(rows.stop - rows.start, g.shape[1], dev)
        for side in sides:
            side.decide(arith, g[rows], rows, nu, nv, buf)

    with _Workers(dev) as workers:
        for a, b in ref_spans:
            nu, rr = ref.norms[a:b], ref_radii[a:b]
            for c, d in smp_spans:
                bar.update(1)
                nv, sr = smp.norms[c:d], smp_radii[c:d]
                sides = [side for side, start in ((precision, c), (recall, a))
                         if side.thresholds(arith, ref.dim, nu, nv, rr, sr, start)]
                if not sides:
                    continue  # every row and column of this tile is decided already
                g = _gemm(ref.x[a:b], smp.x[c:d])
                workers.run([lambda rs=rs: chunk_task(g, rs, sides, nu, nv)
                             for rs in _chunks(b - a, chunk)])
    return float(precision.inside.double().mean()), float(recall.inside.double().mean())


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="tile", disable=not progress, leave=False,
                dynamic_ncols=True)


def _radii(pts: _PointSet, k: int, fp16: bool, block: int, tile: int, chunk: int, progress: bool):
    if len(pts) <= k:
        raise ValueError(f"the k-NN radius needs more than k={k} points, got {len(pts)}")
    if not pts.fast_ok():
        return manifold_radii_reference(pts.raw, k, fp16, None, block, block)
    spans = _spans(len(pts), block, tile)
    with _bar(len(spans) * (len(spans) + 1) // 2, "radii", progress) as bar:
        return _fast_radii(pts, k, spans, chunk, bar)


def _cross(ref: _PointSet, rr, smp: _PointSet, sr, fp16: bool, row_batch: int, col_batch: int,
           tile: int, chunk: int, progress: bool):
    rr, sr = as_tensor(rr, ref.x.device).float(), as_tensor(sr, ref.x.device).float()
    if not (ref.fast_ok() and smp.fast_ok() and bool(torch.isfinite(rr).all())
            and bool(torch.isfinite(sr).all())):
        return precision_recall_from_radii_reference(ref.raw, rr, smp.raw, sr, fp16, None,
                                                     row_batch, col_batch)
    ref_spans, smp_spans = _spans(len(ref), row_batch, tile), _spans(len(smp), col_batch, tile)
    with _bar(len(ref_spans) * len(smp_spans), "precision/recall", progress) as bar:
        return _fast_cross(ref, rr, smp, sr, ref_spans, smp_spans, chunk, bar)


# ----------------------------------------------------------------- public API


def manifold_radii(feats, k: int = 3, fp16: bool = True, device=None,
                   row_batch: int = ROW_BATCH, col_batch: int = COL_BATCH,
                   tile: int = TILE, chunk: int = CHUNK, progress: bool = False) -> torch.Tensor:
    """Squared distance to the k-th nearest point of the same set (the point itself sits at
    position 0), float32 [N], equal to ``manifold_radii_reference``."""
    pts = _PointSet(feats, _arith(fp16), device)
    return _radii(pts, k, fp16, min(row_batch, col_batch), tile, chunk, progress)


def precision_recall_from_radii(ref, ref_radii, sample, sample_radii, fp16: bool = True,
                                device=None, row_batch: int = ROW_BATCH,
                                col_batch: int = COL_BATCH, tile: int = TILE,
                                chunk: int = CHUNK, progress: bool = False):
    """(precision, recall) with ref rows / sample columns (fp16 D is not symmetric) and an
    inclusive ``<=``, equal to ``precision_recall_from_radii_reference``."""
    arith = _arith(fp16)
    r = _PointSet(ref, arith, device)
    s = _PointSet(sample, arith, r.x.device)
    return _cross(r, ref_radii, s, sample_radii, fp16, row_batch, col_batch, tile, chunk, progress)


def precision_recall(ref_acts, sample_acts, k: int = 3, fp16: bool = True, device=None,
                     progress: bool = False, ref_radii=None, row_batch: int = ROW_BATCH,
                     col_batch: int = COL_BATCH, tile: int = TILE, chunk: int = CHUNK):
    """Improved precision/recall (Kynkäänniemi et al.) exactly as OpenAI's evaluator.
    ``ref_radii``: the reference's radii when already known (they are cached with it)."""
    dev = ref_acts.device if isinstance(ref_acts, torch.Tensor) else device
    arith = _arith(fp16)
    ref = _PointSet(ref_acts, arith, dev)
    sample = _PointSet(sample_acts, arith, ref.x.device)
    block = min(row_batch, col_batch)
    if ref_radii is None:
        ref_radii = _radii(ref, k, fp16, block, tile, chunk, progress)
    sample_radii = _radii(sample, k, fp16, block, tile, chunk, progress)
    return _cross(ref, ref_radii, sample, sample_radii, fp16, row_batch, col_batch, tile, chunk, progress)
