"""Triton body of the fp8 x fp8 grouped expert GEMM (launcher: fp8_gemm.py).

Each program computes a [BM, BN] tile for one block of BM token slots that all belong to expert e:
  C[slot, n] = epilogue( sum_k A[slot // A_ROW_DIV, k] * sa * B[e, n, k] * sb )      A, B e4m3fn, sum in fp32
A scales (A_SCALE): 0 one per tensor [1]; 1 one per row [rows]; 2 one per row and 128 columns [rows, K/128].
B scales (B_SCALE): 0 one per expert [E]; 1 one per output row [E, N_b]; 2 one per 128x128 block [E, N_b/128, K/128].
Per-tensor / per-row scales multiply the fp32 accumulator in the epilogue; group / block scales multiply each K-step's
partial dot (BLOCK_K divides 128) before it is added. Tensor-core partial sums are promoted to the fp32 accumulator
every IMPRECISE_ACC products (Hopper's fp8 MMA otherwise keeps a narrower accumulator over the whole K loop).
GEMM1 (GATED): B = w13 [E, 2N, K]; gate rows n, up rows N + n; epilogue act(gate, up); OUT_AMAX atomically folds the
tile's max |C| into amax_ptr[0] (1: per tensor) or its rows' into amax_ptr[slot] (2: per row), for the dynamic
quantization of C; or OUT_QUANT stores C in e4m3 (as bytes) with the static per-tensor scale c_scale_ptr[0], so a
static scheme needs no fp32 C and no quantizer launch. GEMM2: bias and routing weight.
A_HP: A arrives in high precision and each tile is quantized here, as the quantizer kernel would, bit for bit:
per tensor with the scale a_scale_ptr[0] or (A_FROM_AMAX) max(a_scale_ptr[0], EPS) / 448; per row with
max(a_scale_ptr[row], EPS) / 448, a_scale_ptr holding the row amax that GEMM1 folded in (OUT_AMAX 2).
B_DESC: b_ptr is a host TMA descriptor (triton.tools.tensor_descriptor.TensorDescriptor) of B viewed as
[E * N_b, K] (N_b = 2N for GEMM1, N for GEMM2; K-contiguous rows, 16-byte aligned) with block [BLOCK_N, BLOCK_K]:
B tiles arrive by TMA (K past the end zero-filled; rows past N read the neighbouring rows, whose columns the
store masks) and feed the dot transposed (fp8 wgmma takes a K-major B); the stride_b* arguments are unused.
Shape legend: S token slots, P padded slots, E experts, N output columns, N_b rows of B per expert, K reduction dim.
"""

import triton
import triton.language as tl

from moequant.kernels._fp8_act_quant_kernel import _quant, _scale
from moequant.kernels._moe_gemm_kernel import moe_epilogue, tile_coords, tile_slots


@triton.jit
def _k_step(a, b, acc, sa_k, sb_k, PER_STEP: tl.constexpr, IMPRECISE_ACC: tl.constexpr):
    if PER_STEP:
        return acc + tl.dot(a, b) * sa_k[:, None] * sb_k[None, :]
    return tl.dot(a, b, acc, max_num_imprecise_acc=IMPRECISE_ACC)


@triton.jit
def fp8_moe_gemm_kernel(
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, amax_ptr, c_scale_ptr, bias_ptr, topk_w_ptr,
    sorted_ids_ptr, expert_ids_ptr, total_ptr,
    N, K, S, P_total,
    stride_am, stride_ak, stride_as_m, stride_as_k,
    stride_be, stride_bn, stride_bk, stride_bs_e, stride_bs_n, stride_bs_k,
    stride_cm, stride_cn, stride_bias_e, stride_bias_n,
    A_ROW_DIV: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr,
    MUL_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    A_SCALE: tl.constexpr, B_SCALE: tl.constexpr, OUT_AMAX: tl.constexpr, IMPRECISE_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    A_HP: tl.constexpr = False, A_FROM_AMAX: tl.constexpr = False, EPS: tl.constexpr = 1e-10,
    EMULATE_CAST: tl.constexpr = False, OUT_QUANT: tl.constexpr = False, B_DESC: tl.constexpr = False,
):
    pid_m, pid_n = tile_coords(P_total, N, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    slots, row_ok, e, offs_n, col_ok = tile_slots(pid_m, pid_n, sorted_ids_ptr, expert_ids_ptr, S, N,
                                                  BLOCK_M, BLOCK_N)
    a_rows = (slots // A_ROW_DIV).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    PER_STEP: tl.constexpr = (A_SCALE == 2) or (B_SCALE == 2)

    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    if B_DESC:  # first row of the tile in the [E * N_b, K] view (GEMM1's up rows: + N)
        b_row = e.to(tl.int32) * (N * (2 if GATED else 1)) + pid_n * BLOCK_N
    else:
        b_ptrs = b_ptr + e * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk
    bs_row = b_scale_ptr + e * stride_bs_e
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # GEMM1's up half (unused by GEMM2)
    up_off = N * stride_bn  # pointer path's up rows
    # per-K-step scales (identity unless PER_STEP)
    sa_k = tl.full((BLOCK_M,), 1.0, tl.float32)
    sb_k = tl.full((BLOCK_N,), 1.0, tl.float32)
    sb_up_k = tl.full((BLOCK_N,), 1.0, tl.float32)
    if A_HP:  # A in fp16/bf16/fp32, quantized to fp8 tile by tile here (decode: saves the quantizer's launch)
        if A_SCALE == 1:  # per row, from the row amax GEMM1's epilogue left in a_scale_ptr
            sa_q = _scale(tl.load(a_scale_ptr + a_rows * stride_as_m, mask=row_ok, other=1.0), EPS)
            sa_q2 = sa_q[:, None]
        else:
            if A_FROM_AMAX:
                sa_q = _scale(tl.load(a_scale_ptr), EPS)
            else:
                sa_q = tl.load(a_scale_ptr)
            sa_q2 = sa_q
    # per-row / per-channel epilogue scales issued before the K loop, which hides their latency (H200, Mixtral M=4096
    # fp8-channel: about 1.5% faster than loading them after it). B's gate and up scales are one [BN, 2] load: with at
    # least as many elements as threads Triton keeps it in its own layout (a register or two per thread through the
    # loop) and converts it in the epilogue; two [BN] loads took the accumulator's layout, BN / 4 registers each, and
    # were 2% slower than loading late.
    if B_SCALE == 1:
        half = tl.arange(0, 2)
        sb_pair = tl.load(bs_row + (offs_n[:, None] + half[None, :] * N) * stride_bs_n,
                          mask=col_ok[:, None] & ((half[None, :] == 0) | GATED), other=0.0)
    if A_SCALE == 1 and not A_HP:
        sa_rows = tl.load(a_scale_ptr + a_rows * stride_as_m, mask=row_ok, other=0.0)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k0 * BLOCK_K
        kb = (k0 * BLOCK_K) // 128
        if A_SCALE == 2:
            sa_k = tl.load(a_scale_ptr + a_rows * stride_as_m + kb * stride_as_k, mask=row_ok, other=0.0)
        if B_SCALE == 2:
            sb_k = tl.load(bs_row + (offs_n // 128) * stride_bs_n + kb * stride_bs_k, mask=col_ok, other=0.0)
            if GATED:
                sb_up_k = tl.load(bs_row + ((N + offs_n) // 128) * stride_bs_n + kb * stride_bs_k, mask=col_ok,
                                  other=0.0)
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if A_HP:
            a = _quant(a.to(tl.float32), sa_q2, EMULATE_CAST)
        if B_DESC:  # [BN, BK] tiles by TMA, transposed to [BK, BN]
            b = b_ptr.load([b_row, k0 * BLOCK_K]).T
        else:
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _k_step(a, b, acc, sa_k, sb_k, PER_STEP, IMPRECISE_ACC)
        if GATED:
            if B_DESC:
                b_up = b_ptr.load([b_row + N, k0 * BLOCK_K]).T
            else:
                b_up = tl.load(b_ptrs + up_off, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_up = _k_step(a, b_up, acc_up, sa_k, sb_up_k, PER_STEP, IMPRECISE_ACC)
        a_ptrs += BLOCK_K * stride_ak
        if not B_DESC:
            b_ptrs += BLOCK_K * stride_bk

    # epilogue scales: per tensor / per row of A, per expert / per channel of B
    if A_HP:
        acc = acc * sa_q2
        if GATED:
            acc_up = acc_up * sa_q2
    elif A_SCALE == 0:
        sa = tl.load(a_scale_ptr)
        acc = acc * sa
        if GATED:
            acc_up = acc_up * sa
    elif A_SCALE == 1:
        acc = acc * sa_rows[:, None]
        if GATED:
            acc_up = acc_up * sa_rows[:, None]
    if B_SCALE == 0:
        sb = tl.load(bs_row)
        acc = acc * sb
        if GATED:
            acc_up = acc_up * sb
    elif B_SCALE == 1:
        sb_gate, sb_up = tl.split(sb_pair)
        acc = acc * sb_gate[None, :]
        if GATED:
            acc_up = acc_up * sb_up[None, :]

    acc = moe_epilogue(acc, acc_up, slots, row_ok, offs_n, col_ok, col_ok, e, N, bias_ptr, topk_w_ptr,
                       stride_bias_e, stride_bias_n, GATED, ACTIVATION, MUL_WEIGHT, HAS_BIAS)
    ok = row_ok[:, None] & col_ok[None, :]
    # relaxed: the amax is read by a later launch (stream order); acq_rel put a MEMBAR.GPU before each atomic (H200,
    # Mixtral M=4096 fp8-channel ~3880 -> ~3850 us, Qwen3-30B M=64 186 -> 184)
    if OUT_AMAX == 1:  # per tensor
        tl.atomic_max(amax_ptr, tl.max(tl.max(tl.where(ok, tl.abs(acc), 0.0), axis=1), axis=0), sem="relaxed")
    elif OUT_AMAX == 2:  # per row (token slot)
        tl.atomic_max(amax_ptr + slots, tl.max(tl.where(ok, tl.abs(acc), 0.0), axis=1), mask=row_ok, sem="relaxed")
    c_ptrs = c_ptr + slots.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    if OUT_QUANT:  # C in e4m3 with the static scale c_scale_ptr[0], as the quantizer kernel would (bit for bit)
        tl.store(c_ptrs, _quant(acc, tl.load(c_scale_ptr), EMULATE_CAST).to(tl.uint8, bitcast=True), mask=ok)
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=ok)
