"""moequant.validate_metrics against closed-form values on synthetic data with known noise and known distributions."""

import math

import pytest
import torch

from moequant import validate_metrics as vm


@pytest.mark.parametrize("sigma", [0.3, 0.1, 0.01, 1e-3])
def test_sqnr_matches_noise_level(sigma):
    # ref ~ N(0, 1), test = ref + N(0, sigma^2): SQNR -> -20 log10(sigma). With N = 2^16 the relative spread of
    # sum(noise^2) is sqrt(2 / N) ~ 0.55 %, i.e. ~0.03 dB; 0.15 dB leaves room yet fails for a 3 % wrong sigma.
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(256, 256, generator=g, dtype=torch.float64)
    test = ref + sigma * torch.randn(256, 256, generator=g, dtype=torch.float64)
    assert abs(vm.sqnr_db(ref, test) - (-20 * math.log10(sigma))) < 0.15
    # the same noise gives rel_err ~ sigma, cosine ~ 1 / sqrt(1 + sigma^2)
    assert vm.rel_err(ref, test) == pytest.approx(sigma, rel=0.02)
    assert vm.cosine(ref, test) == pytest.approx(1 / math.sqrt(1 + sigma**2), abs=3 * sigma**2 * 0.02 + 1e-9)


def test_sqnr_exact_on_hand_made_case():
    # signal energy 3^2 + 4^2 = 25, noise energy 0.5^2 = 0.25: 10 log10(100) = 20 dB exactly
    ref = torch.tensor([3.0, 4.0])
    test = torch.tensor([3.0, 4.5])
    assert vm.sqnr_db(ref, test) == pytest.approx(20.0, abs=1e-9)
    assert vm.rel_err(ref, test) == pytest.approx(0.1, abs=1e-12)
    assert vm.max_abs_err(ref, test) == pytest.approx(0.5, abs=1e-12)
    assert vm.cosine(ref, test) == pytest.approx((9 + 18) / (5 * math.hypot(3, 4.5)), abs=1e-12)


def test_identical_and_zero_edge_cases():
    x = torch.randn(7, 3)
    assert vm.sqnr_db(x, x.clone()) == math.inf  # zero noise
    assert vm.rel_err(x, x.clone()) == 0.0
    assert vm.cosine(x, x.clone()) == pytest.approx(1.0, abs=1e-12)
    z = torch.zeros(4)
    assert vm.sqnr_db(z, z) == math.inf  # both zero: identical
    assert vm.sqnr_db(z, torch.ones(4)) == -math.inf  # no signal, some noise
    assert vm.rel_err(z, torch.ones(4)) == math.inf
    assert vm.cosine(z, z) == 1.0 and vm.cosine(z, torch.ones(4)) == 0.0
    assert vm.max_abs_err(torch.empty(0), torch.empty(0)) == 0.0  # 0 elements
    assert vm.cosine(x, -x) == pytest.approx(-1.0, abs=1e-12)


def test_bf16_inputs_are_compared_in_float64():
    # a bf16 tensor against its own float32 upcast is identical: no spurious rounding noise from the metric itself
    x = torch.randn(64, dtype=torch.bfloat16)
    assert vm.sqnr_db(x.float(), x) == math.inf


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_test_is_reported_not_averaged_away(bad):
    ref = torch.randn(100)
    test = ref.clone()
    test[17] = bad  # one bad value among 100 good ones must not vanish
    s = vm.error_stats(ref, test)
    assert not s.finite and s.nonfinite == 1 and s.numel == 100
    for v in (s.sqnr_db, s.rel_err, s.cosine, s.max_abs_err):
        assert math.isnan(v)
    # NaN survives the plain mean a report would take over experts
    assert math.isnan(sum([30.0, 40.0, s.sqnr_db]) / 3)
    logits = torch.randn(5, 11)
    bad_logits = logits.clone()
    bad_logits[2, 3] = bad
    assert math.isnan(vm.kl_divergence(logits, bad_logits))
    assert math.isnan(vm.top1_agreement(logits, bad_logits))
    assert math.isnan(vm.perplexity(bad_logits, torch.zeros(5, dtype=torch.long)))


def test_bad_reference_and_shapes_raise():
    with pytest.raises(ValueError, match="ref holds 1 NaN"):
        vm.sqnr_db(torch.tensor([1.0, float("nan")]), torch.zeros(2))
    with pytest.raises(ValueError, match="shape"):
        vm.rel_err(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        vm.routing_changed(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        vm.perplexity(torch.zeros(3, 4), torch.tensor([0, 4, 1]))  # 4 is outside the vocabulary


def test_routing_changed_counts_sets_not_order():
    ref = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    test = torch.tensor([[1, 0],  # same set, other order: unchanged
                         [2, 3],  # same
                         [4, 6],  # one expert swapped: changed
                         [0, 1]])  # both swapped: changed
    assert vm.routing_changed(ref, test) == pytest.approx(0.5)
    assert vm.routing_changed(ref[:0], test[:0]) == 0.0  # 0 tokens


def test_kl_matches_hand_computed_categoricals():
    # p = (1/2, 1/4, 1/4), q = (1/4, 1/4, 1/2): KL(p||q) = 1/2 ln 2 + 0 + 1/4 ln(1/2) = ln(2) / 4
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)  # float64 inputs: the bound is 1e-12
    q = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    # logits are log-probabilities plus an arbitrary per-token shift (softmax ignores it)
    ref = torch.stack([p.log() + 3.0, q.log()])
    test = torch.stack([q.log() - 1.0, q.log() + 7.0])
    # token 0: ln(2)/4, token 1: 0 -> mean ln(2)/8
    assert vm.kl_divergence(ref, test) == pytest.approx(math.log(2) / 8, abs=1e-12)
    # and in the other direction KL(q||p) = 1/4 ln(1/2) + 0 + 1/2 ln 2 = ln(2)/4 as well (this pair is symmetric);
    # an asymmetric pair: p = (0.9, 0.1), q = (0.5, 0.5)
    p2, q2 = torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.5])
    kl_pq = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    kl_qp = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert vm.kl_divergence(p2.log()[None], q2.log()[None]) == pytest.approx(kl_pq, abs=1e-7)
    assert vm.kl_divergence(q2.log()[None], p2.log()[None]) == pytest.approx(kl_qp, abs=1e-7)
    assert vm.kl_divergence(ref, ref) == 0.0


def test_kl_in_float64_does_not_lose_tiny_differences():
    # logits of a large vocabulary differing by 1e-4 in one entry: KL ~ p_v * (d - log(1 + p_v (e^d - 1))) ~ p_v d^2 / 2
    V = 50000
    ref = torch.zeros(1, V, dtype=torch.float64)
    test = ref.clone()
    test[0, 0] = 1e-4
    p = 1.0 / V
    expected = p * 1e-4 - math.log1p(p * math.expm1(1e-4))  # exact KL for this case
    assert vm.kl_divergence(ref, test) == pytest.approx(expected, rel=1e-3)


def test_perplexity_and_bits_per_byte_of_uniform_predictor():
    V, T = 260, 1000
    logits = torch.zeros(T, V)
    targets = torch.randint(0, V, (T,))
    assert vm.perplexity(logits, targets) == pytest.approx(V, rel=1e-9)
    assert vm.bits_per_byte(logits, targets) == pytest.approx(math.log2(V), rel=1e-9)
    # a tokenizer with 4 bytes per token: the same code length spread over 4x the bytes
    assert vm.bits_per_byte(logits, targets, num_bytes=4 * T) == pytest.approx(math.log2(V) / 4, rel=1e-9)


def test_perplexity_known_predictor_and_ignore_index():
    # each token gets p(target) = 1/2 (two equal top logits, the rest -1e9): perplexity 2 exactly
    V = 5
    logits = torch.full((4, V), -1e9)
    logits[:, 1] = 0.0
    logits[:, 3] = 0.0
    targets = torch.tensor([1, 3, 1, -100])  # the last position is ignored: it would have p = 0
    assert vm.perplexity(logits, targets) == pytest.approx(2.0, rel=1e-12)
    nll, n = vm.token_nll(logits, targets)
    assert n == 3 and nll == pytest.approx(3 * math.log(2), rel=1e-12)
    with pytest.raises(ValueError, match="zero tokens"):
        vm.perplexity(logits, torch.full((4,), -100))


def test_top1_agreement():
    ref = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    test = torch.tensor([[0.0, 2.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    assert vm.top1_agreement(ref, test) == pytest.approx(0.5)
    # [B, S, V] logits are flattened over the leading dims
    assert vm.top1_agreement(ref.reshape(2, 2, 3), test.reshape(2, 2, 3)) == pytest.approx(0.5)
