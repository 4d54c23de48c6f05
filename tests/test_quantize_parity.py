"""Layout parity with llm-compressor: for each scheme, llmcompressor.oneshot (QuantizationModifier, RTN, CPU) on the
demo model writes the same tensor names, dtypes and shapes as moequant quantize, bit-identical weights and weight scales,
the same config group, and a config compressed-tensors' QuantizationConfig parses; RTN weight SQNR per scheme is
equal to llm-compressor's (within 0.1 dB).
"""

import json

import pytest
import torch

from _quant_helpers import CALIB, PRESETS, decompress_folder, group_for, quantized, sqnr
from moequant.data import demo_model_path
from moequant.quantize.schemes import SCHEMES

pytest.importorskip("llmcompressor")


def _calib_dataset():
    from datasets import Dataset

    from moequant.data.stdlib_corpus import read_files, split_files

    texts = read_files(split_files()[1][:CALIB["num_samples"]])
    ids = [list(v[: CALIB["seq_len"]]) for v in texts.values()]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]})


def llmc_output(scheme: str, targets: list[str], out):
    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.bfloat16)
    s = preset_name_to_scheme(PRESETS[scheme], targets)
    if group_for(scheme):
        s.weights.group_size = group_for(scheme)
    kw = {}
    if SCHEMES[scheme].static_input:
        kw = dict(dataset=_calib_dataset(), num_calibration_samples=CALIB["num_samples"],
                  max_seq_length=CALIB["seq_len"])
    mod = QuantizationModifier(ignore=["lm_head", "re:.*mlp.gate$"], config_groups={"group_0": s})
    oneshot(model=model, recipe=[mod], output_dir=str(out), **kw)
    return out


def _tensors(folder):
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_layout_and_rtn_parity_with_llm_compressor(scheme, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig

    ours = quantized(scheme)
    qc = json.loads((ours / "config.json").read_text())["quantization_config"]
    cfg = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k in QuantizationConfig.model_fields})
    assert cfg.quantization_status == "compressed" and cfg.format == SCHEMES[scheme].format
    assert "lm_head" in cfg.ignore and "model.layers.0.mlp.gate" in cfg.ignore

    theirs = llmc_output(scheme, cfg.config_groups["group_0"].targets, tmp_path / "llmc")
    tq = json.loads((theirs / "config.json").read_text())["quantization_config"]
    assert tq["config_groups"]["group_0"] == qc["config_groups"]["group_0"]
    assert tq["format"] == qc["format"] and tq["quant_method"] == qc["quant_method"]

    a, b = _tensors(ours), _tensors(theirs)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in a.items()} == {k: (v.dtype, tuple(v.shape)) for k, v in b.items()}
    for k in a:  # RTN: the same bytes, input scales aside (calibration pipelines differ)
        if ".input_" not in k:
            assert torch.equal(_bits(a[k]), _bits(b[k])), k

    src = _tensors(demo_model_path())
    da, db = decompress_folder(ours), decompress_folder(theirs)
    ref = torch.cat([src[m + ".weight"].float().flatten() for m in sorted(da)])
    s_ours = sqnr(ref, torch.cat([da[m].flatten() for m in sorted(da)]))
    s_llmc = sqnr(ref, torch.cat([db[m].flatten() for m in sorted(da)]))
    print(f"{scheme}: weight SQNR moequant {s_ours:.3f} dB, llm-compressor {s_llmc:.3f} dB")
    assert s_ours >= s_llmc - 0.1
