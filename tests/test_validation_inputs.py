"""Bad input to the validator: checkpoints of another architecture or geometry, --layers naming a dense or missing
layer, an empty / binary / non-UTF-8 --calib file. Each error names the checkpoint, file or flag."""

import json
import re
from types import SimpleNamespace

import pytest
import torch

from moequant.data import demo_model_path
from moequant.validation import ValidationError, validate
from moequant.validation.inputs import parse_layers, read_text, select_layers
from moequant.validation.synthetic import perturbed_copy

REF = demo_model_path()


def _as_mixtral(src, out):
    """The demo model's tensors under Mixtral's names (block_sparse_moe, w1/w2/w3) and a Mixtral config."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    sd = load_file(str(src / "model.safetensors"))
    names = {"mlp.gate.": "block_sparse_moe.gate.", "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    new = {}
    for k, v in sd.items():
        if ".mlp." in k:
            for a, b in names.items():
                k = k.replace(a, b)
            k = k.replace(".mlp.experts.", ".block_sparse_moe.experts.")
        new[k] = v
    save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=8,
               intermediate_size=cfg["moe_intermediate_size"])
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "byte_tokenizer.json").write_text((src / "byte_tokenizer.json").read_text())
    return out


def test_different_architecture(tmp_path):
    mix = _as_mixtral(REF, tmp_path / "mixtral")
    with pytest.raises(ValidationError, match=r"REF .*Qwen3MoeForCausalLM.* QUANT .*mixtral.*MixtralForCausalLM"):
        validate(REF, mix)


def test_different_geometry(tmp_path):
    q = perturbed_copy(REF, tmp_path / "q", {}, config_edits={"num_experts_per_tok": 4})
    with pytest.raises(ValidationError, match=re.escape("top_k: REF 2 vs QUANT 4")):
        validate(REF, q)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(ValidationError, match=r"QUANT .*nowhere"):
        validate(REF, tmp_path / "nowhere")


def test_layers_must_be_moe_layers():
    ck = SimpleNamespace(moe_layers=(1, 3), num_layers=4, name="ckpt")
    with pytest.raises(ValidationError, match=r"--layers: layer\(s\) \[2\] are dense \(not MoE\) layers of ckpt"):
        select_layers(ck, [1, 2], "--layers")
    with pytest.raises(ValidationError, match=r"--layers: layer\(s\) \[7\] are outside 0..3"):
        select_layers(ck, "3,7", "--layers")
    assert select_layers(ck, None) == [1, 3] and select_layers(ck, "3,1") == [1, 3]
    assert parse_layers("0-2, 5") == [0, 1, 2, 5]
    for bad in ("a", "3-1", ",", "1--2"):
        with pytest.raises(ValidationError, match="--layers"):
            parse_layers(bad)
    with pytest.raises(ValidationError, match=r"--layers: layer\(s\) \[4\] are outside 0..3 of .*demo_model"):
        validate(REF, REF, layers=[4])


@pytest.mark.parametrize("content, why", [
    (b"", "empty"), (b"  \n\n", "empty"), (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    (b"caf\xe9 au lait\n", "not UTF-8"), (bytes(range(1, 32)) * 50, "does not look like text"),
])
def test_bad_calib_file_is_named(tmp_path, content, why):
    f = tmp_path / "calib.bin"
    f.write_bytes(content)
    with pytest.raises(ValidationError, match=rf"--calib {re.escape(str(f))}: .*{why}"):
        validate(REF, REF, calib=f)
    with pytest.raises(ValidationError, match=r"--calib .*missing.txt: no such file"):
        read_text(tmp_path / "missing.txt")


def test_calib_text_is_used(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("def add(a, b):\n    return a + b\n" * 20)
    rep = validate(REF, REF, calib=f, tokens=10_000, layers=[0])
    assert rep.end_to_end.text_source == str(f)
    assert rep.end_to_end.tokens == len(f.read_bytes())  # byte tokens: <bos> + N bytes -> N predictions
    assert rep.layers[0].tokens == rep.end_to_end.tokens


def test_mixtral_runs_end_to_end_and_random_inputs_without_transformers(tmp_path, monkeypatch):
    # a second architecture (Mixtral names, block_sparse_moe in the checkpoint, .mlp in transformers 5)
    mix = _as_mixtral(REF, tmp_path / "mixtral")
    q = perturbed_copy(mix, tmp_path / "q", {"model.layers.1.block_sparse_moe.experts.0.w2.weight": lambda w: w * 1.1})
    rep = validate(mix, q, tokens=128, inputs="real")
    assert rep.end_to_end is not None and rep.end_to_end.max_abs_logit_diff_ref_moequant < 1e-3
    assert rep.layers[1].experts[0].probe_sqnr_db == pytest.approx(20.0, abs=1e-3)
    # transformers without the architecture: random inputs with the layer's scale, end to end skipped (said why)
    from moequant.validation import hf_model

    monkeypatch.setattr(hf_model, "transformers_has", lambda ck: "transformers 0 has no MixtralForCausalLM")
    rep = validate(mix, q, tokens=64)
    assert [L.inputs for L in rep.layers] == ["random"] * 4 and rep.end_to_end is None
    assert "has no MixtralForCausalLM" in rep.end_to_end_skipped
    assert rep.layers[1].experts[0].probe_sqnr_db == pytest.approx(20.0, abs=1e-3)
    with pytest.raises(ValidationError, match="inputs='real' needs REF"):
        validate(mix, q, inputs="real")
    assert torch.isfinite(torch.tensor(rep.layers[1].sqnr_db))


def test_ref_without_tokenizer_falls_back_to_random_inputs(tmp_path):
    ref = perturbed_copy(REF, tmp_path / "ref", {})
    (ref / "byte_tokenizer.json").unlink()
    rep = validate(ref, REF, tokens=64, layers=[0])
    assert rep.layers[0].inputs == "random" and rep.end_to_end is None
    assert "no tokenizer" in rep.end_to_end_skipped and rep.layers[0].sqnr_db > 100  # bf16 -> fp32 copy: exact
    with pytest.raises(ValidationError, match="no tokenizer"):
        validate(ref, REF, tokens=64, layers=[0], inputs="real")
