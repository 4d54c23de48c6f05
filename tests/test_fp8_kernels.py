"""fp8 Triton kernels against their torch twins: the activation quantizer (bit-exact) and the fused fp8 MoE
(GEMMs vs the method's reference path on the same dequantized weights and fake-quantized activations).
CPU: Triton interpreter (fp16/fp32 activations; tl.dot on e4m3 operands works there). GPU: bf16, larger shapes."""

import zlib
from dataclasses import dataclass

import pytest
import torch

import moequant.methods.fp8  # noqa: F401  (registers the fp8 schemes)
from conftest import ON_GPU, rel_err
from moequant import FusedMoE
from moequant.config import QuantConfig
from moequant.kernels import fp8_gemm
from moequant.kernels.fp8_gemm import act_quant
from moequant.quantize import fp8_math as fm


@pytest.fixture(autouse=True)
def _seed():
    # fixed inputs: a flip of one fp8 rounding (fp32 sums in another order landing on the other side of a
    # midpoint) moves a small output by ~1e-3, so runs must not draw new data each time
    torch.manual_seed(0)


DEV = "cuda" if ON_GPU else "cpu"


def same_bits(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# --- activation quantizer ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["tensor", "token", "group"])
# T=1; odd T; C > the 1024 chunk; > ONE_PROGRAM padded elements (per tensor: amax launch + quantize);
# C > 8192 (per token: two passes)
@pytest.mark.parametrize("T,C", [(1, 128), (7, 384), (3, 2176), (9, 2048), (2, 8320)])
def test_act_quant_kernel_matches_twin_bit_exactly(granularity, T, C):
    x = torch.randn(T, C, device=DEV) * torch.logspace(-3, 2, C, device=DEV)  # many binades
    if T > 2:
        x[1] = 0  # all-zero token
    q, s = act_quant(x, granularity)
    qr, sr = fm.act_quant_ref(x, granularity)
    assert same_bits(q, qr)
    assert torch.equal(s.reshape(-1), sr.reshape(-1))


@pytest.mark.parametrize("granularity", ["token", "group"])
def test_act_quant_of_bf16_ties_matches_twin(granularity):
    # bf16 inputs often sit exactly on an fp8 tie (x / s = 21.0, 152.0) or one ulp of s away from one, so the twin's
    # s = amax / 448 must be the IEEE quotient on every device: torch on CUDA divides by a Python number through its
    # rounded reciprocal, which put 151 of 257 per-token scales one ulp off on the H200 and moved ~0.1% of x
    T, C = (257, 1024) if ON_GPU else (24, 512)
    x = torch.randn(T, C, generator=torch.Generator().manual_seed(1)).to(DEV, torch.bfloat16)
    q, s = act_quant(x, granularity)
    qr, sr = fm.act_quant_ref(x, granularity)
    assert torch.equal(s.reshape(-1), sr.reshape(-1))
    assert same_bits(q, qr)
    assert torch.equal(fm.act_scale(torch.tensor([3.0], device=DEV)), torch.tensor([3.0 / 448], device=DEV))


def test_act_quant_rounding_at_every_fp8_midpoint():
    # every e4m3 value, the midpoints between neighbours and the fp32 values either side of each midpoint:
    # ties to even, carries into the next binade (124.3 -> 128), subnormals, clamping past 448
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 ... 448
    mids = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([grid, mids, mids.nextafter(torch.tensor(0.0)), mids.nextafter(torch.tensor(1e4)),
                      torch.tensor([449.0, 464.0, 1e6])])
    x = torch.cat([vals, -vals]).reshape(1, -1).to(DEV)
    one = torch.ones(1, device=DEV)
    q, _ = act_quant(x, "tensor", scale=one)
    qr, _ = fm.act_quant_ref(x, "tensor", one)
    assert same_bits(q, qr)


def test_act_quant_dynamic_tensor_with_given_amax():
    # GEMM1's epilogue hands the quantizer max|x|; the scale then equals the twin's dynamic one
    x = torch.randn(5, 96, device=DEV)
    amax = x.abs().amax().reshape(1).clone()
    q, s = act_quant(x, "tensor", amax=amax)
    qr, sr = fm.act_quant_ref(x, "tensor")
    assert same_bits(q, qr) and torch.equal(s, sr)


@pytest.mark.parametrize("T,C", [(1, 128), (3, 2176), (2, 8320)])
def test_act_quant_per_token_with_given_row_amax(T, C):
    # GEMM1's epilogue hands the quantizer each row's max|x| (one pass spread over columns instead of a program per
    # row); scales and codes equal the twin's, an all-zero row included
    x = torch.randn(T, C, device=DEV) * torch.logspace(-3, 2, C, device=DEV)
    x[-1] = 0
    q, s = act_quant(x, "token", amax=x.abs().amax(1).contiguous())
    qr, sr = fm.act_quant_ref(x, "token")
    assert same_bits(q, qr) and torch.equal(s.reshape(-1), sr.reshape(-1))


@pytest.mark.skipif(ON_GPU, reason="interpreter test")
def test_per_token_activation_quantized_from_gemm1_row_amax(monkeypatch):
    """fp8-channel: GEMM1 folds each slot's max|act| into a buffer (zeroed by x's quantizer) and the activation's
    quantizer reads it instead of making its own pass; the result still matches the reference."""
    monkeypatch.setattr(fp8_gemm, "FUSE_A2_SLOTS", 0)
    calls = []
    act_quant = fp8_gemm.act_quant
    monkeypatch.setattr(fp8_gemm, "act_quant", lambda a, g, *r, **k: calls.append((g, k.get("amax") is not None))
                        or act_quant(a, g, *r, **k))
    case = next(c for c in CPU_CASES if c.scheme == "fp8-channel")
    layer, x, w, ids = build(case, torch.float32, "cpu")
    out = layer.quant_method.apply_triton(layer, x, w, ids)
    assert calls == [("token", False), ("token", True)]
    assert rel_err(out, layer.quant_method.apply_reference(layer, x, w, ids)) <= 2e-5


# [1] (per tensor) or one entry per slot (per token; K = 6 is not a power of 2)
@pytest.mark.parametrize("granularity,per_row", [("tensor", 1), ("token", 1), ("token", 6), ("group", 6)])
def test_act_quant_zeroes_the_next_amax_buffer(granularity, per_row):
    T = 3
    n = T * per_row if per_row > 1 else 1
    buf = torch.full((n + 8,), 7.0, device=DEV)  # entries past n must stay untouched
    act_quant(torch.randn(T, 256, device=DEV), granularity, zero=buf[:n], zero_per_row=per_row)
    assert torch.all(buf[:n] == 0) and torch.all(buf[n:] == 7)


@pytest.mark.parametrize("granularity,scale", [("tensor", None), ("tensor", 0.05), ("token", None), ("group", None)])
def test_act_quant_runs_moe_align_in_its_first_program(granularity, scale):
    # the decode path's align rides in x's quantizer launch: same routing as moe_align's own launch (bit for bit:
    # one program sorts the slots), same codes and scales as without it; -1 ids (other ranks' experts) dropped
    from moequant.kernels.align import moe_align, one_program_align

    x = torch.randn(3, 256, device=DEV)
    ids = torch.tensor([[4, 0], [2, -1], [4, 3]], dtype=torch.int32, device=DEV)
    s = None if scale is None else torch.tensor([scale], device=DEV)
    plan = one_program_align(ids, 6, 16)
    q, sc = act_quant(x, granularity, s, align=plan)
    q0, sc0 = act_quant(x, granularity, s)
    assert same_bits(q, q0) and torch.equal(sc, sc0)
    for got, want in zip(plan.routing, moe_align(ids, 6, 16)):
        assert torch.equal(got, want)
    assert one_program_align(torch.zeros(0, 2, dtype=torch.int32), 6, 16) is None
    assert one_program_align(torch.zeros(1025, 1, dtype=torch.int32), 6, 16) is None


def test_decode_routing_costs_no_launch_of_its_own(monkeypatch):
    """fp8 grouped path with few slots: moe_align is not launched (x's quantizer sorts the slots), unless GEMM2's
    block size differs from GEMM1's."""
    aligns = []
    real = fp8_gemm.moe_align
    monkeypatch.setattr(fp8_gemm, "moe_align", lambda *a, **k: aligns.append(a[2]) or real(*a, **k))
    layer, x, w, ids = build(CPU_CASES[0], torch.float32, DEV)
    out = layer.quant_method.apply_triton(layer, x, w, ids)
    assert aligns == [] and rel_err(out, layer.quant_method.apply_reference(layer, x.float(), w, ids)) <= 2e-3


def test_act_quant_group_needs_multiple_of_128():
    with pytest.raises(ValueError, match="multiple of 128"):
        act_quant(torch.randn(2, 100, device=DEV), "group")


# --- fused fp8 MoE ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    scheme: str
    E: int
    K: int
    H: int
    I: int
    T: int
    why: str
    routing: str = "random"  # random | one_expert | few_experts | remote
    activation: str = "silu"
    static: bool = False
    bias: bool = False
    weight_on_input: bool = False


CPU_CASES = [
    Case("fp8-tensor", 5, 2, 48, 40, 7, "prime E, odd-but-legal H/I, dynamic per-tensor"),
    Case("fp8-tensor", 3, 2, 48, 24, 5, "static input scales", static=True),
    Case("fp8-tensor", 4, 1, 32, 16, 1, "T = 1, K = 1, weight on input", weight_on_input=True),
    Case("fp8-channel", 7, 3, 40, 56, 6, "prime E, K = 3, gelu", activation="gelu"),
    Case("fp8-channel", 5, 2, 32, 24, 9, "all tokens to one expert", routing="one_expert"),
    Case("fp8-channel", 11, 2, 32, 16, 3, "most experts empty, bias, swigluoai", routing="few_experts", bias=True,
         activation="swigluoai"),
    Case("fp8-tensor", 4, 2, 32, 16, 6, "expert parallelism: ids -1 for remote experts", routing="remote"),
    Case("fp8-block", 3, 2, 128, 256, 5, "block scales per K-step, group-128 activations"),
    Case("fp8-block", 5, 2, 256, 128, 1, "block, T = 1, one expert", routing="one_expert"),
]


def build(case: Case, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(zlib.crc32(case.why.encode()))
    E, K, H, I, T = case.E, case.K, case.H, case.I, case.T
    qc = QuantConfig(case.scheme, activation_scheme="static" if case.static else "dynamic")
    with torch.device(device):
        layer = FusedMoE(E, K, H, I, params_dtype=dtype, quant_config=qc, has_bias=case.bias,
                         activation=case.activation, apply_router_weight_on_input=case.weight_on_input,
                         renormalize=K > 1)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(device)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(device)
    b13 = (torch.randn(E, 2 * I, generator=g) * 0.1).to(device) if case.bias else None
    b2 = (torch.randn(E, H, generator=g) * 0.1).to(device) if case.bias else None
    if case.static:
        layer.quant_method.quantize_dense(layer, w13, w2)
        layer.w13_input_scale.data.fill_(4.0 / 448)
        layer.w2_input_scale.data.fill_(1.5 / 448)
        if b13 is not None:
            layer.w13_bias.data.copy_(b13)
            layer.w2_bias.data.copy_(b2)
        layer.process_weights_after_loading()
    else:
        layer.load_dense_weights(w13, w2, b13, b2)
    x = torch.randn(T, H, generator=g).to(device=device, dtype=dtype)
    w = torch.rand(T, K, generator=g).to(device)
    if case.routing == "one_expert":
        ids = torch.full((T, K), E - 1, dtype=torch.int32)
        if K > 1:
            ids[:, 1:] = torch.arange(K - 1, dtype=torch.int32)  # distinct experts per token
    elif case.routing == "few_experts":
        ids = torch.stack([torch.randperm(2, generator=g)[:K] for _ in range(T)]).int() + 3
    else:
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()
    ids = ids.to(device)
    if case.routing == "remote":
        # odd experts live on another rank: their slots contribute nothing here
        e = torch.arange(E, dtype=torch.int32, device=device)
        layer.expert_map = torch.where(e % 2 == 0, e, torch.full_like(e, -1))
    return layer, x, w, ids


# GEMM2's input: quantized inside GEMM2 (few slots, per tensor / per token) or by the quantizer kernel
# (group-128 activations always take the quantizer kernel)
INTERP = [(c, fuse) for c in CPU_CASES for fuse in ((True, False) if c.scheme != "fp8-block" else (None,))]


@pytest.mark.skipif(ON_GPU, reason="interpreter test")
@pytest.mark.parametrize("case,fuse_a2", INTERP, ids=lambda v: v.scheme + "-" + v.why if isinstance(v, Case)
                         else ("gemm2-quantizes-A" if v else "quantizer-kernel"))  # None: block, always the kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference_in_interpreter(case, fuse_a2, dtype, monkeypatch):
    monkeypatch.setattr(fp8_gemm, "FUSE_A2_SLOTS", 64 if fuse_a2 else 0)
    layer, x, w, ids = build(case, dtype, "cpu")
    local = layer.to_local_ids(ids)
    out = layer.quant_method.apply_triton(layer, x, w, local)
    ref = layer.quant_method.apply_reference(layer, x.float(), w, local)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, ref) <= (2e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.skipif(ON_GPU, reason="interpreter test")
def test_static_scales_quantize_gemm1_output_in_its_epilogue(monkeypatch):
    """Static per-tensor input scales: GEMM1 writes its activation in e4m3 itself (no fp32 intermediate) and only x
    goes through the quantizer kernel; the result still matches the reference."""
    monkeypatch.setattr(fp8_gemm, "FUSE_A2_SLOTS", 0)
    quants, outputs = [], []
    act_quant, gemm = fp8_gemm.act_quant, fp8_gemm.fp8_grouped_gemm
    monkeypatch.setattr(fp8_gemm, "act_quant", lambda *a, **k: quants.append(1) or act_quant(*a, **k))
    monkeypatch.setattr(fp8_gemm, "fp8_grouped_gemm",
                        lambda a, s, b, bs, c, *r, **k: outputs.append(c.dtype) or gemm(a, s, b, bs, c, *r, **k))
    names, config = [], fp8_gemm.fp8_config
    monkeypatch.setattr(fp8_gemm, "fp8_config", lambda kernel, *a: names.append(kernel) or config(kernel, *a))
    layer, x, w, ids = build(CPU_CASES[1], torch.float32, "cpu")
    out = layer.quant_method.apply_triton(layer, x, w, ids)
    assert len(quants) == 1 and outputs == [torch.float8_e4m3fn, torch.float32]
    assert rel_err(out, layer.quant_method.apply_reference(layer, x, w, ids)) <= 2e-5
    assert names == ["w13-fp8-static", "w2-fp8-static"]  # the static epilogue has its own tuning-cache entries
    names.clear()
    layer, x, w, ids = build(CPU_CASES[0], torch.float32, "cpu")  # dynamic per-tensor
    layer.quant_method.apply_triton(layer, x, w, ids)
    assert names == ["w13-fp8", "w2-fp8"]

def test_no_tokens_gives_empty_output():
    layer, x, w, ids = build(CPU_CASES[0], torch.float32, DEV)
    out = layer.quant_method.apply_triton(layer, x[:0], w[:0], ids[:0])
    assert out.shape == (0, x.shape[1])


# --- GPU ----------------------------------------------------------------------------------------------------------
GPU_CASES = [
    Case("fp8-tensor", 8, 2, 1024, 768, 1, "decode"),
    Case("fp8-tensor", 8, 2, 1024, 768, 333, "prefill, odd T"),
    Case("fp8-tensor", 8, 2, 1024, 768, 64, "static input scales", static=True),
    Case("fp8-channel", 16, 4, 2048, 768, 1, "decode"),
    Case("fp8-channel", 16, 4, 2048, 768, 1000, "prefill"),
    Case("fp8-channel", 13, 2, 1024, 512, 257, "prime E, bias, gelu", bias=True, activation="gelu"),
    Case("fp8-block", 8, 2, 1024, 768, 1, "decode"),
    Case("fp8-block", 8, 2, 1024, 768, 700, "prefill"),
    Case("fp8-block", 16, 4, 2048, 768, 300, "all tokens to one expert", routing="one_expert"),
    Case("fp8-tensor", 8, 2, 4096, 3584, 2048, "long K: accumulation precision"),
    Case("fp8-channel", 8, 2, 4096, 3584, 2048, "long K: accumulation precision"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c.scheme}-{c.why}-T{c.T}")
def test_triton_matches_reference_on_gpu(case):
    layer, x, w, ids = build(case, torch.bfloat16, "cuda")
    out = layer.quant_method.apply_triton(layer, x, w, ids)
    ref = layer.quant_method.apply_reference(layer, x.float(), w, ids)
    # bf16 output rounding (~1e-3) plus fp32 accumulation: the bound is 5e-3
    assert rel_err(out, ref) <= 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["fp8-tensor", "fp8-channel", "fp8-block"])
def test_forward_is_cuda_graph_safe(scheme):
    layer, x, w, ids = build(Case(scheme, 8, 2, 1024, 512, 16, "graph"), torch.bfloat16, "cuda")
    logits = torch.randn(x.shape[0], 8, device="cuda")
    eager = layer(x, logits)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer(x, logits)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x, logits)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
