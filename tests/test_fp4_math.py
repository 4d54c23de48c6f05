"""fp4 format math vs compressed-tensors: pack/unpack bit-exact, rounding, NVFP4/MXFP4 RTN and dequantization."""

import pytest
import torch

from moequant.quantize import fp4_math as f4


@pytest.fixture(scope="module")
def ct():
    from compressed_tensors.compressors.nvfp4 import helpers
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    return helpers.pack_fp4_to_uint8, helpers.unpack_fp4_from_uint8, cast_to_fp4


def test_pack_unpack_bit_exact(ct):
    pack, unpack, _ = ct
    gen = torch.Generator().manual_seed(0)
    q = f4.e2m1_table()[torch.randint(0, 16, (7, 34), generator=gen)]  # odd row count, includes -0.0 (nibble 8)
    assert torch.equal(f4.pack_fp4(q), pack(q))
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(8, 32)  # all 256 byte values
    assert torch.equal(f4.unpack_fp4(every_byte), unpack(every_byte, 8, 64, dtype=torch.float32))
    assert torch.equal(f4.pack_fp4(f4.unpack_fp4(every_byte)), every_byte)


def test_rounding_matches_cast_to_fp4_including_ties(ct):
    cast = ct[2]
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, 100.0])
    x = torch.cat([torch.randn(2000, generator=torch.Generator().manual_seed(1)) * 4, ties, -ties])
    assert torch.equal(f4.round_to_e2m1(x), cast(x.clone()))


def test_nvfp4_rtn_matches_compressed_tensors_compressor():
    from _fp4_ckpt import compress_linear, ct_dequantize

    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(2)) * 0.3
    t = compress_linear(w, "nvfp4a16")
    packed, scale, gs = f4.quantize_nvfp4(w)
    assert torch.equal(packed, t["weight_packed"])
    assert torch.equal(scale.view(torch.uint8), t["weight_scale"].view(torch.uint8))
    assert torch.equal(gs.reshape(1), t["weight_global_scale"].float())
    ref = ct_dequantize(t, "nvfp4a16")
    ours = f4.dequantize_nvfp4(packed, scale, 1.0 / gs)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)  # scale*(1/gs) vs scale/gs: last-bit differences
    assert (ours - w).norm() / w.norm() < 0.15  # 4-bit RTN is coarse but not wrong


def test_mxfp4_rtn_matches_compressed_tensors_compressor():
    from _fp4_ckpt import compress_linear, ct_dequantize

    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(3))
    w[0, :32] = 0.0  # an all-zero group
    t = compress_linear(w, "mxfp4")
    packed, scale = f4.quantize_mxfp4(w)
    assert torch.equal(packed[1:], t["weight_packed"][1:])
    assert torch.equal(scale[1:], t["weight_scale"][1:])
    assert torch.equal(f4.dequantize_mxfp4(packed, scale)[1:], ct_dequantize(t, "mxfp4")[1:])
    assert torch.equal(f4.dequantize_mxfp4(packed, scale)[0, :32], torch.zeros(32))


def test_e8m0_nan_and_extremes():
    s = torch.tensor([0, 127, 254, 255], dtype=torch.uint8)
    f = f4.e8m0_to_float(s)
    assert f[1] == 1.0 and f[2] == 2.0 ** 127 and f[0] == 2.0 ** -127 and torch.isnan(f[3])


def test_act_fake_quant_is_fp4_times_fp8_scale():
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(4)) * 2
    x[0, :16] = 0  # an all-zero block stays zero, never NaN
    s_in = x.abs().amax() / (6 * 448)
    y = f4.fake_quant_nvfp4_act(x, s_in)
    assert torch.isfinite(y).all() and torch.equal(y[0, :16], torch.zeros(16))
    blocks = (y / s_in).reshape(5, 3, 16)
    amax = x.reshape(5, 3, 16).abs().amax(-1, keepdim=True)
    sc = (amax / 6 / s_in).to(f4.FP8_DTYPE).float()
    q = torch.where(sc > 0, blocks / sc.clamp(min=1e-30), 0)
    torch.testing.assert_close(q, f4.round_to_e2m1(q), rtol=1e-5, atol=1e-5)
    assert (y - x).norm() / x.norm() < 0.15


def test_bad_shapes_name_the_problem():
    with pytest.raises(ValueError, match="multiple of the group size 16"):
        f4.quantize_nvfp4(torch.randn(4, 24))
    with pytest.raises(ValueError, match="even"):
        f4.pack_fp4(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="uint8"):
        f4.unpack_fp4(torch.zeros(2, 3))
