"""Layer-wise validator figures against closed forms: scaling an expert's down_proj by (1 + d) scales its output
contribution by (1 + d), so its SQNR is exactly -20 log10 |d| dB; NaN experts are reported, not averaged away."""

import math

import pytest
import torch

from moequant.checkpoint import open_checkpoint
from moequant.data import demo_model_path
from moequant.validation import validate
from moequant.validation.layerwise import compare_layer, random_inputs
from moequant.validation.report import load_json
from moequant.validation.synthetic import expert_key, perturbed_copy

REF = demo_model_path()
E = 8


@pytest.fixture(scope="module")
def scaled_layer(tmp_path_factory):
    # every expert of layer 1 scaled by 1.01 (-> 40 dB); expert 3 of layer 2 by 1.1 (-> 20 dB for that expert)
    edits = {expert_key(1, e): (lambda w: w * 1.01) for e in range(E)}
    edits[expert_key(2, 3)] = lambda w: w * 1.1
    return perturbed_copy(REF, tmp_path_factory.mktemp("scaled"), edits)


@pytest.fixture(scope="module")
def scaled_report(scaled_layer):
    return validate(REF, scaled_layer, tokens=512, end_to_end=False)


def test_uniform_scaling_gives_closed_form_sqnr(scaled_report):
    rep = {L.layer: L for L in scaled_report.layers}
    assert [L.inputs for L in scaled_report.layers] == ["real"] * 4  # transformers ran REF: captured hidden states
    assert rep[0].sqnr_db == math.inf and rep[3].sqnr_db == math.inf  # untouched layers are exact
    assert rep[1].sqnr_db == pytest.approx(-20 * math.log10(0.01), abs=1e-3)  # 40 dB
    assert rep[1].rel_err == pytest.approx(0.01, rel=1e-4)
    assert rep[1].cosine == pytest.approx(1.0, abs=1e-9)
    assert rep[1].routing_changed == 0.0  # the routers are untouched
    for ex in rep[1].experts:
        assert ex.sqnr_db == pytest.approx(40.0, abs=1e-3) and ex.probe_sqnr_db == pytest.approx(40.0, abs=1e-3)
    assert sum(ex.tokens for ex in rep[1].experts) == 512 * 2  # T tokens x top-k 2


def test_one_expert_scaled_is_found_and_layer_sqnr_matches(scaled_layer):
    ref, quant = open_checkpoint(REF), open_checkpoint(scaled_layer)
    x = random_inputs(ref, 2, 300, seed=1)
    rb, qb = ref.moe_block(2, dtype=torch.float32), quant.moe_block(2, dtype=torch.float32)
    L = compare_layer(2, rb, qb, x, "random", "unquantized")
    for ex in L.experts:
        if ex.expert == 3:
            assert ex.sqnr_db == pytest.approx(-20 * math.log10(0.1), abs=1e-3)  # 20 dB
        else:
            assert ex.sqnr_db in (math.inf, None) and ex.probe_sqnr_db == math.inf
    # closed form for the layer: y_quant - y_ref = 0.1 * c_3 (expert 3's weighted contribution)
    w, ids = rb.experts.route(x, rb.router_logits(x))
    c3 = rb.experts.experts_forward(x, w, torch.where(ids == 3, ids, torch.full_like(ids, -1)))
    y = rb(x).double()
    want = 10 * math.log10((y ** 2).sum().item() / ((0.1 * c3.double()) ** 2).sum().item())
    assert L.sqnr_db == pytest.approx(want, abs=1e-3)
    assert L.experts[3].tokens == int((ids == 3).any(1).sum())


def test_random_inputs_have_the_layer_rms_scale():
    ref = open_checkpoint(REF)
    g = ref.index.read("model.layers.2.post_attention_layernorm.weight").float()
    x = random_inputs(ref, 2, 20000)
    rms_per_channel = x.pow(2).mean(0).sqrt()
    assert torch.allclose(rms_per_channel, g.abs(), rtol=0.05)


def test_router_change_is_counted(tmp_path):
    # swap router rows 0 and 1 of layer 0: a token's top-k set changes iff exactly one of experts 0, 1 is in it
    q = perturbed_copy(REF, tmp_path / "q", {"model.layers.0.mlp.gate.weight": lambda w: w[[1, 0, *range(2, E)]]})
    ref, quant = open_checkpoint(REF), open_checkpoint(q)
    x = random_inputs(ref, 0, 400)
    rb, qb = ref.moe_block(0, dtype=torch.float32), quant.moe_block(0, dtype=torch.float32)
    L = compare_layer(0, rb, qb, x)
    _, ids = rb.experts.route(x, rb.router_logits(x))
    has0, has1 = (ids == 0).any(1), (ids == 1).any(1)
    want = (has0 ^ has1).double().mean().item()
    assert want > 0.05 and L.routing_changed == pytest.approx(want)


def test_nan_expert_reported_per_expert_not_averaged_away(tmp_path):
    def poison(w):
        w = w.clone()
        w[0, 0] = float("nan")
        return w

    q = perturbed_copy(REF, tmp_path / "q", {expert_key(1, 5): poison, expert_key(3, 2): lambda w: w * math.inf})
    rep = validate(REF, q, tokens=256, end_to_end=True, json_path=tmp_path / "r.json")
    by = {L.layer: L for L in rep.layers}
    assert by[1].nonfinite_experts == [5] and by[3].nonfinite_experts == [2]
    assert math.isnan(by[1].sqnr_db) and by[1].nonfinite > 0
    assert math.isnan(by[1].experts[5].probe_sqnr_db) and by[1].experts[5].nonfinite > 0
    assert all(ex.nonfinite == 0 and ex.probe_sqnr_db == math.inf for ex in by[1].experts if ex.expert != 5)
    assert by[0].sqnr_db == math.inf and by[2].sqnr_db == math.inf  # the others stay clean (REF inputs per layer)
    assert math.isnan(rep.mean_sqnr_db) and rep.nonfinite_experts == {1: [5], 3: [2]}
    assert math.isnan(rep.end_to_end.ppl_quant) and math.isnan(rep.end_to_end.kl)
    assert math.isfinite(rep.end_to_end.ppl_ref)
    d = load_json(tmp_path / "r.json")
    assert d["summary"]["nonfinite_experts"] == {"1": [5], "3": [2]}
    assert math.isnan(d["layers"][1]["sqnr_db"]) and math.isnan(d["layers"][1]["experts"][5]["sqnr_db"])
