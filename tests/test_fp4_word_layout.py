"""The fp4 decode layout (kernels.fp4_word_layout): the bit permutation, its inverse in Triton, the PTX decoder's
instruction sequence (run here by a small interpreter of its four opcodes), and the layer keeping its weights in it."""

import re

import pytest
import torch
import triton
import triton.language as tl

import moequant.methods.fp4  # noqa: F401  (registers the fp4 schemes)
from moequant import FusedMoE, QuantConfig
from moequant.kernels import fp4_word_layout as wl
from moequant.kernels._fp4_gemm_kernel import fp4_byte_word, fp4_row_codes
from moequant.kernels._gemv_fp4_bf16x2 import fp4_word_dot_f32
from moequant.kernels.fp4_gemm import fused_experts_fp4
from moequant.methods.base import rows_contiguous
from moequant.quantize import fp4_math as f4


def _random_words(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2**31, 2**31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)


def _run_ptx(ptx: str, regs: dict[str, int]) -> dict[str, int]:
    """Executes decode_word_ptx's text: shf.l.wrap.b32, and.b32, or.b32 and prmt.b32 (default mode) on 32-bit ints."""
    def val(x):
        return regs[x] if x in regs else int(x, 0)

    for line in ptx.strip().splitlines():
        op, args = line.rstrip(";").split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        if op == "shf.l.wrap.b32":
            a, n = val(src[0]), val(src[2]) % 32
            assert src[0] == src[1], line  # a rotation
            regs[d] = ((a << n) | (a >> (32 - n))) & 0xFFFFFFFF if n else a
        elif op == "and.b32":
            regs[d] = val(src[0]) & val(src[1])
        elif op == "or.b32":
            regs[d] = val(src[0]) | val(src[1])
        elif op == "prmt.b32":
            pool = val(src[0]) | (val(src[1]) << 32)
            sel = val(src[2])
            regs[d] = sum(((pool >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
        else:
            raise AssertionError(f"unexpected instruction {line!r}")
    return regs


def test_layout_is_a_permutation_and_round_trips():
    w = _random_words(4096)
    d = wl.to_decode_words(w)
    assert not torch.equal(d, w)
    assert torch.equal(wl.to_byte_words(d), w)
    packed = rows_contiguous(torch.randint(0, 256, (3, 8, 6), dtype=torch.uint8))
    copy = wl.decode_layout(packed)
    assert copy.stride() == packed.stride() and torch.equal(wl.byte_layout(copy), packed)
    same = packed.clone().transpose(1, 2).contiguous().transpose(1, 2)
    assert wl.decode_layout(same, inplace=True) is same and torch.equal(same, copy)
    ones = torch.tensor([1 << i for i in range(31)] + [-2**31], dtype=torch.int32)  # each bit moves to one bit
    moved = wl.to_decode_words(ones).to(torch.int64) & 0xFFFFFFFF
    assert sorted(int(m).bit_length() - 1 for m in moved) == list(range(32))


def test_decode_ptx_gives_the_bf16_of_every_code_in_every_slot():
    """Slot 2 * (r % 2) + h of a word -> bf16x2 (rows r, r + 2 of column 2j + h) equal to e2m1 * 2^-126, for every
    code in every nibble and for random words. Ten PTX instructions (ptxas fuses the last AND and OR: nine)."""
    ptx = wl.decode_word_ptx("w", ("d0", "d1", "d2", "d3"))
    assert len(ptx.strip().splitlines()) == 10
    words = torch.cat([torch.tensor([c * 0x11111111 for c in range(16)]), _random_words(512, 1).to(torch.int64)])
    decoded = wl.to_decode_words(torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))
    table = f4.e2m1_table()
    for word, dec in zip((words & 0xFFFFFFFF).tolist(), decoded.tolist()):
        out = _run_ptx(ptx, {"w": dec & 0xFFFFFFFF})
        for slot in range(4):
            for half in range(2):
                r, h = slot // 2 + 2 * half, slot % 2
                code = (word >> (8 * r + 4 * h)) & 15
                bits = (out[f"d{slot}"] >> (16 * half)) & 0xFFFF
                bf16 = torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
                assert bf16.double().item() * 2.0 ** 126 == table[code].item(), (hex(word), slot, half, hex(bits))


@triton.jit
def _byte_word_kernel(src, dst, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(dst + o, fp4_byte_word(tl.load(src + o)))


def test_triton_byte_word_inverts_the_layout():
    """fp4_byte_word (the fp32 decoders' way back, written out as shifts and masks) equals to_byte_words."""
    w = _random_words(1024, 2)
    d = wl.to_decode_words(w)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.empty(1024, dtype=torch.int32, device=dev)
    _byte_word_kernel[(1,)](d.to(dev), out, N=1024)
    assert torch.equal(out.cpu(), w)


@triton.jit
def _row_codes_kernel(src, lo_ptr, hi_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    r = tl.arange(0, 4)
    lo, hi = fp4_row_codes(tl.load(src + o)[:, None], r[None, :])
    tl.store(lo_ptr + o[:, None] * 4 + r[None, :], lo)
    tl.store(hi_ptr + o[:, None] * 4 + r[None, :], hi)


def test_triton_row_codes_read_each_row_of_a_word():
    """fp4_row_codes (one row's two codes straight from the decode layout) equals the byte layout's nibbles."""
    w = _random_words(256, 3)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lo, hi = (torch.empty(256, 4, dtype=torch.int32, device=dev) for _ in range(2))
    _row_codes_kernel[(1,)](wl.to_decode_words(w).to(dev), lo, hi, N=256)
    byte = (w.to(torch.int64)[:, None] >> (8 * torch.arange(4))) & 0xFF
    assert torch.equal(lo.cpu().long(), byte & 15) and torch.equal(hi.cpu().long(), byte >> 4)


@triton.jit
def _word_dot_f32_kernel(src, a_lo_ptr, a_hi_ptr, out_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    d0, d1, d2, d3 = fp4_word_dot_f32(tl.load(src + o), tl.load(a_lo_ptr + o), tl.load(a_hi_ptr + o))
    tl.store(out_ptr + o * 4, d0)
    tl.store(out_ptr + o * 4 + 1, d1)
    tl.store(out_ptr + o * 4 + 2, d2)
    tl.store(out_ptr + o * 4 + 3, d3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="inline PTX: needs a CUDA GPU")
def test_word_dot_f32_gives_each_rows_two_products():
    """fp4_word_dot_f32 (the fp32 GEMV path's decode on a GPU): row r of a decode-layout word times the activations
    of its two columns, scaled by 2^64 in and 2^-62 out, equals e2m1 * a in float64 up to fp32 rounding, for every
    code (code 1 decodes to an fp32 subnormal: a flush to zero would lose it) and activations from 1e-15 to 1e15
    (the 2^64 scaling bounds |a| below 2^64, as on the bf16x2 path)."""
    n = 1024
    w = torch.cat([torch.tensor([c * 0x11111111 for c in range(16)], dtype=torch.int64).to(torch.int32),
                   _random_words(n - 16, 4)])
    gen = torch.Generator().manual_seed(9)
    mag = 10.0 ** (torch.randint(-15, 16, (2, n), generator=gen).double())
    a = torch.randn(2, n, generator=gen, dtype=torch.float64) * mag
    out = torch.empty(n, 4, dtype=torch.float32, device="cuda")
    _word_dot_f32_kernel[(1,)](wl.to_decode_words(w).cuda(), (a[0] * 2.0 ** 64).float().cuda(),
                               (a[1] * 2.0 ** 64).float().cuda(), out, N=n)
    a32 = a.float().double()  # the activations as the kernel sees them
    byte = (w.to(torch.int64)[:, None] >> (8 * torch.arange(4))) & 0xFF
    table = f4.e2m1_table().double()
    ref = table[byte & 15] * a32[0][:, None] + table[byte >> 4] * a32[1][:, None]
    got = out.cpu().double() * 2.0 ** 62
    scale = table[byte & 15].abs() * a32[0].abs()[:, None] + table[byte >> 4].abs() * a32[1].abs()[:, None]
    assert ((got - ref).abs() <= 2 ** -22 * scale).all()
    assert (got[16:] != 0).sum() > 0.9 * (ref[16:] != 0).sum()


@pytest.mark.parametrize("scheme", ["nvfp4a16", "mxfp4"])
def test_processed_layer_holds_the_decode_layout(scheme):
    """After process_weights_after_loading the packed weights are the checkpoint bytes, rows-contiguous, in the
    decode layout; packed_bytes gives each expert's checkpoint bytes back."""
    gen = torch.Generator().manual_seed(0)
    E, H, I = 3, 64, 32
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    layer = FusedMoE(E, 2, H, I, params_dtype=torch.float32, quant_config=QuantConfig(scheme=scheme))
    layer.quant_method.quantize_dense(layer, w13, w2)
    before = {p: getattr(layer, f"{p}_weight_packed").data.clone() for p in ("w13", "w2")}
    layer.process_weights_after_loading()
    for p in ("w13", "w2"):
        kept = getattr(layer, f"{p}_weight_packed").data
        assert kept.stride(1) == 1
        assert torch.equal(kept, wl.decode_layout(rows_contiguous(before[p])))
        assert not torch.equal(kept, before[p])
        for e in range(E):
            assert torch.equal(layer.quant_method.packed_bytes(layer, p, e), before[p][e])


@pytest.mark.parametrize("scheme", ["nvfp4a16", "mxfp4"])
def test_state_dict_of_a_processed_layer_reloads_into_a_fresh_one(scheme):
    """A processed layer's state dict (packed bytes in the decode layout, marked by its fp4_decode_layout buffer)
    loaded into a fresh layer and processed there is not permuted a second time: the same bytes, the same outputs
    (reference and kernels), and packed_bytes gives the checkpoint's bytes back before and after processing. (nvfp4's
    input scales are collapsed to one value by processing: its state dict does not load into a fresh layer, loudly.)"""
    gen = torch.Generator().manual_seed(1)
    E, H, I = 3, 64, 32
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    cfg = QuantConfig(scheme=scheme)
    layer = FusedMoE(E, 2, H, I, params_dtype=torch.float32, quant_config=cfg)
    layer.quant_method.quantize_dense(layer, w13, w2)
    ckpt = {p: getattr(layer, f"{p}_weight_packed").data.clone() for p in ("w13", "w2")}
    layer.process_weights_after_loading()
    assert int(layer.fp4_decode_layout) == 1
    fresh = FusedMoE(E, 2, H, I, params_dtype=torch.float32, quant_config=cfg)
    assert int(fresh.fp4_decode_layout) == 0
    fresh.load_state_dict(layer.state_dict())
    for e in range(E):  # not processed yet, the bytes already in the decode layout
        assert torch.equal(fresh.quant_method.packed_bytes(fresh, "w13", e), ckpt["w13"][e])
    fresh.process_weights_after_loading()
    for p in ("w13", "w2"):
        assert torch.equal(getattr(fresh, f"{p}_weight_packed").data, getattr(layer, f"{p}_weight_packed").data)
        for e in range(E):
            assert torch.equal(fresh.quant_method.packed_bytes(fresh, p, e), ckpt[p][e])
    x, logits = torch.randn(3, H, generator=gen), torch.randn(3, E, generator=gen)
    for backend in ("reference", "triton"):
        layer.backend = fresh.backend = backend
        assert torch.equal(fresh(x, logits), layer(x, logits)), backend


def test_kernels_reject_bytes_not_in_the_decode_layout():
    E, H, I = 2, 64, 32
    packed13 = torch.zeros(E, 2 * I, H // 2, dtype=torch.uint8)  # K-contiguous: the checkpoint's strides
    packed2 = rows_contiguous(torch.zeros(E, H, I // 2, dtype=torch.uint8))
    s13, s2 = torch.ones(E, 2 * I, H // 16).to(torch.float8_e4m3fn), torch.ones(E, H, I // 16).to(torch.float8_e4m3fn)
    ids = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"w13_packed must be rows-contiguous in the decode layout.*strides"):
        fused_experts_fp4(torch.zeros(1, H), packed13, s13, packed2, s2, torch.ones(1, 2), ids)
    with pytest.raises(ValueError, match=r"rows-contiguous \(N stride 1, N a multiple of 4"):
        wl.decode_layout(packed13)


def test_nvfp4_processed_state_dict_fails_loudly_in_a_fresh_layer():
    """nvfp4's processing collapses the per-expert input scales to one: a fresh layer refuses that state dict by
    shape instead of running on it."""
    E, H, I = 3, 64, 32
    gen = torch.Generator().manual_seed(2)
    cfg = QuantConfig(scheme="nvfp4")
    layer = FusedMoE(E, 2, H, I, params_dtype=torch.float32, quant_config=cfg)
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    layer.quant_method.quantize_dense(layer, w13, w2)
    layer.process_weights_after_loading()
    with pytest.raises(RuntimeError, match="size mismatch for w13_input_scale"):
        FusedMoE(E, 2, H, I, params_dtype=torch.float32, quant_config=cfg).load_state_dict(layer.state_dict())
