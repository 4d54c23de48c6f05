"""fp8-tensor / fp8-channel / fp8-block: checkpoint loading through weight_loader (incl. tensor parallelism), the
post-load conversions, the reference path against a float64 loop, the online path and the bad-input errors."""

import warnings

import pytest
import torch

import moequant.methods.fp8  # noqa: F401  (registers the fp8 schemes)
from conftest import rel_err
from _moe_loop import moe_loop_f64
from moequant import FusedMoE
from moequant.config import QuantConfig
from moequant.quantize import fp8_math as fm


@pytest.fixture(autouse=True)
def _seed():
    # fixed inputs: a flip of one fp8 rounding (fp32 sums in another order landing on the other side of a
    # midpoint) moves a small output by ~1e-3, so runs must not draw new data each time
    torch.manual_seed(0)


SCHEMES = ("fp8-tensor", "fp8-channel", "fp8-block")
STATIC = QuantConfig("fp8-tensor", activation_scheme="static")


def quantize_linear(w, scheme):
    """One Linear's checkpoint tensors (compressed-tensors names) for the scheme."""
    if scheme == "fp8-tensor":
        q, s = fm.quantize_tensor(w)
    elif scheme == "fp8-channel":
        q, s = fm.quantize_channel(w)
    else:
        q, s = fm.quantize_block(w)
    return {"weight": q, "weight_scale": s}


def make_fp8_checkpoint(E, H, I, scheme, seed=0, input_scales=False, scale_name="weight_scale"):
    """Per-expert fp8 tensors as a Qwen3-MoE checkpoint names them, and the dequantized dense weights."""
    g = torch.Generator().manual_seed(seed)
    sd, deq = {}, {}
    for e in range(E):
        for name, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            # w3 ("up") on a larger scale than w1 so the per-tensor merge really requantizes
            w = torch.randn(*shape, generator=g) / shape[1] ** 0.5 * (3.0 if name == "up_proj" else 1.0)
            t = quantize_linear(w, scheme)
            key = f"mlp.experts.{e}.{name}."
            sd[key + "weight"] = t["weight"]
            sd[key + scale_name] = t["weight_scale"]
            if input_scales:
                sd[key + "input_scale"] = torch.tensor([0.02 + 0.001 * e])
            s = t["weight_scale"]
            if scheme == "fp8-block":
                s = fm.expand_block_scale(s, *shape)
            deq[key] = fm.dequantize_fp8(t["weight"], s)
    pre = "mlp.experts."
    w13 = torch.stack([torch.cat([deq[f"{pre}{e}.gate_proj."], deq[f"{pre}{e}.up_proj."]]) for e in range(E)])
    w2 = torch.stack([deq[f"mlp.experts.{e}.down_proj."] for e in range(E)])
    return sd, w13, w2


def load_into(layer, sd, process=True):
    mapping = FusedMoE.make_expert_params_mapping("gate_proj", "down_proj", "up_proj", layer.global_num_experts)
    params = dict(layer.named_parameters())
    for key, tensor in sd.items():
        for prefix, ckpt_name, e, shard in mapping:
            if ckpt_name in key:
                name = key.split("mlp.", 1)[1].replace(ckpt_name, prefix).removeprefix("experts.")
                if name not in params:
                    raise KeyError(f"{key} -> {name}: no such parameter")
                layer.weight_loader(params[name], tensor, key, shard, e)
                break
    if process:
        layer.process_weights_after_loading()


def fake_quant_loop(layer, x, w13, w2, w, ids):
    """The float64 loop on dequantized weights, with the activations fake-quantized as the scheme does."""
    m = layer.quant_method
    xq = m.act_quant_ref(layer, x.double(), 1)
    T, K = ids.shape
    I = w13.shape[1] // 2
    inter = torch.zeros(T * K, I, dtype=torch.float64)
    from moequant.kernels.reference import gated_activation_ref

    for t in range(T):
        for k in range(K):
            h = w13[ids[t, k]].double() @ xq[t]
            inter[t * K + k] = gated_activation_ref(h[:I], h[I:], layer.activation)
    iq = m.act_quant_ref(layer, inter, 2)
    out = torch.zeros(T, x.shape[1], dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            out[t] += float(w[t, k]) * (w2[ids[t, k]].double() @ iq[t * K + k])
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_checkpoint_loads_and_reference_matches_float64_loop(scheme):
    E, K, H, I, T = 5, 2, 128, 256, 9  # prime E; block needs multiples of 128
    sd, w13, w2 = make_fp8_checkpoint(E, H, I, scheme)
    layer = FusedMoE(E, K, H, I, params_dtype=torch.float32, quant_config=scheme, backend="reference")
    load_into(layer, sd)
    for e in range(E):
        d13, d2 = layer.quant_method.dequantize_expert(layer, e)
        assert torch.equal(d2, w2[e])
        if scheme == "fp8-tensor":  # merged scale: requantized to within half a step of the shared grid
            s = layer.w13_weight_scale[e]
            e_ = torch.floor(torch.log2((w13[e] / s).abs().clamp_min(2.0**-6)))
            assert ((d13 - w13[e]).abs() <= 2.0 ** (e_ - 3) * s * 0.5 * (1 + 1e-6)).all()
            assert not torch.equal(d13, w13[e])  # w1 really moved to w3's (larger) scale
        else:
            assert torch.equal(d13, w13[e])
    x = torch.randn(T, H)
    logits = torch.randn(T, E)
    out = layer(x, logits)
    w, ids = layer.route(x, logits)
    d = [layer.quant_method.dequantize_expert(layer, e) for e in range(E)]
    ref = fake_quant_loop(layer, x, torch.stack([a for a, _ in d]), torch.stack([b for _, b in d]), w, ids)
    assert rel_err(out, ref) <= 1e-5
    # and the fp8 model is close to the full-precision one (quantization error, not a bug)
    assert rel_err(out, moe_loop_f64(x, w13, w2, w, ids)) <= 0.1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_tensor_parallel_slices_scales_like_weights(scheme):
    E, K, H, I, tp = 3, 2, 128, 256, 2
    sd, w13, w2 = make_fp8_checkpoint(E, H, I, scheme, seed=1)
    full = FusedMoE(E, K, H, I, params_dtype=torch.float32, quant_config=scheme)
    load_into(full, sd)
    Ip = I // tp
    for rank in range(tp):
        part = FusedMoE(E, K, H, I, params_dtype=torch.float32, quant_config=scheme, tp_size=tp, tp_rank=rank)
        load_into(part, sd)
        for e in range(E):
            f13, f2 = full.quant_method.dequantize_expert(full, e)
            p13, p2 = part.quant_method.dequantize_expert(part, e)
            rows = torch.cat([torch.arange(rank * Ip, (rank + 1) * Ip), I + torch.arange(rank * Ip, (rank + 1) * Ip)])
            if scheme == "fp8-tensor":  # the shared scale is per expert, the same on every rank
                torch.testing.assert_close(p13, f13[rows], rtol=0, atol=0)
            else:
                assert torch.equal(p13, f13[rows])
            assert torch.equal(p2, f2[:, rank * Ip:(rank + 1) * Ip])


def test_static_input_scales_collapse_to_max_with_warning():
    E, K, H, I = 4, 2, 32, 16
    sd, _, _ = make_fp8_checkpoint(E, H, I, "fp8-tensor", input_scales=True)
    layer = FusedMoE(E, K, H, I, params_dtype=torch.float32, quant_config=STATIC)
    with pytest.warns(UserWarning, match="input scales differ"):
        load_into(layer, sd)
    assert layer.w13_input_scale.shape == (1,) and layer.w13_input_scale.item() == pytest.approx(0.02 + 0.003)
    assert layer.w2_input_scale.item() == pytest.approx(0.023)
    # equal scales: no warning
    for k in sd:
        if k.endswith("input_scale"):
            sd[k] = torch.tensor([0.05])
    layer = FusedMoE(E, K, H, I, params_dtype=torch.float32, quant_config=STATIC)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_into(layer, sd)
    x = torch.randn(3, H)
    q = layer.quant_method.act_quant_ref(layer, x, 1)
    assert torch.equal(q, fm.act_fake_quant(x, "tensor", torch.tensor([0.05])))


def test_missing_input_scale_is_an_error_never_zero():
    E, K, H, I = 3, 2, 32, 16
    sd, _, _ = make_fp8_checkpoint(E, H, I, "fp8-tensor", input_scales=True)
    del sd["mlp.experts.2.down_proj.input_scale"]
    layer = FusedMoE(E, K, H, I, params_dtype=torch.float32, quant_config=STATIC)
    with pytest.raises(ValueError, match=r"w2_input_scale\[expert 2"):
        load_into(layer, sd)
    # RTN from dense weights cannot invent static scales either
    layer = FusedMoE(E, K, H, I, params_dtype=torch.float32, quant_config=STATIC)
    with pytest.raises(ValueError, match="w13_input_scale: expert 0: input scale missing"):
        layer.load_dense_weights(torch.randn(E, 2 * I, H), torch.randn(E, H, I))


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_zero_or_non_finite_weight_scale_names_tensor_and_expert(scheme, bad):
    E, K, H, I = 3, 2, 128, 128
    sd, _, _ = make_fp8_checkpoint(E, H, I, scheme)
    s = sd["mlp.experts.1.up_proj.weight_scale"]
    s.view(-1)[-1] = bad
    layer = FusedMoE(E, K, H, I, params_dtype=torch.float32, quant_config=scheme)
    with pytest.raises(ValueError, match=r"w13_weight_scale: expert 1 \(shard w3\)"):
        load_into(layer, sd)


def test_bad_input_input_scale_zero():
    E, K, H, I = 2, 1, 32, 16
    sd, _, _ = make_fp8_checkpoint(E, H, I, "fp8-tensor", input_scales=True)
    sd["mlp.experts.1.gate_proj.input_scale"] = torch.tensor([0.0])
    sd["mlp.experts.1.up_proj.input_scale"] = torch.tensor([0.0])
    layer = FusedMoE(E, K, H, I, params_dtype=torch.float32, quant_config=STATIC)
    with pytest.raises(ValueError, match="w13_input_scale: expert 1: input scale 0.0"):
        load_into(layer, sd)


@pytest.mark.parametrize("scheme,key,tensor,match", [
    ("fp8-channel", "weight_scale", torch.ones(16),
     r"w13_weight_scale: expert 0 shard w1: .*shape \(16,\), expected \(16, 1\)"),
    ("fp8-tensor", "weight_scale", torch.ones(2), r"w13_weight_scale: expert 0 shard w1: expected a single value"),
    ("fp8-block", "weight_scale", torch.ones(2, 1), r"w13_weight_scale: expert 0 shard w1: .*expected \(1, 1\)"),
    ("fp8-tensor", "weight_scale", torch.ones(1, dtype=torch.float8_e4m3fn),
     r"dtype torch.float8_e4m3fn, expected torch.float32"),
    ("fp8-tensor", "weight", torch.ones(16, 128),
     r"w13_weight: expert 0 shard w1: checkpoint tensor has dtype torch.float32"),
])
def test_wrong_shape_or_dtype_names_tensor_expert_and_expected(scheme, key, tensor, match):
    E, K, H, I = 2, 1, 128, 128 if scheme == "fp8-block" else 16
    layer = FusedMoE(E, K, 128, I, params_dtype=torch.float32, quant_config=scheme)
    with pytest.raises(ValueError, match=match):
        layer.weight_loader(getattr(layer, "w13_" + key), tensor, "experts.0.gate_proj." + key, "w1", 0)


@pytest.mark.parametrize("H,I", [(100, 128), (128, 200)])
def test_block_scheme_needs_multiples_of_128(H, I):
    with pytest.raises(ValueError, match="multiple of 128"):
        FusedMoE(2, 1, H, I, quant_config="fp8-block")
    with pytest.raises(ValueError, match="multiple of 128"):  # I per tp rank
        FusedMoE(2, 1, 128, 128, quant_config="fp8-block", tp_size=2)


def test_deepseek_weight_scale_inv_loads_as_the_scale():
    E, K, H, I = 3, 2, 128, 256
    sd, w13, w2 = make_fp8_checkpoint(E, H, I, "fp8-block", scale_name="weight_scale_inv")
    layer = FusedMoE(E, K, H, I, params_dtype=torch.float32, quant_config="fp8-block")
    load_into(layer, sd)
    assert "w13_weight_scale_inv" not in dict(layer.named_parameters())
    for e in range(E):
        d13, d2 = layer.quant_method.dequantize_expert(layer, e)
        assert torch.equal(d13, w13[e]) and torch.equal(d2, w2[e])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_online_quantization_of_a_bf16_checkpoint(scheme):
    E, K, H, I = 3, 2, 128, 128
    g = torch.Generator().manual_seed(3)
    sd = {}
    for e in range(E):
        for name, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            sd[f"mlp.experts.{e}.{name}.weight"] = (torch.randn(*shape, generator=g) / 10).bfloat16()
    layer = FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config=QuantConfig(scheme, online=True),
                     backend="reference")
    assert layer.w13_weight.dtype == torch.bfloat16
    load_into(layer, sd)
    assert layer.w13_weight.dtype == fm.FP8_DTYPE
    dense = FusedMoE(E, K, H, I, params_dtype=torch.float32, quant_config=scheme)
    pre = "mlp.experts."
    w13 = torch.stack([torch.cat([sd[f"{pre}{e}.gate_proj.weight"], sd[f"{pre}{e}.up_proj.weight"]]) for e in range(E)])
    w2 = torch.stack([sd[f"mlp.experts.{e}.down_proj.weight"] for e in range(E)])
    dense.load_dense_weights(w13.float(), w2.float())
    for e in range(E):
        a, b = layer.quant_method.dequantize_expert(layer, e), dense.quant_method.dequantize_expert(dense, e)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert rel_err(a[0], w13[e].float()) < 0.05


def test_online_static_is_refused():
    with pytest.raises(ValueError, match="online quantization cannot provide static input scales"):
        FusedMoE(2, 1, 32, 16, quant_config=QuantConfig("fp8-tensor", online=True, activation_scheme="static"))
    with pytest.raises(ValueError, match="only supported by fp8-tensor"):
        FusedMoE(2, 1, 32, 16, quant_config=QuantConfig("fp8-channel", activation_scheme="static"))


def test_compute_dtype_is_fp8():
    from moequant.registry import get_method

    assert all(get_method(s).compute_dtype == "fp8" for s in SCHEMES)


def test_online_layer_also_takes_dense_weights():
    # load_dense_weights on an online layer quantizes once (not the fp8 values a second time)
    E, K, H, I = 2, 1, 32, 16
    w13, w2 = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    a = FusedMoE(E, K, H, I, params_dtype=torch.float32, quant_config=QuantConfig("fp8-channel", online=True))
    b = FusedMoE(E, K, H, I, params_dtype=torch.float32, quant_config="fp8-channel")
    a.load_dense_weights(w13, w2)
    b.load_dense_weights(w13, w2)
    assert torch.equal(a.quant_method.dequantize_expert(a, 1)[0], b.quant_method.dequantize_expert(b, 1)[0])
