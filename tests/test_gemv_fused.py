"""The decode path with GEMM2 fused into GEMM1's programs (kernels/gemv_fused.py) against the layer's torch reference
and against the two-launch GEMV: interpreter (fp32, fp16) on the CPU, bf16 (bf16x2 products) on the GPU.

# T tokens, E experts, H hidden, I intermediate, K top-k, BN GEMM1 rows per program, BH w2 rows per fused step
"""

import pytest
import torch

import moequant.kernels.gemv as gv
import moequant.kernels.gemv_fused as gf
import moequant.kernels.int_gemm as ig
from conftest import ON_GPU, rel_err
from moequant import FusedMoE, QuantConfig
from test_gemv import INTERP, build

E, K, H, I = 6, 3, 256, 384


@pytest.fixture
def fused_calls(monkeypatch):
    """GEMV on every M; records each fused launch's config (and fails if the fused path is not taken)."""
    monkeypatch.setattr(gv, "MODE", "always")
    monkeypatch.setattr(gf, "MODE", "auto")
    calls = []
    real = gf.fused_experts_gemv_fused

    def spy(*a, **kw):
        calls.append(kw.get("cfg"))
        return real(*a, **kw)

    monkeypatch.setattr(ig, "fused_experts_gemv_fused", spy)
    return calls


def _forward_vs_reference(layer, T, dtype, device, seed=0, x_scale=1.0, ep_ids=False):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, layer.hidden_size, generator=gen) * x_scale).to(dtype).to(device)
    logits = torch.randn(T, layer.global_num_experts, generator=gen).to(device)
    w, ids = layer.route(x, logits)
    layer.backend = "reference"
    ref = layer.experts_forward(x.float(), w, ids)
    layer.backend = "triton"
    return layer.experts_forward(x, w, ids), ref, (x, w, ids)


@pytest.mark.skipif(not INTERP, reason="interpreter test (CPU)")
@pytest.mark.parametrize("scheme,G", [("w4a16", 32), ("w4a16", 128), ("w8a16", 128), ("w8a16", None)])
def test_fused_matches_reference(scheme, G, fused_calls):
    """fp32: the math (accumulation order only); fp16: the output's rounding. Per-channel int8 has no group scales,
    so it stays on two launches."""
    for dtype, T in ((torch.float32, 3), (torch.float16, 1)):
        layer = build(scheme, G, False, False, dtype, "cpu")
        out, ref, _ = _forward_vs_reference(layer, T, dtype, "cpu", seed=T)
        assert rel_err(out, ref) <= (1e-5 if dtype == torch.float32 else 2e-3), (scheme, dtype)
    assert len(fused_calls) == (0 if G is None else 2)


@pytest.mark.skipif(not INTERP, reason="interpreter test (CPU)")
@pytest.mark.parametrize("cfg", [
    gv.GemvConfig(8, 1, 4, BLOCK_H=128),  # 48 programs per slot, two full output blocks
    gv.GemvConfig(256, 2, 4, BLOCK_H=512),  # a partial last slice of I (384 = 256 + 128), one partial block
    gv.GemvConfig(64, 8, 2, BLOCK_H=64),  # four blocks, steps of a whole row of groups
], ids=lambda c: f"bn{c.BLOCK_N}-bh{c.BLOCK_H}")
def test_fused_partial_slices_and_blocks(cfg, fused_calls, monkeypatch):
    """Slices of I and blocks of H that do not divide them, several tokens per launch, and the workspace: left zero
    after every launch, so a second forward equals the first."""
    monkeypatch.setattr(gf, "OVERRIDE", [cfg])
    layer = build("w4a16", 32, False, False, torch.float32, "cpu")
    for T in (1, 4):
        out, ref, (x, w, ids) = _forward_vs_reference(layer, T, torch.float32, "cpu", seed=T)
        assert rel_err(out, ref) <= 1e-5, T
        assert torch.equal(layer.experts_forward(x, w, ids), out)
        for acc, count in gf._WORKSPACES.values():
            assert not acc.any() and not count.any()
    assert len(fused_calls) == 4


@pytest.mark.skipif(not INTERP, reason="interpreter test (CPU)")
def test_fused_partial_output_block(fused_calls, monkeypatch):
    """H = 224 over blocks of 128 rows: the second block is partial (masked rows, masked cast)."""
    monkeypatch.setattr(gf, "OVERRIDE", [gv.GemvConfig(16, 1, 4, BLOCK_H=128)])
    gen = torch.Generator().manual_seed(2)
    layer = FusedMoE(E, K, 224, I, params_dtype=torch.float32, quant_config=QuantConfig(scheme="w4a16", group_size=32))
    layer.load_dense_weights(torch.randn(E, 2 * I, 224, generator=gen) * 0.05,
                             torch.randn(E, 224, I, generator=gen) * 0.05)
    out, ref, _ = _forward_vs_reference(layer, 2, torch.float32, "cpu")
    assert rel_err(out, ref) <= 1e-5 and len(fused_calls) == 1


@pytest.mark.skipif(not INTERP, reason="interpreter test (CPU)")
def test_fused_expert_parallel_and_weight_on_input(fused_calls):
    """Another rank's slots (-1 ids) add nothing but still count, so every block is cast; top-1 with the routing
    weight applied to GEMM1's input (the fused GEMM2 then multiplies by nothing)."""
    layer = build("w4a16", 32, False, False, torch.float32, "cpu", ep=True)
    for T in (1, 4):
        out, ref, _ = _forward_vs_reference(layer, T, torch.float32, "cpu", seed=T)
        assert rel_err(out, ref) <= 1e-5, T
    gen = torch.Generator().manual_seed(5)
    top1 = FusedMoE(E, 1, H, I, params_dtype=torch.float32, quant_config=QuantConfig(scheme="w4a16", group_size=32),
                    apply_router_weight_on_input=True)
    top1.load_dense_weights(torch.randn(E, 2 * I, H, generator=gen) * 0.05, torch.randn(E, H, I, generator=gen) * 0.05)
    x, w = torch.randn(2, H, generator=gen), torch.rand(2, 1, generator=gen)
    ids = torch.tensor([[4], [1]], dtype=torch.int32)
    top1.backend = "triton"
    out = top1.experts_forward(x, w, ids)
    top1.backend = "reference"
    assert rel_err(out, top1.experts_forward(x, w, ids)) <= 1e-5
    assert len(fused_calls) == 3


def _int_gemv_weights(layer):
    """The two GemvWeights fused_experts_int builds for the decode path."""
    m = layer.quant_method
    layout = ig.IntLayout(bits=m.bits, group_size=m.config.group_size, symmetric=m.symmetric, act_order=m.act_order)
    w13, w2 = m.kernel_weights(layer, "w13"), m.kernel_weights(layer, "w2")
    g13 = ig.gemv_weights(w13, layout, sort_idx=w13.sort_idx, out_perm=w2.inv_sort_idx)
    g2 = ig.gemv_weights(w2, layout, sort_idx=w2.sort_idx if w2.inv_sort_idx is None else None)
    return g13, g2


def test_fused_only_where_it_applies():
    """Zero points, act-order, biases and per-channel scales keep the two launches."""
    x = torch.zeros(1, H)
    for scheme, G, act, want in (("w4a16", 32, False, True), ("w8a16", 128, False, True),
                                 ("w4a16-asym", 64, False, False), ("w4a16", 128, True, False),
                                 ("w8a16", None, False, False)):
        g13, g2 = _int_gemv_weights(build(scheme, G, act, False, torch.float32, "cpu"))
        assert gf.fused_down_ok(x, g13, g2, biases=False) == want, (scheme, G, act)
        if want:
            assert not gf.fused_down_ok(x, g13, g2, biases=True)


def test_fused_config_errors(monkeypatch):
    layer = build("w4a16", 32, False, False, torch.float32, "cpu")
    g13, g2 = _int_gemv_weights(layer)
    x = torch.zeros(1, H)
    w, ids = torch.ones(1, K), torch.zeros(1, K, dtype=torch.int32)
    with pytest.raises(ValueError, match="BLOCK_N 4 must be a multiple of 8"):
        gf.fused_experts_gemv_fused(x, g13, g2, w, ids, cfg=gv.GemvConfig(4, 1, BLOCK_H=128))
    with pytest.raises(ValueError, match="BLOCK_H 2 gives 128 output blocks"):
        gf.fused_experts_gemv_fused(x, g13, g2, w, ids, cfg=gv.GemvConfig(8, 1, BLOCK_H=2))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme,G", [("w4a16", 128), ("w4a16", 32), ("w8a16", 128)])
@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 3e4])
def test_fused_gpu_bf16(scheme, G, magnitude, fused_calls, monkeypatch):
    """bf16 on the GPU (int4: bf16x2 products in both halves) against the reference and the two-launch GEMV, for
    several configs (partial slices and blocks) and T = 1 and 3."""
    layer = build(scheme, G, False, False, torch.bfloat16, "cuda")
    for T in (1, 3):
        out, ref, (x, w, ids) = _forward_vs_reference(layer, T, torch.bfloat16, "cuda", seed=T, x_scale=magnitude)
        monkeypatch.setattr(gf, "MODE", "never")
        two = layer.experts_forward(x, w, ids)
        monkeypatch.setattr(gf, "MODE", "auto")
        assert rel_err(out, ref) <= 1e-2 and rel_err(out, two) <= 1e-2, T
        for cfg in (gv.GemvConfig(8, 1, 4, PREFETCH=True, BLOCK_H=128), gv.GemvConfig(256, 2, 4, BLOCK_H=512)):
            monkeypatch.setattr(gf, "OVERRIDE", [cfg])
            assert rel_err(layer.experts_forward(x, w, ids), ref) <= 1e-2, (T, cfg)
            monkeypatch.setattr(gf, "OVERRIDE", [])
    assert len(fused_calls) == 6


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_fused_gpu_graph_replay(fused_calls):
    """Routing -> the fused launch captured in a CUDA graph: every replay leaves the workspace zero, so replays with
    new inputs match eager forwards (fp32 atomics may add in another order: a bf16 rounding apart at most)."""
    layer = build("w4a16", 128, False, False, torch.bfloat16, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16, generator=gen)
    logits = torch.randn(1, E, device="cuda", generator=gen)
    layer(x, logits)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = layer(x, logits)
    for _ in range(3):
        x.copy_(torch.randn(1, H, device="cuda", dtype=torch.bfloat16, generator=gen))
        logits.copy_(torch.randn(1, E, device="cuda", generator=gen))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(out, layer(x, logits)) <= 4e-3
    assert all(not a.any() and not c.any() for a, c in gf._WORKSPACES.values())
