"""Pure-torch twins of the Triton kernels: the CPU path and the tests' ground truth.

T tokens, K top-k, E experts (local), H hidden, I intermediate (per rank), S = T*K token slots (slot s = t*K + k),
BM block size along tokens.
"""

from __future__ import annotations

from typing import Callable

import torch

GELU_TANH = False  # vLLM's "gelu" is the exact (erf) GELU


def gated_activation_ref(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate, up): silu: silu(g)*u; gelu: gelu_erf(g)*u;
    swigluoai (gpt-oss): g' = min(g, 7), u' = clamp(u, -7, 7), out = g' * sigmoid(1.702 g') * (u' + 1)."""
    if activation == "silu":
        return torch.nn.functional.silu(gate) * up
    if activation == "gelu":
        return torch.nn.functional.gelu(gate) * up
    if activation == "swigluoai":
        g = gate.clamp(max=7.0)
        u = up.clamp(min=-7.0, max=7.0)
        return g * torch.sigmoid(1.702 * g) * (u + 1)
    raise ValueError(f"unknown activation {activation!r}")


def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Sort token slots by expert into BM-padded blocks.

    Returns (sorted_ids [P] int32, expert_ids [P/BM] int32, num_post_padded [1] int32) with P the worst-case padded
    length S + min(E, S) * (BM - 1) rounded to BM. Slot ids S mark padding; expert_ids is -1 past the used blocks.
    Slots with a negative id (experts on other ranks) are dropped. Within an expert slots keep ascending order.
    """
    ids = topk_ids.reshape(-1).to(torch.int64)
    S = ids.numel()
    device = ids.device
    P = padded_capacity(S, num_experts, block_m)
    # bin E collects dropped slots; no op below waits on the host, so this twin is CUDA-graph safe
    key = torch.where(ids >= 0, ids, torch.full_like(ids, num_experts))
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device).scatter_add_(0, key, torch.ones_like(key))
    counts = counts * (torch.arange(num_experts + 1, device=device) < num_experts)  # the dropped bin holds nothing
    padded = (counts + block_m - 1) // block_m * block_m
    pstart = torch.cumsum(padded, 0) - padded
    start = torch.cumsum(counts, 0) - counts
    order = torch.sort(key, stable=True).indices
    sk = key[order]
    rank = torch.arange(S, device=device) - start[sk]
    dest = torch.where(sk < num_experts, pstart[sk] + rank, torch.full_like(sk, P))  # dropped slots land past the end
    sorted_ids = torch.full((P + 1,), S, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    sorted_ids = sorted_ids[:P]
    nblocks = P // block_m
    block_start = torch.arange(nblocks, device=device) * block_m
    pend = torch.cumsum(padded[:num_experts], 0)
    expert_ids = torch.searchsorted(pend, block_start, right=True)
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, torch.full_like(expert_ids, -1)).to(torch.int32)
    total = padded.sum().reshape(1).to(torch.int32)
    return sorted_ids, expert_ids, total


def moe_sum_ref(y: torch.Tensor, T: int, K: int) -> torch.Tensor:
    """out [T, H] = sum_k y[t*K + k] in fp32, cast back to y's dtype."""
    return y.float().view(T, K, y.shape[1]).sum(1).to(y.dtype)


def gather_slot_columns_ref(a: torch.Tensor, sort_idx: torch.Tensor, topk_ids: torch.Tensor,
                            row_div: int) -> torch.Tensor:
    """out[s, k] = a[s // row_div, sort_idx[e_s, k]], e_s = topk_ids[s]; rows of remote slots (e_s < 0) are 0."""
    ids = topk_ids.reshape(-1).long()
    rows = a[torch.arange(ids.numel(), device=a.device) // row_div]
    cols = sort_idx[ids.clamp(min=0)].long()
    out = torch.gather(rows, 1, cols)
    return torch.where((ids >= 0)[:, None], out, torch.zeros((), dtype=a.dtype, device=a.device))


def padded_capacity(num_slots: int, num_experts: int, block_m: int) -> int:
    """Most padded slots moe_align can produce: every non-empty expert adds at most BM - 1 padding slots."""
    cap = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return max(block_m, (cap + block_m - 1) // block_m * block_m)


def fused_moe_ref(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_weights: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    num_experts: int,
    activation: str = "silu",
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    act_quant: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    apply_router_weight_on_input: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """out[t] = sum_k w[t,k] * (W2[e] act(W13[e] x[t] + b13[e]) + b2[e]), e = topk_ids[t,k] (negative ids skipped).

    expert_weights(e) -> (w13 [2I, H], w2 [H, I]) dequantized; act_quant(a, stage) fake-quantizes the GEMM inputs
    (stage 1: x, stage 2: the [S, I] activations). Loops over the experts that received tokens.
    """
    T, H = x.shape
    K = topk_ids.shape[1]
    out_dtype = compute_dtype
    xs = x.to(compute_dtype)
    if act_quant is not None:
        xs = act_quant(xs, 1).to(compute_dtype)
    ids = topk_ids.reshape(-1).long()
    wts = topk_weights.reshape(-1).to(compute_dtype)
    present = torch.unique(ids[ids >= 0]).tolist() if ids.numel() else []
    inter = None
    rows_of = {}
    for e in present:
        rows = (ids == e).nonzero().squeeze(1)
        rows_of[e] = rows
        w13, _ = expert_weights(e)
        a = xs[rows // K]
        if apply_router_weight_on_input:
            a = a * wts[rows, None]
        h = a @ w13.to(compute_dtype).t()
        if w13_bias is not None:
            h = h + w13_bias[e].to(compute_dtype)
        I = h.shape[1] // 2
        if inter is None:
            inter = torch.zeros(T * K, I, dtype=compute_dtype, device=x.device)
        inter[rows] = gated_activation_ref(h[:, :I], h[:, I:], activation)
    out = torch.zeros(T * K, H, dtype=out_dtype, device=x.device)
    if inter is not None:
        if act_quant is not None:
            inter = act_quant(inter, 2).to(compute_dtype)
        for e, rows in rows_of.items():
            _, w2 = expert_weights(e)
            y = inter[rows] @ w2.to(compute_dtype).t()
            if w2_bias is not None:
                y = y + w2_bias[e].to(compute_dtype)
            if not apply_router_weight_on_input:
                y = y * wts[rows, None]
            out[rows] = y
    return out.view(T, K, H).sum(1)
