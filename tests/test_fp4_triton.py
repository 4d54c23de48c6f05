"""fp4 Triton path (interpreter on CPU, real kernels on GPU) vs the reference on the dequantized weights."""

import pytest
import torch
import triton
import triton.language as tl

import moequant.methods.fp4  # noqa: F401  (registers the fp4 schemes)
from conftest import ON_GPU, rel_err
from moequant import FusedMoE
import moequant.kernels.fp4_gemm as fp4_gemm
from moequant.kernels import fp4_word_layout as wl
from moequant.kernels._fp4_gemm_kernel import _dequant_tile, _dequant_tile_bf16, block_scale_value, e2m1_value
from moequant.kernels.reference import fused_moe_ref
from moequant.quantize import fp4_math as f4


def build(scheme, E, H, I, K, dtype, device="cpu", bias=False, activation="silu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = FusedMoE(E, K, H, I, params_dtype=dtype, quant_config=scheme, has_bias=bias, activation=activation)
    w13 = torch.randn(E, 2 * I, H, generator=gen) * 0.1
    w2 = torch.randn(E, H, I, generator=gen) * 0.1
    if scheme.startswith("nvfp4"):
        w13[:, I:] *= 2.5  # w1 and w3 get different ranges (one shared global scale per w13 in RTN)
    b13 = torch.randn(E, 2 * I, generator=gen) * 0.1 if bias else None
    b2 = torch.randn(E, H, generator=gen) * 0.1 if bias else None
    layer.load_dense_weights(w13, w2, b13, b2)
    return layer.to(device)


def run_both(layer, x, w, ids):
    """(Triton output, fp32 reference). For nvfp4 both paths fake-quantize GEMM1's input from x (in x's dtype) and
    GEMM2's input from the fp32 activation: fp4 rounding is discontinuous, and quantizing a bf16 copy of the
    intermediate instead would move ~3% of the values across an e2m1 boundary (measured), so the kernels keep it
    in fp32 and this reference does too."""
    layer.backend = "triton"
    out = layer.experts_forward(x, w, ids)
    layer.backend = "reference"
    qm = layer.quant_method
    act = lambda a, stage: qm.act_quant_ref(layer, a.to(x.dtype).float() if stage == 1 else a.float(), stage)  # noqa: E731
    ref = fused_moe_ref(x.float(), w, ids, lambda e: qm.dequantize_expert(layer, e), qm.moe.num_local_experts,
                        activation=layer.activation, w13_bias=getattr(layer, "w13_bias", None),
                        w2_bias=getattr(layer, "w2_bias", None), act_quant=act)
    return out, ref


CASES = [  # (E, H, I, K, T): prime E, odd-but-legal sizes (multiples of 32), T=1
    (5, 96, 64, 2, 7),
    (3, 64, 96, 1, 1),
    (7, 160, 32, 3, 4),
]


@pytest.mark.skipif(ON_GPU, reason="interpreter shapes; the GPU has its own test")
@pytest.mark.parametrize("scheme", ["nvfp4a16", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("case", CASES)
def test_interpreter_matches_reference(scheme, case):
    E, H, I, K, T = case
    bias = scheme == "mxfp4"
    layer = build(scheme, E, H, I, K, torch.float32, bias=bias, activation="swigluoai" if bias else "silu")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).int()
    w = torch.rand(T, K, generator=gen)
    out, ref = run_both(layer, x, w, ids)
    assert rel_err(out, ref) <= (1e-2 if scheme == "nvfp4" else 1e-4)


@pytest.mark.skipif(ON_GPU, reason="interpreter")
@pytest.mark.parametrize("scheme", ["nvfp4a16", "nvfp4", "mxfp4"])
def test_interpreter_fp16_all_tokens_one_expert_and_empty_experts(scheme):
    E, H, I, K, T = 5, 64, 32, 1, 6
    layer = build(scheme, E, H, I, K, torch.float16)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(3)).half()
    ids = torch.full((T, K), 3, dtype=torch.int32)  # every token to expert 3; the others get none
    out, ref = run_both(layer, x, torch.ones(T, K), ids)
    assert rel_err(out, ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["nvfp4a16", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("T", [1, 33, 512])
def test_gpu_bf16_matches_reference(scheme, T):
    E, H, I, K = 8, 1024, 768, 2
    bias = scheme == "mxfp4"
    layer = build(scheme, E, H, I, K, torch.bfloat16, "cuda", bias=bias, activation="swigluoai" if bias else "silu")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(T, H, generator=gen).cuda().bfloat16()
    logits = torch.randn(T, E, generator=gen).cuda()
    w, ids = torch.softmax(logits, -1).topk(K, -1)
    out, ref = run_both(layer, x, w, ids.int())
    assert rel_err(out, ref) <= 1e-2


@pytest.mark.gpu
def test_gpu_nvfp4a16_is_cuda_graph_safe():
    layer = build("nvfp4a16", 8, 512, 256, 2, torch.bfloat16, "cuda")
    layer.backend = "triton"
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.full((4, 2), 0.5, device="cuda")
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]], device="cuda", dtype=torch.int32)
    eager = layer.experts_forward(x, w, ids)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = layer.experts_forward(x, w, ids)
    g.replay()
    torch.testing.assert_close(out, eager)



@triton.jit
def _dequant_both_kernel(b_ptr, s_ptr, lo_ptr, hi_ptr, lo32_ptr, hi32_ptr, SCALE_KIND: tl.constexpr):
    """One [64, 64] tile per program through both grouped-GEMM dequantizers (bf16x2 PTX and fp32); rows of 64
    bytes in the decode layout (16 words each)."""
    p = tl.program_id(0) * 4096 + tl.arange(0, 64)[:, None] * 64 + tl.arange(0, 64)[None, :]
    ok = p >= 0
    lo, hi = _dequant_tile_bf16(b_ptr + p, s_ptr + p, ok, ok, SCALE_KIND)
    tl.store(lo_ptr + p, lo)
    tl.store(hi_ptr + p, hi)
    lo32, hi32 = _dequant_tile(b_ptr + p, s_ptr + p, ok, ok, (tl.arange(0, 64) % 4)[None, :], SCALE_KIND)
    tl.store(lo32_ptr + p, lo32)
    tl.store(hi32_ptr + p, hi32)


@pytest.mark.gpu
@pytest.mark.parametrize("scale_kind", [0, 1])
def test_gpu_bf16x2_dequant_is_exact_for_every_byte_and_scale(scale_kind):
    """The grouped GEMM's bf16x2 dequantizer (inline PTX) against its fp32 one on every (byte, scale byte) pair:
    e2m1 * scale * 2^-8 (e4m3 scales, subnormal ones included) or e2m1 * scale (E8M0), bit for bit; NaN scale
    bytes (e4m3 0x7f / 0xff, E8M0 0xff) never load and are left out, as are E8M0 scales beyond 2^113, which
    overflow the fp32 dequantizer's intermediate (the fp32 path folds 2^14 into the scale)."""
    idx = torch.arange(65536, device="cuda")
    b = (idx % 256).to(torch.uint8)
    s = (idx // 256).to(torch.uint8)
    skip = (s & 0x7F) == 0x7F if scale_kind == 0 else s > 240
    s = torch.where(skip, torch.zeros_like(s), s)
    lo, hi = (torch.empty(65536, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lo32, hi32 = (torch.empty(65536, device="cuda") for _ in range(2))
    _dequant_both_kernel[(16,)](wl.decode_layout(b.view(-1, 64).t()).t().reshape(-1), s, lo, hi, lo32, hi32,
                                SCALE_KIND=scale_kind)
    factor = 256.0 if scale_kind == 0 else 1.0
    torch.testing.assert_close(lo.float() * factor, lo32, rtol=0, atol=0)
    torch.testing.assert_close(hi.float() * factor, hi32, rtol=0, atol=0)
    assert (lo32 != 0).sum() > 30000  # the comparison covers nonzero values
    # and the fp32 one against torch on the bytes before the decode layout: byte i's nibbles times scale i
    scale = s.cpu().view(torch.float8_e4m3fn).float() if scale_kind == 0 else f4.e8m0_to_float(s.cpu())
    scale = torch.where(s.cpu() == 0, 0.0, scale) if scale_kind == 1 else scale  # E8M0 0 reads as 0
    table, bc = f4.e2m1_table(), b.cpu().long()
    torch.testing.assert_close(lo32.cpu(), table[bc & 15] * scale, rtol=0, atol=0)
    torch.testing.assert_close(hi32.cpu(), table[bc >> 4] * scale, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["nvfp4a16", "mxfp4"])
def test_gpu_grouped_bf16x2_matches_fp32_dequant(scheme, monkeypatch):
    """Beyond the GEMV threshold (64 tokens, 8 experts) the layer gives the same output with the bf16x2 and the fp32
    dequantizer (same dequantized values; the fp32 sums' order is the same)."""
    layer = build(scheme, 8, 1024, 768, 2, torch.bfloat16, "cuda")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 1024, generator=gen).cuda().bfloat16()
    w, ids = torch.softmax(torch.randn(64, 8, generator=gen).cuda(), -1).topk(2, -1)
    layer.backend = "triton"
    outs = []
    for on in (True, False):
        monkeypatch.setattr(fp4_gemm, "BF16X2", on)
        outs.append(layer.experts_forward(x, w, ids.int()).float())
    assert rel_err(outs[0], outs[1]) <= 1e-3


@triton.jit
def _decode_kernel(codes_ptr, out_fp4, out_fp8, out_e8m0):
    offs = tl.arange(0, 256)
    c = tl.load(codes_ptr + offs).to(tl.int32)
    tl.store(out_fp4 + offs, e2m1_value(c & 15) * 16384.0)
    tl.store(out_fp8 + offs, block_scale_value(c, 0))
    tl.store(out_e8m0 + offs, block_scale_value(c, 1))


@pytest.mark.skipif(ON_GPU, reason="interpreter")
def test_in_register_decoders_cover_every_code():
    """e2m1_value * 2^14 for all 16 nibbles and block_scale_value for all 256 fp8 / E8M0 bytes match torch."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    o4, o8, oe = (torch.empty(256) for _ in range(3))
    _decode_kernel[(1,)](codes, o4, o8, oe)
    assert torch.equal(o4, f4.e2m1_table()[codes.long() & 15])
    ref8 = codes.view(torch.float8_e4m3fn).float()
    finite = ~torch.isnan(ref8)  # 0x7f / 0xff are NaN in e4m3fn (dead experts are zeroed before the kernel)
    assert torch.equal(o8[finite], ref8[finite])
    assert torch.equal(oe[1:255], f4.e8m0_to_float(codes)[1:255]) and oe[0] == 0  # 2^-127 flushes to 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nvfp4_activation_codes_are_exact_in_half_precision(dtype):
    """GEMM1's fp32 activation is fake-quantized once and handed to GEMM2 in x's dtype: e2m1 x e4m3 block scale has
    at most 6 significant bits, so nothing is rounded a second time."""
    from moequant.kernels.fp4_gemm import quantize_act_nvfp4

    gen = torch.Generator().manual_seed(7)
    a = torch.randn(33, 256, generator=gen) * torch.rand(33, 1, generator=gen) * 5
    for s in (torch.tensor([float("nan")]), torch.tensor([0.004])):  # dynamic, static
        q32, s32 = quantize_act_nvfp4(a, s)
        qh, sh = quantize_act_nvfp4(a, s, dtype)
        assert qh.dtype == dtype and torch.equal(qh.float(), q32) and torch.equal(sh, s32)
