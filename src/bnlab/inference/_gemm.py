"""An AVX-512 SGEMM with a fused epilogue, for the engine's convolutions (reference: np.matmul).

Why not ``np.matmul``: NumPy's OpenBLAS runs its AVX2 ("Haswell") kernels here (the environment
pins ``OPENBLAS_CORETYPE``), which reach about half of what a core with full-width AVX-512 can do.
This file is a classic register-blocked GEMM (Goto/BLIS style; K blocked by ``KC`` = 512 when
larger, so that a 64 KB piece of a B panel serves an L2-sized chunk of A rows):

    C[i:i+6, j:j+32] = A[i:i+6, :] @ Bp[j/32]          (the micro-kernel, 12 zmm accumulators)

* B (the conv weights, (K, N) with N a multiple of 32) is packed once into panels
  Bp (N/32, K, 32): each k step of the micro-kernel loads two 16-float vectors of one panel;
* A (activations, (M, K) row-major) is read in place: 6 row streams, one broadcast per row and k;
* the micro-kernel is written in LLVM IR (numba ``@intrinsic``) so that the 12 accumulators stay in
  registers: per k, 2 loads + 6 broadcasts + 12 fused multiply-adds;
* rows left over (M mod 6) go through a zero-padded 6-row scratch copy;
* the epilogue y = act(y·scale + shift + residual) is applied to each tile's rows while they are
  still in cache.

Work is split in (row blocks x column panels) items that a small thread pool claims dynamically
(see :class:`WorkPool`): a thread that the OS deschedules on a busy machine delays only the item
it holds, never a whole barrier.
"""

from __future__ import annotations

import itertools
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

MR, NR = 6, 32  # micro-tile: 6 rows x 32 columns (two 16-float vectors)
A_CHUNK_FLOATS = 64 * 1024  # rows of A swept per B panel: 256 KB, a quarter of a 1 MB L2
KC = 512  # K block of the implicit-GEMM conv: a (KC x 32) piece of a B panel is 64 KB


def _microkernel_codegen(prefetch: bool):
    """The IR of the micro-kernel; with ``prefetch``, every k step also prefetches (into L1) the
    float at b[pf_off + k·pf_step]: the caller points it at the next weight-panel piece, so that
    DRAM streams while this piece is reused from cache (measured 5-20 % on the big-K GEMMs)."""

    def codegen(context, builder, signature, args):
        a_arr, a_off_v, lda_v, b_arr, b_off_v, c_arr, c_off_v, ldc_v, k_v, acc_v = args[:10]
        aty, bty, cty = signature.args[0], signature.args[3], signature.args[5]
        f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        v16 = ir.VectorType(f32, 16)
        v16p = v16.as_pointer()
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(v16, [v16, v16, v16]), "llvm.fma.v16f32"
        )
        a_base = builder.gep(context.make_array(aty)(context, builder, a_arr).data, [a_off_v])
        b_base = builder.gep(context.make_array(bty)(context, builder, b_arr).data, [b_off_v])
        c_base = builder.gep(context.make_array(cty)(context, builder, c_arr).data, [c_off_v])
        rows = [builder.gep(a_base, [builder.mul(lda_v, ir.Constant(i64, r))]) for r in range(MR)]
        zero = ir.Constant(v16, None)
        c_ptrs = []
        for r in range(MR):
            crow = builder.gep(c_base, [builder.mul(ldc_v, ir.Constant(i64, r))])
            c_ptrs += [builder.bitcast(builder.gep(crow, [ir.Constant(i64, 16 * h)]), v16p)
                       for h in range(2)]  # fmt: skip
        accumulate = builder.icmp_signed("!=", acc_v, ir.Constant(acc_v.type, 0))
        # the initial accumulators: what c holds, or zero (a select, so c's garbage never counts)
        init = [builder.select(accumulate, builder.load(p, align=4), zero) for p in c_ptrs]
        undef = ir.Constant(v16, ir.Undefined)
        splat = ir.Constant(ir.VectorType(i32, 16), [0] * 16)

        entry = builder.block
        loop = builder.append_basic_block("k_loop")
        done = builder.append_basic_block("k_done")
        builder.cbranch(builder.icmp_signed(">", k_v, ir.Constant(i64, 0)), loop, done)

        builder.position_at_end(loop)
        kk = builder.phi(i64)
        acc = [builder.phi(v16) for _ in range(2 * MR)]
        if prefetch:
            pf_off_v, pf_step_v = args[10:12]
            b_data = context.make_array(bty)(context, builder, b_arr).data
            pf = builder.gep(b_data, [builder.add(pf_off_v, builder.mul(kk, pf_step_v))])
            i8p = ir.IntType(8).as_pointer()
            fn = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                "llvm.prefetch.p0",
            )  # (address, read, locality 3 = keep in L1, data cache)
            builder.call(fn, [builder.bitcast(pf, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3),
                              ir.Constant(i32, 1)])  # fmt: skip
        off = builder.mul(kk, ir.Constant(i64, NR))
        b0 = builder.load(builder.bitcast(builder.gep(b_base, [off]), v16p), align=4)
        off16 = builder.add(off, ir.Constant(i64, 16))
        b1 = builder.load(builder.bitcast(builder.gep(b_base, [off16]), v16p), align=4)
        new = []
        for r in range(MR):
            s = builder.load(builder.gep(rows[r], [kk]), align=4)
            av = builder.shuffle_vector(
                builder.insert_element(undef, s, ir.Constant(i32, 0)), undef, splat
            )
            new += [
                builder.call(fma, [av, b0, acc[2 * r]]),
                builder.call(fma, [av, b1, acc[2 * r + 1]]),
            ]
        k_next = builder.add(kk, ir.Constant(i64, 1))
        tail = builder.block
        kk.add_incoming(ir.Constant(i64, 0), entry)
        kk.add_incoming(k_next, tail)
        for p, v, v0 in zip(acc, new, init, strict=True):
            p.add_incoming(v0, entry)
            p.add_incoming(v, tail)
        builder.cbranch(builder.icmp_signed("<", k_next, k_v), loop, done)

        builder.position_at_end(done)
        results = [builder.phi(v16) for _ in range(2 * MR)]  # phis first: LLVM requires it
        for res, v, v0 in zip(results, new, init, strict=True):
            res.add_incoming(v0, entry)
            res.add_incoming(v, tail)
        for res, p in zip(results, c_ptrs, strict=True):
            builder.store(res, p, align=4)
        return context.get_dummy_value()

    return codegen


@intrinsic
def _microkernel(typingctx, a, a_off, lda, b, b_off, c, c_off, ldc, k, acc):
    """c[r·ldc + j] (+)= Σ_k a[r·lda + k] · b[k·32 + j] for r < 6, j < 32 (offsets in elements);
    ``acc`` (int) nonzero adds to what c holds (the K blocks after the first), zero overwrites."""
    return types.void(a, a_off, lda, b, b_off, c, c_off, ldc, k, acc), _microkernel_codegen(False)


@intrinsic
def _microkernel_pf(typingctx, a, a_off, lda, b, b_off, c, c_off, ldc, k, acc, pf_off, pf_step):
    """:func:`_microkernel`, also prefetching b[pf_off + k·pf_step] at every k step."""
    sig = types.void(a, a_off, lda, b, b_off, c, c_off, ldc, k, acc, pf_off, pf_step)
    return sig, _microkernel_codegen(True)


@numba.njit(nogil=True, cache=True)
def _prefetch_target(b_off, nxt, j, n_blocks, kc):  # pragma: no cover - compiled
    """(pf_off, pf_step) for the j-th row block of a weight piece (kc x 32 floats at b_off)
    whose successor starts at nxt (nxt < 0: none): blocks 1..n−1 each prefetch a 1/(n−1) share
    of the next piece, spread over their kc steps (one address per step, at most 16 floats =
    one 64-byte line apart, so with 3 or more blocks every line is covered); block 0 (and the
    last piece) prefetch their own piece, which is already in cache."""
    if nxt < 0 or j == 0 or n_blocks < 2:
        return b_off, 0
    share = -(-(kc * NR) // (n_blocks - 1))
    return nxt + (j - 1) * share, min(16, -(-share // kc))


@numba.njit(nogil=True, cache=True)
def _next_piece(p, pan0, pan1, kb, k):  # pragma: no cover - compiled
    """Offset in the packed B (N/32, K, 32) of the piece after (panel p, K block kb), in the
    order the K-blocked loops take them (kb outer, p inner); −1 after the last."""
    if p + 1 < pan1:
        return (p + 1) * k * NR + kb * NR
    if kb + KC < k:
        return pan0 * k * NR + (kb + KC) * NR
    return -1


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _epilogue_rows(c, r0, r1, j0, j1, scale, shift, residual, relu):  # pragma: no cover
    """c[r, j] = act(c[r, j]·scale[j] + shift[j] + residual[r, j]), r0 <= r < r1, j0 <= j < j1.

    One branch-free loop per case (ReLU as max(v, lo) with lo = 0 or −inf) over 1-D row views
    starting at j0, so that LLVM vectorizes it (indexing c[r, j] from a variable j0 instead was
    measured 1.6x slower for the whole K=64 GEMM); the tile is still in L1 when this runs.
    """
    lo = np.float32(0.0) if relu else np.float32(-np.inf)
    nj = j1 - j0
    sh = shift[j0:j1]
    sc = scale[j0:j1] if scale.shape[0] > 0 else scale
    for r in range(r0, r1):
        cr = c[r, j0:j1]
        if sc.shape[0] == 0 and residual.shape[0] > 0:
            rr = residual[r, j0:j1]
            for j in range(nj):
                cr[j] = max(cr[j] + sh[j] + rr[j], lo)
        elif sc.shape[0] == 0:
            for j in range(nj):
                cr[j] = max(cr[j] + sh[j], lo)
        elif residual.shape[0] > 0:
            rr = residual[r, j0:j1]
            for j in range(nj):
                cr[j] = max(cr[j] * sc[j] + sh[j] + rr[j], lo)
        else:
            for j in range(nj):
                cr[j] = max(cr[j] * sc[j] + sh[j], lo)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def gemm_tile_range(
    a, bp, c, blk0, blk1, pan0, pan1, scale, shift, residual, relu
):  # pragma: no cover
    """Rows [6·blk0, 6·blk1) ∩ [0, M) and panels [pan0, pan1) of c = epilogue(a @ B).

    a (M, K) float32 C-contiguous; bp (N/32, K, 32) packed B; c (M, N) C-contiguous.
    """
    m, k = a.shape
    n = c.shape[1]
    af = a.reshape(-1)
    bf = bp.reshape(-1)
    cf = c.reshape(-1)
    full = m // MR
    hi = min(blk1, full)
    if k > KC or n > m:
        # big K or more weights than rows (ResNet's later stages): K blocks of KC; a 64 KB piece
        # of each B panel serves a whole L2-sized chunk of row blocks, so the weights are read
        # once per chunk, not once per row block, and the next piece is prefetched meanwhile
        chunk = max(1, A_CHUNK_FLOATS // (MR * KC))
        for c0 in range(blk0, hi, chunk):
            c1 = min(c0 + chunk, hi)
            for kb in range(0, k, KC):
                kc = min(KC, k - kb)
                for p in range(pan0, pan1):
                    b_off = p * k * NR + kb * NR
                    nxt = _next_piece(p, pan0, pan1, kb, k)
                    for blk in range(c0, c1):
                        i = blk * MR
                        pf, st = _prefetch_target(b_off, nxt, blk - c0, c1 - c0, kc)
                        _microkernel_pf(af, i * k + kb, k, bf, b_off, cf, i * n + p * NR, n, kc,
                                        kb, pf, st)  # fmt: skip
            for blk in range(c0, c1):
                _epilogue_rows(c, blk * MR, blk * MR + MR, pan0 * NR, pan1 * NR, scale, shift,
                               residual, relu)  # fmt: skip
    else:
        # one row block against every panel (its A rows stay in L1, C rows are written
        # contiguously), then the epilogue on the whole row block; measured faster than sweeping
        # a chunk of rows per panel even for N = 64 (the layer1 convs)
        for blk in range(blk0, hi):
            i = blk * MR
            for p in range(pan0, pan1):
                _microkernel(af, i * k, k, bf, p * k * NR, cf, i * n + p * NR, n, k, 0)
            _epilogue_rows(c, i, i + MR, pan0 * NR, pan1 * NR, scale, shift, residual, relu)
    if blk1 > full and m % MR:  # the last, partial block: through a zero-padded scratch
        i = full * MR
        rows = m - i
        a_tile = np.zeros((MR, k), np.float32)
        a_tile[:rows] = a[i:]
        c_tile = np.empty((MR, NR), np.float32)
        at = a_tile.reshape(-1)
        ct = c_tile.reshape(-1)
        for p in range(pan0, pan1):
            _microkernel(at, 0, k, bf, p * k * NR, ct, 0, NR, k, 0)
            c[i:, p * NR : (p + 1) * NR] = c_tile[:rows]
        _epilogue_rows(c, i, m, pan0 * NR, pan1 * NR, scale, shift, residual, relu)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _gather_rows(x, kk, stride, pad, ho, wo, r0, r1, out):  # pragma: no cover
    """out[r − r0, (i, j, c)] = x[n, oh·s − p + i, ow·s − p + j, c] for GEMM rows r = (n, oh, ow)
    in [r0, r1): the im2col rows of one chunk, written into a small L2-resident scratch."""
    n_img, h, w, ch = x.shape
    for r in range(r0, r1):
        ow = r % wo
        t = r // wo
        oh = t % ho
        nn = t // ho
        row = r - r0
        for i in range(kk):
            ih = oh * stride - pad + i
            for j in range(kk):
                iw = ow * stride - pad + j
                base = (i * kk + j) * ch
                if 0 <= ih < h and 0 <= iw < w:
                    for q in range(ch):
                        out[row, base + q] = x[nn, ih, iw, q]
                else:
                    for q in range(ch):
                        out[row, base + q] = 0.0


@numba.njit(nogil=True, cache=True, boundscheck=False)
def conv_tile_range(x, kk, stride, pad, ho, wo, bp, c, blk0, blk1, pan0, pan1, scale, shift,
                    residual, relu):  # fmt: skip  # pragma: no cover
    """Implicit-GEMM convolution: rows [6·blk0, 6·blk1) and panels [pan0, pan1) of
    c = epilogue(im2col(x) @ B), where the im2col rows of each chunk are gathered into a scratch
    instead of a full (N·Ho·Wo, k·k·C) matrix. x (N, H, W, C); c (N·Ho·Wo, C_out).

    K is blocked by ``KC``: for each K block, one (KC x 32) piece of a B panel (64 KB) serves
    every row block of the chunk before the next is loaded, and the chunk is sized so that its
    rows of one K block (chunk·6 x KC) fit in L2. Without the blocking, the big-K convs of
    ResNet's last stage (K = 4608, 49 rows at batch 1) streamed their 9.4 MB of weights once
    per 12 rows.
    """
    m, n = c.shape
    k = bp.shape[1]
    bf = bp.reshape(-1)
    cf = c.reshape(-1)
    hi = min(blk1, -(-m // MR))
    chunk = max(1, A_CHUNK_FLOATS // (MR * min(k, KC)))
    scratch = np.empty((chunk * MR, k), np.float32)
    sf = scratch.reshape(-1)
    c_last = np.empty((MR, n), np.float32)  # the last, partial row block accumulates here
    cl = c_last.reshape(-1)
    for c0 in range(blk0, hi, chunk):
        c1 = min(c0 + chunk, hi)
        r0 = c0 * MR
        r1 = min(c1 * MR, m)
        _gather_rows(x, kk, stride, pad, ho, wo, r0, r1, scratch)
        scratch[r1 - r0 : (c1 - c0) * MR] = 0.0  # padding rows of a last, partial block
        for kb in range(0, k, KC):
            kc = min(KC, k - kb)
            for p in range(pan0, pan1):  # one B panel piece stays in L1 across the chunk's rows
                b_off = p * k * NR + kb * NR
                nxt = _next_piece(p, pan0, pan1, kb, k)
                for blk in range(c0, c1):
                    i = blk * MR
                    local = (blk - c0) * MR * k + kb
                    pf, st = _prefetch_target(b_off, nxt, blk - c0, c1 - c0, kc)
                    if i + MR <= m:
                        _microkernel_pf(sf, local, k, bf, b_off, cf, i * n + p * NR, n, kc, kb,
                                        pf, st)  # fmt: skip
                    else:
                        _microkernel_pf(sf, local, k, bf, b_off, cl, p * NR, n, kc, kb, pf, st)
        for blk in range(c0, c1):
            i = blk * MR
            if i + MR > m:
                c[i:m, pan0 * NR : pan1 * NR] = c_last[: m - i, pan0 * NR : pan1 * NR]
            _epilogue_rows(c, i, min(i + MR, m), pan0 * NR, pan1 * NR, scale, shift, residual,
                           relu)  # fmt: skip


def pack_panels(w_kn: np.ndarray) -> np.ndarray:
    """B (K, N) -> panels (N/32, K, 32), contiguous: what the micro-kernel streams."""
    k, n = w_kn.shape
    if n % NR:
        raise ValueError(f"the packed GEMM needs N to be a multiple of {NR}, got N={n}")
    return np.ascontiguousarray(w_kn.reshape(k, n // NR, NR).transpose(1, 0, 2), np.float32)


def work_items(m: int, n: int, k: int, n_threads: int) -> list[tuple[int, int, int, int]]:
    """(blk0, blk1, pan0, pan1) items: about 4 per thread, split by rows or by panels.

    Every item reads its rows of A and its panels of B once, so a row split makes each item
    stream all of B (K x N) and a panel split all of A (M x K): rows when M >= N (the first
    stages), panels when N > M (the weight-heavy later stages at small batch, where a row split
    had each of 8 items stream all of layer4's 4-8 MB weights).
    """
    blocks, panels = -(-m // MR), n // NR
    want = max(1, 4 * n_threads) if n_threads > 1 else 1
    flops_per_item = 2.0 * m * n * k / want
    if flops_per_item < 2e5:  # too small to share: one item
        want = 1
    by_rows = m >= n or panels < min(want, blocks)
    if by_rows:
        step = -(-blocks // want)
        return [(b, min(b + step, blocks), 0, panels) for b in range(0, blocks, step)]
    step = -(-panels // want)
    return [(0, blocks, p, min(p + step, panels)) for p in range(0, panels, step)]


def conv_work_items(m: int, n: int, k: int, n_threads: int) -> list[tuple[int, int, int, int]]:
    """:func:`work_items` for the implicit-GEMM conv: a panel split is cut into one panel group
    per thread only, because every item gathers the im2col rows of its row blocks again (with 8
    groups, layer4's 3x3 convs at batch 1 gathered all their rows 8 times: 0.05-0.1 ms each)."""
    items = work_items(m, n, k, n_threads)
    if len(items) <= n_threads or items[0][:2] != items[-1][:2]:  # few items, or a row split
        return items
    blocks, panels = items[0][1], n // NR
    step = -(-panels // n_threads)
    return [(0, blocks, p, min(p + step, panels)) for p in range(0, panels, step)]


def gemm_reference(a, w_kn, scale, shift, residual, relu):
    """The slow obvious version: np.matmul then the epilogue, in float64."""
    y = a.astype(np.float64) @ w_kn.astype(np.float64)
    if scale.shape[0]:
        y = y * scale
    y = y + shift
    if residual.shape[0]:
        y = y + residual
    return np.maximum(y, 0) if relu else y


# --------------------------------------------------------------------------- threads


class _Job:
    """One parallel call: items claimed from a shared counter by whoever is running."""

    def __init__(self, fn, items):
        self.fn, self.items, self.n = fn, items, len(items)
        self.claim = itertools.count()  # next() on a count is atomic under the GIL
        self.lock = threading.Lock()
        self.done = 0
        self.finished = threading.Event()

    def work(self) -> None:
        while True:
            i = next(self.claim)
            if i >= self.n:
                return
            self.fn(*self.items[i])
            with self.lock:
                self.done += 1
                if self.done == self.n:
                    self.finished.set()


class WorkPool:
    """The calling thread plus ``n_threads − 1`` daemon workers sharing each job's items.

    The caller always works too and only waits for items another thread has already claimed, so
    a worker that is slow to wake (or descheduled on a loaded machine) costs at most one item.
    The kernels release the GIL (``nogil=True``), so the threads run in parallel.
    """

    def __init__(self, n_threads: int):
        self.n_threads = max(1, int(n_threads))
        self._run_lock = threading.Lock()  # one job at a time, whoever calls
        self._cv = threading.Condition()
        self._job: _Job | None = None
        self._serial = 0
        for _ in range(self.n_threads - 1):
            threading.Thread(target=self._worker, daemon=True, name="bnlab-gemm").start()

    def run(self, fn, items) -> None:
        if self.n_threads == 1 or len(items) == 1:
            for it in items:
                fn(*it)
            return
        job = _Job(fn, items)
        with self._run_lock:
            with self._cv:
                self._job = job
                self._serial += 1
                self._cv.notify_all()
            job.work()
            job.finished.wait()

    def _worker(self) -> None:
        seen = 0
        while True:
            with self._cv:
                while self._serial == seen:
                    self._cv.wait()
                seen, job = self._serial, self._job
            job.work()


_POOLS: dict[int, WorkPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(n_threads: int) -> WorkPool:
    """One pool per thread count for the whole process: compiling many engines starts no new
    threads (the workers are daemons that sleep between jobs)."""
    with _POOLS_LOCK:
        if n_threads not in _POOLS:
            _POOLS[n_threads] = WorkPool(n_threads)
        return _POOLS[n_threads]


def host_has_avx512() -> bool:
    """True when LLVM reports AVX-512F on this CPU (the packed GEMM's 16-float vectors then map
    to single zmm instructions; elsewhere they still run correctly, split into narrower ones)."""
    from llvmlite import binding  # noqa: PLC0415

    try:
        return bool(binding.get_host_cpu_features().get("avx512f", False))
    except RuntimeError:  # pragma: no cover - feature detection unavailable
        return False


def default_threads() -> int:
    """Cores this process may use."""
    try:
        import os  # noqa: PLC0415

        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        import os  # noqa: PLC0415

        return os.cpu_count() or 1
