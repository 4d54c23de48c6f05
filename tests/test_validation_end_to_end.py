"""End-to-end validator figures: REF against itself is exact; KL matches the closed form on a synthetic case and an
independent computation on a perturbed demo model; the swapped MoE module keeps the HF block's interface."""

import math

import pytest
import torch
from torch import nn

from moequant.data import demo_model_path
from moequant.validation import validate
from moequant.validation.end_to_end import _Acc, make_windows
from moequant.validation.hf_model import SwappedMoE, returns_tuple
from moequant.validation.synthetic import expert_key, perturbed_copy

transformers = pytest.importorskip("transformers")
REF = demo_model_path()


def test_ref_against_itself_is_exact(tmp_path):
    rep = validate(REF, REF, tokens=300, seq_len=128)
    e = rep.end_to_end
    assert e.tokens == 300 and e.windows == 3
    # QUANT's path (moequant blocks from REF) against transformers' REF: zero up to fp32 summation order
    assert e.kl < 1e-10 and e.top1_agreement == 1.0 and e.ppl_quant == pytest.approx(e.ppl_ref, rel=1e-6)
    assert e.ppl_quant == e.ppl_ref_moequant and e.kl == e.kl_ref_moequant
    # moequant's blocks built from REF reproduce transformers' REF (fp32 noise at most)
    assert e.max_abs_logit_diff_ref_moequant < 1e-4 and e.kl_ref_moequant < 1e-9
    assert e.ppl_ref_moequant == pytest.approx(e.ppl_ref, rel=1e-6)
    assert all(v == 0.0 for v in e.routing_changed.values()) and sorted(e.routing_changed) == [0, 1, 2, 3]
    assert all(L.sqnr_db == math.inf and L.rel_err == 0.0 and L.routing_changed == 0.0 for L in rep.layers)
    assert rep.mean_sqnr_db == math.inf
    # the demo model has learned: held-out bits per byte well below uniform's log2(260) = 8.02
    assert e.bits_per_byte_ref < 2.5
    assert e.bits_per_byte_ref == pytest.approx(math.log2(e.ppl_ref), rel=1e-9)  # one token = one byte


def test_kl_and_top1_closed_form_two_tokens():
    # two-way logits [a, 0] vs [b, 0]: KL = p log(p/q) + (1-p) log((1-p)/(1-q)), p = sigmoid(a), q = sigmoid(b)
    a = torch.tensor([2.0, -1.0, 0.5])
    b = torch.tensor([1.0, -1.5, -0.5])
    ref = torch.stack([a, torch.zeros(3)], 1)
    test = torch.stack([b, torch.zeros(3)], 1)
    p, q = torch.sigmoid(a.double()), torch.sigmoid(b.double())
    kl = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log())
    acc = _Acc()
    acc.add(ref[:2], test[:2], torch.tensor([0, 1]))  # two windows of unequal length: token-weighted mean
    acc.add(ref[2:], test[2:], torch.tensor([0]))
    assert acc.kl / 3 == pytest.approx(kl.mean().item(), rel=1e-12)
    assert acc.top1 / 3 == pytest.approx(2 / 3)  # token 2: argmax 0 vs 1
    nll = -(torch.log(q[0]) + torch.log(1 - q[1]) + torch.log(q[2])).item()  # the compared (test) logits
    assert acc.nll == pytest.approx(nll, rel=1e-12)


def test_kl_matches_independent_transformers_run(tmp_path):
    # QUANT = demo with layer 2's experts scaled by 1.05; transformers loads it directly, so the KL of its logits
    # against REF's is an independent figure for what the validator gets through moequant's swapped blocks
    q = perturbed_copy(REF, tmp_path / "q", {expert_key(2, e, p): (lambda w: w * 1.05)
                                             for e in range(8) for p in ("down_proj", "up_proj")})
    rep = validate(REF, q, tokens=256, seq_len=128)
    from moequant.validation.end_to_end import encode_text
    from moequant.checkpoint import open_checkpoint

    ids, _ = encode_text(open_checkpoint(REF), (_default_text()))
    wins = make_windows(ids, 128, 256)
    load = transformers.AutoModelForCausalLM.from_pretrained
    mr = load(REF, dtype=torch.float32, local_files_only=True).eval()
    mq = load(q, dtype=torch.float32, local_files_only=True).eval()
    kls = []
    with torch.no_grad():
        for x, _ in wins:
            lr, lq = mr(input_ids=x).logits[0].double(), mq(input_ids=x).logits[0].double()
            pr = lr.log_softmax(-1)
            kls.append((pr.exp() * (pr - lq.log_softmax(-1))).sum(-1))
    want = torch.cat(kls).mean().item()
    assert want > 1e-5  # the perturbation is visible
    assert rep.end_to_end.kl == pytest.approx(want, rel=1e-3)
    assert rep.end_to_end.ppl_quant != rep.end_to_end.ppl_ref
    assert rep.layers[2].sqnr_db < 30 and rep.layers[1].sqnr_db == math.inf


def _default_text():
    from moequant.validation.inputs import default_text

    return default_text()[0]


class _TupleBlock(nn.Module):
    """transformers 4.x style sparse block: returns (hidden, router_logits)."""

    def __init__(self):
        super().__init__()
        self.experts = nn.Identity()

    def forward(self, x):
        return x, torch.zeros(x.shape[0] * x.shape[1], 8)


def test_swapped_module_follows_the_replaced_blocks_interface():
    from moequant.checkpoint import open_checkpoint

    block = open_checkpoint(REF).moe_block(0, dtype=torch.float32)
    x = torch.randn(2, 5, 128)
    assert returns_tuple(_TupleBlock(), 128, "cpu", torch.float32)
    out, logits = SwappedMoE(block, tuple_out=True)(x)
    assert out.shape == (2, 5, 128) and logits.shape == (10, 8)
    only = SwappedMoE(block, tuple_out=False)(x)
    assert torch.equal(only, out)
    # transformers 5.x's Qwen3-MoE block returns a tensor
    m = transformers.AutoModelForCausalLM.from_pretrained(REF, dtype=torch.float32, local_files_only=True)
    assert not returns_tuple(m.model.layers[0].mlp, 128, "cpu", torch.float32)
    assert torch.allclose(m.model.layers[0].mlp(x), only, atol=1e-5)
