"""Another architecture and `--targets all`: a tiny random Qwen2-MoE (dense first layer, shared expert with its gate)
saved by transformers, quantized with GPTQ over every decoder Linear; routers, the shared-expert gate and lm_head stay
unquantized and are listed in `ignore`; config targets "Linear"; layout equals llm-compressor's for targets Linear.
"""

import json

import pytest
import torch

from _quant_helpers import decompress_folder, sqnr
from moequant.quantize.api import quantize_checkpoint


@pytest.fixture(scope="module")
def qwen2moe(tmp_path_factory):
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    from moequant.data.byte_tokenizer import ByteTokenizer

    cfg = Qwen2MoeConfig(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                         shared_expert_intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[0],
                         max_position_embeddings=256)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("qwen2moe")
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(folder)
    ByteTokenizer().save(folder)  # calibration text is tokenized byte by byte
    text = folder.parent / "calib.txt"
    text.write_text(open(json.__file__).read() * 4)
    return folder, text


def test_gptq_targets_all_qwen2_moe(qwen2moe, tmp_path):
    from safetensors import safe_open

    folder, text = qwen2moe
    out = quantize_checkpoint(folder, tmp_path / "o", scheme="w4a16-asym", group_size=32, algo="gptq",
                              calib=text, num_samples=4, seq_len=128, targets="all", min_tokens=16, progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert set(qc["ignore"]) == {"model.layers.1.mlp.gate", "model.layers.2.mlp.gate", "lm_head",
                                 "model.layers.1.mlp.shared_expert_gate", "model.layers.2.mlp.shared_expert_gate"}
    deq = decompress_folder(out)
    with safe_open(str(folder / "model.safetensors"), "pt") as src:
        names = [k[: -len(".weight")] for k in src.keys() if k.endswith("proj.weight")]
        assert sorted(deq) == sorted(names)  # attention, dense MLP, shared and routed experts: every Linear
        for m, w in deq.items():
            assert sqnr(src.get_tensor(m + ".weight").float(), w) > 15, m
    rep = json.loads((out / "quantize_report.json").read_text())
    assert rep["tokens_per_module"]["model.layers.0.mlp.down_proj"] == 4 * 128  # dense layer sees every token
    assert rep["tokens_per_module"]["model.layers.1.mlp.shared_expert.up_proj"] == 4 * 128
    from moequant import open_checkpoint

    with open_checkpoint(out) as ck:
        assert ck.scheme_of(1).scheme == "w4a16-asym"


def test_targets_all_layout_equals_llm_compressor(qwen2moe, tmp_path):
    pytest.importorskip("llmcompressor")
    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    folder, _ = qwen2moe
    ours = quantize_checkpoint(folder, tmp_path / "o", scheme="w4a16", group_size=32, targets="all", progress=False)
    s = preset_name_to_scheme("W4A16", ["Linear"])
    s.weights.group_size = 32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    mod = QuantizationModifier(ignore=["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"],
                               config_groups={"group_0": s})
    oneshot(model=model, recipe=[mod], output_dir=str(tmp_path / "llmc"))

    def layout(f):
        idx = json.loads((f / "model.safetensors.index.json").read_text())["weight_map"] \
            if (f / "model.safetensors.index.json").exists() else None
        out = {}
        for p in sorted(f.glob("*.safetensors")):
            with safe_open(str(p), "pt") as sf:
                out.update({k: (sf.get_slice(k).get_dtype(), tuple(sf.get_slice(k).get_shape())) for k in sf.keys()})
        assert idx is None or set(idx) == set(out)
        return out

    from safetensors import safe_open

    assert layout(ours) == layout(tmp_path / "llmc")
    a = json.loads((ours / "config.json").read_text())["quantization_config"]
    b = json.loads((tmp_path / "llmc" / "config.json").read_text())["quantization_config"]
    assert a["config_groups"] == b["config_groups"] and set(a["ignore"]) == set(b["ignore"])
