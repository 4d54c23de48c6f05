"""Triton body of the decode (GEMV) kernel for fp8 weights and for fp4 weights of odd shapes (launcher and layouts:
gemv.py; int and fp4 weights otherwise go through _gemv_rows_kernel.py).

Each program streams BN weight rows of one or more experts once, unpacks them in registers and multiplies them with
activation rows on the CUDA cores in fp32: no tensor cores, no padding of one token to 16 rows, no align step.

# T tokens, TOP_K experts per token, S = T*TOP_K slots, E experts, N output rows, C reduction length,
# G columns per scale group, PW elements per packed unit, GW = G / PW units per group, NG groups per chunk,
# BN rows per program, P parts per program: 2 (GEMM1's gate and up halves) or TOP_K padded (GEMM2's experts)
Weights [E, N(*2), C/PW] packed units, element i of unit j = column j*PW + i:
  FMT_FP4: bytes of two e2m1 codes (low nibble first), PW = 2;  w = e2m1 * block_scale[e, n, g] (fp8 e4m3 or E8M0)
           * s2[e, part]; stored rows-contiguous (methods.base.rows_contiguous) in the decode layout
           (kernels.fp4_word_layout: rows 4q..4q+3 of a byte column form one int32 word, bits permuted): each row
           reads its quad's word and takes its two codes from it (fp4_row_codes)
  FMT_FP8: e4m3 bytes, PW = 1;  w = e4m3 * scale[e] | scale[e, n] | scale[e, n/128, g]; K-contiguous (the
           tensor-core GEMMs read K-major fp8 operands)
Activations: rows of x's dtype or fp32; or fp8 (FMT_FP8) / pre-quantized nvfp4 with a scale per tensor, per row or
per 128 columns (fp8 only). fp8 data of any kind is passed as uint8 bytes.
  out[part, n] = rs[part, n] * sum_g ws[part, n, g] * as[part, g] * sum_{k in g} wq[part, n, k] * aq[part, k]
GEMM1 (not DOWN): grid (S, cdiv(N, BN)); parts = gate rows n and up rows N + n of the slot's expert;
  inter[slot, n] = act(gate, up) (+ biases; routing weight first when applied on the input); with OUT_PERM it is
  stored at column perm[e, n] (the inverse of GEMM2's act-order sort), so GEMM2 reads its input unpermuted.
GEMM2 (DOWN): grid (T, cdiv(N, BN)); parts = the token's TOP_K slots; out[t, n] = sum_k w[slot_k] * (part_k + b2),
  summed in fp32, so no separate top-k sum. Slots whose expert id is negative (another rank's) contribute nothing.
Act-order (SORTED): column k of expert e reads a[sort_idx[e, k]] (the weights' columns were sorted by group).
z_ptr, its strides, HAS_ZP and BITS (int zero points and widths), split_ptr, count_ptr, n_split and n_count (the rows
kernel's split-K buffers) are unused here: gemv.py passes the rows kernel's argument list to both kernels.
"""

import triton
import triton.language as tl

from moequant.kernels._fp4_gemm_kernel import block_scale_value, e2m1_value, fp4_row_codes
from moequant.kernels._moe_gemm_kernel import gated_act

# Codes of the constexpr switches (gemv.py maps names to them): FMT 1 fp4, 2 fp8 (0, int, is the rows kernel's);
# A_SCALE (activation) 0 none, 1 per tensor, 2 per row, 3 per row and 128 columns; W_SCALE (weights, outside the
# groups) 0 none, 1 per expert (and GEMM1 half: fp8 per-tensor, nvfp4's s2), 2 per output row (fp8 per-channel).
FP4_FACTOR = tl.constexpr(16384.0)  # 2^14: e2m1_value returns the e2m1 value times 2^-14


@triton.jit
def _f32(v):
    """fp32 value of loaded data; uint8 data are fp8 e4m3 bits (passed as bytes so masked loads can read 0)."""
    if v.dtype == tl.uint8:
        return v.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return v.to(tl.float32)


@triton.jit
def _act(a_base, sidx_base, k, ok, stride_ak, SORTED: tl.constexpr):
    """Activation columns k of each part's row as fp32 [P, 1, NG, GW] (through the part's sort_idx when SORTED);
    masked by ok (column in range and part routed here)."""
    if SORTED:
        k = tl.load(sidx_base + k, mask=ok, other=0)
    return _f32(tl.load(a_base + k.to(tl.int64) * stride_ak, mask=ok, other=0))


@triton.jit
def _chunk(c, w_base, a_base, sidx_base, row_ok4, p_ok4, C, CW, stride_wk, stride_ak, quad_row4,
           FMT: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, SORTED: tl.constexpr):
    """Each packed unit's share [P, BN, NG, GW] of the dot products over chunk c (columns [c*NG*G, (c+1)*NG*G)),
    before the group scales (_group_scale). fp4: each row's two codes come from its quad's decode-layout word
    (quad_row4: the row's place r in it; fp4_row_codes)."""
    tl.static_assert(FMT != 0, "int weights go through _gemv_rows_kernel")
    PW: tl.constexpr = 2 if FMT == 1 else 1
    GW: tl.constexpr = G // PW
    g = c * NG + tl.arange(0, NG)
    g4 = g[None, None, :, None]
    j4 = g4 * GW + tl.arange(0, GW)[None, None, None, :]  # word (or fp8 element) index [1, 1, NG, GW]
    w_ok = row_ok4 & (j4 < CW)
    if FMT == 1:  # one byte = elements 2j (low nibble) and 2j + 1, byte r of its quad's word (rows stride 1)
        wp = (w_base - quad_row4 + j4 * stride_wk).to(tl.pointer_type(tl.int32), bitcast=True)
        lo, hi = fp4_row_codes(tl.load(wp, mask=w_ok, other=0), quad_row4.to(tl.int32))
        k = j4 * 2
        t = e2m1_value(lo) * _act(a_base, sidx_base, k, p_ok4 & (k < C), stride_ak, SORTED)
        t += e2m1_value(hi) * _act(a_base, sidx_base, k + 1, p_ok4 & (k + 1 < C), stride_ak, SORTED)
    else:
        words = tl.load(w_base + j4 * stride_wk, mask=w_ok, other=0)
        t = _f32(words) * _act(a_base, sidx_base, j4, p_ok4 & (j4 < C), stride_ak, SORTED)
    return t


@triton.jit
def _group_scale(c, s_base, as_base, row_ok4, NUM_G, stride_sg, stride_asg, NG: tl.constexpr, FMT: tl.constexpr,
                 GROUP_SCALES: tl.constexpr, SCALE_KIND: tl.constexpr, A_SCALE: tl.constexpr):
    """The scale of each group of chunk c [P, BN, NG, 1]: weight group scale times activation group scale (1.0 where
    neither exists)."""
    g4 = (c * NG + tl.arange(0, NG))[None, None, :, None]
    g_ok = row_ok4 & (g4 < NUM_G)
    s = tl.where(g_ok, 1.0, 0.0)
    if GROUP_SCALES:
        w_s = tl.load(s_base + g4 * stride_sg, mask=g_ok, other=0)
        if FMT == 1 and SCALE_KIND == 1:
            w_s = block_scale_value(w_s, 1)
        s = _f32(w_s)
    if A_SCALE == 3:
        s = s * tl.load(as_base + g4 * stride_asg, mask=g_ok, other=0.0)
    return s


@triton.jit
def _split_store(out, c_ptrs, part_ptrs, n_ok, count_ptr, SHARES: tl.constexpr):
    """GEMM2 split over its reduction (and, with the rows kernel's PART_SPLIT, over the top-k experts): each of the
    SHARES programs of an output block adds its share to the fp32 split buffer (zeroed by GEMM1), then counts itself
    in the block's counter (also zeroed by GEMM1); the program that arrives last casts the block's sums into c. The
    barrier and the counter's release/acquire order every thread's adds before the last program's reads (which go
    to L2, past L1)."""
    tl.atomic_add(part_ptrs, out, mask=n_ok, sem="relaxed")
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    if arrived == SHARES - 1:
        tot = tl.load(part_ptrs, mask=n_ok, other=0.0, cache_modifier=".cg")
        tl.store(c_ptrs, tot.to(c_ptrs.dtype.element_ty), mask=n_ok)


@triton.jit
def epilogue_operands(e, parts, slot, pid, p_ok, row_ok, offs_n, rows, es_ptr, topk_w_ptr, bias_ptr, stride_ese,
                      stride_esj, stride_bias_e, stride_bias_n, split, DOWN: tl.constexpr, W_SCALE: tl.constexpr,
                      MUL_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, route_w=None):
    """(weight scale, bias, routing weight) for gemv_epilogue, each a dummy 1.0 / 0.0 where its constexpr is off
    (the epilogue then does not use it): the per-expert ([P, 1]) or per-row ([P, BN]) weight scale, the bias [P, BN]
    (GEMM2: only the programs holding the reduction's first share, split = 0, add it) and the routing weight
    ([P, 1]; GEMM1 applies it on the input; route_w: already computed from the logits by a GEMM2 that routes, whose
    GEMM1 may still be writing them). Loaded before the reduction, so their latency is not paid after it."""
    ws = tl.full((parts.shape[0], 1), 1.0, tl.float32)
    if W_SCALE == 1:  # per expert and part (fp8 per-tensor, nvfp4's second-level scale)
        ws = tl.load(es_ptr + e * stride_ese + parts * stride_esj, mask=p_ok, other=0.0)[:, None]
    elif W_SCALE == 2:  # per output row (fp8 per-channel, int per-channel)
        ws = tl.load(es_ptr + e[:, None] * stride_ese + rows * stride_esj, mask=row_ok, other=0.0)
    bias = tl.zeros((parts.shape[0], 1), tl.float32)
    if HAS_BIAS:
        if DOWN:  # added once per expert: by its first share of the reduction
            b_ok = row_ok & ((split + parts * 0) == 0)[:, None]
            bias = tl.load(bias_ptr + e[:, None] * stride_bias_e + offs_n[None, :] * stride_bias_n, mask=b_ok,
                           other=0.0).to(tl.float32)
        else:
            bias = tl.load(bias_ptr + e[:, None] * stride_bias_e + rows * stride_bias_n, mask=row_ok,
                           other=0.0).to(tl.float32)
    tw = tl.full((parts.shape[0], 1), 1.0, tl.float32)
    if MUL_WEIGHT:
        if route_w is not None:
            tw = route_w[:, None]
        elif DOWN:
            tw = tl.load(topk_w_ptr + slot, mask=p_ok, other=0.0)[:, None]
        else:
            tw = tw * tl.load(topk_w_ptr + pid)
    return ws, bias, tw


@triton.jit
def gemv_epilogue(acc, ops, pid, e, parts, p_ok, row_ok, n_ok, offs_n, N, c_ptr, amax_ptr, perm_ptr, split_ptr,
                  count_ptr, stride_cm, stride_cn, stride_pe, DOWN: tl.constexpr, W_SCALE: tl.constexpr,
                  MUL_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                  OUT_AMAX: tl.constexpr, OUT_PERM: tl.constexpr, SHARES: tl.constexpr):
    """Both GEMV kernels' epilogue from acc [P, BN] (the parts' sums, group scales applied) and ops (weight scale,
    bias, routing weight: epilogue_operands): GEMM2: out[t, n] = sum_k w_k * (s_k acc_k + b2) (with SHARES > 1
    programs per output block see _split_store), or GEMM1: c[slot, perm(n)] = act(gate + b, up + b) of s acc
    (times the routing weight first when applied on the input; OUT_AMAX 1 folds max |out| into amax_ptr[0], 2 stores
    this program's max at amax_ptr[pid * programs along N + block])."""
    ws, bias, tw = ops
    if W_SCALE != 0:
        acc *= ws
    if DOWN:
        if HAS_BIAS:
            acc += bias
        if MUL_WEIGHT:
            acc *= tw
        out = tl.sum(tl.where(row_ok, acc, 0.0), axis=0)
        c_ptrs = c_ptr + pid.to(tl.int64) * stride_cm + offs_n * stride_cn
        if SHARES > 1:
            _split_store(out, c_ptrs, split_ptr + pid.to(tl.int64) * N + offs_n, n_ok,
                         count_ptr + pid.to(tl.int64) * tl.num_programs(1) + tl.program_id(1), SHARES)
        else:
            tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=n_ok)
    else:
        if MUL_WEIGHT:
            acc *= tw
        if HAS_BIAS:
            acc += bias
        gate = tl.sum(tl.where(parts[:, None] == 0, acc, 0.0), axis=0)
        up = tl.sum(tl.where(parts[:, None] == 1, acc, 0.0), axis=0)
        out = gated_act(gate, up, ACTIVATION)
        if OUT_AMAX == 1:
            tl.atomic_max(amax_ptr, tl.max(tl.where(n_ok, tl.abs(out), 0.0), axis=0), sem="relaxed")
        elif OUT_AMAX == 2:  # one partial per program, no atomics (the fp8 rows GEMV's GEMM2 reduces them)
            tl.store(amax_ptr + pid * tl.num_programs(1) + tl.program_id(1),
                     tl.max(tl.where(n_ok, tl.abs(out), 0.0), axis=0))
        cols = offs_n
        if OUT_PERM:  # write in the next GEMM's act-order (sorted) column order; every part holds the slot's expert
            cols = tl.load(perm_ptr + tl.max(e, axis=0) * stride_pe + offs_n, mask=n_ok, other=0)
        tl.store(c_ptr + pid.to(tl.int64) * stride_cm + cols * stride_cn, out.to(c_ptr.dtype.element_ty),
                 mask=n_ok)


@triton.jit
def gemv_moe_kernel(
    a_ptr, w_ptr, s_ptr, z_ptr, sidx_ptr, es_ptr, as_ptr, ids_ptr, topk_w_ptr, bias_ptr, c_ptr, amax_ptr, perm_ptr,
    split_ptr, count_ptr, N, C, NUM_G, n_split, n_count,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sg,
    stride_ze, stride_zn, stride_zg, stride_ie, stride_ese, stride_esj, stride_asm, stride_asg,
    stride_bias_e, stride_bias_n, stride_cm, stride_cn, stride_pe,
    DOWN: tl.constexpr, TOP_K: tl.constexpr, P: tl.constexpr, ACTIVATION: tl.constexpr,
    FMT: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, GROUP_SCALES: tl.constexpr, HAS_ZP: tl.constexpr,
    SCALE_KIND: tl.constexpr, W_SCALE: tl.constexpr, A_SCALE: tl.constexpr, SORTED: tl.constexpr,
    MUL_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_AMAX: tl.constexpr,
    OUT_PERM: tl.constexpr,
    BLOCK_N: tl.constexpr, NG: tl.constexpr,
):
    pid = tl.program_id(0)
    parts = tl.arange(0, P)
    if DOWN:
        slot = pid * TOP_K + parts
        p_ok = parts < TOP_K
        e = tl.load(ids_ptr + slot, mask=p_ok, other=-1)
        p_ok = p_ok & (e >= 0)
        a_row = slot
        row_off = parts * 0
    else:
        e0 = tl.load(ids_ptr + pid)
        if e0 < 0:  # another rank's expert: GEMM2 skips this slot
            return
        slot = pid + parts * 0
        e = e0 + parts * 0
        p_ok = parts < 2
        a_row = slot // TOP_K
        row_off = parts * N
    e = tl.where(p_ok, e, 0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = row_off[:, None] + offs_n[None, :]  # [P, BN]
    row_ok = p_ok[:, None] & n_ok[None, :]
    e4 = e[:, None, None, None]
    rows4 = rows[:, :, None, None].to(tl.int64)
    quad_row4 = rows4 % 4  # fp4: each row's place in its four-row word
    row_ok4 = row_ok[:, :, None, None]
    p_ok4 = p_ok[:, None, None, None]
    w_base = w_ptr + e4 * stride_we + rows4 * stride_wn
    if FMT == 2 and GROUP_SCALES:  # fp8 block scales: one row of scales per 128 weight rows
        s_base = s_ptr + e4 * stride_se + (rows4 // 128) * stride_sn
    else:
        s_base = s_ptr + e4 * stride_se + rows4 * stride_sn
    a_base = a_ptr + a_row[:, None, None, None].to(tl.int64) * stride_am
    as_base = as_ptr + a_row[:, None, None, None].to(tl.int64) * stride_asm
    sidx_base = sidx_ptr + e4 * stride_ie
    PW: tl.constexpr = 2 if FMT == 1 else 1
    CW = C // PW

    GW: tl.constexpr = G // PW
    if FMT == 1:  # fp4: sum each group across its units, then scale it (measured faster for fp4 on the H200)
        acc = tl.zeros((P, BLOCK_N), dtype=tl.float32)
        for c in range(0, tl.cdiv(NUM_G, NG)):
            t = _chunk(c, w_base, a_base, sidx_base, row_ok4, p_ok4, C, CW, stride_wk, stride_ak,
                       quad_row4, FMT, G, NG, SORTED)
            s = _group_scale(c, s_base, as_base, row_ok4, NUM_G, stride_sg, stride_asg, NG, FMT, GROUP_SCALES,
                             SCALE_KIND, A_SCALE)
            acc += tl.sum(tl.sum(t, axis=3) * tl.sum(s, axis=3), axis=2)
    else:  # fp8: keep per-unit sums and reduce across threads once, after the last chunk
        acc4 = tl.zeros((P, BLOCK_N, NG, GW), dtype=tl.float32)
        for c in range(0, tl.cdiv(NUM_G, NG)):
            t = _chunk(c, w_base, a_base, sidx_base, row_ok4, p_ok4, C, CW, stride_wk, stride_ak,
                       quad_row4, FMT, G, NG, SORTED)
            acc4 += t * _group_scale(c, s_base, as_base, row_ok4, NUM_G, stride_sg, stride_asg, NG, FMT,
                                     GROUP_SCALES, SCALE_KIND, A_SCALE)
        acc = tl.sum(tl.sum(acc4, axis=3), axis=2)  # [P, BN]

    # scales outside the groups, then the shared epilogue
    if FMT == 1:
        acc *= FP4_FACTOR
    if A_SCALE == 1:
        acc *= tl.load(as_ptr)
    elif A_SCALE == 2:
        acc *= tl.load(as_ptr + a_row * stride_asm, mask=p_ok, other=0.0)[:, None]
    ops = epilogue_operands(e, parts, slot, pid, p_ok, row_ok, offs_n, rows, es_ptr, topk_w_ptr, bias_ptr,
                            stride_ese, stride_esj, stride_bias_e, stride_bias_n, 0, DOWN, W_SCALE, MUL_WEIGHT,
                            HAS_BIAS)
    gemv_epilogue(acc, ops, pid, e, parts, p_ok, row_ok, n_ok, offs_n, N, c_ptr, amax_ptr, perm_ptr, split_ptr,
                  count_ptr, stride_cm, stride_cn, stride_pe, DOWN, W_SCALE, MUL_WEIGHT, HAS_BIAS, ACTIVATION,
                  OUT_AMAX, OUT_PERM, 1)
