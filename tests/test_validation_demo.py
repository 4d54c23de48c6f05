"""The demo model quantized by moequant's own quantizer and validated: w4a16 keeps perplexity within a few percent,
fp8 within 1%; the per-layer SQNR is in the range each scheme's precision gives."""

import math

import pytest

from moequant.data import demo_model_path
from moequant.validation import validate

api = pytest.importorskip("moequant.quantize.api")

# scheme: (max |ppl_quant / ppl_ref - 1|, min mean layer SQNR dB, max KL nats)
CASES = {"w4a16": (0.03, 20.0, 0.01), "fp8-tensor": (0.01, 27.0, 0.003), "fp8-channel": (0.01, 28.0, 0.003)}


@pytest.fixture(scope="module", params=sorted(CASES))
def validated(request, tmp_path_factory):
    scheme = request.param
    out = api.quantize_checkpoint(None, tmp_path_factory.mktemp(scheme) / "q", scheme=scheme, num_samples=16,
                                  seq_len=128, progress=False)
    return scheme, validate(demo_model_path(), out, tokens=2048)


def test_demo_quantized_perplexity_and_sqnr(validated):
    scheme, rep = validated
    ppl_tol, min_sqnr, max_kl = CASES[scheme]
    e = rep.end_to_end
    assert {L.scheme for L in rep.layers} == {scheme} and len(rep.layers) == 4
    assert abs(e.ppl_ratio - 1) <= ppl_tol, (scheme, e.ppl_ref, e.ppl_quant)
    assert min_sqnr <= rep.mean_sqnr_db < 60, (scheme, [L.sqnr_db for L in rep.layers])
    assert 0 < e.kl <= max_kl and e.top1_agreement > 0.95
    assert not rep.nonfinite_experts
    assert all(math.isfinite(x.sqnr_db) for L in rep.layers for x in L.experts if x.tokens)
    # the sanity path: moequant's blocks from REF reproduce transformers' REF
    assert e.kl_ref_moequant < 1e-9
