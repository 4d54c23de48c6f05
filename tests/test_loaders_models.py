"""Tiny transformers models of every supported architecture, saved with save_pretrained (single file and
sharded), opened with moequant and compared with the architecture's own transformers MoE module.

fp32, backend "reference", <= 1e-4 relative error. Routers get larger weights than the default init so that
routing is decisive, experts larger weights so that outputs are of the inputs' size (and DeepSeek's correction bias, gpt-oss's router and expert biases are non-zero), and
gpt-oss's expert weights are large enough that its activation clamp (|x| > 7) is active.
"""

import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moequant.checkpoint import open_checkpoint  # noqa: E402

H = 32
COMMON = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, vocab_size=64, num_experts_per_tok=2)


def _configs():
    return {
        "mixtral": transformers.MixtralConfig(**COMMON, intermediate_size=48, num_key_value_heads=2, num_local_experts=4),
        # shared expert (I_s = 40) with its sigmoid gate; norm_topk_prob False: weights not renormalised
        "qwen2_moe": transformers.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=24,
                                                 shared_expert_intermediate_size=40, num_key_value_heads=2,
                                                 num_experts=4),
        "qwen3_moe": transformers.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=24,
                                                 num_key_value_heads=2, num_experts=8, head_dim=8, norm_topk_prob=True),
        "olmoe": transformers.OlmoeConfig(**COMMON, intermediate_size=24, num_key_value_heads=2, num_experts=4),
        # sigmoid scoring, 4 groups keep 2, correction bias, scaling 2.5, shared experts, layer 0 dense
        "deepseek_v3": transformers.DeepseekV3Config(
            **COMMON, intermediate_size=48, moe_intermediate_size=24, num_key_value_heads=4, n_routed_experts=8,
            n_shared_experts=2, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
        # softmax, group-limited greedy (group max), no renormalisation, scaling 1.5
        "deepseek_v2": transformers.DeepseekV2Config(
            **COMMON, intermediate_size=48, moe_intermediate_size=24, num_key_value_heads=4, n_routed_experts=8,
            n_shared_experts=1, n_group=4, topk_group=2, topk_method="group_limited_greedy", norm_topk_prob=False,
            routed_scaling_factor=1.5, first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
        # fused interleaved gate_up on disk, expert and router biases, clamped swiglu
        "gpt_oss": transformers.GptOssConfig(**COMMON, intermediate_size=24, num_key_value_heads=2,
                                             num_local_experts=4, head_dim=8),
    }


def _randomize(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if ".mlp." not in name:
                continue
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith(("router.bias", "e_score_correction_bias", "_proj_bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith("experts.gate_up_proj") and "gpt_oss" in type(model).__module__:
                p.copy_(torch.randn(p.shape, generator=g) * 0.8)
            elif p.dim() >= 2:  # expert and shared-expert weights: outputs of the size of the inputs
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _build(name, folder, **save_kw):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_configs()[name], dtype=torch.float32)
    _randomize(model)
    model.save_pretrained(folder, **save_kw)
    return model.eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            cache[name] = (_build(name, folder), folder)
        return cache[name]

    return get


def _hf_block(model, L, x):
    out = model.model.layers[L].mlp(x)
    return out[0] if isinstance(out, tuple) else out


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


EXPECTED_LAYERS = {"deepseek_v3": (1,)}


@pytest.mark.parametrize("name", list(_configs()))
def test_moe_block_matches_transformers(built, name):
    model, folder = built(name)
    x = torch.randn(3, 7, H, generator=torch.Generator().manual_seed(1))
    with open_checkpoint(folder) as ck:
        assert ck.moe_layers == EXPECTED_LAYERS.get(name, (0, 1))
        assert ck.spec.name == name
        for L in ck.moe_layers:
            block = ck.moe_block(L, dtype=torch.float32, backend="reference")
            with torch.no_grad():
                ref = _hf_block(model, L, x)
                out = block(x)
            assert out.shape == x.shape
            assert _rel(out, ref) <= 1e-4, (name, L)
            assert ref.norm() > 0.1 * x.norm()  # the block's output is not negligible


def test_routing_settings_read_from_config(built):
    _, folder = built("deepseek_v3")
    with open_checkpoint(folder) as ck:
        s = ck.settings
        assert (s.scoring_func, s.use_grouped_topk, s.num_expert_group, s.topk_group) == ("sigmoid", True, 4, 2)
        assert s.renormalize and s.routed_scaling_factor == 2.5 and ck.has_correction_bias
        assert ck.shared_intermediate_size == 48  # moe_intermediate_size x n_shared_experts
        with pytest.raises(ValueError, match="layer 0 is not an MoE layer"):
            ck.moe_block(0)
    _, folder = built("gpt_oss")
    with open_checkpoint(folder) as ck:
        assert ck.settings.activation == "swigluoai" and ck.settings.has_bias and ck.settings.router_bias
    _, folder = built("qwen2_moe")
    with open_checkpoint(folder) as ck:
        assert not ck.settings.renormalize and ck.shared_intermediate_size == 40


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_sharded_save_loads_the_same(built, tmp_path, name):
    model, single = built(name)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(3))
    with open_checkpoint(tmp_path) as sharded, open_checkpoint(single) as one:
        assert len(sharded.index.files) > 1
        assert sharded.index.bytes_read == sharded.index.header_bytes
        L = one.moe_layers[-1]
        a = sharded.moe_block(L, dtype=torch.float32, backend="reference")(x)
        b = one.moe_block(L, dtype=torch.float32, backend="reference")(x)
        assert torch.equal(a, b)


@pytest.mark.parametrize("name, tp_size, ep_size", [
    ("qwen2_moe", 2, 1),    # shared expert split over tp, its gate applied per rank
    ("qwen2_moe", 1, 2),    # shared expert only on ep rank 0
    ("deepseek_v3", 2, 2),  # grouped top-k + correction bias with both kinds of parallelism
    ("gpt_oss", 4, 1),      # interleaved gate_up sliced per rank; w2 bias added once
    ("gpt_oss", 1, 3),      # E=4 over 3 ranks: 1, 1, 2 experts
])
def test_parallel_ranks_sum_to_transformers(built, name, tp_size, ep_size):
    model, folder = built(name)
    x = torch.randn(11, H, generator=torch.Generator().manual_seed(4))
    with open_checkpoint(folder) as ck:
        L = ck.moe_layers[-1]
        total = sum(ck.moe_block(L, dtype=torch.float32, backend="reference", tp_rank=t, tp_size=tp_size,
                                 ep_rank=e, ep_size=ep_size)(x)
                    for t in range(tp_size) for e in range(ep_size))
        with torch.no_grad():
            assert _rel(total, _hf_block(model, L, x[None])[0]) <= 1e-4


def test_hub_id_from_the_offline_cache(built, tmp_path):
    _, folder = built("olmoe")
    commit = "b" * 40
    repo = tmp_path / "models--tiny--olmoe"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    with open_checkpoint("tiny/olmoe", local_files_only=True, cache_dir=tmp_path) as ck:
        assert ck.architecture == "OlmoeForCausalLM" and ck.name == "tiny/olmoe"
        assert ck.moe_block(0, dtype=torch.float32, backend="reference")(torch.randn(2, H)).shape == (2, H)
