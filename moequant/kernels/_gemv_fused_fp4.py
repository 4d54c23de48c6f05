"""Triton body of the one-launch A16 fp4 decode (launcher: gemv_fused.py): routing, GEMM1, the activation and GEMM2
in one kernel, bf16 activations on a GPU (the bf16x2 PTX of _gemv_fp4_bf16x2.py, which the interpreter cannot run).

Each program takes one slot (token t, its k-th expert e) and BI rows of the intermediate: it routes its token
(_topk_kernel._topk_choice), computes its BI gate and up rows of GEMM1 over the whole hidden size
(_gemv_fp4_bf16x2.fp4_bf16x2_sums), applies the activation, and multiplies those BI intermediate values (rounded to
bf16, as the two-launch path stores them) by the matching BI columns of W2[e], which gives a share of every one of
the H outputs. The shares go to an fp32 accumulator row by reductions in L2 (Triton's atomic_add of four consecutive
floats held by one thread: one REDG.E.ADD.F32x4 on sm_90 per quad 4q..4q+3; R rows per token spread the programs'
adds, which measured no faster at R = 2, 8 or 32); the last of the token's TOP_K * I/BI programs (int32 counter) sums
the rows into out and sets them and its counter back to zero for the next forward (so no launch zeroes them).
PRE2 loads GEMM2's share (one step of all H/4 quads) before GEMM1 starts: its loads do not depend on GEMM1, and
otherwise every program issues them only once its GEMM1 is done. The torch twin is the layer's reference
(kernels.reference.fused_moe_ref on the dequantized weights), against which tests/test_gemv_fused.py checks it.

# T tokens, TOP_K experts per token, E experts, H hidden, I intermediate, BI intermediate rows per program (GEMM1's
# BLOCK_N), G columns per block scale (nvfp4 16, mxfp4 32), U2 byte columns per GEMM2 tile element (at most G/2 and
# BI/2), NU2 = BI/(2 U2) tile elements along GEMM2's reduction, BQ2 output quads (4 rows) per GEMM2 step
w13 words int32 [E, 2I/4, H/2], scales int32 [E, 2I/4, H/G], s13 fp32 [E, 2] (second-level scale of gate and up)
w2 words  int32 [E, H/4, I/2], scales int32 [E, H/4, I/G], s2 fp32 [E]: the decode layout (kernels.fp4_word_layout),
          stride 1 along the quads, so the BI/2 byte columns of a program are contiguous runs of H/4 words
math      h[t, k, i] = bf16(act(s13[e, 0] W1[e, i] . x[t], s13[e, 1] W3[e, i] . x[t]))   for i in the program's BI rows
          acc[t, n] += w[t, k] s2[e] sum_{i in BI} W2[e, n, i] h[t, k, i]                  (fp32, in L2)
          out[t, n] = acc[t, n] once the token's TOP_K * I/BI programs have added their shares
"""

import triton
import triton.language as tl

from moequant.kernels._gemv_fp4_bf16x2 import (FP4_PACKED_FACTOR, _element_rows, _scaled_add, _words, fp4_bf16x2_sums,
                                                interleave_rows, splat_pairs)
from moequant.kernels._moe_gemm_kernel import gated_act
from moequant.kernels._topk_kernel import _topk_choice, _topk_weights


@triton.jit
def _pair_columns(h, NU2: tl.constexpr, U2: tl.constexpr):
    """The bf16 pairs (h_2j, h_2j+1) of byte columns j = u U2 + i, as [1, NU2, 1] int32 tensors for i = 0..7 (i >= U2
    repeat i = 0): h [BI] fp32 rounded to bf16 and packed two per word, then split by column within the element."""
    bits = h.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    lo, hi = tl.split(tl.reshape(bits, (bits.shape[0] // 2, 2)))
    pw = tl.reshape(lo | (hi << 16), (NU2, U2))
    if U2 == 2:
        c0, c1 = tl.split(pw)
        c2, c3, c4, c5, c6, c7 = c0, c0, c0, c0, c0, c0
    elif U2 == 4:
        e0, e1 = tl.split(tl.reshape(pw, (NU2, 2, 2)))  # columns (0, 2), (1, 3)
        c0, c2 = tl.split(e0)
        c1, c3 = tl.split(e1)
        c4, c5, c6, c7 = c0, c0, c0, c0
    else:
        e0, e1 = tl.split(tl.reshape(pw, (NU2, 4, 2)))  # columns (0, 2, 4, 6), (1, 3, 5, 7)
        f0, f1 = tl.split(tl.reshape(e0, (NU2, 2, 2)))  # (0, 4), (2, 6)
        f2, f3 = tl.split(tl.reshape(e1, (NU2, 2, 2)))  # (1, 5), (3, 7)
        c0, c4 = tl.split(f0)
        c2, c6 = tl.split(f1)
        c1, c5 = tl.split(f2)
        c3, c7 = tl.split(f3)
    return (c0[None, :, None], c1[None, :, None], c2[None, :, None], c3[None, :, None], c4[None, :, None],
            c5[None, :, None], c6[None, :, None], c7[None, :, None])


@triton.jit
def _down_loads(qb, e, n_blk, w2_ptr, s2_ptr, HQ, stride_w2e, stride_w2q, stride_w2j, stride_s2e, stride_s2q,
                stride_s2g, G: tl.constexpr, BI: tl.constexpr, U2: tl.constexpr, BQ2: tl.constexpr,
                EVEN2: tl.constexpr):
    """The W2 words (U2 byte columns per tile element [1, NU2, BQ2]) and block scale words of quads qb .. qb + BQ2
    over the program's BI/2 byte columns (block n_blk)."""
    NU2: tl.constexpr = BI // (2 * U2)
    tl.static_assert(2 * U2 <= G and NU2 >= 1, "a GEMM2 tile element lies in one scale group and one program's rows")
    j3 = n_blk * (BI // 2) + tl.arange(0, NU2)[None, :, None] * U2  # first byte column of each tile element
    q3 = (qb + tl.arange(0, BQ2))[None, None, :].to(tl.int64)
    ok = (q3 < HQ) | EVEN2
    w0, w1, w2, w3, w4, w5, w6, w7 = _words(w2_ptr + e * stride_w2e + q3 * stride_w2q, j3, ok, stride_w2j, U2)
    sw = tl.load(s2_ptr + e * stride_s2e + q3 * stride_s2q + (j3 // (G // 2)) * stride_s2g, mask=ok, other=0)
    return w0, w1, w2, w3, w4, w5, w6, w7, sw


@triton.jit
def _down_step(loads, xs, qb, acc_row, H, f, SCALE_KIND: tl.constexpr, U2: tl.constexpr, BQ2: tl.constexpr,
               EVEN2: tl.constexpr):
    """acc_row[4q + r] += f * sum over the step's tile of W2 bf16(h) for quads qb .. qb + BQ2 (one vector reduction
    per quad: Triton's atomic_add of four consecutive floats, each owned by one thread)."""
    w0, w1, w2, w3, w4, w5, w6, w7, sw = loads
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = xs
    s0, s1, s2, s3 = _element_rows(w0, w1, w2, w3, w4, w5, w6, w7, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10,
                                   x11, x12, x13, x14, x15, U2)
    z = tl.zeros(s0.shape, dtype=tl.float32)
    r0, r1, r2, r3 = _scaled_add(z, z, z, z, s0, s1, s2, s3, sw, SCALE_KIND)
    n = 4 * qb + tl.arange(0, 4 * BQ2)[None, :]
    sums = interleave_rows(tl.sum(r0, axis=1), tl.sum(r1, axis=1), tl.sum(r2, axis=1), tl.sum(r3, axis=1))
    tl.atomic_add(acc_row + n, sums * f, mask=(n < H) | EVEN2, sem="relaxed")


@triton.jit
def _last_cast(acc_rows, count_ptr, out_row, H, ARRIVALS, R: tl.constexpr, HB: tl.constexpr):
    """Count this program in its token's counter; the last of ARRIVALS sums the token's R accumulator rows
    (acc_rows: the first) into out and zeroes them and the counter. The barrier and the counter's release/acquire
    order every thread's reductions before the last program's reads (which go to L2, past L1)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    if arrived == ARRIVALS - 1:
        r = tl.arange(0, R)[:, None] * H
        for n0 in tl.range(0, H, HB):
            n = n0 + tl.arange(0, HB)[None, :]
            tot = tl.load(acc_rows + r + n, mask=n < H, other=0.0, cache_modifier=".cg")
            tl.store(out_row + n, tl.sum(tot, axis=0)[None, :].to(out_row.dtype.element_ty), mask=n < H)
            tl.store(acc_rows + r + n, tl.zeros((R, HB), dtype=tl.float32), mask=n < H)
        tl.atomic_xchg(count_ptr, 0, sem="relaxed")


@triton.jit
def gemv_fused_fp4_kernel(
    x_ptr, logits_ptr, w13_ptr, s13_ptr, es13_ptr, w2_ptr, s2_ptr, es2_ptr, topk_w_ptr, ids_ptr, acc_ptr, count_ptr,
    out_ptr, route_scale, I, H, NUM_G1, E_ROUTE,
    stride_xm, stride_lt, stride_w13e, stride_w13q, stride_w13j, stride_s13e, stride_s13q, stride_s13g, stride_es13e,
    stride_es13j, stride_w2e, stride_w2q, stride_w2j, stride_s2e, stride_s2q, stride_s2g, stride_es2e, stride_om,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, SIGMOID: tl.constexpr,
    RENORMALIZE: tl.constexpr, ACTIVATION: tl.constexpr, SCALE_KIND: tl.constexpr, G: tl.constexpr,
    EVEN: tl.constexpr, PREFETCH: tl.constexpr, UNIT: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr,
    U2: tl.constexpr, BQ2: tl.constexpr, EVEN2: tl.constexpr, R: tl.constexpr, HB: tl.constexpr,
    PRE2: tl.constexpr,
):
    """Grid (T * TOP_K, I / BLOCK_N), BLOCK_N dividing I: see the module docstring. EVEN: H a multiple of NG * G
    (GEMM1's steps); EVEN2: H / 4 of BQ2; R accumulator rows per token (fewer programs adding into each); PRE2
    (BQ2 = H/4): GEMM2's weights loaded before GEMM1."""
    pid = tl.program_id(0)
    tok = (pid // TOP_K).to(tl.int64)
    k = pid % TOP_K
    r_ids, r_x, x_row, ks = _topk_choice(logits_ptr, tok, E_ROUTE, stride_lt, K_PAD, E_PAD)
    e = tl.sum(tl.where(ks == k, r_ids, 0), 0).to(tl.int64)
    r_w = _topk_weights(r_x, x_row, ks, route_scale, TOP_K, SIGMOID, RENORMALIZE)
    w_k = tl.sum(tl.where(ks == k, r_w, 0.0), 0)
    if (tl.program_id(1) == 0) & (k == 0):  # the routing, for callers that read it
        tl.store(topk_w_ptr + tok * TOP_K + ks, r_w, mask=ks < TOP_K)
        tl.store(ids_ptr + tok * TOP_K + ks, r_ids, mask=ks < TOP_K)
    s_gate = tl.load(es13_ptr + e * stride_es13e)
    s_up = tl.load(es13_ptr + e * stride_es13e + stride_es13j)
    s_down = tl.load(es2_ptr + e * stride_es2e)
    HQ = H // 4
    if PRE2:  # GEMM2's weights do not depend on GEMM1: the one step's loads in flight during GEMM1
        first = _down_loads(0, e, tl.program_id(1), w2_ptr, s2_ptr, HQ, stride_w2e, stride_w2q, stride_w2j,
                            stride_s2e, stride_s2q, stride_s2g, G, BLOCK_N, U2, BQ2, EVEN2)
    gate, up = fp4_bf16x2_sums(w13_ptr, s13_ptr, x_ptr, tok * stride_xm, e, True, 0, tl.cdiv(NUM_G1, NG), I, NUM_G1,
                               stride_w13e, stride_w13q, stride_w13j, stride_s13e, stride_s13q, stride_s13g, False,
                               EVEN, PREFETCH, SCALE_KIND, G, UNIT, 1, BLOCK_N, NG)
    h = gated_act(gate * (FP4_PACKED_FACTOR * s_gate), up * (FP4_PACKED_FACTOR * s_up), ACTIVATION)
    p0, p1, p2, p3, p4, p5, p6, p7 = _pair_columns(tl.reshape(h, (BLOCK_N,)), BLOCK_N // (2 * U2), U2)
    xs = splat_pairs(p0, p1, p2, p3, p4, p5, p6, p7, U2)
    acc_rows = acc_ptr + tok * (R * H)  # this program adds into the token's row (k * blocks + block) % R
    acc_row = acc_rows + ((k * tl.num_programs(1) + tl.program_id(1)) % R) * H
    f = w_k * s_down * FP4_PACKED_FACTOR
    if PRE2:
        tl.static_assert(EVEN2, "PRE2: GEMM2's share is one step of all H/4 quads")
        _down_step(first, xs, 0, acc_row, H, f, SCALE_KIND, U2, BQ2, EVEN2)
    else:
        for qb in tl.range(0, HQ, BQ2):
            loads = _down_loads(qb, e, tl.program_id(1), w2_ptr, s2_ptr, HQ, stride_w2e, stride_w2q, stride_w2j,
                                stride_s2e, stride_s2q, stride_s2g, G, BLOCK_N, U2, BQ2, EVEN2)
            _down_step(loads, xs, qb, acc_row, H, f, SCALE_KIND, U2, BQ2, EVEN2)
    _last_cast(acc_rows, count_ptr + tok, out_ptr + tok * stride_om, H, TOP_K * tl.num_programs(1), R, HB)
