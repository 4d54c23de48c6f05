"""Launchers of the int4/int8 weight-only fused MoE: align -> GEMM1 (+gated activation) -> GEMM2 (+routing weight)
-> sum over K, with packed integer weights dequantized in registers (see _int_gemm_kernel); few slots per expert
take the two-launch GEMV path instead (gemv.py). No dequantized copy of the weights is ever made. Act-order: the
GEMV gathers x's columns in its loads (GEMM1) and GEMM1 writes its output in w2's sorted order; the grouped GEMMs
read per-slot copies of their inputs in the expert's sorted column order (gather.py: one launch each), because
gathering in their tensor-core loads measured 1.3x (Qwen3-30B) to 2.5x (Mixtral) slower at M=64 on the H200.

T tokens, K top-k, S = T*K slots, E experts (local), H hidden, I intermediate (per rank), G group size, PW = 32 / b.
x [T, H]; IntWeights: packed int32 [E, N, K/PW], scale [E, N, groups], zero_point int8 [E, N, groups] or None,
g_idx int32 [E, K] (sorted act-order groups) and sort_idx int32 [E, K] or None.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton

from moequant.kernels._int_gemm_kernel import int_moe_gemm_kernel
from moequant.kernels._int_gemm_slab_kernel import int_moe_gemm_slab_kernel
from moequant.kernels.align import moe_align
from moequant.kernels.gather import gather_slot_columns
from moequant.kernels.gemv import GemvWeights, fused_experts_gemv, use_gemv
from moequant.kernels.moe_gemm import _ACT_CODE, _dot_precision, moe_sum
from moequant.kernels.tuning import get_config


@dataclass(frozen=True)
class IntLayout:
    """bits 4|8; group_size None = per channel; act_order: sort_idx present (and maybe uneven groups)."""

    bits: int
    group_size: int | None
    symmetric: bool = True
    act_order: bool = False


@dataclass(frozen=True)
class IntWeights:
    """One GEMM's weights in kernel layout. uniform_groups: after the act-order sort, g_idx[k] == k // G (so the
    kernel reads scales by k // G and only gathers activations); decided once at load time."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None
    sort_idx: torch.Tensor | None = None
    uniform_groups: bool = True
    inv_sort_idx: torch.Tensor | None = None


KERNEL = os.environ.get("MOEQUANT_INT_KERNEL", "auto")  # auto | slab | tile (see use_slab)
SLAB_MAX_SLOTS_PER_EXPERT = 8  # H200: slab faster at 4 slots/expert (Qwen3 M=64), slower at 16 (Mixtral M=64)


def use_slab(S: int, E: int) -> bool:
    """The slab kernel (one dot per bit position, scales factored out of the dot) for few slots per expert, where
    dequantization rather than the tensor cores sets the pace; the tile kernel (one unpacked [BK, BN] tile) beyond."""
    if KERNEL in ("slab", "tile"):
        return KERNEL == "slab"
    return S <= SLAB_MAX_SLOTS_PER_EXPERT * E


def _config(kernel, T, E, N, K, gated, device, top_k, layout: IntLayout, slab: bool):
    cfg = get_config(kernel, T, E, N, K, gated=gated, device=device, top_k=top_k)
    pw = 32 // layout.bits
    if slab:  # each slab is a dot of BK / PW >= 16 columns
        bk = max(triton.next_power_of_2(cfg.BLOCK_K), 16 * pw)
    else:  # [BK/PW, BN] word tiles; BK >= 16 for tl.dot
        bk = max(triton.next_power_of_2(cfg.BLOCK_K), 16 * pw // 2, 32)
        G = layout.group_size
        if G is not None and bk % G and G % bk:
            bk = G
    return dataclasses.replace(cfg, BLOCK_K=bk) if bk != cfg.BLOCK_K else cfg


def split_k_for(S: int, E: int, N: int, K: int, cfg, device: torch.device) -> int:
    """K slices for GEMM2 of few-token batches: double until the programs fill the SMs twice; slices >= 4 K blocks.
    Tiles are estimated from min(S, E) active experts (no host sync)."""
    if device.type != "cuda" or S * 1.0 / max(E, 1) > 4:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = min(S, E) * triton.cdiv(N, cfg.BLOCK_N)
    split = 1
    while split < 8 and tiles * split < 2 * sms and triton.cdiv(K, cfg.BLOCK_K) >= 8 * split:
        split *= 2
    return split


def int_grouped_gemm(a, w: IntWeights, c, routing, cfg, layout: IntLayout, *, gated: bool, a_row_div: int,
                     activation: str = "silu", bias=None, topk_weights=None, split_k: int = 1,
                     slab: bool = False) -> torch.Tensor:
    """c[slot] = epilogue(a[slot // a_row_div] @ dequant(w[expert(slot)]).T); see _int_gemm_kernel. Act-order
    weights need a already in sorted column order (gather_slot_columns) and w without sort_idx."""
    sorted_ids, expert_ids, total = routing
    pw = 32 // layout.bits
    N = w.packed.shape[1] // 2 if gated else w.packed.shape[1]
    K = w.packed.shape[2] * pw
    S = c.shape[0]
    P = sorted_ids.numel()
    if split_k > 1 and (gated or c.dtype != torch.float32):
        raise ValueError("int MoE: split-K needs the non-gated GEMM and an fp32 (zeroed) output")
    grid = (triton.cdiv(P, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N), split_k)
    dummy = c
    if w.sort_idx is not None:
        raise ValueError("int_grouped_gemm: act-order activations must be gathered into sorted order first "
                         "(gather_slot_columns) and the weights passed without sort_idx")
    zp, gi = w.zero_point, w.g_idx
    gidx = layout.act_order and not w.uniform_groups
    kernel = int_moe_gemm_slab_kernel if slab else int_moe_gemm_kernel
    kernel[grid](
        a, w.packed, w.scale, zp if zp is not None else dummy, gi if gidx else dummy, c,
        bias if bias is not None else dummy, topk_weights if topk_weights is not None else dummy,
        sorted_ids, expert_ids, total,
        N, K, S, P, w.scale.shape[2],
        a.stride(0), a.stride(1), w.packed.stride(0), w.packed.stride(1), w.packed.stride(2),
        w.scale.stride(0), w.scale.stride(1), w.scale.stride(2),
        *(zp.stride() if zp is not None else (0, 0, 0)), gi.stride(0) if gidx else 0,
        c.stride(0), c.stride(1),
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        A_ROW_DIV=a_row_div, GATED=gated, ACTIVATION=_ACT_CODE[activation],
        BITS=layout.bits, GROUP=layout.group_size or 0, GIDX=gidx, HAS_ZP=zp is not None,
        MUL_WEIGHT=topk_weights is not None, HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(a.dtype),
        SPLIT_K=split_k, **cfg.launch_kwargs(),
    )
    return c


def gemv_weights(w: IntWeights, layout: IntLayout, sort_idx=None, out_perm=None) -> GemvWeights:
    """The GEMV kernel's view of one GEMM's int weights: per-channel scales [E, N, 1] become row scales, and a
    per-channel zero point is read for every chunk (stride 0 over groups)."""
    zp = w.zero_point
    if layout.group_size is None:
        chunks = triton.cdiv(w.packed.shape[2] * (32 // layout.bits), 128)
        return GemvWeights("int", w.packed, bits=layout.bits, row_scale=w.scale[:, :, 0],
                           zero_point=None if zp is None else zp[:, :, :1].expand(-1, -1, chunks),
                           sort_idx=sort_idx, out_perm=out_perm)
    return GemvWeights("int", w.packed, bits=layout.bits, group=layout.group_size, scale=w.scale, zero_point=zp,
                       sort_idx=sort_idx, out_perm=out_perm)


def fused_experts_int(x, w13: IntWeights, w2: IntWeights, topk_weights, topk_ids, layout: IntLayout, *,
                      activation="silu", w13_bias=None, w2_bias=None, apply_router_weight_on_input=False,
                      has_remote_experts=False, split_k: int | None = None, slot_rows=None,
                      route=None) -> torch.Tensor:
    """out[t] = sum_k w[t,k] * (W2[e] act(W13[e] x[t] + b13[e]) + b2[e]), W = dequantized int weights.
    split_k: K slices of GEMM2 (None: split_k_for's choice, 1 off the GPU). route (topk.DeferredRouting, whose
    outputs topk_weights and topk_ids are): the decode GEMV routes in GEMM1; other paths run it first."""
    T, H = x.shape
    E, two_i, _ = w13.packed.shape
    I = two_i // 2
    K = topk_ids.shape[1]
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"int MoE: x must be fp16, bf16 or fp32, got {x.dtype}")
    if w13.packed.dtype != torch.int32 or w2.packed.dtype != torch.int32:
        raise ValueError("int MoE: packed weights must be int32")
    if T == 0:
        return torch.zeros(0, H, dtype=x.dtype, device=x.device)
    gemv_path = use_gemv(T, K, E) and w13.uniform_groups and w2.uniform_groups
    if route is not None and not gemv_path:
        route.run()
    if gemv_path:
        # act-order: each slot's x row is gathered in w13's sorted order first; GEMM1 writes its output already in
        # w2's sorted order (inverse sort), so GEMM2 reads it contiguously
        g13 = gemv_weights(w13, layout, sort_idx=w13.sort_idx, out_perm=w2.inv_sort_idx)
        g2 = gemv_weights(w2, layout, sort_idx=w2.sort_idx if w2.inv_sort_idx is None else None)
        return fused_experts_gemv(x, g13, g2, topk_weights, topk_ids,
                                  activation=activation, w13_bias=w13_bias, w2_bias=w2_bias,
                                  apply_router_weight_on_input=apply_router_weight_on_input, slot_rows=slot_rows,
                                  route=route)
    S = T * K
    tag = f"int{layout.bits}"
    slab = use_slab(S, E)
    cfg1 = _config(f"w13-{tag}", T, E, I, H, True, x.device, K, layout, slab)
    cfg2 = _config(f"w2-{tag}", T, E, H, I, False, x.device, K, layout, slab)
    topk_weights = topk_weights.reshape(-1).float().contiguous()
    route1 = moe_align(topk_ids, E, cfg1.BLOCK_M)
    route2 = route1 if cfg2.BLOCK_M == cfg1.BLOCK_M else moe_align(topk_ids, E, cfg2.BLOCK_M)
    new = torch.zeros if has_remote_experts else torch.empty
    a_div = K
    if w13.sort_idx is not None:  # act-order: each slot's x row in its expert's sorted column order
        x = slot_rows if slot_rows is not None else gather_slot_columns(
            x, w13.sort_idx, topk_ids, K, out=new(S, H, dtype=x.dtype, device=x.device))
        w13, a_div = dataclasses.replace(w13, sort_idx=None), 1
    inter = new(S, I, dtype=x.dtype, device=x.device)
    int_grouped_gemm(x, w13, inter, route1, cfg1, layout, gated=True, a_row_div=a_div, activation=activation,
                     bias=w13_bias, topk_weights=topk_weights if apply_router_weight_on_input else None, slab=slab)
    if w2.sort_idx is not None:
        inter = gather_slot_columns(inter, w2.sort_idx, topk_ids, 1, out=new(S, I, dtype=x.dtype, device=x.device))
        w2 = dataclasses.replace(w2, sort_idx=None)
    if split_k is None:
        split_k = split_k_for(S, E, H, I, cfg2, x.device)
    if split_k > 1:
        y = torch.zeros(S, H, dtype=torch.float32, device=x.device)
    else:
        y = new(S, H, dtype=x.dtype, device=x.device)
    int_grouped_gemm(inter, w2, y, route2, cfg2, layout, gated=False, a_row_div=1, bias=w2_bias,
                     topk_weights=None if apply_router_weight_on_input else topk_weights, split_k=split_k,
                     slab=slab)
    return moe_sum(y, T, K).to(x.dtype)
