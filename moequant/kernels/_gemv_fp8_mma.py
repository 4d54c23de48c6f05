"""fp8 body of the decode GEMV on the tensor cores: gemv_rows_kernel's FMT 2 branch with MMA (GPU only), the
activation quantized to e4m3 in the kernel as in _gemv_fp8_rows.py, the products by warp-level mma.sync.

# BN = 16 or 32 rows per program in pairs of 8-row tiles (a: rows n0 .. n0 + 7, b: n0 + 8 .. n0 + 15; BN 32 a second
# pair 16 rows on; GEMM1 the same pairs of up rows N + ..), W = num_warps warps, each summing its share of the
# reduction; a chunk is 64 columns = 16 int32 words of e4m3 codes per row
weights  fp8 [E, N(*2), C] K-contiguous, read as int32 words [E, N(*2), C/4] (C a multiple of 16, 16-byte aligned
         rows: the launcher's fp8_rows); a step's tile is [8 W, 16] words per row tile: tile row i is row
         n0 + i % 8 (tile b: + 8) over chunk i // 8 + W * step, so warp w (Triton puts the 8 W rows on the warps,
         8 per warp, and a row's 16 words on 4 lanes, 4 each) reads chunks w, w + W, .. of the program's rows
lanes    lane 4g + q holds words 4q .. 4q + 3 (columns 16q .. 16q + 15 of the chunk) of tile rows g: exactly
         mma.m16n8k16's A fragment rows g (tile a) and g + 8 (tile b) if its k index 2q, 2q + 1 / 8 + 2q, 9 + 2q is
         read as the lane's word j columns 4j, 4j + 1 / 4j + 2, 4j + 3 (j = 0 .. 3: four mmas per chunk). The B
         fragment's column g then takes the activation codes of the same columns from lane (g, q): every lane
         supplies the codes of its own columns, so all 8 columns of B are the activation and D's rows g and g + 8
         (columns 2q, 2q + 1) are the two rows' dot products over all four lanes' columns
math     out[n] = s * sum_k w_code[n, k] * q(a)[k]: the codes converted to f16 (exact, cvt.rn.f16x2.e4m3x2), products
         exact, sums in the mma's fp32 accumulator (chained over the warp's chunks), the warps' sums added at the
         end. q(a) = e4m3(clamp(a / s, -448, 448)) as the twin (_gemv_fp8_rows._quant_pair), s by fp8_act_scale
Each lane quantizes its 16 columns once per chunk for all its row tiles (GEMM1: gate a, b and up a, b). Each step's
loads are issued DEPTH (1-3) steps before its products (registers) and kept raw until used; with EVEN (C a multiple
of 64 W) they take no masks (the prefetches after the last step read that step's chunk again). The warps' sums of
all tiles meet in one cross-warp reduction at the end (_row_sums).
On sm_90 ptxas runs an e4m3 mma as f16 HMMA.16816.F32 after F2FP conversions; this body converts itself and issues
the f16 mma, so the activation's conversion is shared by the tiles.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from moequant.kernels._gemv_fp8_rows import _act_raw, _quant_pair, _raw_f32, fp8_act_scale

CHUNK_WORDS = tl.constexpr(16)  # 64 columns of e4m3 codes


def _mma_ptx() -> str:
    """$0..$3 = the accumulators $20..$23 plus four m16n8k16 f16 mmas, one per word j of tiles a ($4 + j) and b
    ($8 + j), against the activation's f16x2 pairs $12 + j (columns 4j, 4j + 1) and $16 + j (4j + 2, 4j + 3)."""
    body = ["mov.f32 d0, $20;", "mov.f32 d1, $21;", "mov.f32 d2, $22;", "mov.f32 d3, $23;"]
    for j in range(4):
        body += [f"mov.b32 {{l, h}}, ${4 + j};", "cvt.rn.f16x2.e4m3x2 al, l;", "cvt.rn.f16x2.e4m3x2 ah, h;",
                 f"mov.b32 {{l, h}}, ${8 + j};", "cvt.rn.f16x2.e4m3x2 bl, l;", "cvt.rn.f16x2.e4m3x2 bh, h;",
                 "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {d0, d1, d2, d3}, {al, bl, ah, bh}, "
                 f"{{${12 + j}, ${16 + j}}}, {{d0, d1, d2, d3}};"]
    return ("{ .reg .b16 l, h; .reg .b32 al, ah, bl, bh; .reg .f32 d0, d1, d2, d3; " + " ".join(body)
            + " mov.f32 $0, d0; mov.f32 $1, d1; mov.f32 $2, d2; mov.f32 $3, d3; }")


MMA_PTX = tl.constexpr(_mma_ptx())
MMA_CONSTRAINTS = tl.constexpr("=f,=f,=f,=f," + "r," * 16 + "f,f,f,f")


@triton.jit
def _mma_tiles(acc, wa, wb, xl, xh):
    """acc [8W, 16] fp32 plus the dot products of tiles a and b (int32 words of e4m3 codes) with the activation
    pairs xl / xh (f16x2); per lane's four elements (d0, d1, d2, d3) = (row a, row a, row b, row b)."""
    return tl.inline_asm_elementwise(MMA_PTX, MMA_CONSTRAINTS,
                                     [wa, wb, xl, xh, acc], dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _codes_f16x2(p):
    """The four e4m3 codes of each int32 word as two f16x2 words (columns 0-1, 2-3), exact."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.rn.f16x2.e4m3x2 $0, l; cvt.rn.f16x2.e4m3x2 $1, h; }",
        "=r,=r,r", [p], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _act_codes(raw, r, ns, A_BYTES: tl.constexpr, IS_BF16: tl.constexpr):
    """(columns 0-1, 2-3) of each word's activation (_act_raw's values) as f16x2 pairs of its e4m3 codes (q(a) of
    the module doc)."""
    x0, x1, x2, x3 = _raw_f32(raw, A_BYTES, IS_BF16)
    return _codes_f16x2(_quant_pair(x0, x1, r, ns) | (_quant_pair(x2, x3, r, ns) << 16))


@triton.jit
def _step_loads(s, live, w_a, a_row, chunk0, cstep, col, row_ok, n_chunks, stride_wn, o1, o2, o3,
                NP: tl.constexpr, EVEN: tl.constexpr, A_BYTES: tl.constexpr, ACT: tl.constexpr = True):
    """Step s's raw activation values and words of the NP pairs of 8-row tiles (pair j: rows o_j + 0..7 and
    o_j + 8..15 from w_a's, o_0 = 0; unused pairs alias pair 0): chunk chunk0 + s * cstep of each tile row. Unless
    EVEN, nothing is read (zeros) where live is false (the prefetch after the last step), for rows not row_ok or
    past the last chunk. Without ACT the activation is not read (raw: dummies)."""
    chunk = chunk0 + s * cstep  # [8W, 1]
    if EVEN:  # no masks: the prefetch after the last step reads the last step's chunk again (an L1 hit), rows not
        ok = col >= 0  # row_ok point at expert 0 (the caller)
    else:
        ok = row_ok & live & (chunk < n_chunks) & (col >= 0)
    wd = chunk * CHUNK_WORDS + col  # [8W, 16]
    pa = w_a + wd
    t0 = _load_words(pa, ok, EVEN)
    t1 = _load_words(pa + 8 * stride_wn, ok, EVEN)
    t2, t3, t4, t5, t6, t7 = t0, t1, t0, t1, t0, t1
    if NP >= 2:
        t2 = _load_words(pa + o1 * stride_wn, ok, EVEN)
        t3 = _load_words(pa + (o1 + 8) * stride_wn, ok, EVEN)
    if NP == 4:
        t4 = _load_words(pa + o2 * stride_wn, ok, EVEN)
        t5 = _load_words(pa + (o2 + 8) * stride_wn, ok, EVEN)
        t6 = _load_words(pa + o3 * stride_wn, ok, EVEN)
        t7 = _load_words(pa + (o3 + 8) * stride_wn, ok, EVEN)
    raw = (t0, t0, t0, t0)
    if ACT:
        raw = _act_raw(a_row, wd * 4, ok, A_BYTES, not EVEN)
    return raw, t0, t1, t2, t3, t4, t5, t6, t7


@triton.jit
def _with_act(loads, s, a_row, chunk0, cstep, col, n_chunks, EVEN: tl.constexpr, A_BYTES: tl.constexpr):
    """_step_loads' values of step s (loaded without ACT) with the step's activation values."""
    _, t0, t1, t2, t3, t4, t5, t6, t7 = loads
    chunk = chunk0 + s * cstep
    raw = _act_raw(a_row, (chunk * CHUNK_WORDS + col) * 4, (chunk < n_chunks) & (col >= 0), A_BYTES, not EVEN)
    return raw, t0, t1, t2, t3, t4, t5, t6, t7


@triton.jit
def _load_words(p, ok, EVEN: tl.constexpr):
    """The int32 words at p: unmasked when EVEN, else zeros where ok is false."""
    if EVEN:
        return tl.load(p)
    return tl.load(p, mask=ok, other=0)


@triton.jit
def _step_mma(cur, accs, r, ns, NP: tl.constexpr, A_BYTES: tl.constexpr, IS_BF16: tl.constexpr):
    """The accumulators of the NP pairs plus one step's products (cur: _step_loads' values)."""
    raw, t0, t1, t2, t3, t4, t5, t6, t7 = cur
    acc0, acc1, acc2, acc3 = accs
    xl, xh = _act_codes(raw, r, ns, A_BYTES, IS_BF16)
    acc0 = _mma_tiles(acc0, t0, t1, xl, xh)
    if NP >= 2:
        acc1 = _mma_tiles(acc1, t2, t3, xl, xh)
    if NP == 4:
        acc2 = _mma_tiles(acc2, t4, t5, xl, xh)
        acc3 = _mma_tiles(acc3, t6, t7, xl, xh)
    return acc0, acc1, acc2, acc3


@triton.jit
def _load_then_mma(s, per_w, buf, accs, ld, r, ns, NP: tl.constexpr, EVEN: tl.constexpr, A_BYTES: tl.constexpr,
                   IS_BF16: tl.constexpr):
    """(step s's loads in a new buffer, accs plus buf's products): _step_loads of s (past the last step: nothing
    read, or with EVEN the last step again), then _step_mma of buf. ld: _step_loads' loop-invariant arguments."""
    w_a, a_row, chunk0, cstep, col, row_ok, n_chunks, stride_wn, o1, o2, o3 = ld
    new = _step_loads(tl.minimum(s, per_w - 1), s < per_w, w_a, a_row, chunk0, cstep, col, row_ok, n_chunks,
                      stride_wn, o1, o2, o3, NP, EVEN, A_BYTES)
    return new, _step_mma(buf, accs, r, ns, NP, A_BYTES, IS_BF16)


@triton.jit
def fp8_mma_sums(w_ptr, a_ptr, as_ptr, a_row_idx, slot, e, ok, n0, N, C, a_amax_n, a_rows, stride_am, stride_we,
                 stride_wn, stride_ak, A_SCALE: tl.constexpr, A_SRC: tl.constexpr, EPS: tl.constexpr,
                 DOWN: tl.constexpr, EVEN: tl.constexpr, W: tl.constexpr, BLOCK_N: tl.constexpr,
                 PDL_WAIT: tl.constexpr, DEPTH: tl.constexpr = 1, UNROLL: tl.constexpr = False, early=None,
                 XB: tl.constexpr = 0):
    """(first, second, s): [BLOCK_N] fp32 dot products of expert e's rows with the quantized activation row
    a_row_idx, divided by its scale s: GEMM1 the gate rows n0 .. n0 + BLOCK_N - 1 and the up rows N + n0 ..; GEMM2
    rows n0 .. (second = first); BLOCK_N 16 or 32. ok: the expert is valid (else expert 0's rows are read, EVEN, or
    nothing, and the epilogue drops the rows). EVEN: C a multiple of 64 W columns. DEPTH (1-3): steps of loads in
    flight; with PDL_WAIT the first DEPTH steps' weights are issued before the wait (a GEMM2 of at most DEPTH steps
    per warp then has all its weights in flight before GEMM1 ends). early, XB: fp8_act_scale's early row. UNROLL
    (DEPTH 1 or 2): DEPTH + 1 steps per loop iteration, each buffer refilled right after its products, so the ring
    needs no register copies (sm_90 SASS, Qwen3-30B: GEMM1 195 -> 170 instructions per step, GEMM2 219 -> 153).
    H200, Qwen3-30B M=1: static scales 18.07 -> 17.78 us per forward; dynamic ones 0.25-0.3 us slower with it (0.1-
    0.35 us again with x's row loaded early: *-s18-*), so the caller unrolls for static scales only. (In the SASS
    the compiler sinks the loads under `if st + k < per_w` to just before their products: GEMM2's third step's
    words go out after two steps' products. Unguarded groups keep them early but take GEMM1 from 62
    to 98 registers and dynamic GEMM2 from 120 to 166: branch wip/fp8-unroll-groups, not run.)"""
    tl.static_assert(DEPTH >= 1 and DEPTH <= 3, "1-3 steps of loads in flight")
    NP: tl.constexpr = (BLOCK_N // 16) * (1 if DOWN else 2)  # pairs of 8-row tiles sharing the activation codes
    o1 = 16
    o2 = N
    o3 = N + 16
    if not DOWN and BLOCK_N == 16:
        o1 = N
    i = tl.arange(0, 8 * W)[:, None]  # tile row: row n0 + i % 8 (+ 8 in a pair's second tile), warp i // 8
    col = tl.arange(0, 16)[None, :]
    n_chunks = tl.cdiv(C, 64)
    per_w = tl.cdiv(n_chunks, W)
    # warp w takes chunks w, w + W, ..: each step of the program reads 64 W contiguous columns of its rows (H200,
    # Qwen3-30B M=1: 1.1 us faster per forward than warps on contiguous ranges of chunks)
    chunk0 = i // 8
    cstep = W
    row = n0 + i % 8  # N is a multiple of BLOCK_N (the launcher): no row mask
    row_ok = ok + i * 0 > 0
    w_a = w_ptr + tl.where(ok, e, 0).to(tl.int64) * stride_we + row.to(tl.int64) * stride_wn  # [8W, 1] words
    a_row = a_ptr + a_row_idx.to(tl.int64) * stride_am
    A_BYTES: tl.constexpr = a_ptr.dtype.element_ty.primitive_bitwidth // 8
    IS_BF16: tl.constexpr = a_ptr.dtype.element_ty == tl.bfloat16
    # DEPTH steps of loads in flight: steps 0 .. DEPTH - 1 now (with PDL_WAIT their weights only, before the wait)
    nxt = _step_loads(0, per_w > 0, w_a, a_row, chunk0, cstep, col, row_ok, n_chunks, stride_wn, o1, o2, o3, NP,
                      EVEN, A_BYTES, not PDL_WAIT)
    nx1 = nxt
    nx2 = nxt
    if DEPTH >= 2:
        nx1 = _step_loads(tl.minimum(1, per_w - 1), per_w > 1, w_a, a_row, chunk0, cstep, col, row_ok, n_chunks,
                          stride_wn, o1, o2, o3, NP, EVEN, A_BYTES, not PDL_WAIT)
    if DEPTH >= 3:
        nx2 = _step_loads(tl.minimum(2, per_w - 1), per_w > 2, w_a, a_row, chunk0, cstep, col, row_ok, n_chunks,
                          stride_wn, o1, o2, o3, NP, EVEN, A_BYTES, not PDL_WAIT)
    if PDL_WAIT:  # GEMM2 launched while GEMM1 runs: its first weights are in flight, now wait for GEMM1's output
        gdc_wait()
        nxt = _with_act(nxt, 0, a_row, chunk0, cstep, col, n_chunks, EVEN, A_BYTES)
        if DEPTH >= 2:
            nx1 = _with_act(nx1, 1, a_row, chunk0, cstep, col, n_chunks, EVEN, A_BYTES)
        if DEPTH >= 3:
            nx2 = _with_act(nx2, 2, a_row, chunk0, cstep, col, n_chunks, EVEN, A_BYTES)
    s = fp8_act_scale(a_ptr, as_ptr, a_row_idx, slot, a_amax_n, a_rows, C, stride_am, stride_ak, A_SCALE, A_SRC,
                      EPS, 1024, early, XB)
    r = tl.math.div_rn(1.0, s)
    ns = -s
    z = tl.zeros((8 * W, 16), dtype=tl.float32)
    accs = (z, z, z, z)
    ld = (w_a, a_row, chunk0, cstep, col, row_ok, n_chunks, stride_wn, o1, o2, o3)
    if DEPTH == 1 and UNROLL:  # two steps per iteration, each buffer refilled right after its products
        for st in range(0, per_w, 2):
            second_buf, accs = _load_then_mma(st + 1, per_w, nxt, accs, ld, r, ns, NP, EVEN, A_BYTES, IS_BF16)
            if st + 1 < per_w:
                nxt, accs = _load_then_mma(st + 2, per_w, second_buf, accs, ld, r, ns, NP, EVEN, A_BYTES, IS_BF16)
    elif DEPTH == 2 and UNROLL:  # three steps per iteration, each buffer refilled right after its products: no
        # register copies rotating the ring (the loop below spends 65 IMAD.MOV of 219 instructions per step on them)
        for st in range(0, per_w, 3):
            third, accs = _load_then_mma(st + 2, per_w, nxt, accs, ld, r, ns, NP, EVEN, A_BYTES, IS_BF16)
            if st + 1 < per_w:
                nxt, accs = _load_then_mma(st + 3, per_w, nx1, accs, ld, r, ns, NP, EVEN, A_BYTES, IS_BF16)
                if st + 2 < per_w:
                    nx1, accs = _load_then_mma(st + 4, per_w, third, accs, ld, r, ns, NP, EVEN, A_BYTES, IS_BF16)
    else:
        for st in range(0, per_w):  # step st + DEPTH's loads are issued before step st's products
            new, accs = _load_then_mma(st + DEPTH, per_w, nxt, accs, ld, r, ns, NP, EVEN, A_BYTES, IS_BF16)
            if DEPTH == 1:
                nxt = new
            elif DEPTH == 2:
                nxt = nx1
                nx1 = new
            else:
                nxt = nx1
                nx1 = nx2
                nx2 = new
    first, second = _row_sums(accs, col, W, NP, DOWN)
    return first, second, s


@triton.jit
def _lane_rows(acc, col):
    """[8W, 2] per tile row i: lane q = 0's d0 (column 0: tile a's row i % 8) and d2 (column 2: tile b's) of the
    mma accumulators [8W, 16] (one nonzero term each: exact)."""
    return tl.join(tl.sum(tl.where(col == 0, acc, 0.0), axis=1), tl.sum(tl.where(col == 2, acc, 0.0), axis=1))


@triton.jit
def _pair_rows(x):
    """[8 (g), 2 (tile)] warp-summed rows of one pair -> its [16] rows in order (tile a's 0..7, then b's)."""
    return tl.reshape(tl.permute(x, (1, 0)), (16,))


@triton.jit
def _row_sums(accs, col, W: tl.constexpr, NP: tl.constexpr, DOWN: tl.constexpr):
    """(first, second) [BLOCK_N] row sums of the NP pairs' accumulators (GEMM1: gate pairs, then up pairs; GEMM2:
    second = first), the W warps' shares added by one cross-warp reduction for all pairs (a reduction per pair and
    tile cost three barriers each, at the end of every program)."""
    acc0, acc1, acc2, acc3 = accs
    v = _lane_rows(acc0, col)  # [8W, 2]
    if NP == 1:
        first = _pair_rows(tl.sum(tl.reshape(v, (W, 8, 2)), axis=0))
        second = first
    elif NP == 2:
        v = tl.join(v, _lane_rows(acc1, col))  # [8W, 2, 2 (pair)]
        r0, r1 = tl.split(tl.sum(tl.reshape(v, (W, 8, 2, 2)), axis=0))
        first = _pair_rows(r0)
        second = _pair_rows(r1)
        if DOWN:  # rows 0..15, 16..31
            first = _join_rows(first, second)
            second = first
    else:  # GEMM1, 32 rows per half: pairs 0-1 gate, 2-3 up
        v = tl.join(tl.join(v, _lane_rows(acc1, col)), tl.join(_lane_rows(acc2, col), _lane_rows(acc3, col)))
        lo, hi = tl.split(tl.sum(tl.reshape(v, (W, 8, 2, 2, 2)), axis=0))  # [8, 2, 2] each
        r0, r1 = tl.split(lo)
        r2, r3 = tl.split(hi)
        first = _join_rows(_pair_rows(r0), _pair_rows(r1))
        second = _join_rows(_pair_rows(r2), _pair_rows(r3))
    return first, second


@triton.jit
def _join_rows(lo, hi):
    """[16] + [16] -> [32] in order."""
    return tl.reshape(tl.permute(tl.join(lo, hi), (1, 0)), (32,))
