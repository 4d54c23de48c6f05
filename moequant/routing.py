"""Expert selection (the router): scores, top-k, renormalisation, DeepSeek grouped top-k, routed scaling.

T tokens, E experts, K top-k, G expert groups (E/G experts each), Gk groups kept (topk_group)

    s = softmax(logits) or sigmoid(logits)                      [T, E] fp32
    b = s + e_score_correction_bias  (b = s without a bias)     [T, E]
    plain:   ids = top-K of b over all E experts
    grouped: group score = sum of the top-2 b of each group with a bias, else max s of the group   [T, G]
             keep the Gk best groups; ids = top-K of b over the experts of the kept groups
    w = s[ids]  (always the UNBIASED score)                     [T, K]
    w = w / sum_K w  when renormalize
    w = w * routed_scaling_factor  (always, after renormalisation)

Ties: among equal values the lower index wins, for experts and for groups alike (a stable descending sort,
not torch.topk, whose order for equal values is unspecified).
ids are ordered by decreasing b, the lower index first on ties.
A custom_routing_function(hidden_states, gating_output, topk, renormalize) -> (w, ids) replaces all of the above;
its results are cast to fp32 / indices_type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

SCORING_FUNCS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class RoutingParams:
    """A layer's routing options in one object; `select` runs select_experts with them."""

    top_k: int
    renormalize: bool = True
    use_grouped_topk: bool = False
    num_expert_group: int | None = None
    topk_group: int | None = None
    scoring_func: str = "softmax"
    routed_scaling_factor: float = 1.0
    custom_routing_function: Callable | None = None

    def __post_init__(self):
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"RoutingParams.scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")

    def select(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
               e_score_correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return select_experts(
            hidden_states, router_logits, self.top_k, self.use_grouped_topk, self.renormalize,
            topk_group=self.topk_group, num_expert_group=self.num_expert_group,
            custom_routing_function=self.custom_routing_function, scoring_func=self.scoring_func,
            routed_scaling_factor=self.routed_scaling_factor, e_score_correction_bias=e_score_correction_bias,
        )


def _topk_low_index(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values along the last dim; equal values keep the lower index first (stable sort)."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def _check(router_logits, T, top_k, scoring_func, use_grouped_topk, num_expert_group, topk_group, bias):
    if router_logits.dim() != 2 or router_logits.shape[0] != T:
        raise ValueError(f"router_logits must be [T, E] with T = hidden_states.shape[0] = {T}, "
                         f"got shape {tuple(router_logits.shape)}")
    E = router_logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, E={E}], got {top_k!r}")
    if scoring_func not in SCORING_FUNCS:
        raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {scoring_func!r}")
    if bias is not None and tuple(bias.shape) != (E,):
        raise ValueError(f"e_score_correction_bias must have shape ({E},) (one per expert), got {tuple(bias.shape)}")
    if use_grouped_topk:
        if not isinstance(num_expert_group, int) or num_expert_group < 1 or E % num_expert_group:
            raise ValueError(f"use_grouped_topk needs num_expert_group dividing E={E}, got {num_expert_group!r}")
        if not isinstance(topk_group, int) or not 1 <= topk_group <= num_expert_group:
            raise ValueError(f"use_grouped_topk needs topk_group in [1, num_expert_group={num_expert_group}], "
                             f"got {topk_group!r}")
        if top_k > topk_group * (E // num_expert_group):
            raise ValueError(f"top_k={top_k} exceeds the experts in the kept groups: topk_group={topk_group} "
                             f"x {E // num_expert_group} experts per group")


def _kept_experts_mask(scores, biased, num_expert_group, topk_group, has_bias):
    """[T, E] bool: experts of the topk_group best groups."""
    T, E = scores.shape
    n = E // num_expert_group
    if has_bias:  # DeepSeek-V3: sum of the two best biased scores (the single one for one-expert groups)
        group_score = biased.view(T, num_expert_group, n).topk(min(2, n), dim=-1).values.sum(-1)
    else:  # DeepSeek-V2: best score of the group
        group_score = scores.view(T, num_expert_group, n).amax(dim=-1)
    keep = _topk_low_index(group_score, topk_group)
    mask = torch.zeros(T, num_expert_group, dtype=torch.bool, device=scores.device).scatter_(1, keep, True)
    return mask.repeat_interleave(n, dim=1)


def _custom(fn, hidden_states, router_logits, top_k, renormalize, indices_type):
    w, ids = fn(hidden_states, router_logits, top_k, renormalize)
    T = hidden_states.shape[0]
    if tuple(w.shape) != (T, top_k) or tuple(ids.shape) != (T, top_k):
        raise ValueError(f"custom_routing_function must return (weights, ids) of shape [T={T}, K={top_k}], "
                         f"got {tuple(w.shape)} and {tuple(ids.shape)}")
    return w.float(), ids.to(indices_type)


def select_experts(hidden_states: torch.Tensor, router_logits: torch.Tensor, top_k: int, use_grouped_topk: bool,
                   renormalize: bool, topk_group: int | None = None, num_expert_group: int | None = None,
                   custom_routing_function: Callable | None = None, scoring_func: str = "softmax",
                   routed_scaling_factor: float = 1.0, e_score_correction_bias: torch.Tensor | None = None,
                   indices_type: torch.dtype = torch.int32) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights fp32 [T, K], topk_ids indices_type [T, K]) for router_logits [T, E], on router_logits' device.

    hidden_states [T, H] only gives T (and is passed to a custom routing function). The math and the tie rule are
    in the module docstring. A correction bias without grouped top-k biases the plain top-K the same way.
    """
    T = hidden_states.shape[0]
    if custom_routing_function is not None:
        return _custom(custom_routing_function, hidden_states, router_logits, top_k, renormalize, indices_type)
    _check(router_logits, T, top_k, scoring_func, use_grouped_topk, num_expert_group, topk_group,
           e_score_correction_bias)
    logits = router_logits.float()
    scores = logits.softmax(-1) if scoring_func == "softmax" else logits.sigmoid()
    has_bias = e_score_correction_bias is not None
    biased = scores + e_score_correction_bias.to(scores.device, torch.float32) if has_bias else scores
    if use_grouped_topk:
        mask = _kept_experts_mask(scores, biased, num_expert_group, topk_group, has_bias)
        biased = biased.masked_fill(~mask, float("-inf"))
    ids = _topk_low_index(biased, top_k)
    w = scores.gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    if routed_scaling_factor != 1.0:
        w = w * routed_scaling_factor
    return w, ids.to(indices_type)
