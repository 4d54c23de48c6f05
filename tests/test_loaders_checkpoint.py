"""Checkpoint on small hand-written Mixtral-style checkpoints (no transformers): a plain per-expert loop as the
reference, expert/tensor-parallel loading that reads only the rank's bytes, the inspect CLI, and bad input.

H hidden, I intermediate, E experts, K top-k, T tokens.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moequant.checkpoint import Checkpoint, open_checkpoint
from moequant.loaders.architectures import ARCHITECTURES, find_architecture, moe_layer_indices
from moequant.loaders.inspect_cli import inspect_main
from moequant.loaders.safetensors_index import CheckpointError

H, I, E, K, LAYERS = 32, 24, 6, 2, 2  # E = 6 so that ep_size=4 gives ranks of unequal size (1, 1, 1, 3)


def _config(**over):
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": H,
           "intermediate_size": I, "num_local_experts": E, "num_experts_per_tok": K, "num_hidden_layers": LAYERS,
           "hidden_act": "silu"}
    return {**cfg, **over}


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for L in range(LAYERS):
        b = f"model.layers.{L}.block_sparse_moe"
        t[f"{b}.gate.weight"] = torch.randn(E, H, generator=g) * 0.5
        for e in range(E):
            t[f"{b}.experts.{e}.w1.weight"] = torch.randn(I, H, generator=g) * 0.2
            t[f"{b}.experts.{e}.w3.weight"] = torch.randn(I, H, generator=g) * 0.2
            t[f"{b}.experts.{e}.w2.weight"] = torch.randn(H, I, generator=g) * 0.2
        t[f"model.layers.{L}.self_attn.q_proj.weight"] = torch.randn(H, H, generator=g)  # not ours, never read
    return t


def _write(folder, tensors=None, config=None, shards=1):
    folder.mkdir(parents=True, exist_ok=True)
    tensors = _tensors() if tensors is None else tensors
    (folder / "config.json").write_text(json.dumps(config or _config()))
    if shards == 1:
        save_file(tensors, folder / "model.safetensors")
        return folder
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, folder / fname)
        weight_map |= {n: fname for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _reference(t, L, x):
    """out[t] = sum_k w_k * W2 (silu(W1 x) * W3 x): softmax, top-K, renormalised (Mixtral)."""
    b = f"model.layers.{L}.block_sparse_moe"
    p = (x @ t[f"{b}.gate.weight"].T).softmax(-1)
    w, ids = p.topk(K, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for k in range(K):
            e = int(ids[i, k])
            h = torch.nn.functional.silu(t[f"{b}.experts.{e}.w1.weight"] @ x[i]) * (t[f"{b}.experts.{e}.w3.weight"] @ x[i])
            out[i] += w[i, k] * (t[f"{b}.experts.{e}.w2.weight"] @ h)
    return out


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("mixtral"), shards=3)


def test_matches_the_per_expert_loop(sharded):
    t = _tensors()
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(1))
    with open_checkpoint(sharded) as ck:
        assert ck.moe_layers == (0, 1) and ck.architecture == "MixtralForCausalLM"
        assert (ck.settings.num_experts, ck.settings.top_k, ck.settings.intermediate_size) == (E, K, I)
        assert ck.scheme_of(1).scheme == "unquantized"
        for L in ck.moe_layers:
            block = ck.moe_block(L, dtype=torch.float32, backend="reference")
            assert _rel(block(x), _reference(t, L, x)) < 1e-5
        # the default dtype is bf16: same result within bf16 rounding
        assert _rel(ck.moe_block(1, backend="reference")(x.bfloat16()), _reference(t, 1, x)) < 2e-2


def test_opening_reads_only_headers(sharded):
    with open_checkpoint(sharded) as ck:
        assert ck.index.bytes_read == ck.index.header_bytes
        assert ck.index.header_bytes < ck.size_bytes / 20


def _expert_bytes_of(ck, L, experts):
    b = f"model.layers.{L}.block_sparse_moe.experts."
    return sum(ck.index.info(k).nbytes for k in ck.index.with_prefix(b) if int(k[len(b):].split(".")[0]) in experts)


@pytest.mark.parametrize("tp_size, ep_size", [(2, 1), (1, 2), (3, 1), (1, 4), (2, 2)])
def test_parallel_ranks_sum_to_the_full_block_and_read_only_their_bytes(sharded, tp_size, ep_size):
    x = torch.randn(7, H, generator=torch.Generator().manual_seed(2))
    router_bytes = E * H * 4
    with open_checkpoint(sharded) as ck:
        full = ck.moe_block(1, dtype=torch.float32, backend="reference")(x)
        total = torch.zeros_like(full)
        for ep in range(ep_size):
            for tp in range(tp_size):
                before = ck.index.bytes_read
                block = ck.moe_block(1, dtype=torch.float32, backend="reference",
                                     tp_rank=tp, tp_size=tp_size, ep_rank=ep, ep_size=ep_size)
                local = [block.experts.global_expert_id(i) for i in range(block.experts.local_num_experts)]
                # this rank's experts only, and of each only its 1/tp of the rows (w1, w3) or columns (w2)
                assert ck.index.bytes_read - before == router_bytes + _expert_bytes_of(ck, 1, set(local)) // tp_size
                total += block(x)
        assert _rel(total, full) < 1e-5


def test_inspect_cli(sharded, capsys):
    assert inspect_main([str(sharded)]) == 0
    out = capsys.readouterr().out
    assert "MixtralForCausalLM" in out and f"E={E} K={K} H={H} I={I}" in out
    assert "unquantized (unquantized, dense): layers 0-1" in out and "3 file(s)" in out
    assert inspect_main([str(sharded), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["moe_layers"] == "0-1" and d["geometry"]["renormalize"] is True and d["shards"] == 3
    assert inspect_main([str(sharded / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_online_quant_config_only_for_unquantized(tmp_path):
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    folder = _write(tmp_path / "fp8", config=_config(quantization_config=qc))
    with open_checkpoint(folder) as ck:
        assert ck.scheme_of(0).scheme == "fp8-block"
        with pytest.raises(ValueError, match="fp8-block needs hidden_size to be a multiple of 128, got 32"):
            ck.moe_block(0)  # the geometry cannot hold 128x128 blocks (quantized loading: test_loaders_quantized.py)
        with pytest.raises(ValueError, match="already fp8-block"):
            ck.moe_block(0, quant_config="fp8-tensor")


# --- MoE layer rules and the table ------------------------------------------------------------------------------
def test_moe_layer_rules():
    ds = find_architecture({"architectures": ["DeepseekV3ForCausalLM"]})
    assert moe_layer_indices({"first_k_dense_replace": 3}, ds, 6) == [3, 4, 5]
    assert moe_layer_indices({"first_k_dense_replace": 1, "moe_layer_freq": 2}, ds, 6) == [2, 4]
    qw = find_architecture({"model_type": "qwen2_moe"})
    assert moe_layer_indices({"decoder_sparse_step": 2, "mlp_only_layers": [3]}, qw, 6) == [1, 5]
    assert moe_layer_indices({}, find_architecture({"architectures": ["OlmoeForCausalLM"]}), 3) == [0, 1, 2]
    assert len({s.name for s in ARCHITECTURES}) == len(ARCHITECTURES)
    with pytest.raises(ValueError, match="unsupported architecture \\['LlamaForCausalLM'\\].*supported: MixtralForCausalLM"):
        find_architecture({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})


# --- bad input: each names the file and tensor, and no partial layer comes back ---------------------------------
def test_layer_that_is_not_moe(tmp_path):
    folder = _write(tmp_path / "c")
    with open_checkpoint(folder) as ck, pytest.raises(ValueError, match="layer 2 is not an MoE layer .* MoE layers: 0-1"):
        ck.moe_block(2)


def test_missing_config_and_unknown_architecture(tmp_path):
    folder = _write(tmp_path / "c")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing config.json"):
        open_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({"architectures": ["Foo"], "model_type": "foo"}))
    with pytest.raises(ValueError, match="unsupported architecture \\['Foo'\\]"):
        open_checkpoint(folder)


def test_config_that_disagrees_with_the_tensors(tmp_path):
    # more experts in the config than the router has rows: caught on open, naming the router tensor and file
    with pytest.raises(CheckpointError, match="model.safetensors: router model.layers.0.block_sparse_moe.gate.weight "
                                              "has shape \\[6, 32\\], but config.json gives \\[E, H\\] = \\[8, 32\\]"):
        open_checkpoint(_write(tmp_path / "a", config=_config(num_local_experts=8)))
    # a wrong intermediate size is caught when the layer loads, naming the expert tensor and file
    with open_checkpoint(_write(tmp_path / "b", config=_config(intermediate_size=16))) as ck:
        with pytest.raises(CheckpointError, match="model.safetensors: tensor model.layers.0.block_sparse_moe.experts.0."
                                                  "w\\d.weight: .*shape \\(\\d+, \\d+\\), expected"):
            ck.moe_block(0, dtype=torch.float32)
    # a layer the config calls MoE without a router
    with pytest.raises(CheckpointError, match="makes layer 2 an MoE layer, but the checkpoint has no router tensor "
                                              "model.layers.2.block_sparse_moe.gate.weight"):
        open_checkpoint(_write(tmp_path / "c", config=_config(num_hidden_layers=3)))


def test_missing_and_unexpected_expert_tensors(tmp_path):
    t = _tensors()
    del t["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    with open_checkpoint(_write(tmp_path / "a", t)) as ck:
        ck.moe_block(0, dtype=torch.float32)  # the other layer is complete
        with pytest.raises(CheckpointError, match="missing tensor model.layers.1.block_sparse_moe.experts.2.w3.\\* "
                                                  "\\(expert 2 of 6\\)"):
            ck.moe_block(1, dtype=torch.float32)
        # an expert parallel rank that does not hold expert 2 loads fine (E=6, ep_size=2: rank 1 holds 3-5)
        ck.moe_block(1, dtype=torch.float32, ep_rank=1, ep_size=2)
    t = _tensors()
    t["model.layers.0.block_sparse_moe.experts.6.w1.weight"] = torch.zeros(I, H)
    with open_checkpoint(_write(tmp_path / "b", t)) as ck:
        with pytest.raises(CheckpointError, match="tensor model.layers.0.block_sparse_moe.experts.6.w1.weight is not a "
                                                  "w1/w3/w2 tensor of experts 0..5"):
            ck.moe_block(0, dtype=torch.float32)
    t = _tensors()
    t["model.layers.0.block_sparse_moe.experts.1.w1.weight_scale"] = torch.ones(1)
    with open_checkpoint(_write(tmp_path / "c", t)) as ck:
        with pytest.raises(CheckpointError, match="experts.1.w1.weight_scale has no place in the unquantized layer"):
            ck.moe_block(0, dtype=torch.float32)


def test_wrong_dtype(tmp_path):
    t = _tensors()
    t["model.layers.0.block_sparse_moe.experts.3.w2.weight"] = torch.zeros(H, I, dtype=torch.int32)
    with open_checkpoint(_write(tmp_path / "a", t)) as ck:
        with pytest.raises(CheckpointError, match="model.safetensors: tensor model.layers.0.block_sparse_moe.experts.3."
                                                  "w2.weight: .*dtype torch.int32"):
            ck.moe_block(0, dtype=torch.float32)


def test_router_in_a_dense_layer_and_corrupt_shard(tmp_path):
    cfg = {**_config(), "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": E,
           "moe_intermediate_size": I, "mlp_only_layers": [1]}
    t = {k.replace("block_sparse_moe", "mlp").replace(".w1.", ".gate_proj.").replace(".w3.", ".up_proj.")
         .replace(".w2.", ".down_proj."): v for k, v in _tensors().items()}
    with pytest.raises(CheckpointError, match="config.json makes layer 1 a dense layer, but the checkpoint has the "
                                              "router tensor model.layers.1.mlp.gate.weight"):
        open_checkpoint(_write(tmp_path / "a", t, cfg))
    folder = _write(tmp_path / "b", shards=2)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: truncated safetensors file: tensor"):
        open_checkpoint(folder)


def test_checkpoint_class_directly(tmp_path):
    folder = _write(tmp_path / "a")
    ck = Checkpoint(folder)
    assert "E=6, K=2, H=32, I=24" in repr(ck)
    assert ck.expert_bytes(0) == E * 3 * I * H * 4
    assert load_file(folder / "model.safetensors").keys() == set(ck.index.names())
    ck.close()
