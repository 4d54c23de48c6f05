"""GEMM2 inside GEMM1's programs (decode GEMV, int weights): each GEMM1 program of the rows kernel
(_gemv_rows_kernel.py, FUSE_DOWN) has just written BN activations of its slot, inter[slot, n0 : n0 + BN]; it then
multiplies them with the matching BN columns of its expert's w2 and adds the partial sums of all H outputs into the
token's fp32 accumulator. GEMM2 needs no launch of its own and waits for no other program: every program's share
of the reduction over I is its own slice.

# T tokens, TOP_K experts per token, H output rows (hidden size), I reduction length (intermediate size), BN the
# GEMM1 program's rows = its slice of I, PW elements per int32 word (8 int4, 4 int8), KW = BN / PW words per w2 row
# in the slice, BH rows of w2 per step, NB = cdiv(H, BH) steps, G columns per scale group
w2 words [E, H, I/PW] rows-contiguous (H stride 1), group scales [E, H, I/G] rows-contiguous (symmetric: no zero
points); acc fp32 [T, H] and count int32 [T, NB], zero before the launch and left zero after it.
  acc[t, h] += wt * sum_{k in slice} scale[e, h, k / G] * (u[e, h, k] - 2^(BITS-1)) * inter[slot, k]
wt: the slot's routing weight (1 when it was applied to GEMM1's input). After its last step, a program counts itself
in each block's counter; the program that arrives last at a block (SHARES = TOP_K * cdiv(I, BN) programs per token)
casts the block's sums into out[t] and zeroes the block and its counter for the next launch, so the accumulator
costs no memset launch. Programs of another rank's expert (live false) read nothing and add nothing, but still count.
PACKED (int4, bf16 inter, GPU): the products in bf16x2 (int4_word_dot_bf16, activation pairs regrouped by byte
permutes); else fp32 products (int_elem).
"""

import triton
import triton.language as tl

from moequant.kernels._gemv_fp4_bf16x2 import act_pair
from moequant.kernels._gemv_int_decode import int4_word_dot_bf16, int_act_factor, int_elem, prmt


@triton.jit
def _down_step_loads(hb, w_base, s_base, cols_ok, H, BH: tl.constexpr):
    """Words [KW, BH] and group scales (as stored) of w2 rows hb * BH + [0, BH) (none past H)."""
    h = hb * BH + tl.arange(0, BH)
    ok = cols_ok[:, None] & (h < H)[None, :]
    return tl.load(w_base + h[None, :], mask=ok, other=0), tl.load(s_base + h[None, :], mask=ok, other=0)


@triton.jit
def _slice_bases(n0, live, e, w2_ptr, s2_ptr, I, stride_we, stride_wk, stride_se, stride_sg, BITS: tl.constexpr,
                 G: tl.constexpr, BN: tl.constexpr):
    """The slice's word columns that exist (cols_ok [KW]; none for another rank's expert) and the pointers of their
    words and scales in row 0 ([KW, 1])."""
    PW: tl.constexpr = 32 // BITS
    KW: tl.constexpr = BN // PW
    kw = tl.arange(0, KW)
    cols_ok = n0 + kw * PW < tl.where(live, I, 0)
    e = tl.where(live, e, 0).to(tl.int64)
    w_base = w2_ptr + e * stride_we + (n0 // PW + kw)[:, None].to(tl.int64) * stride_wk
    s_base = s2_ptr + e * stride_se + ((n0 + kw * PW) // G)[:, None].to(tl.int64) * stride_sg
    return cols_ok, w_base, s_base


@triton.jit
def fused_down_first_loads(n0, live, e, w2_ptr, s2_ptr, H, I, stride_we, stride_wk, stride_se, stride_sg,
                           BITS: tl.constexpr, G: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr):
    """The first step's w2 words and scales, issued before GEMM1 so that they stream in while GEMM1 runs (they do
    not depend on it)."""
    cols_ok, w_base, s_base = _slice_bases(n0, live, e, w2_ptr, s2_ptr, I, stride_we, stride_wk, stride_se,
                                           stride_sg, BITS, G, BN)
    return _down_step_loads(0, w_base, s_base, cols_ok, H, BH)


@triton.jit
def fused_down(inter_ptr, n0, live, e, t, wt, first, w2_ptr, s2_ptr, acc_ptr, count_ptr, out_ptr, H, I, two23,
               stride_we, stride_wk, stride_se, stride_sg, stride_om,
               BITS: tl.constexpr, G: tl.constexpr, PACKED: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr,
               SHARES: tl.constexpr):
    """acc[t] += wt * w2[e][:, n0 : n0 + BN] @ inter[n0 : n0 + BN] (inter_ptr: the slot's row; first: the first
    step's loads, fused_down_first_loads), then the arrival count and, for the blocks this program completes, the
    cast into out[t] (see the module docstring)."""
    PW: tl.constexpr = 32 // BITS
    KW: tl.constexpr = BN // PW
    kw = tl.arange(0, KW)
    cols_ok, w_base, s_base = _slice_bases(n0, live, e, w2_ptr, s2_ptr, I, stride_we, stride_wk, stride_se,
                                           stride_sg, BITS, G, BN)
    if PACKED:  # (x_i, x_i+4) of each word's eight columns as bf16x2, from the row's int32 pairs
        m = n0 // 2 + kw * 4
        p0 = act_pair(inter_ptr, m, cols_ok, True)
        p1 = act_pair(inter_ptr, m + 1, cols_ok, True)
        p2 = act_pair(inter_ptr, m + 2, cols_ok, True)
        p3 = act_pair(inter_ptr, m + 3, cols_ok, True)
        x04 = prmt(p0, p2, 0x5410)[:, None]
        x15 = prmt(p0, p2, 0x7632)[:, None]
        x26 = prmt(p1, p3, 0x5410)[:, None]
        x37 = prmt(p1, p3, 0x7632)[:, None]
    nb = tl.cdiv(H, BH)
    acc_row = acc_ptr + t.to(tl.int64) * H
    nxt = first
    for hb in range(0, nb):  # the next step's words are in flight while this step's products form
        u, sc = nxt
        sc = sc.to(tl.float32)
        nxt = _down_step_loads(hb + 1, w_base, s_base, cols_ok, H, BH)
        if PACKED:
            d = int4_word_dot_bf16(u, x04, x15, x26, x37)
        else:
            hi = u >> (12 if BITS == 4 else 16)
            d = tl.zeros(u.shape, dtype=tl.float32)
            for i in tl.static_range(PW):
                a = tl.load(inter_ptr + n0 + kw * PW + i, mask=cols_ok, other=0).to(tl.float32)
                d += int_elem(u, hi, 1 << (BITS - 1), i, BITS, two23) * (a * int_act_factor(i, BITS))[:, None]
        h = hb * BH + tl.arange(0, BH)
        tl.atomic_add(acc_row + h, tl.sum(d * sc, axis=0) * wt, mask=h < tl.where(live, H, 0), sem="relaxed")
    tl.debug_barrier()  # every thread's adds are issued before the counts
    NBP: tl.constexpr = 64  # counters per token handled at once (H <= 64 * BH, checked by the launcher)
    blocks = tl.arange(0, NBP)
    cnt = count_ptr + t.to(tl.int64) * nb + blocks
    arrived = tl.atomic_add(cnt, tl.full((NBP,), 1, tl.int32), mask=blocks < nb, sem="acq_rel")
    last = (arrived == SHARES - 1) & (blocks < nb)
    tl.debug_barrier()
    for hb in range(0, nb):
        if tl.sum(tl.where(blocks == hb, last, False).to(tl.int32), axis=0) > 0:
            h = hb * BH + tl.arange(0, BH)
            h_ok = h < H
            tot = tl.load(acc_row + h, mask=h_ok, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + t.to(tl.int64) * stride_om + h, tot.to(out_ptr.dtype.element_ty), mask=h_ok)
            tl.store(acc_row + h, tl.zeros((BH,), dtype=tl.float32), mask=h_ok)
    tl.store(cnt, tl.zeros((NBP,), dtype=tl.int32), mask=last)
