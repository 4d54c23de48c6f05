"""Expert selection: scores, top-k, renormalisation, DeepSeek grouped top-k, routed scaling.

T tokens, E experts, K top-k, G expert groups (E/G experts each), Gk groups kept.
softmax / sigmoid scores s = f(logits) in fp32. Plain: ids = top-k(s); w = s[ids].
Grouped: biased b = s + correction_bias (when given); group score = sum of the top-2 b in the group with a bias, else
max s in the group; keep the Gk best groups; ids = top-k of b over kept experts; w = s[ids] (unbiased).
Then w /= sum_k w when renormalize; w *= routed_scaling_factor. Ties go to the lower expert index.
"""

from __future__ import annotations

from typing import Callable

import torch


def _topk_low_index(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values per row; among equal values the lower index first (stable sort)."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def _check(router_logits, T, top_k, scoring_func, use_grouped_topk, num_expert_group, topk_group, bias):
    if router_logits.dim() != 2 or router_logits.shape[0] != T:
        raise ValueError(f"router_logits must be [T={T}, E], got {tuple(router_logits.shape)}")
    E = router_logits.shape[1]
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, E={E}], got {top_k}")
    if scoring_func not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {scoring_func!r}")
    if bias is not None and tuple(bias.shape) != (E,):
        raise ValueError(f"e_score_correction_bias must have shape ({E},), got {tuple(bias.shape)}")
    if use_grouped_topk:
        if not num_expert_group or E % num_expert_group:
            raise ValueError(f"num_expert_group={num_expert_group} must divide the number of experts E={E}")
        if topk_group is None or not 1 <= topk_group <= num_expert_group:
            raise ValueError(f"topk_group must be in [1, num_expert_group={num_expert_group}], got {topk_group}")
        if top_k > topk_group * (E // num_expert_group):
            raise ValueError(f"top_k={top_k} exceeds the experts in the kept groups ({topk_group} x {E // num_expert_group})")


def _grouped(scores, top_k, num_expert_group, topk_group, bias):
    T, E = scores.shape
    biased = scores + bias.float() if bias is not None else scores
    per_group = biased.view(T, num_expert_group, E // num_expert_group)
    if bias is not None:
        group_score = per_group.topk(min(2, per_group.shape[-1]), dim=-1).values.sum(-1)
    else:
        group_score = per_group.max(dim=-1).values
    keep = _topk_low_index(group_score, topk_group)
    mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
    mask = mask.unsqueeze(-1).expand_as(per_group).reshape(T, E)
    masked = biased.masked_fill(~mask, float("-inf"))
    return _topk_low_index(masked, top_k)


def select_experts(hidden_states: torch.Tensor, router_logits: torch.Tensor, top_k: int, use_grouped_topk: bool,
                   renormalize: bool, topk_group: int | None = None, num_expert_group: int | None = None,
                   custom_routing_function: Callable | None = None, scoring_func: str = "softmax",
                   routed_scaling_factor: float = 1.0, e_score_correction_bias: torch.Tensor | None = None,
                   indices_type: torch.dtype = torch.int32) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights fp32 [T, K], topk_ids int32 [T, K]) for router_logits [T, E]; see the module docstring."""
    T = hidden_states.shape[0]
    if custom_routing_function is not None:
        w, ids = custom_routing_function(hidden_states, router_logits, top_k, renormalize)
        return w.float(), ids.to(indices_type)
    _check(router_logits, T, top_k, scoring_func, use_grouped_topk, num_expert_group, topk_group,
           e_score_correction_bias)
    logits = router_logits.float()
    scores = logits.softmax(-1) if scoring_func == "softmax" else logits.sigmoid()
    if use_grouped_topk:
        ids = _grouped(scores, top_k, num_expert_group, topk_group, e_score_correction_bias)
    else:
        ids = _topk_low_index(scores, top_k)
    w = scores.gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    if routed_scaling_factor != 1.0:
        w = w * routed_scaling_factor
    return w, ids.to(indices_type)
