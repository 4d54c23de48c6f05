"""Triton body of the unquantized grouped expert GEMM (launcher: moe_gemm.py).

Each program computes a [BM, BN] tile of C for one block of BM token slots that all belong to expert e:
  C[slot, n] = epilogue( sum_k A[slot // A_ROW_DIV, k] * B[e, n, k] )
GEMM1 (GATED): B = w13 [E, 2N, K]; two accumulators (gate rows n, up rows N + n); epilogue act(gate, up).
GEMM2: B = w2 [E, N, K]; epilogue optional bias and routing weight.
Shape legend: S token slots, P padded slots, E experts, N output columns, K reduction dim.
"""

import triton
import triton.language as tl

ACT_SILU: tl.constexpr = 0
ACT_GELU: tl.constexpr = 1
ACT_SWIGLUOAI: tl.constexpr = 2


@triton.jit
def gated_act(gate, up, ACTIVATION: tl.constexpr):
    """fp32 act(gate, up): silu, exact gelu, or gpt-oss's clamped swiglu (alpha 1.702, limit 7)."""
    if ACTIVATION == 0:
        return gate * tl.sigmoid(gate) * up
    elif ACTIVATION == 1:
        return 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)) * up
    else:
        g = tl.minimum(gate, 7.0)
        u = tl.minimum(tl.maximum(up, -7.0), 7.0)
        return g * tl.sigmoid(1.702 * g) * (u + 1.0)


@triton.jit
def moe_epilogue(acc, acc_up, slots, row_ok, offs_n, col_ok, bias_ok, e, N, bias_ptr, topk_w_ptr,
                 stride_bias_e, stride_bias_n, GATED: tl.constexpr, ACTIVATION: tl.constexpr,
                 MUL_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """fp32 [BM, BN] tile -> epilogue: GEMM1 (GATED) act(w * gate + b_gate, w * up + b_up) with w the routing weight
    when it is applied on the input side; GEMM2 w * (acc + b). bias_ok masks the bias columns (a split-K slice
    other than the first adds none)."""
    if MUL_WEIGHT:
        w = tl.load(topk_w_ptr + slots, mask=row_ok, other=0.0).to(tl.float32)
        if GATED:
            acc = acc * w[:, None]
            acc_up = acc_up * w[:, None]
    if HAS_BIAS:
        bias_row = bias_ptr + e * stride_bias_e
        acc += tl.load(bias_row + offs_n * stride_bias_n, mask=bias_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(bias_row + (N + offs_n) * stride_bias_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if MUL_WEIGHT:
        if not GATED:
            acc = acc * w[:, None]
    if GATED:
        acc = gated_act(acc, acc_up, ACTIVATION)
    return acc


@triton.jit
def store_rows(acc, slots, row_ok, offs_n, col_ok, c_ptr, stride_cm, stride_cn, ATOMIC: tl.constexpr):
    """C[slot, n] = acc (cast to C's dtype), or with ATOMIC += acc (fp32 split-K partial sums)."""
    c_ptrs = c_ptr + slots.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    if ATOMIC:
        tl.atomic_add(c_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def tile_slots(pid_m, pid_n, sorted_ids_ptr, expert_ids_ptr, S, N,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile (pid_m, pid_n) -> (slots [BM] of its token block, row_ok = slot < S (not padding), its expert e (int64),
    output columns offs_n [BN], col_ok = offs_n < N): every expert GEMM's prologue."""
    slots = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return slots, slots < S, e, offs_n, offs_n < N


@triton.jit
def tile_coords(P_total, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) order of tiles: GROUP_M token blocks share each column strip."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(P_total, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % size_m)
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, topk_w_ptr,
    sorted_ids_ptr, expert_ids_ptr, total_ptr,
    N, K, S, P_total,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_bias_e, stride_bias_n,
    A_ROW_DIV: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr,
    MUL_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_coords(P_total, N, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    slots, row_ok, e, offs_n, col_ok = tile_slots(pid_m, pid_n, sorted_ids_ptr, expert_ids_ptr, S, N,
                                                  BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + (slots // A_ROW_DIV).to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + e * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # GEMM1's up half (unused by GEMM2)
    up_off = N * stride_bn
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATED:
            b_up = tl.load(b_ptrs + up_off, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    acc = moe_epilogue(acc, acc_up, slots, row_ok, offs_n, col_ok, col_ok, e, N, bias_ptr, topk_w_ptr,
                       stride_bias_e, stride_bias_n, GATED, ACTIVATION, MUL_WEIGHT, HAS_BIAS)
    store_rows(acc, slots, row_ok, offs_n, col_ok, c_ptr, stride_cm, stride_cn, False)
