"""fused_topk: softmax/sigmoid scores, top-k, renormalisation and scaling in one launch (the common routing case).

logits [T, E] -> (topk_weights fp32 [T, K], topk_ids int32 [T, K]); ties go to the lower expert index.
Torch twin: moequant.routing.select_experts (without grouped top-k, correction bias or a custom function).
"""

from __future__ import annotations

import torch
import triton

from moequant.kernels._topk_kernel import fused_topk_kernel


def fused_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool, scoring_func: str = "softmax",
               routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    T, E = router_logits.shape
    weights = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=router_logits.device)
    if T == 0:
        return weights, ids
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    fused_topk_kernel[(T,)](
        logits, weights, ids, E, logits.stride(0), float(routed_scaling_factor),
        TOP_K=top_k, K_PAD=max(2, triton.next_power_of_2(top_k)), E_PAD=max(16, triton.next_power_of_2(E)),
        SIGMOID=scoring_func == "sigmoid", RENORMALIZE=renormalize, num_warps=1 if E <= 256 else 4,
    )
    return weights, ids
