"""The int4/int8 Triton dequant-GEMMs (interpreter on the CPU, bf16 on the GPU) against the torch reference on the
same dequantized weights.

# T tokens, E experts, H hidden, I intermediate, K top-k, G group size
"""

import os

import pytest
import torch

import _int_ckpt as ck
import moequant.methods.intq  # noqa: F401  (registers the schemes)
from moequant.config import QuantConfig
from moequant.layer import FusedMoE

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
cpu_interp = pytest.mark.skipif(not INTERP and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 on the CPU or a GPU")

E, K, H, I = 5, 2, 64, 96  # prime E; I = 3 groups of 32 (odd group count)

CASES = [  # (scheme, preset, G, act_order, tp_size, tp_rank): why
    ("w4a16", "W4A16", 32, False, 1, 0),  # BK a multiple of G
    ("w4a16-asym", "W4A16_ASYM", 32, False, 1, 0),  # zero points
    ("w8a16", "W8A16", 32, False, 1, 0),  # int8 words
    ("w4a16", "W4A16", None, False, 1, 0),  # per channel
    ("w4a16", "W4A16", 32, True, 1, 0),  # act-order, equal groups: gathered A, k // G scales
    ("w4a16-asym", "W4A16_ASYM", 32, True, 2, 1),  # act-order + TP: w2's sorted groups uneven (GIDX path)
]


@pytest.fixture(scope="module")
def ckpts():
    return {(p, G, a): ck.build_experts(E, H, I, ck.preset(p, G), act_order=a, seed=3)
            for _, p, G, a, _, _ in CASES}


def make(ckpts, scheme, preset, G, act, tp, rank, dtype):
    cfg = QuantConfig(scheme=scheme, group_size=G, act_order=act)
    layer = FusedMoE(E, K, H, I, params_dtype=dtype, quant_config=cfg, tp_size=tp, tp_rank=rank)
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in ck.state_dict(ckpts[(preset, G, act)]).items()}
    ck.load_into(layer, sd)
    return layer


def check(layer, x, ids, tol):
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(ids.shape, generator=gen).to(x.device)
    got = layer.quant_method.apply_triton(layer, x, w, ids)
    want = layer.quant_method.apply_reference(layer, x.float(), w, ids).to(got.dtype)
    err = float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-6))
    assert err <= tol, err


def routes(T, device, one_expert=False):
    gen = torch.Generator().manual_seed(T)
    if one_expert:  # all tokens to expert 3, other experts empty
        return torch.stack([torch.full((T,), 3), torch.full((T,), 1)], 1).int().to(device)
    return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).int().to(device)


@pytest.fixture(params=["tile", "slab"])
def kernel(request, monkeypatch):
    """Both int GEMM bodies: the unpacked-tile kernel (many slots per expert) and the per-bit-slab one (few)."""
    import moequant.kernels.int_gemm as ig

    monkeypatch.setattr(ig, "KERNEL", request.param)
    return request.param


@cpu_interp
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-G{c[2]}-act{int(c[3])}-tp{c[4]}")
def test_interpreter_matches_reference(ckpts, case, kernel):
    if not INTERP:
        pytest.skip("interpreter test")
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
        layer = make(ckpts, *case, dtype)
        for T, one in ((1, False), (7, False), (6, True)):  # T=1; odd T; all to one expert
            x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(dtype)
            check(layer, x, routes(T, "cpu", one), tol)


@cpu_interp
@pytest.mark.parametrize("scheme,preset,G,act", [("w4a16", "W4A16", 128, False), ("w4a16-asym", "W4A16_ASYM", 128, True),
                                                 ("w8a16", "W8A16", 64, True)])
def test_slab_factored_group_scales(scheme, preset, G, act, kernel):
    """BK dividing G: the slab kernel multiplies each block's dot by its group scale (and the tile kernel by G)."""
    if not INTERP:
        pytest.skip("interpreter test")
    E2, H2, I2 = 2, 256, 128
    cfg = QuantConfig(scheme=scheme, group_size=G, act_order=act)
    layer = FusedMoE(E2, K, H2, I2, params_dtype=torch.float32, quant_config=cfg)
    ck.load_into(layer, ck.state_dict(ck.build_experts(E2, H2, I2, ck.preset(preset, G), act_order=act, seed=4)))
    gen = torch.Generator().manual_seed(1)
    for T in (3,):
        x = torch.randn(T, H2, generator=gen)
        ids = torch.stack([torch.randperm(E2, generator=gen)[:K] for _ in range(T)]).int()
        check(layer, x, ids, 1e-4)


@cpu_interp
@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=["asym", "act-tp"])
def test_split_k_matches_reference(ckpts, case, kernel):
    """GEMM2 split over K slices (atomic fp32 adds), as chosen for few-token batches on the GPU."""
    from moequant.kernels.int_gemm import IntLayout, fused_experts_int

    dtype = torch.float32 if INTERP else torch.bfloat16
    dev = "cpu" if INTERP else "cuda"
    layer = make(ckpts, *case, dtype).to(dev)
    m = layer.quant_method
    layout = IntLayout(m.bits, m.config.group_size, m.symmetric, m.act_order)
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(5)).to(dtype).to(dev)
    ids = routes(3, dev)
    w = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)).to(dev)
    got = fused_experts_int(x, m.kernel_weights(layer, "w13"), m.kernel_weights(layer, "w2"), w, ids, layout,
                            split_k=2)
    want = m.apply_reference(layer, x.float(), w, ids)
    assert float((got.float() - want).abs().max() / want.abs().max()) <= (1e-4 if INTERP else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-G{c[2]}-act{int(c[3])}-tp{c[4]}")
def test_gpu_bf16_small(ckpts, case):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    layer = make(ckpts, *case, torch.bfloat16).cuda()
    for T in (1, 7, 300):
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(torch.bfloat16).cuda()
        check(layer, x, routes(T, "cuda"), 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme,G,act", [("w4a16", 128, False), ("w4a16", 128, True), ("w4a16-asym", 64, False),
                                          ("w8a16", None, False), ("w4a16", 32, True)])
@pytest.mark.parametrize("T", [1, 16, 512])  # decode, small batch, prefill configs
def test_gpu_bf16_large(scheme, G, act, T):
    """Larger shapes through quantize_dense (identity act-order grouping permuted here into a random one)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    E2, K2, H2, I2 = 8, 2, 1024, 768
    cfg = QuantConfig(scheme=scheme, group_size=G, act_order=act)
    layer = FusedMoE(E2, K2, H2, I2, params_dtype=torch.bfloat16, quant_config=cfg).cuda()
    gen = torch.Generator().manual_seed(0)
    w13 = (torch.randn(E2, 2 * I2, H2, generator=gen) * 0.05).bfloat16().cuda()
    w2 = (torch.randn(E2, H2, I2, generator=gen) * 0.05).bfloat16().cuda()
    m = layer.quant_method
    m.quantize_dense(layer, w13, w2)
    if act:  # a random act-order grouping: shuffle input channels of packed words and g_idx alike
        from moequant.quantize import int_math as im

        for p, k, n in (("w13", H2, 2 * I2), ("w2", I2, H2)):
            perm = torch.randperm(k, generator=gen).cuda()
            q = im.unpack_int32(getattr(layer, f"{p}_weight_packed").data, m.bits, k)[:, :, perm]
            getattr(layer, f"{p}_weight_packed").data.copy_(im.pack_int32(q.contiguous(), m.bits))
            g = getattr(layer, f"{p}_weight_g_idx").data
            g.copy_(g[:, perm].contiguous())
    m.process_weights_after_loading(layer)
    x = torch.randn(T, H2, generator=gen).bfloat16().cuda()
    ids = torch.stack([torch.randperm(E2, generator=gen)[:K2] for _ in range(T)]).int().cuda()
    check(layer, x, ids, 1e-2)
