"""Launchers of the fp4 fused MoE (nvfp4, nvfp4a16, mxfp4): align -> GEMM1 (+gated activation) -> GEMM2 (+routing
weight) -> sum over K, with packed fp4 weights dequantized in registers (see _fp4_gemm_kernel); few slots per expert
take the two-launch GEMV path instead (gemv.py).

T tokens, K top-k, S = T*K slots, E experts (local), H hidden, I intermediate (per rank).
x [T, H]; w13 packed uint8 [E, 2I, H/2], w13 block scales [E, 2I, H/G]; w2 packed [E, H, I/2], scales [E, H, I/G];
nvfp4: w13_scale_2 [E, 2], w2_scale_2 [E] fp32; act_fp4: input scales [1] (NaN = dynamic per tensor).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton

from moequant.kernels._fp4_gemm_kernel import fp4_moe_gemm_kernel
from moequant.kernels.align import moe_align
from moequant.kernels.fp4_word_layout import check_word_rows
from moequant.kernels.gemv import GemvWeights, fused_experts_gemv, use_gemv
from moequant.kernels.gemv_fused import fused_decode_fp4, fuses
from moequant.kernels.moe_gemm import _ACT_CODE, _dot_precision, moe_sum
from moequant.kernels.nvfp4_act import fake_quant_act
from moequant.kernels.tuning import get_config
from moequant.quantize import fp4_math as f4

_SCALE_KIND = {"fp8": 0, "e8m0": 1}
# bf16 activations on a GPU: weights dequantized straight to bf16x2 (inline PTX); 0: through fp32
BF16X2 = os.environ.get("MOEQUANT_FP4_BF16X2", "1") == "1"


def uses_bf16x2(a: torch.Tensor) -> bool:
    """The grouped GEMM dequantizes in bf16x2 (_fp4_gemm_kernel's BF16X2) for bf16 activations on a GPU (inline PTX,
    which the interpreter cannot run)."""
    return BF16X2 and a.dtype == torch.bfloat16 and a.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


def quantize_act_nvfp4(a: torch.Tensor, input_scale: torch.Tensor,
                       out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 activation emulation: (a_q = e2m1 code * fp8 block scale in out_dtype (default a's), s = input scale [1]
    fp32) with a ~= a_q * s, the codes and block scales those of fp4_math.nvfp4_act_codes (the reference's own, so
    ties round alike); a NaN input scale means dynamic: s = amax(a) / (6 * 448). a_q is exact in bf16/fp16 (a 2-bit
    e2m1 significand times a 4-bit e4m3 one). On a GPU or in the interpreter one Triton launch (nvfp4_act; H200,
    nvfp4 M=1 forward: see the results README), else torch. No host sync."""
    if a.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return fake_quant_act(a.reshape(-1, a.shape[-1]), input_scale, out_dtype or a.dtype)
    s = f4.nvfp4_act_scale(a, input_scale)
    q, scale, _ = f4.nvfp4_act_codes(a, s)
    return (q * scale).reshape(a.shape).to(out_dtype or a.dtype), s


def _config(kernel, T, E, N, K, gated, device, top_k, group):
    cfg = get_config(kernel, T, E, N, K, gated=gated, device=device, top_k=top_k)
    bk = max(triton.next_power_of_2(cfg.BLOCK_K), 32, group)  # BK/2 >= 16 for tl.dot; a power of 2, so whole groups
    return dataclasses.replace(cfg, BLOCK_K=bk) if bk != cfg.BLOCK_K else cfg


def fp4_grouped_gemm(a, b, bs, c, routing, cfg, *, scale_kind, group, gated, a_row_div, activation="silu",
                     scale_2=None, a_scale=None, bias=None, topk_weights=None) -> torch.Tensor:
    """c[slot] = epilogue(a[slot // a_row_div] @ dequant(b[expert(slot)]).T); see _fp4_gemm_kernel."""
    sorted_ids, expert_ids, total = routing
    N = b.shape[1] // 2 if gated else b.shape[1]
    K = b.shape[2] * 2
    S = c.shape[0]
    P = sorted_ids.numel()
    grid = (triton.cdiv(P, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N),)
    dummy = c
    s2 = scale_2 if scale_2 is not None else dummy
    s2_strides = (scale_2.stride(0), scale_2.stride(1) if scale_2.dim() > 1 else 0) if scale_2 is not None else (0, 0)
    fp4_moe_gemm_kernel[grid](
        a, b, bs, s2, a_scale if a_scale is not None else dummy, c,
        bias if bias is not None else dummy, topk_weights if topk_weights is not None else dummy,
        sorted_ids, expert_ids, total,
        N, K, S, P,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), bs.stride(0), bs.stride(1), bs.stride(2),
        *s2_strides, c.stride(0), c.stride(1),
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        A_ROW_DIV=a_row_div, GATED=gated, ACTIVATION=_ACT_CODE[activation], SCALE_KIND=_SCALE_KIND[scale_kind],
        GROUP=group, HAS_S2=scale_2 is not None, HAS_ASCALE=a_scale is not None,
        MUL_WEIGHT=topk_weights is not None, HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(a.dtype),
        BF16X2=uses_bf16x2(a), **cfg.launch_kwargs(),
    )
    return c


def fused_experts_fp4(x, w13_packed, w13_scale, w2_packed, w2_scale, topk_weights, topk_ids, *, scale_kind="fp8",
                      w13_scale_2=None, w2_scale_2=None, w13_input_scale=None, w2_input_scale=None, act_fp4=False,
                      activation="silu", w13_bias=None, w2_bias=None, apply_router_weight_on_input=False,
                      has_remote_experts=False, route=None) -> torch.Tensor:
    """out[t] = sum_k w[t,k] * (W2[e] act(W13[e] x'[t] + b13[e]) + b2[e]), W = dequantized fp4, x' = x (A16) or
    x fake-quantized to nvfp4 (act_fp4; likewise the activation before W2). Packed weights in the decode layout
    (kernels.fp4_word_layout), as methods.fp4 keeps them after process_weights_after_loading. route
    (topk.DeferredRouting, whose outputs topk_weights and topk_ids are): the decode GEMV routes in GEMM1; other
    paths run it first."""
    T, H = x.shape
    E, two_i, _ = w13_packed.shape
    I = two_i // 2
    K = topk_ids.shape[1]
    group = H // w13_scale.shape[2]
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"fp4 MoE: x must be fp16, bf16 or fp32, got {x.dtype}")
    check_word_rows(w13_packed, "fp4 MoE: w13_packed")
    check_word_rows(w2_packed, "fp4 MoE: w2_packed")
    if T == 0:
        return torch.zeros(0, H, dtype=x.dtype, device=x.device)
    gemv_path = use_gemv(T, K, E, slots_per_expert=2)
    if route is not None and not gemv_path:
        route.run()
    if gemv_path:
        ws = [GemvWeights("fp4", p, bits=4, group=group, scale=sc, scale_kind=scale_kind, expert_scale=s2)
              for p, sc, s2 in ((w13_packed, w13_scale, w13_scale_2), (w2_packed, w2_scale, w2_scale_2))]

        def quantize(a, stage):  # nvfp4: activations fake-quantized with one scale for the tensor
            a_q, s = quantize_act_nvfp4(a, w13_input_scale if stage == 1 else w2_input_scale, x.dtype)
            return a_q, s, "tensor"

        if fuses(x, *ws, route, biases=w13_bias is not None or w2_bias is not None, act_quant=act_fp4,
                 apply_router_weight_on_input=apply_router_weight_on_input):
            out = fused_decode_fp4(x, *ws, route, activation)
            if out is not None:
                return out
        return fused_experts_gemv(x, *ws, topk_weights, topk_ids, activation=activation, w13_bias=w13_bias,
                                  w2_bias=w2_bias, apply_router_weight_on_input=apply_router_weight_on_input,
                                  quantize=quantize if act_fp4 else None,
                                  inter_dtype=torch.float32 if act_fp4 else None, route=route)
    if scale_kind == "fp8":  # the kernel decodes the fp8 bits itself
        w13_scale, w2_scale = w13_scale.view(torch.uint8), w2_scale.view(torch.uint8)
    S = T * K
    # one tuning entry for nvfp4 and mxfp4: the same kernel, only the block scales decode differently
    cfg1 = _config("w13-fp4", T, E, I, H, True, x.device, K, group)
    cfg2 = _config("w2-fp4", T, E, H, I, False, x.device, K, group)
    topk_weights = topk_weights.reshape(-1).float().contiguous()
    route1 = moe_align(topk_ids, E, cfg1.BLOCK_M)
    route2 = route1 if cfg2.BLOCK_M == cfg1.BLOCK_M else moe_align(topk_ids, E, cfg2.BLOCK_M)
    new = torch.zeros if has_remote_experts else torch.empty
    a1, s1 = quantize_act_nvfp4(x, w13_input_scale) if act_fp4 else (x, None)
    # nvfp4 quantizes GEMM1's activation: keep it in fp32 so it is rounded once (to fp4), as in the reference; a bf16
    # copy first would move ~3% of the values across an e2m1 rounding boundary
    inter = new(S, I, dtype=torch.float32 if act_fp4 else x.dtype, device=x.device)
    fp4_grouped_gemm(a1, w13_packed, w13_scale, inter, route1, cfg1, scale_kind=scale_kind, group=group, gated=True,
                     a_row_div=K, activation=activation, scale_2=w13_scale_2, a_scale=s1, bias=w13_bias,
                     topk_weights=topk_weights if apply_router_weight_on_input else None)
    a2, s2 = quantize_act_nvfp4(inter, w2_input_scale, x.dtype) if act_fp4 else (inter, None)
    y = new(S, H, dtype=x.dtype, device=x.device)
    fp4_grouped_gemm(a2, w2_packed, w2_scale, y, route2, cfg2, scale_kind=scale_kind, group=group, gated=False,
                     a_row_div=1, scale_2=w2_scale_2, a_scale=s2, bias=w2_bias,
                     topk_weights=None if apply_router_weight_on_input else topk_weights)
    return moe_sum(y, T, K)
