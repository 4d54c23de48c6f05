"""Launchers of the unquantized fused MoE: align -> GEMM1 (+gated activation) -> GEMM2 (+routing weight) -> sum over K.

T tokens, K top-k, S = T*K slots, E experts (local), H hidden, I intermediate (per rank).
x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights fp32 [T, K], topk_ids int32 [T, K] (local ids, -1 = elsewhere).
"""

from __future__ import annotations

import torch
import triton

from moequant.kernels._moe_gemm_kernel import moe_gemm_kernel
from moequant.kernels._moe_sum_kernel import moe_sum_kernel
from moequant.kernels.align import moe_align
from moequant.kernels.tuning import get_config, fit_shared_memory

_ACT_CODE = {"silu": 0, "gelu": 1, "swigluoai": 2}


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def grouped_gemm(a, b, c, routing, cfg, *, gated: bool, a_row_div: int, activation: str = "silu",
                 bias=None, topk_weights=None) -> torch.Tensor:
    """c[slot] = epilogue(a[slot // a_row_div] @ b[expert(slot)].T) for every routed slot; see _moe_gemm_kernel."""
    sorted_ids, expert_ids, total = routing
    N = b.shape[1] // 2 if gated else b.shape[1]
    K = b.shape[2]
    S = c.shape[0]
    P = sorted_ids.numel()
    grid = (triton.cdiv(P, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N),)
    dummy = c
    moe_gemm_kernel[grid](
        a, b, c, bias if bias is not None else dummy, topk_weights if topk_weights is not None else dummy,
        sorted_ids, expert_ids, total,
        N, K, S, P,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        A_ROW_DIV=a_row_div, GATED=gated, ACTIVATION=_ACT_CODE[activation],
        MUL_WEIGHT=topk_weights is not None, HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(a.dtype),
        **cfg.launch_kwargs(),
    )
    return c


def fused_experts(x, w13, w2, topk_weights, topk_ids, *, activation="silu", w13_bias=None, w2_bias=None,
                  apply_router_weight_on_input=False, has_remote_experts=False) -> torch.Tensor:
    """out[t] = sum_k w[t,k] * (w2[e] act(w13[e] x[t] + b13[e]) + b2[e]) with e = topk_ids[t,k].

    has_remote_experts: some ids may be -1 (expert parallelism); their slots then contribute zero."""
    T, H = x.shape
    E, two_i, _ = w13.shape
    I = two_i // 2
    K = topk_ids.shape[1]
    if x.dtype != w13.dtype:
        raise ValueError(f"x dtype {x.dtype} differs from the weights' {w13.dtype}")
    if T == 0:
        return torch.zeros(0, H, dtype=x.dtype, device=x.device)
    S = T * K
    size = x.element_size()
    cfg1 = fit_shared_memory(get_config("w13", T, E, I, H, gated=True, device=x.device, top_k=K), size, True)
    cfg2 = fit_shared_memory(get_config("w2", T, E, H, I, gated=False, device=x.device, top_k=K), size, False)
    topk_weights = topk_weights.reshape(-1).float().contiguous()
    route1 = moe_align(topk_ids, E, cfg1.BLOCK_M)
    route2 = route1 if cfg2.BLOCK_M == cfg1.BLOCK_M else moe_align(topk_ids, E, cfg2.BLOCK_M)
    # slots routed to other ranks are never written: start from zeros then
    new = torch.zeros if has_remote_experts else torch.empty
    inter = new(S, I, dtype=x.dtype, device=x.device)
    grouped_gemm(x, w13, inter, route1, cfg1, gated=True, a_row_div=K, activation=activation, bias=w13_bias,
                 topk_weights=topk_weights if apply_router_weight_on_input else None)
    y = new(S, H, dtype=x.dtype, device=x.device)
    grouped_gemm(inter, w2, y, route2, cfg2, gated=False, a_row_div=1, bias=w2_bias,
                 topk_weights=None if apply_router_weight_on_input else topk_weights)
    return moe_sum(y, T, K)


def moe_sum(y: torch.Tensor, T: int, K: int) -> torch.Tensor:
    """out [T, H] = sum over the K slots of each token of y [T*K, H] (fp32 accumulation). Twin: moe_sum_ref."""
    H = y.shape[1]
    out = torch.empty(T, H, dtype=y.dtype, device=y.device)
    if T:
        block = min(1024, triton.next_power_of_2(H))
        moe_sum_kernel[(T, triton.cdiv(H, block))](y, out, H, y.stride(0), out.stride(0), TOP_K=K, BLOCK_H=block,
                                                   num_warps=4)
    return out
