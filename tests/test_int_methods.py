"""w4a16 / w4a16-asym / w8a16: checkpoints written by compressed-tensors load per expert and shard and match the
reference on compressed-tensors' own dequantized weights; act-order (g_idx), tensor parallel 2, bad input.

# T tokens, E experts, H hidden, I intermediate, K top-k, G group size
"""

import pytest
import torch

import _int_ckpt as ck
import moequant.methods.intq  # noqa: F401  (registers the schemes)
from moequant.config import QuantConfig
from moequant.kernels.reference import fused_moe_ref
from moequant.layer import FusedMoE

E, K, H, I = 3, 2, 64, 64  # prime E, K < E; H = I = 2 groups of 32


def make_layer(scheme, G, act_order=False, tp_size=1, tp_rank=0, I_full=I):
    cfg = QuantConfig(scheme=scheme, group_size=G, act_order=act_order)
    return FusedMoE(E, K, H, I_full, params_dtype=torch.float32, quant_config=cfg, tp_size=tp_size, tp_rank=tp_rank,
                    backend="reference")


def reference(experts, x, logits):
    w13, w2 = ck.dense(experts)
    tw, ti = FusedMoE.select_experts(x, logits, K, False, True)
    return fused_moe_ref(x, tw, ti, lambda e: (w13[e], w2[e]), E)


CASES = [  # (moequant scheme, ct preset, G, act_order)
    ("w4a16", "W4A16", 32, False),
    ("w4a16-asym", "W4A16_ASYM", 32, False),
    ("w8a16", "W8A16", 64, False),
    ("w4a16", "W4A16", None, False),  # per channel
    ("w4a16", "W4A16", 32, True),  # act-order
    ("w4a16-asym", "W4A16_ASYM", 32, True),
    ("w8a16", "W8A16", 32, True),
]


@pytest.fixture(scope="module")
def ckpts():
    out = {}
    for _, preset, G, act in CASES:
        out[(preset, G, act)] = ck.build_experts(E, H, I, ck.preset(preset, G), act_order=act)
    return out


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("scheme,preset,G,act", CASES)
def test_ct_checkpoint_matches_reference(ckpts, scheme, preset, G, act):
    experts = ckpts[(preset, G, act)]
    layer = make_layer(scheme, G, act)
    ck.load_into(layer, ck.state_dict(experts))
    w13, w2 = ck.dense(experts)
    for e in range(E):  # bit-exact dequantization after the act-order sort and back
        d13, d2 = layer.quant_method.dequantize_expert(layer, e)
        assert torch.equal(d13, w13[e]) and torch.equal(d2, w2[e])
    if act:
        assert bool((layer.w13_weight_g_idx.diff(dim=-1) >= 0).all())  # groups are contiguous after loading
    gen = torch.Generator().manual_seed(1)
    x, logits = torch.randn(7, H, generator=gen), torch.randn(7, E, generator=gen)
    assert rel(layer(x, logits), reference(experts, x, logits)) <= 1e-3


@pytest.mark.parametrize("scheme,preset,G,act", CASES)
def test_tensor_parallel_two_ranks_sum(ckpts, scheme, preset, G, act):
    """Two ranks' shards (I_p = I/2; w2's scales unsharded with act-order) sum to the TP=1 result."""
    experts = ckpts[(preset, G, act)]
    if not act and G is not None and (I // 2) % G:
        pytest.skip("G=64 does not divide I_p=32 without act-order (the layer refuses it: tested below)")
    sd = ck.state_dict(experts)
    gen = torch.Generator().manual_seed(2)
    x, logits = torch.randn(5, H, generator=gen), torch.randn(5, E, generator=gen)
    total = 0
    for r in range(2):
        layer = make_layer(scheme, G, act, tp_size=2, tp_rank=r)
        ck.load_into(layer, sd)
        total = total + layer(x, logits)
    assert rel(total, reference(experts, x, logits)) <= 1e-3


def test_quantize_dense_round_trip():
    layer = make_layer("w4a16-asym", 32)
    w13, w2 = torch.randn(E, 2 * I, H) * 0.1, torch.randn(E, H, I) * 0.1
    layer.load_dense_weights(w13, w2)
    d13, d2 = layer.quant_method.dequantize_expert(layer, 1)
    assert rel(d13, w13[1]) < 0.1 and rel(d2, w2[1]) < 0.1  # int4: a step is ~1/15 of the range


# --- bad input ----------------------------------------------------------------------------------------------
def _sd(ckpts, preset="W4A16", G=32, act=False):
    return {k: v.clone() for k, v in ck.state_dict(ckpts[(preset, G, act)]).items()}


def test_packed_shape_vs_weight_shape(ckpts):
    sd = _sd(ckpts)
    sd["experts.1.up_proj.weight_packed"] = sd["experts.1.up_proj.weight_packed"][:, :-1].contiguous()
    with pytest.raises(ValueError, match=r"w13_weight_packed: expert 1 shard w3: packed shape .* weight_shape"):
        ck.load_into(make_layer("w4a16", 32), sd)


def test_weight_shape_mismatch(ckpts):
    sd = _sd(ckpts)
    sd["experts.0.down_proj.weight_shape"] = torch.tensor([H, I + 8])
    with pytest.raises(ValueError, match=r"w2_weight_shape: expert 0 shard w2: weight_shape \[64, 72\]"):
        ck.load_into(make_layer("w4a16", 32), sd)


def test_mixed_schemes_int8_w2_in_int4_layer(ckpts):
    sd = _sd(ckpts)
    int8 = ck.state_dict(ckpts[("W8A16", 32, True)])
    sd["experts.2.down_proj.weight_packed"] = int8["experts.2.down_proj.weight_packed"]
    with pytest.raises(ValueError, match="different bit width or scheme"):
        ck.load_into(make_layer("w4a16", 32), sd)


def test_group_size_not_dividing():
    with pytest.raises(ValueError, match="group_size 128 does not divide hidden_size=64"):
        make_layer("w4a16", 128)
    with pytest.raises(ValueError, match="group_size must be 32, 64, 128"):
        make_layer("w4a16", 48)


def test_g_idx_out_of_range_and_not_covering(ckpts):
    sd = _sd(ckpts, act=True)
    sd["experts.0.gate_proj.weight_g_idx"][3] = 2
    sd["experts.0.up_proj.weight_g_idx"][3] = 2
    with pytest.raises(ValueError, match=r"w13_weight_g_idx\[expert 0\]: g_idx values must lie in \[0, 2\)"):
        ck.load_into(make_layer("w4a16", 32, True), sd)
    sd = _sd(ckpts, act=True)
    sd["experts.1.down_proj.weight_g_idx"][:] = 0
    with pytest.raises(ValueError, match=r"w2_weight_g_idx\[expert 1\]: g_idx does not cover every group"):
        ck.load_into(make_layer("w4a16", 32, True), sd)


def test_g_idx_w1_w3_differ(ckpts):
    sd = _sd(ckpts, act=True)
    sd["experts.2.up_proj.weight_g_idx"] = sd["experts.2.up_proj.weight_g_idx"].flip(0).contiguous()
    with pytest.raises(ValueError, match="w1 and w3 carry different g_idx"):
        ck.load_into(make_layer("w4a16", 32, True), sd)


def test_missing_zero_point_is_named(ckpts):
    sd = _sd(ckpts, preset="W4A16_ASYM")
    del sd["experts.1.gate_proj.weight_zero_point"]
    with pytest.raises(ValueError, match=r"w13_weight_zero_point\[expert 1, w1\]"):
        ck.load_into(make_layer("w4a16-asym", 32), sd)


def test_bad_scale(ckpts):
    sd = _sd(ckpts)
    sd["experts.2.down_proj.weight_scale"] = torch.zeros_like(sd["experts.2.down_proj.weight_scale"])
    with pytest.raises(ValueError, match=r"w2_weight_scale: expert 2: .*finite and positive"):
        ck.load_into(make_layer("w4a16", 32), sd)
