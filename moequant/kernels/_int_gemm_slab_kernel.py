"""Triton body of the int4/int8 weight-only grouped expert GEMM for few token slots per expert (launcher: int_gemm.py).

# S token slots, P padded slots, E experts, N output columns, K reduction dim, G group size, b bits, PW = 32 / b
B int32 [E, N, K/PW] as compressed-tensors packs it: word j of a row holds k = j*PW + i at bits [i*b, (i+1)*b), as
q + 2^(b-1). A K block of BK = BKW*PW columns is one [BKW, BN] word tile, read once and split by bit position into
PW "slabs": slab i holds the columns k = k0 + j*PW + i (j < BKW), and the matching A columns are loaded with stride PW.
Each slab is one tensor-core dot [BM, BKW] x [BKW, BN], with no reshape of the unpacked values:
  FACTORED (per channel, or BK divides G, no uneven g_idx): the group scale is constant over the block, so
    acc += (sum_i A_i @ (q_i - zp)) * scale[e, n, g(k0)]      (one [BM, BN] multiply per block)
  otherwise (G < BK, or act-order groups of uneven size): w_i = (q_i - zp[g(k)]) * scale[g(k)] per element, with
    g(k) = k // G or gidx[e, k] gathered for the slab's columns.
Act-order: A holds each slot's row already in its expert's sorted column order (int_gemm.py gathers it first).
GEMM1 (GATED): gate rows n and up rows N + n. SPLIT_K > 1 (GEMM2): each program sums a slice of the K blocks.
"""

import triton
import triton.language as tl

from moequant.kernels._int_gemm_kernel import int_epilogue, k_blocks
from moequant.kernels._moe_gemm_kernel import tile_slots


@triton.jit
def _slab(words, i, zp, BITS: tl.constexpr, HAS_ZP: tl.constexpr):
    """Bit position i of every word as the signed value q (stored q + 2^(b-1)), minus the signed zero point (tile
    or row) when asymmetric: int32."""
    q = ((words >> (i * BITS)) & ((1 << BITS) - 1)) - (1 << (BITS - 1))
    if HAS_ZP:
        q = q - zp
    return q


@triton.jit
def int_moe_gemm_slab_kernel(
    a_ptr, b_ptr, s_ptr, z_ptr, gidx_ptr, c_ptr, bias_ptr, topk_w_ptr,
    sorted_ids_ptr, expert_ids_ptr, total_ptr,
    N, K, S, P_total, NUM_GROUPS,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_se, stride_sn, stride_sk,
    stride_ze, stride_zn, stride_zk, stride_ge, stride_cm, stride_cn, stride_bias_e, stride_bias_n,
    A_ROW_DIV: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr,
    BITS: tl.constexpr, GROUP: tl.constexpr, GIDX: tl.constexpr, HAS_ZP: tl.constexpr,
    MUL_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m = tl.program_id(0) // tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(0) % tl.cdiv(N, BLOCK_N)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    PW: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BLOCK_K // PW
    FACTORED: tl.constexpr = (not GIDX) and (GROUP == 0 or GROUP % BLOCK_K == 0)
    slots, row_ok, e, offs_n, col_ok = tile_slots(pid_m, pid_n, sorted_ids_ptr, expert_ids_ptr, S, N,
                                                  BLOCK_M, BLOCK_N)
    offs_w = tl.arange(0, BKW)
    KW = K // PW

    a_rows = a_ptr + (slots // A_ROW_DIV).to(tl.int64)[:, None] * stride_am
    b_base = b_ptr + e * stride_be + offs_n[None, :].to(tl.int64) * stride_bn
    s_row = s_ptr + e * stride_se + offs_n.to(tl.int64) * stride_sn
    z_row = z_ptr + e * stride_ze + offs_n.to(tl.int64) * stride_zn
    dtype = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b_up = N * stride_bn
    s_up = N * stride_sn
    z_up = N * stride_zn
    k_lo, k_hi = k_blocks(K, BLOCK_K, SPLIT_K)
    for k0 in range(k_lo, k_hi):
        j = k0 * BKW + offs_w
        w_mask = (j < KW)[:, None] & col_ok[None, :]
        words = tl.load(b_base + j[:, None] * stride_bk, mask=w_mask, other=0)
        words_up = words
        if GATED:
            words_up = tl.load(b_base + b_up + j[:, None] * stride_bk, mask=w_mask, other=0)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        part_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        g0 = 0
        if GROUP != 0:
            g0 = (k0 * BLOCK_K) // GROUP
        zp = 0
        zp_up = 0
        if FACTORED and HAS_ZP:
            zp = tl.load(z_row + g0 * stride_zk, mask=col_ok, other=0).to(tl.int32)[None, :]
            if GATED:
                zp_up = tl.load(z_row + z_up + g0 * stride_zk, mask=col_ok, other=0).to(tl.int32)[None, :]
        for i in tl.static_range(PW):
            k = j * PW + i
            k_ok = k < K
            a = tl.load(a_rows + k.to(tl.int64)[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if FACTORED:
                part = tl.dot(a, _slab(words, i, zp, BITS, HAS_ZP).to(dtype), part, input_precision=DOT_PRECISION)
                if GATED:
                    q_up = _slab(words_up, i, zp_up, BITS, HAS_ZP).to(dtype)
                    part_up = tl.dot(a, q_up, part_up, input_precision=DOT_PRECISION)
            else:
                if GIDX:
                    g = tl.load(gidx_ptr + e * stride_ge + k, mask=k_ok, other=0).to(tl.int64)
                else:
                    g = (k // GROUP).to(tl.int64)
                m2 = k_ok[:, None] & col_ok[None, :]
                s = tl.load(s_row[None, :] + g[:, None] * stride_sk, mask=m2, other=0.0).to(tl.float32)
                if HAS_ZP:
                    zp = tl.load(z_row[None, :] + g[:, None] * stride_zk, mask=m2, other=0).to(tl.int32)
                w = (_slab(words, i, zp, BITS, HAS_ZP).to(tl.float32) * s).to(dtype)
                part = tl.dot(a, w, part, input_precision=DOT_PRECISION)
                if GATED:
                    s = tl.load(s_row[None, :] + s_up + g[:, None] * stride_sk, mask=m2, other=0.0).to(tl.float32)
                    if HAS_ZP:
                        zp_up = tl.load(z_row[None, :] + z_up + g[:, None] * stride_zk, mask=m2, other=0).to(tl.int32)
                    w = (_slab(words_up, i, zp_up, BITS, HAS_ZP).to(tl.float32) * s).to(dtype)
                    part_up = tl.dot(a, w, part_up, input_precision=DOT_PRECISION)
        if FACTORED:
            s = tl.load(s_row + g0 * stride_sk, mask=col_ok, other=0.0).to(tl.float32)
            acc += part * s[None, :]
            if GATED:
                s_up_row = tl.load(s_row + s_up + g0 * stride_sk, mask=col_ok, other=0.0).to(tl.float32)
                acc_up += part_up * s_up_row[None, :]
        else:
            acc += part
            acc_up += part_up

    int_epilogue(acc, acc_up, slots, row_ok, offs_n, col_ok, e, N, c_ptr, bias_ptr, topk_w_ptr,
                 stride_cm, stride_cn, stride_bias_e, stride_bias_n,
                 GATED, ACTIVATION, MUL_WEIGHT, HAS_BIAS, SPLIT_K)
