"""The validator end to end on the other architectures (tiny random Mixtral, OLMoE and DeepSeek-V3 from the quantizer's
architecture tests): the REF-through-moequant sanity path equals transformers, and a w4a16 QUANT gives finite,
plausible figures for every MoE layer (DeepSeek's dense layer 0 is not an MoE layer)."""

import math

import pytest

import moequant
from test_quantize_architectures import ARCHS, MOE_LAYERS, calib, source  # noqa: F401  (fixtures)


@pytest.mark.parametrize("name", ARCHS)
def test_validate_end_to_end(source, calib, tmp_path, name):  # noqa: F811
    folder, _ = source(name)
    out = tmp_path / "q"
    moequant.quantize_checkpoint(folder, out, scheme="w4a16", group_size=32, progress=False)
    report = moequant.validate(folder, out, calib=calib, tokens=256, seq_len=64, json_path=tmp_path / "r.json")
    assert [r.layer for r in report.layers] == list(MOE_LAYERS[name])
    assert all(10 < r.sqnr_db < 60 and r.cosine > 0.9 for r in report.layers), [r.sqnr_db for r in report.layers]
    e = report.end_to_end
    assert e is not None, report.end_to_end_skipped
    assert e.kl_ref_moequant < 1e-8 and e.ppl_ref_moequant == pytest.approx(e.ppl_ref, rel=1e-6)
    assert 0 < e.kl < 0.1 and math.isfinite(e.ppl_quant) and 0.9 < e.ppl_ratio < 1.1
    assert (tmp_path / "r.json").is_file()
    assert e.tokens == 256
