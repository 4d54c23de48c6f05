"""Bit-exact checks of the int4/int8 math against compressed-tensors, and of the GPTQ conversion.

# N output rows, K input columns, G group size
"""

import pytest
import torch

from moequant.quantize import gptq_format as gf
from moequant.quantize import int_math as im


@pytest.fixture(scope="module")
def ct():
    from compressed_tensors.compressors import pack_to_int32, unpack_from_int32

    return pack_to_int32, unpack_from_int32


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(5, 64), (3, 40), (16, 8)])  # 40: a partial last word for int4? no (40*4/32=5); 8: one word
def test_pack_matches_compressed_tensors(ct, bits, shape):
    pack_ct, unpack_ct = ct
    lo, hi = im.qrange(bits)
    q = torch.randint(lo, hi + 1, shape, dtype=torch.int8)
    q[0, 0], q[-1, -1] = lo, hi  # range ends
    assert torch.equal(im.pack_int32(q, bits), pack_ct(q, bits))
    assert torch.equal(im.unpack_int32(pack_ct(q, bits), bits, shape[1]), q)
    # zero points are packed along the output dim
    assert torch.equal(im.pack_int32(q, bits, dim=0), pack_ct(q, bits, packed_dim=0))
    assert torch.equal(im.unpack_int32(pack_ct(q, bits, packed_dim=0), bits, shape[0], dim=0), q)
    assert torch.equal(unpack_ct(im.pack_int32(q, bits), bits, torch.Size(shape)), q)


def test_unpack_rejects_wrong_word_count():
    with pytest.raises(ValueError, match="words cannot hold"):
        im.unpack_int32(torch.zeros(2, 3, dtype=torch.int32), 4, 32)


@pytest.mark.parametrize("name,G", [("W4A16", 32), ("W4A16_ASYM", 64), ("W8A16", 32), ("W4A16_ASYM", None)])
def test_dequantize_matches_compressed_tensors(name, G):
    import _int_ckpt as ck

    scheme = ck.preset(name, G)
    w = torch.randn(24, 128) * 0.05
    t = ck.compress_linear(w, scheme)
    bits = scheme.weights.num_bits
    q = im.unpack_int32(t["weight_packed"], bits, 128)
    zp = im.unpack_int32(t["weight_zero_point"], bits, 24, dim=0) if "weight_zero_point" in t else None
    got = im.dequantize(q, t["weight_scale"], zp, group_size=G or 128)
    assert torch.equal(got, t["dequant"])  # bit-exact in fp32


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_round_trip_error(sym):
    w = torch.randn(8, 64)
    q, s, zp = im.quantize_rtn(w, 4, 32, sym)
    err = (im.dequantize(q, s, zp, group_size=32) - w).abs()
    assert float((err / s.repeat_interleave(32, 1)).max()) <= 0.5 + 1e-5  # at most half a step


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        im.quantize_rtn(torch.randn(4, 48), 4, 32)


def test_g_idx_checks():
    with pytest.raises(ValueError, match="range"):
        im.check_g_idx(torch.tensor([0, 1, 2]), 2, "t")
    with pytest.raises(ValueError, match="cover every group"):
        im.check_g_idx(torch.tensor([0, 0, 2]), 3, "t")


def _gptq_pack(u: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned ints -> GPTQ words (same bit order as compressed-tensors, packed along dim)."""
    return im.pack_int32((u - (1 << (bits - 1))).to(torch.int8), bits, dim)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym,desc_act", [(True, False), (False, False), (False, True), (True, True)])
def test_gptq_conversion_bit_exact(ct, bits, fmt, sym, desc_act):
    """A GPTQ expert built from known integers dequantizes exactly like its compressed-tensors twin."""
    _, unpack_ct = ct
    K, N, G = 64, 16, 32
    groups = K // G
    gen = torch.Generator().manual_seed(bits)
    u = torch.randint(0, 1 << bits, (K, N), generator=gen)
    half = 1 << (bits - 1)
    z = torch.full((groups, N), half) if sym else torch.randint(0, 1 << bits, (groups, N), generator=gen)
    scales = torch.rand(groups, N, generator=gen) + 0.01
    g_idx = (torch.arange(K) // G)[torch.randperm(K, generator=gen)] if desc_act else torch.arange(K) // G
    stored_z = z - 1 if fmt == "gptq" else z
    if fmt == "gptq" and int(stored_z.min()) < 0:  # v1 cannot store zero 0: that is what its -1 wraps to
        stored_z = stored_z.clamp(min=0)
        z = stored_z + 1
    qweight = _gptq_pack(u, bits, 0)
    qzeros = _gptq_pack(stored_z, bits, 1)
    out = gf.gptq_to_compressed_tensors(qweight, qzeros, scales, g_idx.int(), bits, sym, desc_act, fmt)
    want = (u - z[g_idx]).float() * scales[g_idx]  # [K, N], GPTQ's own math
    q = unpack_ct(out["weight_packed"], bits, torch.Size([N, K]))
    zp = None if sym else unpack_ct(out["weight_zero_point"], bits, torch.Size([N, groups]), packed_dim=0)
    got = im.dequantize(q, out["weight_scale"], zp, g_idx=out.get("weight_g_idx"), group_size=G)
    assert torch.equal(got, want.t())
    assert ("weight_g_idx" in out) == desc_act and ("weight_zero_point" in out) == (not sym)
    assert out["weight_shape"].tolist() == [N, K]


def test_gptq_bad_inputs():
    K, N, G = 64, 16, 32
    qw = torch.zeros(K // 8, N, dtype=torch.int32)
    qz = _gptq_pack(torch.full((2, N), 7), 4, 1)
    s = torch.ones(2, N)
    with pytest.raises(ValueError, match="sym=True needs"):  # v2 zero 7 is not symmetric
        gf.gptq_to_compressed_tensors(qw, qz, s, None, 4, True, False, "gptq_v2")
    over = _gptq_pack(torch.full((2, N), 15), 4, 1)  # v1: 15 + 1 = 16 is out of range
    with pytest.raises(ValueError, match="zero points must lie"):
        gf.gptq_to_compressed_tensors(qw, over, s, None, 4, False, False, "gptq")
    with pytest.raises(ValueError, match="g_idx values"):
        gf.gptq_to_compressed_tensors(qw, qz, s, torch.full((K,), 2, dtype=torch.int32), 4, False, True, "gptq")
    with pytest.raises(ValueError, match="scales"):
        gf.gptq_to_compressed_tensors(qw, qz, torch.ones(2, N + 1), None, 4, False, False, "gptq")
