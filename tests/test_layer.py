"""FusedMoE through make_expert_params_mapping + weight_loader, against a float64 per-expert loop (reference backend)."""

import pytest
import torch

from conftest import rel_err
from _moe_loop import moe_loop_f64
from moequant import FusedMoE


def make_checkpoint(E, H, I, seed=0, bias=False):
    """Per-expert tensors named as a Qwen3-MoE checkpoint names them."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for e in range(E):
        sd[f"mlp.experts.{e}.gate_proj.weight"] = torch.randn(I, H, generator=g) / H**0.5
        sd[f"mlp.experts.{e}.up_proj.weight"] = torch.randn(I, H, generator=g) / H**0.5
        sd[f"mlp.experts.{e}.down_proj.weight"] = torch.randn(H, I, generator=g) / I**0.5
        if bias:
            sd[f"mlp.experts.{e}.gate_proj.bias"] = torch.randn(I, generator=g) * 0.1
            sd[f"mlp.experts.{e}.up_proj.bias"] = torch.randn(I, generator=g) * 0.1
            sd[f"mlp.experts.{e}.down_proj.bias"] = torch.randn(H, generator=g) * 0.1
    return sd


def load_into(layer: FusedMoE, sd: dict) -> None:
    mapping = FusedMoE.make_expert_params_mapping("gate_proj", "down_proj", "up_proj", layer.global_num_experts)
    params = dict(layer.named_parameters())
    for key, tensor in sd.items():
        for prefix, ckpt_name, e, shard in mapping:
            if ckpt_name in key:
                name = key.split("mlp.", 1)[1].replace(ckpt_name, prefix).removeprefix("experts.")
                if name in params:
                    layer.weight_loader(params[name], tensor, key, shard, e)
                break
    layer.process_weights_after_loading()


def dense_from(sd, E):
    w13 = torch.stack([torch.cat([sd[f"mlp.experts.{e}.gate_proj.weight"], sd[f"mlp.experts.{e}.up_proj.weight"]]) for e in range(E)])
    w2 = torch.stack([sd[f"mlp.experts.{e}.down_proj.weight"] for e in range(E)])
    return w13, w2


def test_mapping_matches_the_seed_format():
    m = FusedMoE.make_expert_params_mapping("w1", "w2", "w3", 2)
    assert m[:3] == [("experts.w13_", "experts.0.w1.", 0, "w1"), ("experts.w2_", "experts.0.w2.", 0, "w2"),
                     ("experts.w13_", "experts.0.w3.", 0, "w3")]
    assert len(m) == 6 and m[-1] == ("experts.w13_", "experts.1.w3.", 1, "w3")


@pytest.mark.parametrize("routing", ["softmax", "grouped_sigmoid_bias"])
def test_fp32_layer_matches_float64_loop(routing):
    E, K, H, I, T = 8, 2, 32, 24, 13
    sd = make_checkpoint(E, H, I)
    kw = dict(renormalize=True)
    if routing == "grouped_sigmoid_bias":
        # DeepSeek-V3 style: sigmoid scores, 4 groups keep 2, correction bias, scaled weights
        kw = dict(renormalize=True, use_grouped_topk=True, num_expert_group=4, topk_group=2, scoring_func="sigmoid",
                  routed_scaling_factor=2.5, e_score_correction_bias=torch.linspace(-0.2, 0.2, E))
    layer = FusedMoE(E, K, H, I, params_dtype=torch.float32, backend="reference", **kw)
    load_into(layer, sd)
    x = torch.randn(T, H)
    logits = torch.randn(T, E)
    out = layer(x, logits)
    w, ids = layer.route(x, logits)
    w13, w2 = dense_from(sd, E)
    ref = moe_loop_f64(x, w13, w2, w, ids)
    assert rel_err(out, ref) <= 1e-5


def test_three_d_tensor_loads_all_experts():
    E, K, H, I = 4, 2, 16, 8
    layer = FusedMoE(E, K, H, I, params_dtype=torch.float32)
    w13 = torch.randn(E, 2 * I, H)
    layer.weight_loader(layer.w13_weight, w13[:, :I], "gate_all", "w1", None)
    layer.weight_loader(layer.w13_weight, w13[:, I:], "up_all", "w3", None)
    assert torch.equal(layer.w13_weight, w13)


def test_shape_and_dtype_errors_name_everything():
    layer = FusedMoE(4, 2, 16, 8, params_dtype=torch.float32, prefix="model.layers.3.mlp.experts")
    with pytest.raises(ValueError, match=r"w13_weight: expert 1 shard w1: checkpoint tensor has shape \(8, 15\), expected \(8, 16\)"):
        layer.weight_loader(layer.w13_weight, torch.randn(8, 15), "k", "w1", 1)
    with pytest.raises(ValueError, match=r"dtype torch.int32, expected torch.float32"):
        layer.weight_loader(layer.w2_weight, torch.zeros(16, 8, dtype=torch.int32), "k", "w2", 0)
    with pytest.raises(ValueError, match="shard w2 cannot load into w13_weight"):
        layer.weight_loader(layer.w13_weight, torch.randn(8, 16), "k", "w2", 0)
    with pytest.raises(ValueError, match="expert_id 9 out of range"):
        layer.weight_loader(layer.w2_weight, torch.randn(16, 8), "k", "w2", 9)


def test_missing_tensor_is_reported():
    E, H, I = 3, 16, 8
    sd = make_checkpoint(E, H, I)
    del sd["mlp.experts.2.up_proj.weight"]
    layer = FusedMoE(E, 2, H, I, params_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"never loaded: w13_weight\[expert 2, w3\]"):
        load_into(layer, sd)


def test_bf16_checkpoint_converts_into_fp32_layer():
    layer = FusedMoE(2, 1, 16, 8, params_dtype=torch.float32)
    t = torch.randn(8, 16).bfloat16()
    layer.weight_loader(layer.w13_weight, t, "k", "w1", 0)
    assert torch.equal(layer.w13_weight[0, :8], t.float())


def test_tensor_parallel_ranks_sum_to_the_full_layer():
    E, K, H, I, T = 4, 2, 16, 12, 9
    sd = make_checkpoint(E, H, I, bias=True)
    x, logits = torch.randn(T, H), torch.randn(T, E)
    full = FusedMoE(E, K, H, I, params_dtype=torch.float32, has_bias=True)
    load_into(full, sd)
    parts = []
    for rank in range(2):
        layer = FusedMoE(E, K, H, I, params_dtype=torch.float32, has_bias=True, tp_size=2, tp_rank=rank)
        load_into(layer, sd)
        assert layer.w13_weight.shape == (E, I, H)
        parts.append(layer(x, logits))
    assert rel_err(parts[0] + parts[1], full(x, logits)) <= 1e-6


def test_expert_parallel_ranks_sum_to_the_full_layer():
    E, K, H, I, T = 5, 2, 16, 8, 11
    sd = make_checkpoint(E, H, I)
    x, logits = torch.randn(T, H), torch.randn(T, E)
    full = FusedMoE(E, K, H, I, params_dtype=torch.float32)
    load_into(full, sd)
    parts = []
    for rank in range(2):
        layer = FusedMoE(E, K, H, I, params_dtype=torch.float32, ep_size=2, ep_rank=rank)
        assert layer.local_num_experts == (2 if rank == 0 else 3)  # linear placement, remainder on the last rank
        load_into(layer, sd)
        parts.append(layer(x, logits))
    assert rel_err(parts[0] + parts[1], full(x, logits)) <= 1e-6


def test_reduce_results_without_process_group_is_a_clear_error():
    layer = FusedMoE(4, 2, 16, 8, params_dtype=torch.float32, tp_size=2, reduce_results=True)
    layer.load_dense_weights(torch.randn(4, 8, 16), torch.randn(4, 16, 4))
    with pytest.raises(RuntimeError, match="reduce_results=True"):
        layer(torch.randn(3, 16), torch.randn(3, 4))


@pytest.mark.parametrize("flag,value", [("enable_eplb", True), ("dp_size", 2), ("num_redundant_experts", 1)])
def test_later_features_raise_not_implemented(flag, value):
    with pytest.raises(NotImplementedError, match=flag):
        FusedMoE(4, 2, 16, 8, **{flag: value})


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="activation"):
        FusedMoE(4, 2, 16, 8, activation="relu")
    with pytest.raises(ValueError, match="top_k"):
        FusedMoE(4, 5, 16, 8)
    with pytest.raises(KeyError, match="unknown MoE quantization scheme 'int3'"):
        FusedMoE(4, 2, 16, 8, quant_config="int3")


def test_zero_tokens():
    layer = FusedMoE(4, 2, 16, 8, params_dtype=torch.float32)
    layer.load_dense_weights(torch.randn(4, 16, 16), torch.randn(4, 16, 8))
    assert layer(torch.randn(0, 16), torch.randn(0, 4)).shape == (0, 16)
