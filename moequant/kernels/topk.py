"""fused_topk: softmax/sigmoid scores, top-k, renormalisation and scaling in one launch (the common routing case);
fused_topk_gather: the same, also writing each slot's row of x in its expert's act-order column order;
deferred_routing: the same routing left to the decode GEMV's first launch (gemv.py, route=);
routed_rows: fused_topk_gather's rows without the routing, for that launch to read (act-order on the decode GEMV).

logits [T, E] -> (topk_weights fp32 [T, K], topk_ids int32 [T, K]); ties go to the lower expert index.
Torch twins: moequant.routing.select_experts (without grouped top-k, correction bias or a custom function) and
moequant.kernels.reference.gather_slot_columns_ref.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from moequant.kernels._topk_kernel import fused_topk_gather_kernel, fused_topk_kernel, routed_rows_kernel

GATHER_BLOCK = 256  # fused_topk_gather: columns per program (each program also routes its token)
ROWS_BLOCK = 1024  # routed_rows: columns per program (each program ranks one expert)


def _consts(router_logits: torch.Tensor, top_k: int, renormalize: bool, scoring_func: str) -> dict:
    E = router_logits.shape[1]
    return dict(TOP_K=top_k, K_PAD=max(2, triton.next_power_of_2(top_k)), E_PAD=max(16, triton.next_power_of_2(E)),
                SIGMOID=scoring_func == "sigmoid", RENORMALIZE=renormalize, num_warps=1 if E <= 256 else 4)


@dataclass(frozen=True)
class DeferredRouting:
    """Routing that a later launch does itself (the decode GEMV's GEMM1: each program routes its token, so the
    forward has no routing launch): fused_topk's logits and settings, and the outputs that launch fills, weights
    fp32 [T, K] and ids int32 [T, K] (empty until then). run() fills them with fused_topk instead, for a kernel
    that cannot route."""

    logits: torch.Tensor
    top_k: int
    renormalize: bool
    scoring_func: str
    scale: float
    weights: torch.Tensor
    ids: torch.Tensor

    def consts(self) -> dict:
        """The routing constexprs of a kernel that routes (_topk_kernel._topk_choice's and _topk_weights')."""
        c = _consts(self.logits, self.top_k, self.renormalize, self.scoring_func)
        return {k: c[k] for k in ("K_PAD", "E_PAD", "SIGMOID", "RENORMALIZE")}

    def run(self) -> None:
        """Route now, with the routing launch (fused_topk writing into weights and ids)."""
        fused_topk(self.logits, self.top_k, self.renormalize, self.scoring_func, self.scale,
                   out=(self.weights, self.ids))


def deferred_routing(router_logits: torch.Tensor, top_k: int, renormalize: bool, scoring_func: str = "softmax",
                     routed_scaling_factor: float = 1.0) -> DeferredRouting:
    """fused_topk's routing, left for the expert kernel to do (DeferredRouting); outputs allocated, not written."""
    T = router_logits.shape[0]
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    return DeferredRouting(logits, top_k, renormalize, scoring_func, float(routed_scaling_factor),
                           torch.empty(T, top_k, dtype=torch.float32, device=logits.device),
                           torch.empty(T, top_k, dtype=torch.int32, device=logits.device))


def fused_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool, scoring_func: str = "softmax",
               routed_scaling_factor: float = 1.0, out: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """out: (weights, ids) to write into (contiguous [T, K]), else new tensors."""
    T, E = router_logits.shape
    weights, ids = out if out is not None else (
        torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device),
        torch.empty(T, top_k, dtype=torch.int32, device=router_logits.device))
    if T == 0:
        return weights, ids
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    fused_topk_kernel[(T,)](logits, weights, ids, E, logits.stride(0), float(routed_scaling_factor),
                            **_consts(logits, top_k, renormalize, scoring_func))
    return weights, ids


def fused_topk_gather(router_logits: torch.Tensor, top_k: int, renormalize: bool, scoring_func: str,
                      routed_scaling_factor: float, x: torch.Tensor, sort_idx: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fused_topk plus rows [T*K, C]: rows[t*K + k, j] = x[t, sort_idx[ids[t, k], j]] (x [T, C]; sort_idx int32
    [E, C], the experts' act-order column order). One launch of T x K x cdiv(C, GATHER_BLOCK) programs, each routing
    its token again (cheap next to a launch at decode sizes; fused_topk + gather_slot_columns for many tokens)."""
    T, E = router_logits.shape
    C = x.shape[1]
    if x.shape[0] != T or sort_idx.shape != (E, C):
        raise ValueError(f"fused_topk_gather: x {tuple(x.shape)} and sort_idx {tuple(sort_idx.shape)} do not match "
                         f"router_logits {tuple(router_logits.shape)} (expected x [{T}, C], sort_idx [{E}, C])")
    weights = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=x.device)
    rows = torch.empty(T * top_k, C, dtype=x.dtype, device=x.device)
    if T == 0:
        return weights, ids, rows
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    sort_idx = sort_idx if sort_idx.stride(1) == 1 else sort_idx.contiguous()
    block = min(GATHER_BLOCK, triton.next_power_of_2(C))
    fused_topk_gather_kernel[(T, top_k, triton.cdiv(C, block))](
        logits, weights, ids, x, sort_idx, rows, E, C, logits.stride(0), x.stride(0), sort_idx.stride(0),
        rows.stride(0), float(routed_scaling_factor), BLOCK=block, **_consts(logits, top_k, renormalize, scoring_func))
    return weights, ids, rows


def routed_rows(router_logits: torch.Tensor, top_k: int, x: torch.Tensor, sort_idx: torch.Tensor,
                pdl: bool = False) -> torch.Tensor:
    """fused_topk_gather's rows [T*K, C] without its routing: rows[t*K + k, j] = x[t, sort_idx[e, j]] for e the
    k-th largest of token t's logits (ties to the lower index, as fused_topk and the GEMV's in-kernel routing order
    them); weights and ids are left to the launch that reads the rows and routes itself. One launch of
    T x E x cdiv(C, ROWS_BLOCK) programs: each ranks its expert among the token's logits (E compares, no top-k)
    and loads its expert's columns of x before knowing the rank, storing them only if it is below K. pdl: let the
    next launch start early (it must be launched as a programmatic dependent that waits before reading the rows)."""
    T, E = router_logits.shape
    C = x.shape[1]
    if x.shape[0] != T or sort_idx.shape != (E, C):
        raise ValueError(f"routed_rows: x {tuple(x.shape)} and sort_idx {tuple(sort_idx.shape)} do not match "
                         f"router_logits {tuple(router_logits.shape)} (expected x [{T}, C], sort_idx [{E}, C])")
    rows = torch.empty(T * top_k, C, dtype=x.dtype, device=x.device)
    if T == 0:
        return rows
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    sort_idx = sort_idx if sort_idx.stride(1) == 1 else sort_idx.contiguous()
    block = min(ROWS_BLOCK, triton.next_power_of_2(C))
    routed_rows_kernel[(T, E, triton.cdiv(C, block))](
        logits, x, sort_idx, rows, E, C, logits.stride(0), x.stride(0), sort_idx.stride(0), rows.stride(0),
        TOP_K=top_k, E_PAD=_consts(logits, top_k, False, "softmax")["E_PAD"], BLOCK=block,
        PDL=pdl and os.environ.get("TRITON_INTERPRET") != "1", num_warps=4)
    return rows
