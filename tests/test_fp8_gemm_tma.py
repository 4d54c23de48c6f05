"""The fp8 grouped GEMM with weight (B) tiles loaded by TMA (kernel B_DESC, host TensorDescriptor) against the same
GEMM with pointer loads, and both against a torch twin on the dequantized operands.

c[slot] = epilogue(sa * a[slot // top_k] @ (sb * b[e(slot)]).T): GEMM1 (gated) b [E, 2N, K], c = silu(gate) * up;
GEMM2 b [E, N, K]. Legend: T tokens, k top-k, S = T*k slots, E experts, N output columns, K reduction dim.
CPU: the Triton interpreter (it takes host descriptors: TensorDescriptor loads become masked loads); GPU (sm_90+):
the TMA path bit for bit against the pointer path.
"""

import zlib
from dataclasses import dataclass

import pytest
import torch

from conftest import ON_GPU, rel_err
from moequant.kernels import fp8_gemm
from moequant.kernels.align import moe_align
from moequant.kernels.fp8_gemm import Fp8Layout, b_desc_wanted, b_descriptor, fp8_grouped_gemm
from moequant.kernels.tuning import GemmConfig
from moequant.quantize import fp8_math as fm

DEV = "cuda" if ON_GPU else "cpu"
WEIGHT = {"tensor": "tensor", "token": "channel", "group": "block"}  # activation granularity -> weight's
INTERP_CFG = GemmConfig(16, 32, 32, 1, 4, 1)  # fp8_config's interpreter config


@dataclass(frozen=True)
class Case:
    act: str  # "tensor" | "token" | "group" activation scales; weights: WEIGHT[act]
    gated: bool
    E: int
    T: int
    k: int
    N: int
    K: int
    why: str
    a_hp: bool = False  # a in fp32, quantized in the kernel (per tensor / per token)
    out: str = "fp32"  # "fp32" | "amax" (fold max |c|) | "fp8" (static scale in the epilogue)


def _data(case: Case, device: str):
    """(a fp8 [T, K] or fp32, a_scale, b fp8 [E, N_b, K], b_scale, topk_ids [T, k], reference c [S, N] fp32)."""
    g = torch.Generator().manual_seed(zlib.crc32(case.why.encode()))
    E, T, k, N, K = case.E, case.T, case.k, case.N, case.K
    Nb = 2 * N if case.gated else N
    x = torch.randn(T, K, generator=g) * torch.logspace(-1, 1, K)  # several binades per row
    w = torch.randn(E, Nb, K, generator=g) / K**0.5
    weight = WEIGHT[case.act]
    if weight == "tensor":
        qs = [fm.quantize_tensor(w[e]) for e in range(E)]
        b, bs = torch.stack([q for q, _ in qs]), torch.cat([s for _, s in qs])
        wd = b.float() * bs[:, None, None]
    elif weight == "channel":
        b, bs = fm.quantize_channel(w)
        wd, bs = b.float() * bs, bs[..., 0].contiguous()
    else:  # block scales: K padded to a multiple of 128 for quantize_block, then cut back
        Kp = -(-K // fm.BLOCK) * fm.BLOCK
        b, bs = fm.quantize_block(torch.nn.functional.pad(w, (0, Kp - K)))
        b = b[..., :K].contiguous()
        wd = b.float() * fm.expand_block_scale(bs, Nb, K)
    if case.act == "group":  # group-128 scales, the last group short when K % 128
        Kp = -(-K // fm.BLOCK) * fm.BLOCK
        a, sa = fm.act_quant_ref(torch.nn.functional.pad(x, (0, Kp - K)), "group")
        a = a[:, :K].contiguous()
        ad = a.float() * sa.repeat_interleave(fm.BLOCK, 1)[:, :K]
    else:
        a, sa = fm.act_quant_ref(x, case.act)
        sa = sa.reshape(-1).contiguous()
        ad = a.float() * (sa[:, None] if case.act == "token" else sa)
    if case.a_hp:  # the kernel quantizes x itself: per tensor with sa, per token from the row amax
        a, sa = x, (sa if case.act == "tensor" else x.abs().amax(1))
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
    e, rows = ids.reshape(-1).long(), ad.repeat_interleave(k, 0).double()
    h = torch.empty(T * k, Nb, dtype=torch.float64)
    for j in range(E):
        h[e == j] = rows[e == j] @ wd[j].double().T
    ref = (torch.nn.functional.silu(h[:, :N]) * h[:, N:] if case.gated else h).float()
    to = lambda t: t.to(device)  # noqa: E731
    return to(a), to(sa), to(b), to(bs), to(ids), to(ref)


def _run(case: Case, cfg: GemmConfig, b_desc: bool, data):
    """(c [S, N], out_amax or None) of fp8_grouped_gemm with TMA loads of B on or off."""
    a, sa, b, bs, ids, ref = data
    S, N = ref.shape
    routing = moe_align(ids, case.E, cfg.BLOCK_M)
    layout = Fp8Layout(WEIGHT[case.act], case.act)
    amax = torch.zeros(1, device=a.device) if case.out == "amax" else None
    c_scale = (ref.abs().amax() / fm.FP8_MAX).reshape(1) if case.out == "fp8" else None
    c = torch.full((S, N), float("nan"), device=a.device)  # unwritten slots stay NaN
    if case.out == "fp8":
        c = c.to(fm.FP8_DTYPE)
    fp8_grouped_gemm(a, sa, b, bs, c, routing, cfg, layout, gated=case.gated, a_row_div=case.k, out_amax=amax,
                     c_scale=c_scale, b_desc=b_desc)
    return c, amax, c_scale


def _check(case: Case, cfg: GemmConfig, tol: float):
    data = _data(case, DEV)
    assert b_descriptor(data[2], cfg) is not None  # the TMA path really runs
    c_on, amax_on, c_scale = _run(case, cfg, True, data)
    c_off, amax_off, _ = _run(case, cfg, False, data)
    assert torch.equal(c_on.view(torch.uint8), c_off.view(torch.uint8))  # same tiles, same MMAs: same bits
    if amax_on is not None:
        assert torch.equal(amax_on, amax_off)
    ref = data[-1]
    if case.out == "fp8":
        assert rel_err(c_on.float() * c_scale, ref) <= 0.05  # e4m3 rounding of C: 2^-4 at most per element
    else:
        assert rel_err(c_on, ref) <= tol
    if amax_on is not None:
        assert abs(amax_on.item() - ref.abs().max().item()) <= tol * ref.abs().max().item()


# --- interpreter ----------------------------------------------------------------------------------------------------
CPU_CASES = [
    Case("tensor", True, 3, 5, 2, 40, 80, "gated, N % BN, K % BK (K = 80: a multiple of 16, not 32)"),
    Case("tensor", False, 3, 5, 2, 40, 80, "GEMM2, per tensor, tails"),
    Case("token", True, 4, 6, 2, 24, 48, "per channel, per token, gated"),
    Case("token", False, 4, 6, 2, 72, 48, "per channel, GEMM2, N > two column blocks"),
    Case("group", True, 3, 4, 2, 40, 208, "block scales, K tail inside the second group"),
    Case("group", False, 3, 4, 2, 136, 160, "block scales, GEMM2, N past one 128 block"),
    Case("tensor", True, 3, 5, 2, 40, 80, "A in fp32, quantized in the kernel", a_hp=True),
    Case("token", False, 3, 5, 2, 40, 80, "A in fp32 per token", a_hp=True),
    Case("tensor", True, 3, 5, 2, 40, 80, "GEMM1 folds max |c|", out="amax"),
    Case("tensor", True, 3, 5, 2, 40, 80, "GEMM1 writes e4m3 C", out="fp8"),
]


@pytest.mark.skipif(ON_GPU, reason="interpreter test")
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.why)
def test_tma_b_matches_pointer_b_in_interpreter(case):
    _check(case, INTERP_CFG, 1e-5)


@pytest.mark.skipif(ON_GPU, reason="interpreter test")
def test_layer_forward_with_tma_b_in_interpreter(monkeypatch):
    """MOEQUANT_FP8_TMA=on (B_DESC_MODE) reaches both GEMMs of a layer's forward; the output is the same bits."""
    from moequant import FusedMoE
    from moequant.config import QuantConfig

    E, k, H, I, T = 4, 2, 64, 48, 5
    with torch.device("cpu"):
        layer = FusedMoE(E, k, H, I, params_dtype=torch.float32, quant_config=QuantConfig("fp8-channel"))
    g = torch.Generator().manual_seed(3)
    layer.load_dense_weights(torch.randn(E, 2 * I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5)
    x, w = torch.randn(T, H, generator=g), torch.rand(T, k, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
    descs = []
    real = fp8_gemm.b_descriptor
    monkeypatch.setattr(fp8_gemm, "b_descriptor", lambda b, cfg: descs.append(real(b, cfg)) or descs[-1])
    monkeypatch.setattr(fp8_gemm, "B_DESC_MODE", "off")
    off = layer.quant_method.apply_triton(layer, x, w, ids)
    assert descs == []
    monkeypatch.setattr(fp8_gemm, "B_DESC_MODE", "on")
    on = layer.quant_method.apply_triton(layer, x, w, ids)
    assert len(descs) == 2 and all(d is not None for d in descs)
    assert torch.equal(on, off)


def test_b_descriptor_falls_back_where_tma_cannot_load_b():
    cfg = INTERP_CFG if not ON_GPU else GemmConfig(128, 128, 128, 8, 8, 3)
    b = torch.zeros(3, 64, 96, dtype=fm.FP8_DTYPE, device=DEV)
    if ON_GPU and torch.cuda.get_device_capability()[0] < 9:
        assert b_descriptor(b, cfg) is None
        return
    d = b_descriptor(b, cfg)
    assert d is not None and list(d.shape) == [192, 96] and list(d.block_shape) == [cfg.BLOCK_N, cfg.BLOCK_K]
    padded = b_descriptor(b[:, :, :80], cfg)  # rows of 80 bytes at a 96-byte stride: TMA zero-fills past 80
    assert padded is not None and list(padded.shape) == [192, 80] and list(padded.strides) == [96, 1]
    assert b_descriptor(torch.zeros(3, 64, 40, dtype=fm.FP8_DTYPE, device=DEV), cfg) is None  # 40-byte row stride
    assert b_descriptor(b[:, :32], cfg) is None  # experts 64 rows apart, 32 used: no [E * N_b, K] view
    assert b_descriptor(b.transpose(1, 2), cfg) is None  # not K-contiguous
    raw = torch.zeros(3 * 64 * 96 + 8, dtype=torch.uint8, device=DEV)
    assert b_descriptor(raw[8:].view(fm.FP8_DTYPE).view(3, 64, 96), cfg) is None  # base 8 bytes off 16
    assert b_descriptor(b, GemmConfig(16, 32, 8, 1, 4, 1)) is None  # 8-byte box rows
    assert b_descriptor(b, GemmConfig(16, 32, 512, 1, 4, 1)) is None  # box over 256 elements


def test_b_desc_switch(monkeypatch):
    monkeypatch.setattr(fp8_gemm, "B_DESC_MODE", "auto")  # the default: prefill tiles only
    assert b_desc_wanted(None, 128) and b_desc_wanted(None, 64) and not b_desc_wanted(None, 16)
    assert b_desc_wanted(True, 16) and not b_desc_wanted(False, 128)
    monkeypatch.setattr(fp8_gemm, "B_DESC_MODE", "off")
    assert not b_desc_wanted() and b_desc_wanted(True)
    monkeypatch.setattr(fp8_gemm, "B_DESC_MODE", "on")
    assert b_desc_wanted() and not b_desc_wanted(False)
    monkeypatch.setattr(fp8_gemm, "B_DESC_MODE", "yes")
    with pytest.raises(ValueError, match="MOEQUANT_FP8_TMA"):
        b_desc_wanted()


@pytest.mark.skipif(ON_GPU, reason="interpreter test")
def test_forced_tma_falls_back_to_pointers_for_unaligned_rows():
    # K = 40: rows of 40 bytes cannot be a TMA stride; b_desc=True still runs (pointer loads) and matches the twin
    case = Case("tensor", False, 3, 4, 2, 24, 40, "K = 40")
    data = _data(case, DEV)
    assert b_descriptor(data[2], INTERP_CFG) is None
    c, _, _ = _run(case, INTERP_CFG, True, data)
    assert rel_err(c, data[-1]) <= 1e-5


# --- GPU ------------------------------------------------------------------------------------------------------------
PREFILL = GemmConfig(128, 128, 128, 8, 8, 3)  # Mixtral prefill (M = 4096): fp8_config's heuristic for GEMM1
GPU_CASES = [
    Case("tensor", True, 8, 300, 2, 200, 336, "gated, per tensor, N % 128, K % 128 (K = 336)"),
    Case("tensor", False, 8, 300, 2, 200, 336, "GEMM2, per tensor, tails"),
    Case("token", True, 8, 300, 2, 200, 336, "gated, per channel"),
    Case("token", False, 8, 300, 2, 264, 336, "GEMM2, per channel"),
    Case("group", True, 8, 300, 2, 200, 336, "gated, block scales, short last group"),
    Case("group", False, 8, 300, 2, 264, 336, "GEMM2, block scales"),
    Case("tensor", True, 8, 300, 2, 512, 4096, "long K: promoted accumulation"),
    Case("tensor", True, 8, 300, 2, 200, 336, "A in fp32, per tensor", a_hp=True),
    Case("token", False, 8, 300, 2, 200, 336, "A in fp32, per token", a_hp=True),
    Case("token", True, 8, 300, 2, 200, 336, "GEMM1 folds max |c|", out="amax"),
    Case("tensor", True, 8, 300, 2, 200, 336, "GEMM1 writes e4m3 C", out="fp8"),
]
# every case with fp8 A on the prefill tiles; the plain scale cases and fp32 A (decode's in-kernel quantization) on
# decode tiles; two cases with one stage more and with BLOCK_K 64 (block scales: two K-steps per 128 group)
GPU_GRID = ([(c, PREFILL) for c in GPU_CASES if not c.a_hp]  # fp32 A tiles of 128 x 128 exceed shared memory
            + [(c, GemmConfig(16, 64, 128, 1, 4, 4)) for c in GPU_CASES[:6] + [c for c in GPU_CASES if c.a_hp]]
            + [(GPU_CASES[i], cfg) for i in (2, 4)
               for cfg in (GemmConfig(128, 128, 128, 8, 8, 4), GemmConfig(64, 128, 64, 8, 4, 3))])


@pytest.mark.gpu
@pytest.mark.parametrize("case,cfg", GPU_GRID, ids=lambda v: v.why if isinstance(v, Case) else
                         f"{v.BLOCK_M}x{v.BLOCK_N}x{v.BLOCK_K}w{v.num_warps}s{v.num_stages}")
def test_tma_b_matches_pointer_b_on_gpu(case, cfg):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90")
    _check(case, cfg, 5e-4)  # the fp8 wgmma's partial sums (promoted every 128 products): 1.2e-4 measured at K=336
