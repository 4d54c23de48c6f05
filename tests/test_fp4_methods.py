"""FP4 methods (nvfp4, nvfp4a16, mxfp4): checkpoints written by compressed-tensors load and match its dequantization;
ModelOpt and compressed-tensors spellings agree; w1/w3 second-level scales are unified; dead experts stay finite."""

import logging
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import moequant.methods.fp4  # noqa: F401  (registers the fp4 schemes)
from _fp4_ckpt import PROJ, build_checkpoint, load_into, to_modelopt
from conftest import rel_err
from moequant import FusedMoE
from moequant.kernels.reference import fused_moe_ref
from moequant.quantize import fp4_math as f4

E, H, I, K = 3, 64, 32, 2  # prime E


@pytest.fixture(scope="module")
def ckpts():
    """One compressed-tensors checkpoint per preset (module scope: compressed-tensors imports transformers)."""
    return {p: build_checkpoint(p, E, H, I, seed=1) for p in ("nvfp4", "nvfp4a16", "mxfp4")}


def make_layer(scheme, **kw):
    bias = scheme == "mxfp4"
    return FusedMoE(E, K, H, I, params_dtype=torch.float32, quant_config=scheme, has_bias=bias,
                    activation="swigluoai" if bias else "silu", **kw)


def routing(T, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).int()
    w = torch.rand(T, K, generator=gen)
    return x, w / w.sum(1, keepdim=True), ids


def ct_weights(deq, e):
    return torch.cat([deq[(e, "w1")], deq[(e, "w3")]]), deq[(e, "w2")]


def ct_act_quant(sd, stage):
    """nvfp4 fake-quant with compressed-tensors' input global scales (max of 1/gs over the experts)."""
    names = ("gate_proj", "up_proj") if stage == 1 else ("down_proj",)
    s = max((1.0 / sd[f"experts.{e}.{n}.input_global_scale"].float()).item() for e in range(E) for n in names)
    return lambda a: f4.fake_quant_nvfp4_act(a, torch.tensor([s]))


@pytest.mark.parametrize("scheme", ["nvfp4a16", "nvfp4", "mxfp4"])
def test_compressed_tensors_checkpoint_matches_its_dequantization(scheme, ckpts, tmp_path):
    sd, deq = ckpts[scheme]
    save_file(sd, tmp_path / "model.safetensors")
    sd = load_file(tmp_path / "model.safetensors")
    if scheme == "mxfp4":  # gpt-oss style biases
        gen = torch.Generator().manual_seed(5)
        for e in range(E):
            for s, n in (("w1", I), ("w3", I), ("w2", H)):
                sd[f"experts.{e}.{PROJ[s]}.bias"] = torch.randn(n, generator=gen) * 0.1
    layer = make_layer(scheme)
    load_into(layer, sd)
    for e in range(E):
        w13, w2 = layer.quant_method.dequantize_expert(layer, e)
        r13, r2 = ct_weights(deq, e)
        torch.testing.assert_close(w13, r13, rtol=1e-6, atol=0)
        torch.testing.assert_close(w2, r2, rtol=1e-6, atol=0)
    x, w, ids = routing(7)
    out = layer.experts_forward(x, w, ids)
    kw = {}
    if scheme == "mxfp4":
        kw = dict(w13_bias=layer.w13_bias, w2_bias=layer.w2_bias)
    if scheme == "nvfp4":
        q1, q2 = ct_act_quant(sd, 1), ct_act_quant(sd, 2)
        kw["act_quant"] = lambda a, stage: q1(a) if stage == 1 else q2(a)
    ref = fused_moe_ref(x, w, ids, lambda e: ct_weights(deq, e), E, activation=layer.activation, **kw)
    assert rel_err(out, ref) <= (1e-2 if scheme == "nvfp4" else 1e-3)
    if scheme == "nvfp4":  # fake-quant of activations is actually on: differs from the unquantized-activation result
        kw.pop("act_quant")
        assert rel_err(out, fused_moe_ref(x, w, ids, lambda e: ct_weights(deq, e), E, **kw)) > 1e-3


def test_modelopt_and_compressed_tensors_spellings_load_identically(ckpts):
    sd, _ = ckpts["nvfp4"]
    a, b = make_layer("nvfp4"), make_layer("nvfp4")
    load_into(a, sd)
    load_into(b, to_modelopt(sd))
    for name in ("w13_weight_scale_2", "w2_weight_scale_2", "w13_input_scale", "w2_input_scale"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    x, w, ids = routing(5, seed=2)
    assert torch.equal(a.experts_forward(x, w, ids), b.experts_forward(x, w, ids))
    assert a.quant_method.uses_weight_scale_2_pattern()


def test_different_w1_w3_scales_are_unified_to_the_larger(caplog):
    sd, deq = build_checkpoint("nvfp4a16", E, H, I, seed=3, w1_w3_gap=3.0, share_gate_up=False)  # w3 gets the larger scale_2
    layer = make_layer("nvfp4a16")
    with caplog.at_level(logging.WARNING, logger="moequant.methods.fp4"):
        load_into(layer, sd)
    assert sum("different weight_scale_2" in r.message for r in caplog.records) == 1  # said once per layer
    s2 = layer.w13_weight_scale_2
    assert torch.equal(s2[:, 0], s2[:, 1])
    for e in range(E):
        assert s2[e, 0].item() == pytest.approx(1.0 / sd[f"experts.{e}.up_proj.weight_global_scale"].item(), rel=1e-6)
        w13, _ = layer.quant_method.dequantize_expert(layer, e)
        r13, _ = ct_weights(deq, e)
        torch.testing.assert_close(w13[I:], r13[I:], rtol=1e-6, atol=0)  # the larger half is untouched
        # the requantized half: fp8 rounding of each block scale (3 mantissa bits -> <= 1/16 per block)
        assert rel_err(w13[:I], r13[:I]) < 0.04


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_dead_expert_warns_and_outputs_stay_finite(bad, ckpts):
    sd = dict(ckpts["nvfp4"][0])
    sd["experts.1.gate_proj.weight_global_scale"] = torch.tensor([bad])  # scale_2 = 1/bad: inf, nan or 0
    sd["experts.2.down_proj.input_global_scale"] = torch.tensor([bad])
    layer = make_layer("nvfp4")
    with pytest.warns(UserWarning, match="expert 1 has zero, NaN or infinite scales") as rec:
        load_into(layer, sd)
    assert any("w2_input_scale: expert 2" in str(r.message) for r in rec) or bad == 0.0  # 1/0 = inf is dead too
    w13, w2 = layer.quant_method.dequantize_expert(layer, 1)
    assert torch.equal(w13, torch.zeros_like(w13))
    x = torch.randn(6, H)
    ids = torch.tensor([[1, 2]] * 6, dtype=torch.int32)  # all tokens to the dead expert and its neighbour
    out = layer.experts_forward(x, torch.full((6, K), 0.5), ids)
    assert torch.isfinite(out).all()


def test_mxfp4_nan_scale_is_a_dead_expert(ckpts):
    sd = dict(ckpts["mxfp4"][0])
    s = sd["experts.0.down_proj.weight_scale"].clone()
    s[0, 0] = 255
    sd["experts.0.down_proj.weight_scale"] = s
    for e in range(E):
        for sh, n in (("w1", I), ("w3", I), ("w2", H)):
            sd[f"experts.{e}.{PROJ[sh]}.bias"] = torch.zeros(n)
    layer = make_layer("mxfp4")
    with pytest.warns(UserWarning, match="w2: expert 0"):
        load_into(layer, sd)
    out = layer.experts_forward(torch.randn(3, H), torch.ones(3, K) / K, torch.tensor([[0, 1]] * 3, dtype=torch.int32))
    assert torch.isfinite(out).all()


def test_missing_input_scale_for_one_expert_is_an_error(ckpts):
    sd = {k: v for k, v in ckpts["nvfp4"][0].items() if k != "experts.2.down_proj.input_global_scale"}
    with pytest.raises(ValueError, match="w2_input_scale: expert 2: input scale missing"):
        load_into(make_layer("nvfp4"), sd)


def test_missing_weight_tensor_is_named(ckpts):
    sd = {k: v for k, v in ckpts["nvfp4a16"][0].items() if k != "experts.1.up_proj.weight_global_scale"}
    with pytest.raises(ValueError, match=r"w13_weight_scale_2\[expert 1, w3\]"):
        load_into(make_layer("nvfp4a16"), sd)


def test_wrong_scale_dtype_and_shape_are_named(ckpts):
    sd = dict(ckpts["nvfp4a16"][0])
    layer = make_layer("nvfp4a16")
    with pytest.raises(ValueError, match="w13_weight_scale: expert 0 shard w1.*dtype"):
        layer.weight_loader(layer.w13_weight_scale, sd["experts.0.gate_proj.weight_scale"].float(), "k", "w1", 0)
    with pytest.raises(ValueError, match="w2_weight_packed: expert 0 shard w2.*expected \\(64, 16\\)"):
        layer.weight_loader(layer.w2_weight_packed, torch.zeros(64, 8, dtype=torch.uint8), "k", "w2", 0)


@pytest.mark.parametrize("scheme,H_,I_", [("nvfp4", 40, 32), ("mxfp4", 64, 48)])
def test_sizes_must_be_multiples_of_the_group(scheme, H_, I_):
    with pytest.raises(ValueError, match="multiple of the scale group size"):
        FusedMoE(E, K, H_, I_, params_dtype=torch.float32, quant_config=scheme)


@pytest.mark.parametrize("scheme", ["nvfp4a16", "nvfp4", "mxfp4"])
def test_rtn_quantize_dense_round_trip(scheme):
    gen = torch.Generator().manual_seed(7)
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen) * 0.1, torch.randn(E, H, I, generator=gen) * 0.1
    layer = make_layer(scheme)
    layer.load_dense_weights(w13, w2)
    for e in range(E):
        d13, d2 = layer.quant_method.dequantize_expert(layer, e)
        assert rel_err(d13, w13[e]) < 0.15 and rel_err(d2, w2[e]) < 0.15
    x, w, ids = routing(4, seed=8)
    assert torch.isfinite(layer.experts_forward(x, w, ids)).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter run (the GPU tests use RTN layers)")
@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_checkpoint_layer_through_triton_interpreter(scheme, ckpts):
    """Static input scales (nvfp4) and biases + swigluoai (mxfp4) through the Triton path vs the reference."""
    sd = dict(ckpts[scheme][0])
    if scheme == "mxfp4":
        gen = torch.Generator().manual_seed(6)
        for e in range(E):
            for s, n in (("w1", I), ("w3", I), ("w2", H)):
                sd[f"experts.{e}.{PROJ[s]}.bias"] = torch.randn(n, generator=gen) * 0.1
    layer = make_layer(scheme)
    load_into(layer, sd)
    x, w, ids = routing(5, seed=9)
    ref = layer.experts_forward(x, w, ids)
    layer.backend = "triton"
    assert rel_err(layer.experts_forward(x, w, ids), ref) <= 1e-4


def test_tensor_parallel_rank_slices_packed_weights_and_scales(ckpts):
    """tp_size 2, rank 1: rows [I/2:] of w1/w3 and columns [I/2:] of w2 (bytes I/4, scales I/32) of the checkpoint."""
    sd, deq = ckpts["nvfp4a16"]
    layer = FusedMoE(E, K, H, I, params_dtype=torch.float32, quant_config="nvfp4a16", tp_size=2, tp_rank=1)
    load_into(layer, sd)
    half = I // 2
    for e in range(E):
        w13, w2 = layer.quant_method.dequantize_expert(layer, e)
        ref13 = torch.cat([deq[(e, "w1")][half:], deq[(e, "w3")][half:]])
        torch.testing.assert_close(w13, ref13, rtol=1e-6, atol=0)
        torch.testing.assert_close(w2, deq[(e, "w2")][:, half:], rtol=1e-6, atol=0)


@pytest.mark.parametrize("scheme", ["nvfp4a16", "mxfp4"])
def test_quantize_dense_per_expert_equals_whole_stack(scheme):
    """quantize_dense works one expert at a time (bounded temporaries) and stores exactly what quantizing the whole
    [E, R, C] stack gives: bytes, block scales and (nvfp4) one second-level scale per expert matrix, w1 and w3
    sharing it; experts with different ranges keep their own."""
    from moequant import QuantConfig
    from moequant.quantize import fp4_math as f4

    gen = torch.Generator().manual_seed(0)
    E, K, H, I = 4, 2, 64, 96
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen) * 0.05, torch.randn(E, H, I, generator=gen) * 0.05
    w13[1] *= 30
    layer = FusedMoE(E, K, H, I, params_dtype=torch.float32, quant_config=QuantConfig(scheme=scheme))
    layer.quant_method.quantize_dense(layer, w13, w2)
    for p, w in (("w13", w13), ("w2", w2)):
        if scheme == "nvfp4a16":
            packed, scale, gs = f4.quantize_nvfp4(w)
            s2 = getattr(layer, f"{p}_weight_scale_2").data
            assert torch.equal(s2, (1.0 / gs).reshape(-1, *([1] * (s2.dim() - 1))).expand_as(s2))
        else:
            packed, scale = f4.quantize_mxfp4(w)
        assert torch.equal(getattr(layer, f"{p}_weight_packed").data, packed)
        assert torch.equal(getattr(layer, f"{p}_weight_scale").data.view(torch.uint8), scale.view(torch.uint8))
