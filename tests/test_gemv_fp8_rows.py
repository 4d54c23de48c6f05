"""fp8 decode on the rows GEMV (kernels/_gemv_fp8_rows.py): activations quantized inside the two GEMV launches
(static scale, x's own amax, GEMM1's amax partials), GEMM1 routing itself, against the layer's torch reference on
the same dequantized weights: interpreter (fp32 products) on the CPU; on the GPU the tensor-core body
(_gemv_fp8_mma.py, the default there) and the CUDA-core one (f16x2 products).

# T tokens, E experts, H hidden, I intermediate, K top-k
"""

import os

import pytest
import torch

import moequant.kernels.fp8_gemm as fp8_gemm
import moequant.kernels.gemv as gv
from _graph_replay import assert_graph_replays_match_eager
from conftest import ON_GPU, rel_err
from moequant import FusedMoE, QuantConfig
from moequant.quantize import fp8_math as fm

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
E, K, H, I = 6, 3, 256, 384  # I = 3 groups of 128: a partial last step when a step holds 2
DEV = "cuda" if ON_GPU else "cpu"

needs_triton = pytest.mark.skipif(not ON_GPU and not INTERP, reason="the Triton backend on the CPU needs the "
                                                                    "interpreter")


def build(scheme, dtype, *, static=False, bias=False, ep=False, top_k=K, on_input=False, scale=1.0, hidden=H):
    gen = torch.Generator().manual_seed(7)
    qc = QuantConfig(scheme, activation_scheme="static" if static else "dynamic")
    kw = dict(ep_size=2, ep_rank=1) if ep else {}
    layer = FusedMoE(E, top_k, hidden, I, params_dtype=dtype, quant_config=qc, has_bias=bias,
                     activation="swigluoai" if bias else "silu", apply_router_weight_on_input=on_input, **kw)
    El = layer.local_num_experts
    w13 = torch.randn(El, 2 * I, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(El, hidden, I, generator=gen) / I**0.5
    b13 = torch.randn(El, 2 * I, generator=gen) * 0.1 if bias else None
    b2 = torch.randn(El, H, generator=gen) * 0.1 if bias else None
    if static:
        layer.quant_method.quantize_dense(layer, w13.to(dtype), w2.to(dtype))
        layer.w13_input_scale.data.fill_(3.0 * scale / 448)
        layer.w2_input_scale.data.fill_(0.8 * scale / 448)
        layer.process_weights_after_loading()
    else:
        layer.load_dense_weights(w13.to(dtype), w2.to(dtype), b13, b2)
    return layer.to(DEV)


def forward_pair(layer, T, dtype, seed, scale=1.0):
    """(Triton forward through the layer, reference forward) on the same routing."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, layer.hidden_size, generator=gen) * scale).to(dtype).to(DEV)
    logits = torch.randn(T, E, generator=gen).to(DEV)
    layer.backend = "triton"
    out = layer(x, logits)
    layer.backend = "reference"
    ref = layer(x.float(), logits)
    return out, ref


def record_plans(monkeypatch):
    plans, plan_gemv = [], gv.plan_gemv
    monkeypatch.setattr(gv, "plan_gemv", lambda *a, **k: plans.append(plan_gemv(*a, **k)) or plans[-1])
    monkeypatch.setattr(fp8_gemm, "plan_gemv", gv.plan_gemv)
    return plans


CASES = [  # (scheme, static, bias)
    ("fp8-tensor", False, False), ("fp8-tensor", True, False), ("fp8-channel", False, False),
    ("fp8-channel", False, True),
]


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-static{int(c[1])}-bias{int(c[2])}")
@pytest.mark.parametrize("cfg", ["heuristic", "uneven-split"])
def test_rows_gemv_matches_reference(case, cfg, monkeypatch):
    """Both GEMVs on the rows kernel (GEMM2 one expert per program), routing in GEMM1, for one token and for three
    (a per-tensor dynamic scale over all of x's rows; GEMM2's from GEMM1's per-program maxima); "uneven-split":
    steps of 256 columns over I = 384 (masked last step), GEMM2 split in two, GEMM1 blocks of 256 rows over 384 (on a
    GPU 128: a thread would hold 256 words per half)."""
    scheme, static, bias = case
    monkeypatch.setattr(gv, "MODE", "always")
    if cfg == "uneven-split":
        monkeypatch.setattr(gv, "OVERRIDE", {False: gv.GemvConfig(256 if not ON_GPU else 128, 2, 4),
                                             True: gv.GemvConfig(32, 2, 4, SPLIT_K=2, PART_SPLIT=True)})
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    layer = build(scheme, dtype, static=static, bias=bias)
    plans = record_plans(monkeypatch)
    quants = []
    monkeypatch.setattr(fp8_gemm, "act_quant", lambda *a, **k: quants.append(1))  # must not run
    for T in (1, 3):
        out, ref = forward_pair(layer, T, dtype, seed=T)
        assert rel_err(out, ref) <= (5e-3 if ON_GPU else 1e-5), (case, T)
    assert quants == []
    assert all(p.rows_kernel for p in plans) and {p.P for p in plans} == {2, 1}, plans


@needs_triton
@pytest.mark.parametrize("scheme", ["fp8-tensor", "fp8-channel"])
def test_rows_gemv_expert_parallel_and_weight_on_input(scheme, monkeypatch):
    """Slots of another rank's experts write an amax partial of 0 and contribute nothing; top-1 with the routing
    weight applied to GEMM1's input (routed by a launch first)."""
    monkeypatch.setattr(gv, "MODE", "always")
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    tol = 5e-3 if ON_GPU else 1e-5
    layer = build(scheme, dtype, ep=True)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, H, generator=gen).to(dtype).to(DEV)
    w = torch.rand(2, K, generator=gen).to(DEV)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(2)]).int().to(DEV)
    local = layer.to_local_ids(ids)
    assert (local < 0).any()
    out = layer.quant_method.apply_triton(layer, x, w, local)
    assert rel_err(out, layer.quant_method.apply_reference(layer, x.float(), w, local)) <= tol
    top1 = build(scheme, dtype, top_k=1, on_input=True)
    out, ref = forward_pair(top1, 2, dtype, seed=4)
    assert rel_err(out, ref) <= tol


class _LaunchSpy:
    """Stands in for gemv_rows_kernel: records each launch's keyword arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.launches.append(kw)
            return self.kernel[grid](*args, **kw)
        return launch


@needs_triton
@pytest.mark.parametrize("scheme", ["fp8-tensor", "fp8-channel"])
def test_rows_gemv_early_input_row_changes_nothing(scheme, monkeypatch):
    """GEMM1 loading the input row its dynamic scale reduces before it routes (XB, a masked power of two over
    H = 208) gives the output of the late loads (bit for bit on the CPU), for one token and for three (per tensor:
    the early row, then the others); a static scale never takes it."""
    monkeypatch.setattr(gv, "MODE", "always")
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    layer = build(scheme, dtype, hidden=208)
    spy = _LaunchSpy(gv.gemv_rows_kernel)
    monkeypatch.setattr(gv, "gemv_rows_kernel", spy)
    for T in (1, 3):
        out, ref = forward_pair(layer, T, dtype, seed=T)
        assert [kw.get("XB", 0) for kw in spy.launches[-2:]] == [256, 0]
        monkeypatch.setattr(gv, "X_EARLY", False)
        late, _ = forward_pair(layer, T, dtype, seed=T)
        monkeypatch.setattr(gv, "X_EARLY", True)
        assert [kw.get("XB", 0) for kw in spy.launches[-2:]] == [0, 0]
        assert rel_err(out, ref) <= (5e-3 if ON_GPU else 1e-5), T
        assert torch.equal(out, late) if not ON_GPU else rel_err(out, late) <= 4e-3, T
    static = build("fp8-tensor", dtype, static=True, hidden=208)
    forward_pair(static, 1, dtype, seed=1)
    assert [kw.get("XB", 0) for kw in spy.launches[-2:]] == [0, 0]


@needs_triton
def test_rows_gemv_is_the_default_for_one_token_only(monkeypatch):
    """Auto mode: one token takes the rows GEMV and routes in GEMM1 (no routing launch); two tokens, or experts
    beyond ROWS_MAX_EXPERT_BYTES, the tensor-core path; block scales and rows that are not a multiple of 16 bytes
    never take it."""
    import moequant.kernels.topk as topk_mod

    monkeypatch.setattr(gv, "MODE", "auto")
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    layer = build("fp8-tensor", dtype)
    calls, fused = [], topk_mod.fused_topk
    monkeypatch.setattr(topk_mod, "fused_topk", lambda *a, **k: calls.append(1) or fused(*a, **k))
    plans = record_plans(monkeypatch)
    out, ref = forward_pair(layer, 1, dtype, seed=1)
    assert calls == [] and len(plans) == 2 and rel_err(out, ref) <= (5e-3 if ON_GPU else 1e-5)
    plans.clear()
    out, ref = forward_pair(layer, 2, dtype, seed=2)
    assert plans == [] and rel_err(out, ref) <= (5e-3 if ON_GPU else 1e-5)
    monkeypatch.setattr(fp8_gemm, "ROWS_MAX_EXPERT_BYTES", layer.w13_weight[0].numel() - 1)  # experts too large
    forward_pair(layer, 1, dtype, seed=3)
    assert plans == [] and len(calls) == 2
    blocky = fp8_gemm.Fp8Layout("block", "group")
    w = layer.w13_weight
    assert not fp8_gemm.rows_gemv(1, w, layer.w2_weight, layer.w13_weight_scale, layer.w2_weight_scale, blocky)
    assert not gv.fp8_rows(gv.GemvWeights("fp8", w[:, :, :248], expert_scale=layer.w13_weight_scale))


@needs_triton
def test_rows_gemv_reads_an_aligned_copy_of_a_strided_x(monkeypatch):
    """x whose rows are not 16-byte aligned (a column slice) goes to GEMM1 as an aligned contiguous copy (its
    activations are read by vector loads) and gives the output of the contiguous x."""
    monkeypatch.setattr(gv, "MODE", "always")
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    layer = build("fp8-tensor", dtype)
    gen = torch.Generator().manual_seed(6)
    wide = torch.randn(2, H + 1, generator=gen).to(dtype).to(DEV)
    x = wide[:, 1:]
    w = torch.rand(2, K, generator=gen).to(DEV)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(2)]).int().to(DEV)
    seen, gemv = [], gv.gemv
    monkeypatch.setattr(fp8_gemm, "gemv", lambda a, *r, **k: seen.append(a) or gemv(a, *r, **k))
    out = layer.quant_method.apply_triton(layer, x, w, ids)
    a = seen[0]
    assert a.stride(1) == 1 and a.stride(0) % 8 == 0 and a.data_ptr() % 16 == 0
    again = layer.quant_method.apply_triton(layer, x.contiguous(), w, ids)  # GPU: atomics may add in another order
    assert torch.equal(out, again) if not ON_GPU else rel_err(out, again) <= 4e-3


def test_rows_gemv_rejects_other_fp8_layouts():
    w = torch.zeros(2, 8, 40, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        gv.uses_rows_kernel(gv.GemvWeights("fp8", w, expert_scale=torch.ones(2)), a_quant=gv.Fp8ActIn("tensor",
                                                                                                         "input"))


# --- GPU: the tensor-core (mma) and CUDA-core (f16x2) bodies ------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_quant_pair_equals_the_twin_bit_for_bit():
    """The in-kernel quantizer (x * RN(1/s) corrected by an fma residual, satfinite e4m3) gives the twin's codes
    (IEEE division, clamp, cast; equal values, zero's sign aside) for random values, values that sit exactly on e4m3
    rounding ties, values beyond +-448 s, tiny values and zeros, for several scales; the f16x2 form (times 2^-8)
    holds the same values."""
    import triton
    import triton.language as tl

    from moequant.kernels._gemv_fp8_rows import _pair_f16x2, _quant_pair

    @triton.jit
    def probe(x_ptr, codes_ptr, halves_ptr, s, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x0 = tl.load(x_ptr + 2 * offs, mask=offs < n, other=0.0)
        x1 = tl.load(x_ptr + 2 * offs + 1, mask=offs < n, other=0.0)
        q = _quant_pair(x0, x1, tl.math.div_rn(1.0, s), -s)
        tl.store(codes_ptr + offs, q, mask=offs < n)
        tl.store(halves_ptr + offs, _pair_f16x2(q), mask=offs < n)

    gen = torch.Generator().manual_seed(0)
    grid = fm.quantize_fp8(torch.linspace(-448, 448, 4001), torch.ones(1)).float().unique()
    ties = (grid[1:] + grid[:-1]) / 2  # midpoints between neighbouring e4m3 values
    for amax in (1.0, 3.7, 1e-3, 2.5e4):
        s = fm.act_scale(torch.tensor([amax]))
        x = torch.cat([torch.randn(100000, generator=gen) * amax / 2, ties * s, grid * s, torch.tensor([
            1e3 * amax, -1e3 * amax, 0.0, -0.0, 1e-30, amax])])
        x = x[: x.numel() // 2 * 2].contiguous().cuda()
        codes = torch.empty(x.numel() // 2, dtype=torch.int32, device="cuda")
        halves = torch.empty_like(codes)
        probe[(triton.cdiv(codes.numel(), 1024),)](x, codes, halves, s.item(), codes.numel(), BLOCK=1024)
        want = fm.quantize_fp8(x.cpu(), s).float()  # values: x = -0.0 gives the code +0 here (the residual adds +0)
        got = codes.cpu().view(torch.uint8).view(-1, 4)[:, :2].reshape(-1).view(torch.float8_e4m3fn).float()
        assert torch.equal(got, want), (amax, (got != want).sum().item())
        assert (codes.cpu() >> 16 == 0).all()
        assert torch.equal(halves.view(torch.float16).float().cpu() * 256, want), amax


F16X2 = {False: gv.GemvConfig(32, 2, 4), True: gv.GemvConfig(16, 2, 4, PART_SPLIT=True)}  # the CUDA-core body


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("body", ["mma", "f16x2"])
@pytest.mark.parametrize("scheme", ["fp8-tensor", "fp8-channel"])
@pytest.mark.parametrize("dtype,magnitude", [(torch.bfloat16, 1e-4), (torch.bfloat16, 1.0), (torch.bfloat16, 3e3),
                                             (torch.float16, 1e-2), (torch.float16, 1.0), (torch.float16, 30.0)])
def test_rows_gemv_gpu_products(body, scheme, dtype, magnitude, monkeypatch):
    """Both GPU bodies keep the error within issue 3's 5e-3 at activation scales far from 1 (the codes do not depend
    on the scale; the sums do not overflow), one to five tokens; fp16 at scales whose outputs fp16 holds (1e-4 gives
    outputs ~1e-8, below its subnormals; 3e3 beyond its range). mma (the heuristic's on a GPU): codes in f16,
    products and sums in the mma's fp32 accumulator; f16x2: GEMM1's exact products in fp32 and GEMM2's f16x2 chains
    (the activation codes times 2^-8, chains of eight fmas)."""
    monkeypatch.setattr(gv, "MODE", "always")
    if body == "f16x2":
        monkeypatch.setattr(gv, "OVERRIDE", F16X2)
    layer = build(scheme, dtype)
    plans = record_plans(monkeypatch)
    for T in (1, 2, 5):
        out, ref = forward_pair(layer, T, dtype, seed=T, scale=magnitude)
        assert rel_err(out, ref) <= 5e-3, (T, rel_err(out, ref))
    assert {p.cfg.MMA for p in plans} == {body == "mma"}


# (GEMM1 rows, GEMM1 warps, GEMM2 rows, GEMM2 warps): H = 256 columns are one step of 4 warps (EVEN) or a masked half
# step of 8; I = 384 are three steps of 2 warps (EVEN) or one and a half of 4
# (rows, warps, steps in flight) of GEMM1, then of GEMM2
MMA_CONFIGS = [(16, 4, 1, 32, 2, 1), (16, 8, 1, 16, 4, 2), (16, 8, 2, 32, 4, 3), (16, 2, 3, 16, 1, 2),
               (32, 4, 1, 32, 4, 2)]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows1,warps1,stages1,rows2,warps2,stages2", MMA_CONFIGS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-static{int(c[1])}-bias{int(c[2])}")
def test_rows_gemv_gpu_mma_configs(rows1, warps1, stages1, rows2, warps2, stages2, case, monkeypatch):
    """The tensor-core body over its configs (warps splitting the reduction, with and without a masked last step;
    blocks of 16 or 32 rows; 1-3 steps of loads in flight, more than some warps have steps), static / dynamic /
    per-token scales, bias + swigluoai, one and three tokens (one: GEMM2 launched as GEMM1's programmatic dependent,
    its first steps' weights loaded before it waits), against the reference within 5e-3."""
    scheme, static, bias = case
    monkeypatch.setattr(gv, "MODE", "always")
    monkeypatch.setattr(gv, "OVERRIDE", {False: gv.GemvConfig(rows1, 1, warps1, STAGES=stages1, MMA=True),
                                         True: gv.GemvConfig(rows2, 1, warps2, PART_SPLIT=True, STAGES=stages2,
                                                             MMA=True)})
    layer = build(scheme, torch.bfloat16, static=static, bias=bias)
    launches, gemv = [], gv.gemv
    monkeypatch.setattr(fp8_gemm, "gemv", lambda *a, **k: launches.append(k.get("pdl", False)) or gemv(*a, **k))
    for T in (1, 3):
        out, ref = forward_pair(layer, T, torch.bfloat16, seed=T)
        assert rel_err(out, ref) <= 5e-3, (case, T, rel_err(out, ref))
    assert launches == [False, True, False, False]  # the chain at one token only


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("cfg", [gv.GemvConfig(8, 1, 4, MMA=True), gv.GemvConfig(16, 1, 4, STAGES=4, MMA=True)],
                         ids=["8-rows", "4-stages"])
def test_rows_gemv_gpu_mma_rejects_other_blocks(cfg, monkeypatch):
    monkeypatch.setattr(gv, "MODE", "always")
    monkeypatch.setattr(gv, "OVERRIDE", {False: cfg})
    layer = build("fp8-tensor", torch.bfloat16)
    with pytest.raises(ValueError, match="BLOCK_N 16 or 32 dividing N, no split and 1-3 STAGES"):
        forward_pair(layer, 1, torch.bfloat16, seed=1)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("body", ["mma", "f16x2"])
def test_rows_gemv_gpu_graph_replay(body, monkeypatch):
    """Routing GEMM1 -> GEMM2 captured in a CUDA graph: replays with new inputs match eager forwards. mma: GEMM2
    launched as GEMM1's programmatic dependent; f16x2: GEMM2 split in three (GEMM1 zeroes its buffers)."""
    if body == "f16x2":
        monkeypatch.setattr(gv, "OVERRIDE", {False: gv.GemvConfig(32, 1, 4),
                                             True: gv.GemvConfig(16, 1, 4, SPLIT_K=3, PART_SPLIT=True)})
    layer = build("fp8-tensor", torch.bfloat16)
    assert_graph_replays_match_eager(layer, H, E)
