"""RTN edge cases per scheme: an all-zero (dead) expert gets finite scales, a warning and dequantizes to zeros;
NVFP4 gate and up of one expert share their second-level (global) scale; bad weights are refused by name."""

import warnings

import pytest
import torch

from _quant_helpers import group_for
from moequant.quantize import rtn
from moequant.quantize.schemes import SCHEMES, ct_scheme


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_all_zero_weight_finite_and_warned(scheme):
    from compressed_tensors.compressors import BaseCompressor

    s = ct_scheme(scheme, ["Linear"], group_for(scheme))
    w = torch.zeros(64, 128, dtype=torch.bfloat16)
    extra = rtn.input_qparams(torch.zeros(()), s, w.dtype)  # an expert no calibration token reached
    with pytest.warns(UserWarning, match="all-zero"):
        out = rtn.quantize_weight(w, s, "experts.3.down_proj", extra=extra)
    for k, t in out.items():
        if t.is_floating_point():
            assert bool(torch.isfinite(t.float()).all()) and bool((t.float() > 0).all() or k == "weight"), k
    deq = BaseCompressor.get_value_from_registry(s.format).decompress(dict(out), s)["weight"]
    assert not bool(deq.any())


def test_nvfp4_gate_up_share_global_scale():
    gen = torch.Generator().manual_seed(0)
    gate, up = torch.randn(64, 128, generator=gen), 3 * torch.randn(64, 128, generator=gen)
    s = ct_scheme("nvfp4a16", ["Linear"])
    gs = rtn.global_scale([gate, up])
    assert torch.equal(gs, torch.tensor([448 * 6 / float(up.abs().max())]))
    a = rtn.quantize_weight(gate, s, "gate_proj", gs)
    b = rtn.quantize_weight(up, s, "up_proj", gs)
    assert torch.equal(a["weight_global_scale"], b["weight_global_scale"])


def test_demo_output_nvfp4_pairs_share_global_scale():
    from _quant_helpers import quantized
    from moequant import open_checkpoint

    with open_checkpoint(quantized("nvfp4a16")) as ck:
        for L in ck.moe_layers:
            for e in range(ck.settings.num_experts):
                p = f"{ck.block_prefix(L)}.experts.{e}"
                assert torch.equal(ck.index.read(f"{p}.gate_proj.weight_global_scale"),
                                   ck.index.read(f"{p}.up_proj.weight_global_scale"))


@pytest.mark.parametrize("w,match", [
    (torch.zeros(4, 32, dtype=torch.int32), "floating-point"),
    (torch.zeros(2, 4, 32), "2-D"),
    (torch.zeros(4, 48), "group size 64"),
])
def test_bad_weights_named(w, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match) as e:
            rtn.quantize_weight(w, ct_scheme("w4a16", ["Linear"], 64), "model.layers.0.mlp.experts.1.up_proj")
    assert "experts.1.up_proj" in str(e.value)
