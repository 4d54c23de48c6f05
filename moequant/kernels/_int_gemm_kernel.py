"""Triton body of the int4/int8 weight-only grouped expert GEMM (launcher: int_gemm.py). Weights stay packed.

# S token slots, P padded slots, E experts, N output columns, K reduction dim, G group size, b bits, PW = 32 / b
B int32 [E, N, K/PW]: word j of a row holds k = j*PW + i at bits [i*b, (i+1)*b), stored as q + 2^(b-1).
A K block of BK columns is read as a [BK/PW, BN] word tile and unpacked in registers (shift / mask) into [BK, BN]:
  w[k, n] = (q[k, n] - zp[e, n, g(k)]) * scale[e, n, g(k)]  (rounded to the activation dtype), acc += A @ w (fp32).
Groups: GROUP > 0 and not GIDX: g(k) = k // GROUP (BK a multiple of GROUP: the [BK/GROUP, BN] scale tile is broadcast
over GROUP rows; GROUP a multiple of BK: one scale row per block); GROUP = 0: per channel (g = 0);
GIDX: g(k) = gidx[e, k] (sorted act-order groups of uneven size, e.g. w2 under tensor parallelism), gathered.
Act-order: A holds each slot's row already in its expert's sorted column order (int_gemm.py gathers it first).
GEMM1 (GATED): gate rows n and up rows N + n, epilogue act(gate, up). GEMM2: bias and routing weight.
SPLIT_K > 1 (GEMM2 of few-token batches, grid axis 1): each program sums a slice of the K blocks and atomically adds
its (linear) epilogue into a zeroed fp32 output.
"""

import triton
import triton.language as tl

from moequant.kernels._moe_gemm_kernel import moe_epilogue, store_rows, tile_coords, tile_slots


@triton.jit
def _dequant(b_ptrs, w_mask, s_base, z_base, g_vec, k_ok, col_ok, k_start, K, stride_sk, stride_zk,
             BITS: tl.constexpr, GROUP: tl.constexpr, GIDX: tl.constexpr, HAS_ZP: tl.constexpr,
             BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Word tile [BK/PW, BN] -> dequantized fp32 [BK, BN]. s_base / z_base: [BN] pointers to group 0 of the tile's
    rows; g_vec: [BK] group ids (GIDX only)."""
    PW: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    HALF: tl.constexpr = 1 << (BITS - 1)
    words = tl.load(b_ptrs, mask=w_mask, other=0)
    shifts = tl.arange(0, PW) * BITS
    q = (words[:, None, :] >> shifts[None, :, None]) & MASK
    q = tl.reshape(q, (BLOCK_K, BLOCK_N)) - HALF
    if GIDX:
        m = k_ok[:, None] & col_ok[None, :]
        goff = g_vec[:, None].to(tl.int64)
        s = tl.load(s_base[None, :] + goff * stride_sk, mask=m, other=0.0).to(tl.float32)
        if HAS_ZP:
            q = q - tl.load(z_base[None, :] + goff * stride_zk, mask=m, other=0).to(tl.int32)
        w = q.to(tl.float32) * s
    elif GROUP == 0 or GROUP >= BLOCK_K:
        g = 0
        if GROUP != 0:
            g = k_start // GROUP
        s = tl.load(s_base + g * stride_sk, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_ZP:
            q = q - tl.load(z_base + g * stride_zk, mask=col_ok, other=0).to(tl.int32)[None, :]
        w = q.to(tl.float32) * s[None, :]
    else:
        NG: tl.constexpr = BLOCK_K // GROUP
        g = k_start // GROUP + tl.arange(0, NG)
        m = col_ok[None, :] & (g[:, None] * GROUP < K)
        s = tl.load(s_base[None, :] + g[:, None] * stride_sk, mask=m, other=0.0).to(tl.float32)
        q3 = tl.reshape(q, (NG, GROUP, BLOCK_N))
        if HAS_ZP:
            z = tl.load(z_base[None, :] + g[:, None] * stride_zk, mask=m, other=0).to(tl.int32)
            q3 = q3 - z[:, None, :]
        w = tl.reshape(q3.to(tl.float32) * s[:, None, :], (BLOCK_K, BLOCK_N))
    return w


@triton.jit
def int_moe_gemm_kernel(
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
    pid_m, pid_n = tile_coords(P_total, N, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    PW: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BLOCK_K // PW
    slots, row_ok, e, offs_n, col_ok = tile_slots(pid_m, pid_n, sorted_ids_ptr, expert_ids_ptr, S, N,
                                                  BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BKW)
    KW = K // PW

    a_rows = a_ptr + (slots // A_ROW_DIV).to(tl.int64)[:, None] * stride_am
    b_base = b_ptr + e * stride_be + offs_n[None, :].to(tl.int64) * stride_bn
    s_base = s_ptr + e * stride_se + offs_n.to(tl.int64) * stride_sn
    z_base = z_ptr + e * stride_ze + offs_n.to(tl.int64) * stride_zn
    dtype = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # GEMM1's up half (unused by GEMM2)
    if GATED:
        b_up = N * stride_bn
        s_up = N * stride_sn
        z_up = N * stride_zn
    k_lo, k_hi = k_blocks(K, BLOCK_K, SPLIT_K)
    for k0 in range(k_lo, k_hi):
        k_start = k0 * BLOCK_K
        k = k_start + offs_k
        k_ok = k < K
        a = tl.load(a_rows + k.to(tl.int64)[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g_vec = k
        if GIDX:
            g_vec = tl.load(gidx_ptr + e * stride_ge + k, mask=k_ok, other=0)
        j = k0 * BKW + offs_w
        b_ptrs = b_base + j[:, None] * stride_bk
        w_mask = (j < KW)[:, None] & col_ok[None, :]
        w = _dequant(b_ptrs, w_mask, s_base, z_base, g_vec, k_ok, col_ok, k_start, K, stride_sk, stride_zk,
                     BITS, GROUP, GIDX, HAS_ZP, BLOCK_K, BLOCK_N)
        acc = tl.dot(a, w.to(dtype), acc, input_precision=DOT_PRECISION)
        if GATED:
            w = _dequant(b_ptrs + b_up, w_mask, s_base + s_up, z_base + z_up, g_vec, k_ok, col_ok, k_start, K,
                         stride_sk, stride_zk, BITS, GROUP, GIDX, HAS_ZP, BLOCK_K, BLOCK_N)
            acc_up = tl.dot(a, w.to(dtype), acc_up, input_precision=DOT_PRECISION)

    int_epilogue(acc, acc_up, slots, row_ok, offs_n, col_ok, e, N, c_ptr, bias_ptr, topk_w_ptr,
                 stride_cm, stride_cn, stride_bias_e, stride_bias_n,
                 GATED, ACTIVATION, MUL_WEIGHT, HAS_BIAS, SPLIT_K)


@triton.jit
def k_blocks(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """[k_lo, k_hi): the K blocks this program sums; all of them, or with SPLIT_K > 1 its slice (grid axis 1)."""
    n_iter = tl.cdiv(K, BLOCK_K)
    k_lo = 0
    k_hi = n_iter
    if SPLIT_K > 1:
        per = tl.cdiv(n_iter, SPLIT_K)
        k_lo = tl.program_id(1) * per
        k_hi = tl.minimum(k_lo + per, n_iter)
    return k_lo, k_hi


@triton.jit
def int_epilogue(acc, acc_up, slots, row_ok, offs_n, col_ok, e, N, c_ptr, bias_ptr, topk_w_ptr,
                 stride_cm, stride_cn, stride_bias_e, stride_bias_n,
                 GATED: tl.constexpr, ACTIVATION: tl.constexpr, MUL_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    """moe_epilogue then a store, or with SPLIT_K > 1 an atomic add of this K slice's partial sum (GEMM2 only; the
    bias comes with the first slice)."""
    bias_ok = col_ok
    if SPLIT_K > 1:
        bias_ok = col_ok & (tl.program_id(1) == 0)
    acc = moe_epilogue(acc, acc_up, slots, row_ok, offs_n, col_ok, bias_ok, e, N, bias_ptr, topk_w_ptr,
                       stride_bias_e, stride_bias_n, GATED, ACTIVATION, MUL_WEIGHT, HAS_BIAS)
    store_rows(acc, slots, row_ok, offs_n, col_ok, c_ptr, stride_cm, stride_cn, SPLIT_K > 1)
