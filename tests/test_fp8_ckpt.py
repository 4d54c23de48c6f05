"""Checkpoints written by compressed-tensors' own float-quantized compressor (presets FP8, FP8_DYNAMIC, FP8_BLOCK)
load through make_expert_params_mapping + weight_loader and match the reference on compressed-tensors' own
dequantized weights; our RTN is bit-exact with compressed-tensors' quantize."""

import warnings

import pytest
import torch

import moequant.methods.fp8  # noqa: F401  (registers the fp8 schemes)
from _fp8_ckpt import PRESET_SCHEME, build_checkpoint
from conftest import rel_err
from moequant import FusedMoE
from moequant.config import QuantConfig
from moequant.quantize import fp8_math as fm
from test_fp8_methods import fake_quant_loop, load_into


@pytest.fixture(autouse=True)
def _seed():
    # fixed inputs: a flip of one fp8 rounding (fp32 sums in another order landing on the other side of a
    # midpoint) moves a small output by ~1e-3, so runs must not draw new data each time
    torch.manual_seed(0)


E, K, H, I, T = 3, 2, 256, 128, 6  # odd E; multiples of 128 for the block preset


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8ckpt")
    return {p: build_checkpoint(p, E, H, I, d / f"{p}.safetensors") for p in PRESET_SCHEME}


def strip(sd):
    return {k.replace("model.layers.0.", ""): v for k, v in sd.items()}


@pytest.mark.parametrize("preset", list(PRESET_SCHEME))
def test_compressed_tensors_checkpoint_matches_reference(checkpoints, preset):
    sd, w13, w2 = checkpoints[preset]
    scheme = PRESET_SCHEME[preset]
    static = preset == "FP8"
    qc = QuantConfig(scheme, activation_scheme="static" if static else "dynamic")
    layer = FusedMoE(E, K, H, I, params_dtype=torch.float32, quant_config=qc, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FP8: per-expert input scales differ (collapsed to the max)
        load_into(layer, strip(sd))
    if static:
        want = max(sd[k].item() for k in sd if k.endswith("gate_proj.input_scale") or k.endswith("up_proj.input_scale"))
        assert layer.w13_input_scale.item() == want
    for e in range(E):
        d13, d2 = layer.quant_method.dequantize_expert(layer, e)
        assert torch.equal(d2, w2[e])
        if scheme == "fp8-tensor":  # w1/w3 requantized to their max scale: within half a step of the shared grid
            s = layer.w13_weight_scale[e]
            step = 2.0 ** (torch.floor(torch.log2((w13[e] / s).abs().clamp_min(2.0**-6))) - 3) * s
            assert ((d13 - w13[e]).abs() <= step * 0.5 * (1 + 1e-6)).all()
        else:
            assert torch.equal(d13, w13[e])
    x = torch.randn(T, H)
    logits = torch.randn(T, E)
    out = layer(x, logits)
    w, ids = layer.route(x, logits)
    if scheme == "fp8-tensor":  # the shared-scale grid: compressed-tensors' w1/w3 rounded to max(s1, s3)
        pre = "model.layers.0.mlp.experts."
        w13 = torch.stack([fm.dequantize_fp8(fm.quantize_fp8(w13[e], s), s) for e, s in enumerate(
            torch.maximum(sd[f"{pre}{e}.gate_proj.weight_scale"].float(), sd[f"{pre}{e}.up_proj.weight_scale"].float())
            for e in range(E))])
    # the same fake-quantized activations on compressed-tensors' dequantized weights
    ref = fake_quant_loop(layer, x, w13, w2, w, ids)
    assert rel_err(out, ref) <= 1e-5
    if not torch.cuda.is_available():  # the Triton path on these CPU tensors: the interpreter
        layer.backend = "triton"
        assert rel_err(layer(x, logits), ref) <= 1e-4


@pytest.mark.parametrize("preset", list(PRESET_SCHEME))
def test_our_rtn_is_bit_exact_with_compressed_tensors(checkpoints, preset):
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    from _fp8_ckpt import _weight_scale

    args = preset_name_to_scheme(preset, ["Linear"])
    w = torch.randn(256, 384) * torch.logspace(-2, 1, 384)
    ct_scale = _weight_scale(w, args.weights)
    ct = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": ct_scale}, args)
    q, s = {"FP8": fm.quantize_tensor, "FP8_DYNAMIC": fm.quantize_channel, "FP8_BLOCK": fm.quantize_block}[preset](w)
    assert torch.equal(s.reshape(ct_scale.shape), ct_scale.float())
    assert torch.equal(q.view(torch.uint8), ct["weight"].view(torch.uint8))
    deq = FloatQuantizationCompressor.decompress(ct, args)["weight"]
    s_full = fm.expand_block_scale(s, *w.shape) if preset == "FP8_BLOCK" else s
    assert torch.equal(fm.dequantize_fp8(q, s_full), deq.float())
