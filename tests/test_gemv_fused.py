"""The one-launch nvfp4a16 decode (kernels.gemv_fused, GPU only: bf16x2 PTX) against the two-launch GEMV path, the
layer's torch reference and the routing launch; its workspace is left zeroed; CUDA graphs.

# T tokens, E experts, H hidden, I intermediate, K top-k
"""

import pytest
import torch

import moequant.kernels.gemv_fused as gf
from _graph_replay import assert_graph_replays_match_eager
from conftest import ON_GPU, rel_err
from moequant import FusedMoE, QuantConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (bf16x2 PTX)")]


def build(E, K, H, I, seed=1):
    gen = torch.Generator().manual_seed(seed)
    layer = FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config=QuantConfig(scheme="nvfp4a16"))
    w13 = torch.randn(E, 2 * I, H, generator=gen) * 0.05
    w13[:, I:] *= 2.5  # gate and up of different ranges: different second-level scales
    layer.load_dense_weights(w13.bfloat16(), (torch.randn(E, H, I, generator=gen) * 0.05).bfloat16())
    layer.backend = "triton"
    return layer.cuda()


@pytest.fixture
def launches(monkeypatch):
    """The one-launch path's outputs (None: it declined), recorded per forward."""
    calls, fused = [], gf.fused_decode_fp4
    monkeypatch.setattr(gf, "fused_decode_fp4", lambda *a, **k: calls.append(fused(*a, **k)) or calls[-1])
    import moequant.kernels.fp4_gemm as fp4_gemm
    monkeypatch.setattr(fp4_gemm, "fused_decode_fp4", gf.fused_decode_fp4)
    return calls


def _forward(layer, x, logits, mode, monkeypatch):
    monkeypatch.setattr(gf, "MODE", mode)
    return layer(x, logits)


TUNED = {"BLOCK_N": 32, "NG": 4, "num_warps": 4, "UNIT": 8, "PREFETCH": True}  # a tuned entry's form


@pytest.mark.parametrize("shape", [(6, 3, 256, 384), (8, 2, 160, 64), (16, 4, 512, 256)],
                         ids=lambda s: "E{}-K{}-H{}-I{}".format(*s))
@pytest.mark.parametrize("tile, tuned", [(None, None), (None, {**TUNED, "PRE2": True}), ("2,16,1", None),
                                         ("4,8,2", TUNED), ("8,64,8", {**TUNED, "PRE2": True})])
def test_fused_matches_two_launches_and_reference(shape, tile, tuned, launches, monkeypatch):
    """Tiles (U2, BQ2, R): the default, and GEMM2 shares over several steps of quads (H/4 = 40 with 16 or 8 per
    step: a masked last step), tile elements of 2, 4 and 8 byte columns, one to eight accumulator rows per token;
    GEMM1 as the two-launch path's or as a tuned entry gives it (PREFETCH, steps of 64 columns: a masked last one
    at H = 160), with GEMM2's weights loaded before GEMM1 (PRE2, where its share is one step); one to three tokens;
    softmax with and without renormalisation; the output matches the two-launch path's and the reference, and a
    second forward the first (the workspace is zero after each forward)."""
    E, K, H, I = shape
    if tile:
        monkeypatch.setenv("MOEQUANT_GEMV_FUSED_TILE", tile)
    monkeypatch.setattr(gf, "_tuned", lambda w13, T: tuned)
    layer = build(E, K, H, I)
    gen = torch.Generator().manual_seed(4)
    for T, renorm in ((1, True), (2, False), (3, True)):
        layer.renormalize = renorm
        x = torch.randn(T, H, generator=gen).bfloat16().cuda()
        logits = torch.randn(T, E, generator=gen).cuda()
        launches.clear()
        out = _forward(layer, x, logits, "always", monkeypatch)
        assert len(launches) == 1 and launches[0] is out, "the one-launch path ran"
        assert all(not a.any() and not c.any() for a, c in gf._WORKSPACE.values()), "workspace left zeroed"
        two = _forward(layer, x, logits, "never", monkeypatch)
        assert len(launches) == 1
        assert rel_err(out, two) <= 5e-3, (T, rel_err(out, two))
        again = _forward(layer, x, logits, "always", monkeypatch)
        assert rel_err(again, out) <= 5e-3  # fp32 reductions in another order at most
        layer.backend = "reference"
        ref = layer(x.float(), logits).bfloat16()
        layer.backend = "triton"
        assert rel_err(out, ref) <= 1e-2, (T, rel_err(out, ref))


def test_fused_writes_the_routing(launches, monkeypatch):
    """The kernel routes each token itself and writes the weights and ids (DeferredRouting's outputs) as the
    routing launch computes them, scaled by routed_scaling_factor."""
    import moequant.kernels.topk as topk_mod

    routes, deferred = [], topk_mod.deferred_routing
    monkeypatch.setattr(topk_mod, "deferred_routing", lambda *a: routes.append(deferred(*a)) or routes[-1])
    layer = build(6, 3, 256, 384)
    layer.routed_scaling_factor = 2.5
    x = torch.randn(1, 256, device="cuda").bfloat16()
    logits = torch.randn(1, 6, device="cuda")
    _forward(layer, x, logits, "always", monkeypatch)
    assert launches and launches[0] is not None
    w_ref, ids_ref = layer.route(x, logits)
    assert torch.equal(routes[-1].ids, ids_ref)
    torch.testing.assert_close(routes[-1].weights, w_ref, rtol=1e-6, atol=1e-7)


def test_fused_auto_only_where_tuned_and_at_one_token(launches, monkeypatch):
    """auto: one launch at one token where the tuned cache has an entry for the shape; two beyond one token or
    without an entry (Mixtral's shape measured slower in one launch)."""
    layer = build(6, 3, 256, 384)
    for T, entry, fused in ((1, TUNED, True), (2, TUNED, False), (1, None, False)):
        monkeypatch.setattr(gf, "_tuned", lambda w13, T: entry)
        launches.clear()
        _forward(layer, torch.randn(T, 256, device="cuda").bfloat16(), torch.randn(T, 6, device="cuda"), "auto",
                 monkeypatch)
        assert bool(launches) == fused, (T, entry)


def test_fused_graph_replays_and_capture_before_eager(launches, monkeypatch):
    """Captured after an eager forward (the workspace exists): replays with new inputs match eager forwards. A shape
    first seen under capture declines (no allocation in the graph) and the two-launch path is captured instead."""
    monkeypatch.setattr(gf, "MODE", "always")
    layer = build(8, 2, 320, 128)
    assert_graph_replays_match_eager(layer, 320, 8)
    assert launches and all(o is not None for o in launches)
    launches.clear()
    x = torch.randn(5, 320, device="cuda").bfloat16()
    logits = torch.randn(5, 8, device="cuda")
    for key in [k for k in gf._WORKSPACE if k[1] == 5]:
        del gf._WORKSPACE[key]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up the two-launch path's kernels outside the capture
        monkeypatch.setattr(gf, "MODE", "never")
        layer(x, logits)
        monkeypatch.setattr(gf, "MODE", "always")
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = layer(x, logits)
    assert launches == [None]
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(out, layer(x, logits)) <= 4e-3


def test_fused_declines_when_its_rows_do_not_divide_the_intermediate(launches, monkeypatch):
    """A tuned BLOCK_N of 64 over I = 96: the one-launch path declines (None) and the two launches give the output."""
    monkeypatch.setattr(gf, "_tuned", lambda w13, T: {**TUNED, "BLOCK_N": 64})
    layer = build(6, 2, 256, 96)
    x = torch.randn(1, 256, device="cuda").bfloat16()
    logits = torch.randn(1, 6, device="cuda")
    out = _forward(layer, x, logits, "auto", monkeypatch)
    assert launches == [None]
    layer.backend = "reference"
    assert rel_err(out, layer(x.float(), logits).bfloat16()) <= 1e-2
