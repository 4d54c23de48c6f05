"""The decode (GEMV) path of every quantized scheme against the layer's torch reference on the same dequantized
weights: interpreter (fp32, fp16) on the CPU, bf16 on the GPU. Also the choice between GEMV and grouped GEMM.

# T tokens, E experts, H hidden, I intermediate, K top-k
"""

import os

import pytest
import torch

import moequant.kernels.gemv as gv
from _graph_replay import assert_graph_replays_match_eager
from conftest import ON_GPU, rel_err
from moequant import FusedMoE, QuantConfig

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
E, K, H, I = 6, 3, 256, 384  # 384 = 3 groups of 128: a partial last chunk when a chunk holds 2 or 4 groups

SCHEMES = [  # (scheme, group size, act_order, bias + swigluoai)
    ("w4a16", 32, False, False), ("w4a16", 128, True, False), ("w4a16-asym", 64, False, False),
    ("w4a16-asym", None, False, False), ("w8a16", 128, False, False), ("w8a16", 32, True, False),
    ("nvfp4a16", None, False, False), ("nvfp4", None, False, False), ("mxfp4", None, False, True),
    ("fp8-tensor", None, False, False), ("fp8-channel", None, False, True), ("fp8-block", None, False, False),
]


def build(scheme, G, act_order, bias, dtype, device, ep=False, H=H, I=I):
    gen = torch.Generator().manual_seed(1)
    cfg = QuantConfig(scheme=scheme, group_size=G, act_order=act_order)
    kw = dict(ep_size=2, ep_rank=1) if ep else {}
    layer = FusedMoE(E, K, H, I, params_dtype=dtype, quant_config=cfg, has_bias=bias,
                     activation="swigluoai" if bias else "silu", **kw)
    El = layer.local_num_experts
    w13 = torch.randn(El, 2 * I, H, generator=gen) * 0.05
    w2 = torch.randn(El, H, I, generator=gen) * 0.05
    b13 = torch.randn(El, 2 * I, generator=gen) * 0.1 if bias else None
    b2 = torch.randn(El, H, generator=gen) * 0.1 if bias else None
    if act_order:  # a random act-order grouping per expert: g_idx[perm[j]] = j // G
        layer.quant_method.quantize_dense(layer, w13.to(dtype), w2.to(dtype))
        for p in ("w13", "w2"):
            g = getattr(layer, f"{p}_weight_g_idx").data
            for e in range(El):
                perm = torch.randperm(g.shape[1], generator=gen)
                g[e, perm] = (torch.arange(g.shape[1]) // G).int()
        layer.quant_method.process_weights_after_loading(layer)
    else:
        layer.load_dense_weights(w13.to(dtype), w2.to(dtype), b13, b2)
    return layer.to(device)


def compare(layer, T, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype).to(device)
    logits = torch.randn(T, E, generator=gen).to(device)
    w, ids = layer.route(x, logits)
    layer.backend = "triton"
    out = layer.experts_forward(x, w, ids)
    layer.backend = "reference"
    ref = layer.experts_forward(x.float(), w, ids)
    return rel_err(out, ref)


@pytest.fixture
def always_gemv(monkeypatch):
    monkeypatch.setattr(gv, "MODE", "always")


def _tol(dtype):
    """fp32: accumulation order only; fp16/bf16: the output's rounding (nvfp4 too: both paths quantize activations
    with fp4_math.nvfp4_act_codes, GEMM2's from an fp32 intermediate)."""
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


@pytest.mark.skipif(not INTERP, reason="interpreter test (CPU)")
@pytest.mark.parametrize("case", SCHEMES, ids=lambda c: f"{c[0]}-G{c[1]}-act{int(c[2])}-bias{int(c[3])}")
def test_gemv_interpreter_matches_reference(case, always_gemv):
    scheme, G, act, bias = case
    for dtype, T in ((torch.float32, 3), (torch.float16, 1)):  # fp32: the math; fp16: the output's rounding
        layer = build(scheme, G, act, bias, dtype, "cpu")
        err = compare(layer, T, dtype, "cpu", seed=T)
        assert err <= _tol(dtype), (scheme, dtype, T, err)


@pytest.mark.skipif(not INTERP, reason="interpreter test (CPU)")
@pytest.mark.parametrize("case", [("w4a16", 32, False, 3), ("w4a16", 128, True, 2), ("w4a16-asym", 64, False, 2)],
                         ids=lambda c: f"{c[0]}-G{c[1]}-act{int(c[2])}-split{c[3]}")
def test_gemv_int_split_k_and_wide_blocks(case, always_gemv, monkeypatch):
    """The int kernel's GEMM2 split over the reduction (atomic fp32 adds, then one cast) with uneven last splits, and
    the masked (not EVEN) steps: GEMM1 blocks of 256 rows over N = 384, GEMM2 chunks of 256 columns over 384 (G=128),
    against the reference."""
    scheme, G, act_order, split = case
    monkeypatch.setattr(gv, "OVERRIDE", {False: gv.GemvConfig(256, 2, 4), True: gv.GemvConfig(32, 2, 2, SPLIT_K=split)})
    layer = build(scheme, G, act_order, False, torch.float32, "cpu")
    assert compare(layer, 3, torch.float32, "cpu") < 1e-5


@pytest.mark.skipif(not INTERP, reason="interpreter test (CPU)")
@pytest.mark.parametrize("case", [("w4a16", 32, False, False, 1), ("w4a16", 128, True, False, 2),
                                  ("w4a16-asym", 64, False, False, 3), ("mxfp4", None, False, True, 2),
                                  ("w4a16", 32, False, False, 2, True)],
                         ids=lambda c: f"{c[0]}-G{c[1]}-act{int(c[2])}-bias{int(c[3])}-split{c[4]}"
                                       + ("-ep" if len(c) > 5 else ""))
def test_gemv_part_split(case, always_gemv, monkeypatch):
    """GEMM2 with one program per top-k expert (PART_SPLIT), alone or times a split of the reduction: every program
    adds its weighted share (the bias once per expert, from its first split) to the fp32 buffer and the last of the
    K * SPLIT_K programs casts it; with expert parallelism the other rank's slots still arrive, adding nothing."""
    scheme, G, act_order, bias, split, *ep = case
    monkeypatch.setattr(gv, "OVERRIDE", {False: gv.GemvConfig(64, 2, 4),
                                         True: gv.GemvConfig(32, 1, 2, SPLIT_K=split, PART_SPLIT=True)})
    layer = build(scheme, G, act_order, bias, torch.float32, "cpu", ep=bool(ep))
    plans, plan_gemv = [], gv.plan_gemv
    monkeypatch.setattr(gv, "plan_gemv", lambda *a, **k: plans.append(plan_gemv(*a, **k)) or plans[-1])
    for T in (1, 3):
        assert compare(layer, T, torch.float32, "cpu", seed=T) < 1e-5, T
    assert {(p.part_programs, p.shares) for p in plans if p.P == 1} == {(K, K * split)}, plans


@pytest.mark.skipif(not INTERP, reason="interpreter test (CPU)")
@pytest.mark.parametrize("scheme", ["w4a16", "nvfp4a16", "fp8-channel"])
def test_gemv_expert_parallel_and_weight_on_input(scheme, always_gemv):
    """Slots routed to another rank's experts (-1 ids) contribute nothing; top-1 with the routing weight applied to
    the input."""
    layer = build(scheme, 32 if scheme == "w4a16" else None, False, False, torch.float32, "cpu", ep=True)
    assert compare(layer, 4, torch.float32, "cpu") <= 1e-5
    gen = torch.Generator().manual_seed(5)
    cfg = QuantConfig(scheme=scheme, group_size=32 if scheme == "w4a16" else None)
    top1 = FusedMoE(E, 1, H, I, params_dtype=torch.float32, quant_config=cfg, apply_router_weight_on_input=True)
    top1.load_dense_weights(torch.randn(E, 2 * I, H, generator=gen) * 0.05, torch.randn(E, H, I, generator=gen) * 0.05)
    x = torch.randn(2, H, generator=gen)
    w = torch.rand(2, 1, generator=gen)
    ids = torch.tensor([[4], [1]], dtype=torch.int32)
    top1.backend = "triton"
    out = top1.experts_forward(x, w, ids)
    top1.backend = "reference"
    assert rel_err(out, top1.experts_forward(x, w, ids)) <= 1e-5


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16", "w4a16-asym"])
def test_act_order_decode_gathers_in_the_routing_launch(scheme, always_gemv, monkeypatch):
    """Act-order on the decode path with a routing launch (GEMM1 not routing: beyond ROUTE_MAX_TOKENS, or
    MOEQUANT_GEMV_ROUTE=never): the layer's forward routes and writes each slot's x row in w13's sorted order in one
    launch (fused_topk_gather, no gather_slot_columns), and matches the reference forward."""
    import moequant.kernels.gather as gather_mod
    import moequant.kernels.topk as topk_mod

    monkeypatch.setattr(gv, "ROUTE_MODE", "never")

    dtype = torch.bfloat16 if ON_GPU else torch.float32
    dev = "cuda" if ON_GPU else "cpu"
    if not ON_GPU and not INTERP:
        pytest.skip("the Triton backend on the CPU needs the interpreter")
    layer = build(scheme, 64, True, False, dtype, dev)
    calls = []
    fused = topk_mod.fused_topk_gather
    monkeypatch.setattr(topk_mod, "fused_topk_gather", lambda *a: calls.append(1) or fused(*a))
    monkeypatch.setattr(gather_mod, "gather_slot_columns_kernel", None)  # must not be launched
    gen = torch.Generator().manual_seed(9)
    for T in (1, 2):
        x = torch.randn(T, H, generator=gen).to(dtype).to(dev)
        logits = torch.randn(T, E, generator=gen).to(dev)
        layer.backend = "triton"
        out = layer(x, logits)
        layer.backend = "reference"
        ref = layer(x.float(), logits).to(dtype) if dtype != torch.float32 else layer(x, logits)
        assert rel_err(out, ref) <= (1e-2 if ON_GPU else 1e-5), (scheme, T)
    assert len(calls) == 2


@pytest.mark.parametrize("case", [("w4a16", 32, False, False, "softmax", True),
                                  ("w8a16", 128, False, False, "sigmoid", True),
                                  ("nvfp4a16", None, False, False, "softmax", False),
                                  ("mxfp4", None, False, True, "softmax", True),
                                  ("w4a16-asym", 64, False, False, "sigmoid", False),
                                  ("w4a16", 32, True, False, "softmax", True),
                                  ("w8a16", 64, True, True, "sigmoid", False)],
                         ids=lambda c: f"{c[0]}-G{c[1]}-act{int(c[2])}-bias{int(c[3])}-{c[4]}-renorm{int(c[5])}")
def test_decode_gemv_routes_in_gemm1(case, monkeypatch):
    """Decode GEMV: GEMM1's programs route their tokens themselves (no routing launch: neither fused_topk nor
    fused_topk_gather is called) and write the weights and ids GEMM2 reads: the ids those of the routing launch, the
    weights equal up to the order of one fp32 sum (another warp count); the output matches the one with a routing
    launch first (on the CPU bit for bit: the same GEMV sums; a GPU's split-K atomics add in any order) and the
    reference. Act-order: routed_rows (no routing) writes the slots' rows of x in sorted column order, each where
    GEMM1's routing puts its expert (GEMM1 its programmatic dependent, and GEMM2, routing again, GEMM1's:
    gemv.rows_launch_pdl and chain_pdl, forced here; in the interpreter the launches wait as plain ones).
    Softmax and sigmoid, with and without renormalisation, a routed scaling factor, E = 6 padded to 16, one token
    and two. Beyond ROUTE_MAX_TOKENS, and for mxfp4 (measured slower), the routing launch stays. In the interpreter
    H = I = 128 (the routing is under test here, not the tiles: a quarter of the time of 256 x 384)."""
    h, i = (H, I) if ON_GPU else (128, 128)
    import moequant.kernels.topk as topk_mod

    scheme, G, act_order, bias, scoring, renorm = case
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    dev = "cuda" if ON_GPU else "cpu"
    if not ON_GPU and not INTERP:
        pytest.skip("the Triton backend on the CPU needs the interpreter")
    layer = build(scheme, G, act_order, bias, dtype, dev, H=h, I=i)
    layer.scoring_func, layer.renormalize, layer.routed_scaling_factor = scoring, renorm, 2.5
    calls, routes, rows = [], [], []
    fused, deferred = topk_mod.fused_topk, topk_mod.deferred_routing
    fused_gather, routed = topk_mod.fused_topk_gather, topk_mod.routed_rows
    monkeypatch.setattr(topk_mod, "fused_topk", lambda *a, **k: calls.append(1) or fused(*a, **k))
    monkeypatch.setattr(topk_mod, "fused_topk_gather", lambda *a, **k: calls.append(2) or fused_gather(*a, **k))
    monkeypatch.setattr(topk_mod, "deferred_routing", lambda *a: routes.append(deferred(*a)) or routes[-1])
    monkeypatch.setattr(topk_mod, "routed_rows", lambda *a, **k: rows.append(routed(*a, **k)) or rows[-1])
    monkeypatch.setattr(gv, "rows_launch_pdl", lambda x: True)
    monkeypatch.setattr(gv, "chain_pdl", lambda x, w13: True)
    launches, gemv = [], gv.gemv
    monkeypatch.setattr(gv, "gemv", lambda *a, **k: launches.append((k["down"], k.get("route") is not None))
                        or gemv(*a, **k))
    gen = torch.Generator().manual_seed(11)
    for T, max_tokens in ((1, 1), (2, 2), (2, 1)):
        monkeypatch.setattr(gv, "ROUTE_MAX_TOKENS", max_tokens)
        x = torch.randn(T, h, generator=gen).to(dtype).to(dev)
        logits = torch.randn(T, E, generator=gen).to(dev)
        layer.backend = "triton"
        calls.clear()
        rows.clear()
        launches.clear()
        monkeypatch.setattr(gv, "ROUTE_MODE", "auto")
        out = layer(x, logits)
        assert len(calls) == (T > max_tokens or scheme == "mxfp4"), (T, max_tokens, calls)
        # GEMM2 routes again when chained to GEMM1: act-order, and A16 fp4's bf16x2 body on a GPU
        chained = not calls and (act_order or (gv.PLAIN_CHAIN and scheme == "nvfp4a16" and ON_GPU))
        assert launches == [(False, not calls), (True, chained)], launches  # which ones route
        assert len(rows) == (act_order and not calls), (T, max_tokens, len(rows))
        monkeypatch.setattr(gv, "ROUTE_MODE", "never")
        w_ref, ids_ref = layer.route(x, logits)
        if not calls:  # routed in GEMM1
            assert torch.equal(routes[-1].ids, ids_ref), T
            torch.testing.assert_close(routes[-1].weights, w_ref, rtol=1e-6, atol=1e-7)
        if rows:  # each slot's row: x in its expert's sorted column order
            slot_x = x.repeat_interleave(layer.top_k, 0)
            want = torch.gather(slot_x, 1, layer.w13_sort_idx[ids_ref.reshape(-1).long()].long())
            assert torch.equal(rows[-1], want), T
        launched = layer(x, logits)
        assert torch.equal(out, launched) if dev == "cpu" else rel_err(out, launched) <= 5e-3, T
        layer.backend = "reference"
        ref = layer(x.float(), logits).to(dtype) if dtype != torch.float32 else layer(x, logits)
        assert rel_err(out, ref) <= (1e-2 if ON_GPU else 1e-5), (scheme, T)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", SCHEMES, ids=lambda c: f"{c[0]}-G{c[1]}-act{int(c[2])}-bias{int(c[3])}")
def test_gemv_gpu_bf16_matches_reference(case, always_gemv):
    scheme, G, act, bias = case
    layer = build(scheme, G, act, bias, torch.bfloat16, "cuda")
    for T in (1, 2, 5):
        err = compare(layer, T, torch.bfloat16, "cuda", seed=T)
        assert err <= _tol(torch.bfloat16), (scheme, T, err)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme", ["nvfp4a16", "mxfp4", "nvfp4"])
def test_gemv_gpu_fp16_fp4_takes_the_fp32_path(scheme, always_gemv):
    """fp16 activations keep the A16 fp4 GEMVs off the bf16x2 path: the rows kernel's fp32 path with the decode
    layout's own decode (fp4_word_dot_f32), as nvfp4's GEMM1 takes it for bf16 too, against the reference."""
    layer = build(scheme, None, False, False, torch.float16, "cuda")
    for T in (1, 2):
        err = compare(layer, T, torch.float16, "cuda", seed=T)
        assert err <= (1e-2 if scheme == "nvfp4" else _tol(torch.float16)), (scheme, T, err)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", [("w4a16", 128, True), ("w4a16-asym", 64, False), ("w8a16", 32, False),
                                  ("nvfp4a16", None, False), ("mxfp4", None, False)], ids=lambda c: f"{c[0]}-G{c[1]}")
def test_gemv_gpu_pipelined_steps(case, always_gemv, monkeypatch):
    """The rows kernel with its steps software-pipelined through shared memory (STAGES 3 and 4; the interpreter
    ignores it), one group per step so there are several steps, GEMM2 split in two, against the reference."""
    scheme, G, act_order = case
    monkeypatch.setattr(gv, "OVERRIDE", {False: gv.GemvConfig(32, 1, 4, STAGES=3),
                                         True: gv.GemvConfig(16, 1, 4, SPLIT_K=2, STAGES=4)})
    layer = build(scheme, G, act_order, False, torch.bfloat16, "cuda")
    for T in (1, 3):
        assert compare(layer, T, torch.bfloat16, "cuda", seed=T) <= 1e-2, (scheme, T)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme, G, act_order",
                         [("w4a16", 128, False), ("w4a16", 128, True), ("nvfp4a16", None, False),
                          ("nvfp4", None, False)], ids=["plain", "act-order", "nvfp4a16", "nvfp4"])
def test_gemv_gpu_graph_replay_with_split(scheme, G, act_order, always_gemv, monkeypatch):
    """GEMM1 (routing) -> GEMM2 captured in a CUDA graph with GEMM2 split in three (GEMM1 zeroes the split buffer
    and counters on every replay, the last program of a block casts it); with act-order routed_rows -> GEMM1 ->
    GEMM2, and for nvfp4a16 GEMM1 -> GEMM2 (its first weights loaded before it waits), chained as programmatic
    dependents (forced on); nvfp4: x's quantizer -> GEMM1 -> its output's quantizer -> GEMM2, not chained:
    replays with new inputs match eager forwards (fp32 atomics may add in another order: a bf16 rounding apart at
    most) and the reference."""
    monkeypatch.setattr(gv, "OVERRIDE", {False: gv.GemvConfig(32, 1, 4), True: gv.GemvConfig(16, 1, 4, SPLIT_K=3)})
    monkeypatch.setattr(gv, "chain_pdl", lambda x, w13: gv.rows_launch_pdl(x))
    layer = build(scheme, G, act_order, False, torch.bfloat16, "cuda")
    assert_graph_replays_match_eager(layer, H, E)
    gen = torch.Generator().manual_seed(5)
    for T in (1, 2):  # routed by GEMM1 (chained at one token)
        x = torch.randn(T, H, generator=gen).to(torch.bfloat16).cuda()
        logits = torch.randn(T, E, generator=gen).cuda()
        layer.backend = "triton"
        out = layer(x, logits)
        layer.backend = "reference"
        assert rel_err(out, layer(x.float(), logits).to(torch.bfloat16)) <= 1e-2, (scheme, T)
        layer.backend = "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", [("w4a16", 128, False), ("w4a16", 32, True), ("w4a16-asym", 64, False),
                                  ("w4a16-asym", None, False), ("nvfp4a16", None, False), ("mxfp4", None, False)],
                         ids=lambda c: f"{c[0]}-G{c[1]}-act{int(c[2])}")
@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 3e4])
@pytest.mark.parametrize("prefetch", [False, True])
def test_gemv_gpu_packed_bf16_products(case, magnitude, prefetch, always_gemv, monkeypatch):
    """int4 and fp4 with bf16 activations form their products in bf16x2 chains (PACKED, from int32 activation pairs;
    act-order's GEMM1 input pre-gathered per slot; fp4's activations scaled by 2^64, its e2m1 values read as bf16
    times 2^-126, subnormal for the code 0.5): against the reference and against the fp32-product kernel, for
    activations far below and above 1 (bf16 has fp32's exponent range: nothing underflows or overflows). prefetch:
    one group per step, each step's loads issued during the step before (GEMM2 in uneven splits, one expert per
    program)."""
    scheme, G, act_order = case
    if prefetch:
        monkeypatch.setattr(gv, "OVERRIDE", {False: gv.GemvConfig(16, 1, 4, PREFETCH=True),
                                             True: gv.GemvConfig(16, 1, 4, SPLIT_K=2, PART_SPLIT=True, PREFETCH=True)})
    layer = build(scheme, G, act_order, False, torch.bfloat16, "cuda")
    x = (torch.randn(3, H, generator=torch.Generator().manual_seed(7)) * magnitude).to("cuda", torch.bfloat16)
    logits = torch.randn(3, E, generator=torch.Generator().manual_seed(8)).to("cuda")
    w, ids = layer.route(x, logits)
    layer.backend = "reference"
    ref = layer.experts_forward(x.float(), w, ids)
    layer.backend = "triton"
    seen = []
    choose = gv.uses_packed
    monkeypatch.setattr(gv, "uses_packed", lambda wt, a: seen.append(choose(wt, a)) or seen[-1])
    out = layer.experts_forward(x, w, ids)
    assert len(seen) >= 2 and all(seen)  # GEMM1 and GEMM2 both took the bf16x2 path (GEMM2's plan asks first)
    monkeypatch.setattr(gv, "PACKED", False)
    fp32_products = layer.experts_forward(x, w, ids)
    assert rel_err(out, ref) <= 1e-2
    assert rel_err(out, fp32_products) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme", ["nvfp4a16", "mxfp4"])
@pytest.mark.parametrize("unit", [2, 4, 8])
@pytest.mark.parametrize("prefetch,stages", [(False, 1), (True, 1), (False, 3)])
def test_gemv_gpu_fp4_tile_units(scheme, unit, prefetch, stages, always_gemv, monkeypatch):
    """A16 fp4's bf16x2 tile elements of 2, 4 and 8 byte columns (their chains added in fp32, one block scale per
    row and element): a partial last row block in GEMM1 (256 of 384 rows), a partial last step in GEMM2 (16 groups
    per step of 24 nvfp4 / 12 mxfp4 groups), GEMM2 with every top-k expert in one program and with one expert per
    program in uneven splits; loads one step ahead in registers (PREFETCH) or three stages through shared memory;
    against the reference and the fp32-product kernel, for T = 1 and 3."""
    layer = build(scheme, None, False, scheme == "mxfp4", torch.bfloat16, "cuda")
    pipe = dict(PREFETCH=prefetch, STAGES=stages, UNIT=unit)  # registers one step ahead, or cp.async stages
    configs = [{False: gv.GemvConfig(256, 2, 4, **pipe), True: gv.GemvConfig(32, 16, 4, **pipe)},
               {False: gv.GemvConfig(16, 1, 4, **pipe),
                True: gv.GemvConfig(16, 1, 4, SPLIT_K=2, PART_SPLIT=True, **pipe)}]
    for T in (1, 3):
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to("cuda", torch.bfloat16)
        logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T + 1)).to("cuda")
        w, ids = layer.route(x, logits)
        layer.backend = "reference"
        ref = layer.experts_forward(x.float(), w, ids)
        layer.backend = "triton"
        monkeypatch.setattr(gv, "PACKED", False)
        fp32_products = layer.experts_forward(x, w, ids)
        monkeypatch.setattr(gv, "PACKED", True)
        for cfg in configs:
            monkeypatch.setattr(gv, "OVERRIDE", cfg)
            out = layer.experts_forward(x, w, ids)
            assert rel_err(out, ref) <= 1e-2, (T, cfg)
            assert rel_err(out, fp32_products) <= 1e-2, (T, cfg)


def test_fp4_unit_must_fit_a_scale_group():
    assert gv.fp4_unit(gv.GemvConfig(16, 1, UNIT=8), 16) == 8 and gv.fp4_unit(gv.GemvConfig(16, 1), 32) == 2
    for unit, G in ((16, 32), (8, 8), (3, 16)):
        with pytest.raises(ValueError, match="UNIT must be 2, 4 or 8"):
            gv.fp4_unit(gv.GemvConfig(16, 1, UNIT=unit), G)


@pytest.mark.parametrize("case,want", [
    # (fmt, elements per unit, G, N, groups, parts, grid rows, down) -> (BLOCK_N, NG, SPLIT_K, PART_SPLIT, UNIT)
    (("fp4", 2, 16, 14336, 256, 2, 2, False), (32, 32, 1, False, 8)),  # Mixtral nvfp4 GEMM1 (= the H200's tuned)
    (("fp4", 2, 16, 4096, 896, 2, 1, True), (64, 32, 4, True, 8)),  # Mixtral nvfp4 GEMM2 (tuned runner-up)
    (("fp4", 2, 32, 4096, 448, 2, 1, True), (64, 16, 4, True, 8)),  # Mixtral mxfp4 GEMM2 (= tuned)
    (("fp4", 2, 16, 2048, 48, 8, 1, True), (64, 32, 2, True, 8)),  # Qwen3-30B nvfp4 GEMM2: 512 programs as tuned
    (("int", 8, 128, 4096, 112, 2, 1, True), (32, 2, 4, True, 2)),  # Mixtral int4 GEMM2 (= tuned but PREFETCH)
    (("int", 8, 128, 768, 16, 2, 8, False), (8, 4, 1, False, 2)),  # Qwen3-30B int4 GEMM1 (= tuned but PREFETCH)
])
def test_rows_heuristic_follows_the_tuned_configs(case, want):
    """Without a tuned entry a GPU gets the structure the H200's sweeps chose (132 multiprocessors): GEMM2 with one
    program per top-k expert and the reduction split to about 3 (fp4) or 6 (int) programs per multiprocessor, fp4
    with PREFETCH and 8-byte-column tile elements; on the CPU neither split nor PART_SPLIT."""
    cfg = gv.rows_heuristic(*case, sms=132)
    assert (cfg.BLOCK_N, cfg.NG, cfg.SPLIT_K, cfg.PART_SPLIT, cfg.UNIT) == want
    assert cfg.PREFETCH == (case[0] == "fp4")
    cpu = gv.rows_heuristic(*case, sms=0)
    assert cpu.SPLIT_K == 1 and not cpu.PART_SPLIT and not cpu.PREFETCH and cpu.UNIT == 2


@pytest.mark.parametrize("case,want", [
    # (N, groups of 128 columns, grid rows, down) -> (BLOCK_N, num_warps, STAGES), all on the tensor-core body
    ((768, 16, 8, False), (16, 8, 1)),  # Qwen3-30B GEMM1 (= the H200's tuned)
    ((2048, 6, 1, True), (32, 4, 2)),  # Qwen3-30B GEMM2 (= tuned)
    ((256, 56, 8, False), (16, 16, 1)),  # DeepSeek-V3 shard GEMM1: K 7168, 112 chunks (= tuned)
    ((7168, 2, 1, True), (32, 2, 1)),  # DeepSeek-V3 shard GEMM2: K 256, 4 chunks (= tuned)
])
def test_fp8_rows_heuristic_follows_the_tuned_configs(case, want):
    """Without a tuned entry a GPU's fp8 rows GEMV gets what the H200's sweeps chose: more warps for a long GEMM1
    reduction, fewer and one step in flight for a short GEMM2 one; the CPU keeps the CUDA-core body."""
    cfg = gv.fp8_rows_heuristic(*case, sms=132)
    assert cfg.MMA and (cfg.BLOCK_N, cfg.num_warps, cfg.STAGES) == want and cfg.PART_SPLIT == case[3]
    assert not gv.fp8_rows_heuristic(*case, sms=0).MMA


def test_use_gemv_follows_slots_per_expert(monkeypatch):
    monkeypatch.setattr(gv, "MODE", "auto")
    assert gv.use_gemv(1, 2, 8) and gv.use_gemv(4, 2, 8) and not gv.use_gemv(8, 2, 8)  # Mixtral: T*K <= E
    assert gv.use_gemv(16, 8, 128) and not gv.use_gemv(64, 8, 128)  # Qwen3-30B
    assert gv.use_gemv(2, 8, 4)  # two tokens always
    assert not gv.use_gemv(1, 2, 8, slots_per_expert=0)  # fp8: the tensor-core path unless forced
    assert gv.use_gemv(8, 2, 8, slots_per_expert=2) and not gv.use_gemv(9, 2, 8, slots_per_expert=2)  # fp4
    monkeypatch.setattr(gv, "MODE", "always")
    assert gv.use_gemv(64, 8, 8, slots_per_expert=0)
    monkeypatch.setattr(gv, "MODE", "never")
    assert not gv.use_gemv(1, 2, 8)
