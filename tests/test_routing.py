"""select_experts against hand-computed ids and weights.

Logits are built from chosen scores (log p for softmax, logit(p) for sigmoid), so every expected id and weight below
is worked out by hand from those p, not by re-running the routing math.
"""

import math

import pytest
import torch

from moequant.routing import RoutingParams, select_experts

TOL = dict(rtol=1e-6, atol=1e-6)


def softmax_logits(*rows):
    """Logits whose softmax is p / sum(p) for each row of p."""
    return torch.tensor(rows, dtype=torch.float64).log().float()


def sigmoid_logits(*rows):
    """Logits whose sigmoid is p."""
    return torch.logit(torch.tensor(rows, dtype=torch.float64)).float()


def route(logits, top_k, renormalize=False, **kw):
    return select_experts(logits, logits, top_k, kw.pop("use_grouped_topk", False), renormalize, **kw)


def check(out, ids, weights):
    w, i = out
    assert i.dtype == torch.int32 and w.dtype == torch.float32
    assert i.tolist() == ids
    assert torch.allclose(w, torch.tensor(weights, dtype=torch.float32), **TOL), w


# --- plain top-k -----------------------------------------------------------------------------------------------------
def test_softmax_without_renormalize():
    # p = [.1 .2 .3 .4]: top-2 = experts 3, 2 with their full-softmax probabilities
    check(route(softmax_logits([1, 2, 3, 4]), 2), [[3, 2]], [[0.4, 0.3]])


def test_softmax_with_renormalize():
    # .4 and .3 renormalised over their sum .7
    check(route(softmax_logits([1, 2, 3, 4]), 2, renormalize=True), [[3, 2]], [[4 / 7, 3 / 7]])


def test_sigmoid_scores_each_expert_independently():
    # sigmoid p = [.5 .75 .25 .9]: top-2 = 3, 1; renormalised 0.9/1.65 = 6/11, 0.75/1.65 = 5/11
    logits = sigmoid_logits([0.5, 0.75, 0.25, 0.9])
    check(route(logits, 2, scoring_func="sigmoid"), [[3, 1]], [[0.9, 0.75]])
    check(route(logits, 2, True, scoring_func="sigmoid"), [[3, 1]], [[6 / 11, 5 / 11]])


def test_routed_scaling_factor_applies_after_renormalisation():
    logits = softmax_logits([1, 2, 3, 4])
    check(route(logits, 2, True, routed_scaling_factor=2.5), [[3, 2]], [[10 / 7, 7.5 / 7]])
    check(route(logits, 2, False, routed_scaling_factor=2.5), [[3, 2]], [[1.0, 0.75]])


def test_rows_are_routed_independently():
    # several tokens at once (the vectorised path): each row as in the single-row tests
    logits = softmax_logits([1, 2, 3, 4], [4, 3, 2, 1], [1, 6, 2, 1])
    check(route(logits, 2), [[3, 2], [0, 1], [1, 2]], [[0.4, 0.3], [0.4, 0.3], [0.6, 0.2]])


def test_bias_without_grouping_picks_by_biased_score_and_weighs_by_unbiased():
    # sigmoid p = [.9 .5 .6 .1], bias +.3 on expert 1: biased [.9 .8 .6 .1] -> ids 0, 1 with weights .9, .5
    logits = sigmoid_logits([0.9, 0.5, 0.6, 0.1])
    bias = torch.tensor([0.0, 0.3, 0.0, 0.0])
    check(route(logits, 2, scoring_func="sigmoid", e_score_correction_bias=bias), [[0, 1]], [[0.9, 0.5]])


# --- grouped top-k (DeepSeek) ----------------------------------------------------------------------------------------
# E = 8 in 4 groups of 2, keep 2 groups, top-3, sigmoid p:
#   group:   g0        g1        g2        g3
#   p:     .9  .1    .6  .5    .2  .3    .7  .3
P_GROUPED = [0.9, 0.1, 0.6, 0.5, 0.2, 0.3, 0.7, 0.3]
GROUPED = dict(use_grouped_topk=True, num_expert_group=4, topk_group=2, scoring_func="sigmoid")


def test_grouped_without_bias_uses_the_group_max():
    # group max: g0 .9, g1 .6, g2 .3, g3 .7 -> keep g0, g3; top-3 of {0:.9, 1:.1, 6:.7, 7:.3} = 0, 6, 7
    # (plain top-3 would be 0, 6, 2: expert 2 (.6) sits in dropped group g1)
    check(route(sigmoid_logits(P_GROUPED), 3, **GROUPED), [[0, 6, 7]], [[0.9, 0.7, 0.3]])


def test_grouped_with_bias_uses_top2_sum_and_unbiased_weights():
    # bias +.5 on expert 4, +.35 on 5: biased = [.9 .1 | .6 .5 | .7 .65 | .7 .3]
    # top-2 sums: g0 1.0, g1 1.1, g2 1.35, g3 1.0 -> keep g2, g1 (g0 held the best expert but loses)
    # top-3 biased of {2:.6, 3:.5, 4:.7, 5:.65} = 4, 5, 2; weights are the unbiased p = .2, .3, .6
    bias = torch.tensor([0, 0, 0, 0, 0.5, 0.35, 0, 0])
    logits = sigmoid_logits(P_GROUPED)
    check(route(logits, 3, e_score_correction_bias=bias, **GROUPED), [[4, 5, 2]], [[0.2, 0.3, 0.6]])
    # renormalised over 1.1, then scaled by 2.5
    check(route(logits, 3, True, e_score_correction_bias=bias, routed_scaling_factor=2.5, **GROUPED),
          [[4, 5, 2]], [[2.5 * 2 / 11, 2.5 * 3 / 11, 2.5 * 6 / 11]])


def test_zero_bias_switches_the_group_score_to_top2_sum():
    # softmax of p = [10 1 | 9 8 | 1 1 | 9.5 1] / 40.5, 4 groups of 2, keep 2, top-2
    # max rule: g0 10, g3 9.5 -> ids 0, 6; top-2 sum rule: g1 17, g0 11 -> ids 0, 2
    logits = softmax_logits([10, 1, 9, 8, 1, 1, 9.5, 1])
    kw = dict(use_grouped_topk=True, num_expert_group=4, topk_group=2)
    check(route(logits, 2, True, **kw), [[0, 6]], [[10 / 19.5, 9.5 / 19.5]])
    check(route(logits, 2, True, e_score_correction_bias=torch.zeros(8), **kw), [[0, 2]], [[10 / 19, 9 / 19]])


def test_grouped_keeps_one_group_of_four():
    # p = [9 1 1 1 | 8 7 6 1] / 34, 2 groups of 4, keep 1: g0 (max 9) wins; top-2 in g0 = 0, then the tie
    # among 1, 2, 3 goes to expert 1. Weights 9/34, 1/34; renormalised .9, .1
    logits = softmax_logits([9, 1, 1, 1, 8, 7, 6, 1])
    kw = dict(use_grouped_topk=True, num_expert_group=2, topk_group=1)
    check(route(logits, 2, **kw), [[0, 1]], [[9 / 34, 1 / 34]])
    check(route(logits, 2, True, **kw), [[0, 1]], [[0.9, 0.1]])


def test_grouped_ids_stay_in_kept_groups_on_random_data():
    # invariant on many tokens: every chosen expert lies in one of <= topk_group groups, ids in a row are distinct
    g = torch.Generator().manual_seed(0)
    T, E, G, Gk, K = 64, 32, 8, 3, 6
    logits = torch.randn(T, E, generator=g)
    bias = torch.randn(E, generator=g) * 0.1
    w, ids = select_experts(logits, logits, K, True, True, topk_group=Gk, num_expert_group=G,
                            scoring_func="sigmoid", e_score_correction_bias=bias)
    groups = ids.long() // (E // G)
    assert all(len(set(r)) <= Gk for r in groups.tolist())
    assert all(len(set(r)) == K for r in ids.tolist())
    assert torch.allclose(w.sum(-1), torch.ones(T), **TOL)


# --- ties, sizes ------------------------------------------------------------------------------------------------------
def test_ties_go_to_the_lower_expert_index():
    # equal logits: the lower index first, in every position
    check(route(torch.zeros(1, 4), 2), [[0, 1]], [[0.25, 0.25]])
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    assert route(logits, 2)[1].tolist() == [[1, 2]]
    assert route(logits, 3)[1].tolist() == [[1, 2, 4]]
    # many experts (torch.topk on CPU/GPU does not promise this order)
    assert route(torch.zeros(3, 64), 8)[1].tolist() == [list(range(8))] * 3


def test_group_ties_go_to_the_lower_group_index():
    # 4 equal groups of 2, keep 1: group 0 is kept, then experts 0, 1 (with and without bias)
    logits = torch.zeros(1, 8)
    kw = dict(use_grouped_topk=True, num_expert_group=4, topk_group=1)
    assert route(logits, 2, **kw)[1].tolist() == [[0, 1]]
    assert route(logits, 2, e_score_correction_bias=torch.zeros(8), **kw)[1].tolist() == [[0, 1]]


@pytest.mark.parametrize("grouped", [False, True])
def test_zero_tokens(grouped):
    # T = 0: empty [0, K] results of the right dtypes
    logits = torch.zeros(0, 8)
    kw = dict(use_grouped_topk=True, num_expert_group=4, topk_group=2) if grouped else {}
    w, ids = route(logits, 2, True, e_score_correction_bias=torch.zeros(8) if grouped else None, **kw)
    assert w.shape == (0, 2) and ids.shape == (0, 2)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32


def test_single_expert_single_token():
    # T = 1, E = 1, K = 1: softmax of one logit is 1
    check(route(torch.tensor([[-3.0]]), 1), [[0]], [[1.0]])


def test_k_equals_e_returns_every_expert_by_score():
    # K = E: all experts, ordered by decreasing score; softmax renormalised changes nothing
    check(route(softmax_logits([2, 4, 1, 3]), 4, True), [[1, 3, 0, 2]], [[0.4, 0.3, 0.2, 0.1]])


def test_low_precision_logits_give_fp32_weights():
    # bf16 logits: scores are computed in fp32; log 3 - log 1 survives bf16 well enough for the order
    w, ids = route(softmax_logits([1, 3]).bfloat16(), 1)
    assert ids.tolist() == [[1]] and w.dtype == torch.float32
    assert abs(w.item() - 0.75) < 1e-2
    _, ids64 = route(softmax_logits([1, 3]), 1, indices_type=torch.int64)
    assert ids64.dtype == torch.int64


# --- custom routing function ------------------------------------------------------------------------------------------
def test_custom_routing_function_replaces_everything():
    seen = {}

    def fixed(hidden_states, gating_output, topk, renormalize):
        seen.update(T=hidden_states.shape[0], topk=topk, renormalize=renormalize)
        T = gating_output.shape[0]
        return torch.full((T, topk), 0.5, dtype=torch.float64), torch.tensor([[3, 0]] * T, dtype=torch.int64)

    logits = softmax_logits([1, 2, 3, 4], [4, 3, 2, 1])
    # scoring_func / grouping / scaling are ignored: the function's answer is returned, cast to fp32 / int32
    out = select_experts(torch.zeros(2, 5), logits, 2, True, True, custom_routing_function=fixed,
                         scoring_func="sigmoid", routed_scaling_factor=3.0)
    check(out, [[3, 0], [3, 0]], [[0.5, 0.5], [0.5, 0.5]])
    assert seen == dict(T=2, topk=2, renormalize=True)


def test_custom_routing_function_with_wrong_shape_is_rejected():
    def bad(hidden_states, gating_output, topk, renormalize):
        return torch.ones(1, topk + 1), torch.zeros(1, topk + 1, dtype=torch.int64)

    with pytest.raises(ValueError, match="custom_routing_function"):
        select_experts(torch.zeros(1, 4), torch.zeros(1, 4), 2, False, True, custom_routing_function=bad)


def test_routing_params_select():
    params = RoutingParams(top_k=2, renormalize=True, routed_scaling_factor=2.5)
    check(params.select(torch.zeros(1, 3), softmax_logits([1, 2, 3, 4])), [[3, 2]], [[10 / 7, 7.5 / 7]])
    with pytest.raises(ValueError, match="scoring_func"):
        RoutingParams(top_k=2, scoring_func="relu")


# --- validation -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("logits,top_k,kw,match", [
    (torch.zeros(8), 2, {}, "router_logits"),                                    # 1-D logits
    (torch.zeros(3, 8), 2, {}, "router_logits"),                                 # T differs from hidden_states (2)
    (torch.zeros(2, 8), 0, {}, "top_k"),                                         # K = 0
    (torch.zeros(2, 8), 9, {}, "top_k"),                                         # K > E
    (torch.zeros(2, 8), 2, dict(scoring_func="relu"), "scoring_func"),
    (torch.zeros(2, 8), 2, dict(e_score_correction_bias=torch.zeros(7)), "e_score_correction_bias"),
    (torch.zeros(2, 8), 2, dict(use_grouped_topk=True, topk_group=1), "num_expert_group"),            # missing
    (torch.zeros(2, 8), 2, dict(use_grouped_topk=True, num_expert_group=3, topk_group=1), "num_expert_group"),
    (torch.zeros(2, 8), 2, dict(use_grouped_topk=True, num_expert_group=4, topk_group=0), "topk_group"),
    (torch.zeros(2, 8), 2, dict(use_grouped_topk=True, num_expert_group=4, topk_group=5), "topk_group"),
    (torch.zeros(2, 8), 2, dict(use_grouped_topk=True, num_expert_group=4), "topk_group"),            # missing
    (torch.zeros(2, 8), 5, dict(use_grouped_topk=True, num_expert_group=4, topk_group=2), "top_k"),   # 5 > 2 x 2
])
def test_invalid_inputs_raise(logits, top_k, kw, match):
    use_grouped = kw.pop("use_grouped_topk", False)
    with pytest.raises(ValueError, match=match):
        select_experts(torch.zeros(2, 16), logits, top_k, use_grouped, True, **kw)


@pytest.mark.gpu
def test_results_stay_on_the_input_device():
    logits = sigmoid_logits(P_GROUPED).cuda()
    bias = torch.tensor([0, 0, 0, 0, 0.5, 0.35, 0, 0], device="cuda")
    w, ids = route(logits, 3, e_score_correction_bias=bias, **GROUPED)
    assert w.is_cuda and ids.is_cuda
    check((w.cpu(), ids.cpu()), [[4, 5, 2]], [[0.2, 0.3, 0.6]])
    assert route(torch.zeros(3, 256, device="cuda"), 8)[1].cpu().tolist() == [list(range(8))] * 3


def test_logit_helpers_give_the_scores_the_cases_assume():
    # logit(.75) = log 3; log-probabilities differ by log ratios
    assert math.isclose(sigmoid_logits([0.75]).item(), math.log(3), rel_tol=1e-6)
    a, b = softmax_logits([1, 3])[0].tolist()
    assert math.isclose(b - a, math.log(3), rel_tol=1e-6)
