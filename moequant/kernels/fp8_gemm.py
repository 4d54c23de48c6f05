"""Launchers of the fp8 fused MoE: quantize x -> align -> GEMM1 (+gated activation, fp32 out) -> quantize the
activation -> GEMM2 (+routing weight) -> sum over K. Kernels: _fp8_gemm_kernel.py, _fp8_act_quant_kernel.py;
torch twins: quantize/fp8_math.act_quant_ref and the method's dequantized reference path.

T tokens, K top-k, S = T*K slots, E experts (local), H hidden, I intermediate (per rank), G = 128.
x [T, H] (fp16/bf16/fp32), w13 fp8 [E, 2I, H], w2 fp8 [E, H, I]; weight scales by `Fp8Layout.weight`:
tensor [E] | channel [E, 2I] and [E, H] | block [E, 2I/G, H/G] and [E, H/G, I/G] (fp32).
GEMM1 writes its activation in fp32, so the activation is rounded once (to fp8), as in the reference; with a
static per-tensor stage-2 scale it writes it in e4m3 directly (the same rounding, in its epilogue). Launches:
x's quantizer (which also zeroes the amax buffer GEMM1's epilogue folds into and, for up to align.SORT_SLOTS slots,
sorts the slots by expert in its first program: moe_align's one-program body), GEMM1, the activation's quantizer
(skipped with a static per-tensor scale, and for <= FUSE_A2_SLOTS slots with per-tensor / per-token scales: GEMM2
then quantizes its A tiles itself), GEMM2, the sum: as many launches as the bf16 path (align, GEMM1, GEMM2, sum)
plus one, or none with static scales; more slots add moe_align's launches.
Decode of one token with small experts (rows_gemv) takes the rows GEMV instead (_fused_gemv_rows): GEMM1 routes and
quantizes x itself, GEMM2 quantizes the fp32 activation itself and sums over the top k: two launches (on a GPU the
tensor-core body, GEMM2 launched as GEMM1's programmatic dependent). Prefill tiles load their weight tiles by TMA
(B_DESC_MODE).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from moequant.kernels._fp8_act_quant_kernel import fp8_act_quant_kernel
from moequant.kernels._fp8_gemm_kernel import fp8_moe_gemm_kernel
from moequant.kernels.align import OneProgramAlign, moe_align, one_program_align
from moequant.kernels import gemv as gemv_mod
from moequant.kernels.gemv import (Fp8ActIn, GemvWeights, fp8_rows, fused_experts_gemv, gemv, plan_gemv,
                                   split_buffers, use_gemv)
from moequant.kernels.moe_gemm import _ACT_CODE, moe_sum
from moequant.kernels.tuning import GemmConfig, cached_config
from moequant.quantize.fp8_math import ACT_EPS, BLOCK, FP8_DTYPE

try:  # host-side TMA descriptors (Triton >= 3.3); without them B always takes pointer loads
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - old Triton
    TensorDescriptor = None

_A_CODE = {"tensor": 0, "token": 1, "group": 2}
_ALIGN_ARGS = ("al_ids_ptr", "al_sorted_ptr", "al_expert_ptr", "al_total_ptr", "al_scratch_ptr", "al_S", "al_E", "al_P",
               "al_NB")  # fp8_act_quant_kernel's names of OneProgramAlign.args
_B_CODE = {"tensor": 0, "channel": 1, "block": 2}
_QUANT_BLOCK = 1024
_ROW_BLOCK = 8192  # per-token quantization holds up to this many columns of a row in one tile
# MOEQUANT_FP8_FAST_ACCUM=1 keeps Hopper's narrow fp8 MMA accumulator over the whole K loop (Triton's default, faster,
# less exact); by default partial sums are promoted to fp32 every 128 products
FAST_ACCUM = os.environ.get("MOEQUANT_FP8_FAST_ACCUM") == "1"
# up to this many slots GEMM2 quantizes its own input: off by default, since on the H200 it made decode 2-11x slower
# (Mixtral M=1: 383 -> 105 us per-tensor, 1249 -> 111 us per-token without it; benchmarks/results/*fp8-nofuse*)
FUSE_A2_SLOTS = int(os.environ.get("MOEQUANT_FP8_FUSE_A2_SLOTS", 0))
# the grouped GEMMs load weight (B) tiles through a host TMA descriptor (the kernel's B_DESC) where b_descriptor allows
# it: MOEQUANT_FP8_TMA=auto (default) for tiles of at least TMA_MIN_BLOCK_M slots (H200, Mixtral M=4096: fp8-tensor
# 3866 -> 3700 us per forward, 59.3 -> 62.0% of scaled_mm; fp8-channel 3908 -> 3812, 58.7 -> 60.1%; decode tiles
# not measured with it), on (every tile), off (masked pointer loads). fp8_grouped_gemm's b_desc overrides it per call
B_DESC_MODE = os.environ.get("MOEQUANT_FP8_TMA", "auto")
TMA_MIN_BLOCK_M = 64
TMA_MAX_BOX = 256  # a TMA box spans at most 256 elements per dimension
ONE_PROGRAM = 1 << 14  # dynamic per-tensor quantization of a padded x up to this many elements: one program


@dataclass(frozen=True)
class Fp8Layout:
    """weight: "tensor" | "channel" | "block" scales; act: "tensor" | "token" | "group" activation scales."""

    weight: str
    act: str


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# --- activation quantization -------------------------------------------------------------------------------------
def act_quant(x: torch.Tensor, granularity: str, scale: torch.Tensor | None = None,
              amax: torch.Tensor | None = None, zero: torch.Tensor | None = None,
              zero_per_row: int = 1, align: OneProgramAlign | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, C] -> (q fp8 [T, C], scales fp32 [1] | [T] | [T, C/G]); twin: fp8_math.act_quant_ref.
    tensor: static `scale` [1]; or dynamic: with `amax` [1] already holding max|x| (e.g. from GEMM1's epilogue),
    else one program for a small x (<= ONE_PROGRAM elements padded), else an amax launch then the quantize launch.
    token: with `amax` [T] already holding each row's max|x| (GEMM1's epilogue), one pass spread over columns; else
    one program per row (two passes over a row wider than a tile).
    zero: an fp32 buffer the kernel sets to 0 on the way (the next amax accumulator; saves a memset): row r of x
    clears entries [r*zero_per_row, (r+1)*zero_per_row), so [1] with 1, or [T*K] per slot with K.
    align: a one-program moe_align (align.one_program_align) that the first launch's first program runs too; its
    routing outputs are ready for the GEMM launched next."""
    T, C = x.shape
    if granularity == "tensor" and zero_per_row != 1:
        raise ValueError("act_quant: per-tensor quantization zeroes a single amax entry (zero_per_row=1)")
    q = torch.empty(T, C, dtype=FP8_DTYPE, device=x.device)
    if T == 0:
        if zero is not None:
            zero.zero_()
        if align is not None:
            raise ValueError("act_quant: align needs a launch, and no tokens launch nothing")
        return q, torch.ones(1 if granularity == "tensor" else T, device=x.device)
    x = x if x.stride(1) == 1 else x.contiguous()
    block = min(_QUANT_BLOCK, triton.next_power_of_2(C))
    kw = dict(EPS=ACT_EPS, EMULATE_CAST=_interpret(), ZERO=zero is not None,
              ZERO_N=zero.numel() if zero is not None else 1, ZERO_PER_ROW=zero_per_row,
              ZERO_BLOCK=triton.next_power_of_2(zero_per_row))
    z = zero if zero is not None else q
    pending = [align]  # the align runs in the first launch

    def launch(grid, s, a, mode, dynamic, stride_s=0, blk=block, zero_kw=kw, **extra):
        al = pending.pop() if pending else None
        if al is not None:
            extra = {**extra, **dict(zip(_ALIGN_ARGS, al.args)), "ALIGN": True,
                     **{f"AL_{k}": v for k, v in al.consts.items()}}
        fp8_act_quant_kernel[grid](x, q, s, a, z, T, C, x.stride(0), q.stride(0), stride_s, MODE=mode,
                                   DYNAMIC=dynamic, BLOCK=blk, **zero_kw, **extra)

    if granularity == "tensor":
        grid = (T, triton.cdiv(C, block))
        if scale is not None:
            s = scale.reshape(1).float()
            launch(grid, s, s, 0, False)
            return q, s
        s = torch.empty(1, dtype=torch.float32, device=x.device)
        if amax is not None:
            launch(grid, s, amax, 0, True)
        elif triton.next_power_of_2(T) * triton.next_power_of_2(C) <= ONE_PROGRAM:
            launch((1,), s, s, 4, True, blk=triton.next_power_of_2(C), BLOCK_T=triton.next_power_of_2(T),
                   num_warps=8)
        else:
            amax = torch.zeros(1, dtype=torch.float32, device=x.device)
            launch(grid, s, amax, 3, True, zero_kw={**kw, "ZERO": False})
            launch(grid, s, amax, 0, True)
        return q, s
    if granularity == "token":
        s = torch.empty(T, dtype=torch.float32, device=x.device)
        if amax is not None:
            launch((T, triton.cdiv(C, block)), s, amax, 5, True, stride_s=1)
            return q, s
        row_block = min(_ROW_BLOCK, triton.next_power_of_2(C))
        launch((T,), s, s, 1, True, stride_s=1, blk=row_block, num_warps=8 if row_block >= 4096 else 4)
        return q, s
    if granularity == "group":
        if C % BLOCK:
            raise ValueError(f"per-group fp8 activation quantization needs the width ({C}) to be a multiple of {BLOCK}")
        s = torch.empty(T, C // BLOCK, dtype=torch.float32, device=x.device)
        launch((T, C // BLOCK), s, s, 2, True, stride_s=s.stride(0), blk=BLOCK)
        return q, s
    raise ValueError(f"unknown activation granularity {granularity!r}; expected 'tensor', 'token' or 'group'")


# --- block sizes --------------------------------------------------------------------------------------------------
def fp8_config(kernel: str, M: int, E: int, N: int, K: int, gated: bool, device: torch.device, top_k: int,
               block_scales: bool) -> GemmConfig:
    """The tuned cache's entry for kernel ("w13-fp8" / "w2-fp8", "w13-fp8-static" / "w2-fp8-static" for the static
    per-tensor epilogue; "-block" appended for block scales) at the nearest M, else a heuristic by slots per expert
    s = M*top_k/E: decode (s <= 4) streams weights with BM 16 and 256-byte rows of B per K-step; prefill uses
    128 x 128 tiles. Block scales need BLOCK_K to divide 128."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret:
        return GemmConfig(16, 32, 32, 1, 4, 1)
    cfg = cached_config(kernel + ("-block" if block_scales else ""), M, E, N, K, device)
    if cfg is not None:
        return cfg
    bk = 128 if block_scales else 256
    s = M * top_k / max(E, 1)
    if s <= 4:
        return GemmConfig(16, 64 if N >= 4096 else 32, bk, 1, 4, 4 if gated else 5)
    if s <= 16:
        return GemmConfig(32, 64, 128, 8, 4, 4)
    if s <= 64:
        return GemmConfig(64, 64 if gated else 128, 128, 8, 4, 4)
    return GemmConfig(128, 128, 128, 8, 8, 3 if gated else 4)


# --- the grouped GEMM ---------------------------------------------------------------------------------------------
def b_desc_wanted(b_desc: bool | None = None, block_m: int = TMA_MIN_BLOCK_M) -> bool:
    """b_desc when given, else MOEQUANT_FP8_TMA (B_DESC_MODE): whether a GEMM with BLOCK_M block_m should try TMA
    loads of B."""
    if b_desc is not None:
        return bool(b_desc)
    if B_DESC_MODE not in ("auto", "off", "on"):
        raise ValueError(f"MOEQUANT_FP8_TMA={B_DESC_MODE!r}: expected 'auto', 'off' or 'on'")
    return B_DESC_MODE == "on" or (B_DESC_MODE == "auto" and block_m >= TMA_MIN_BLOCK_M)


def b_descriptor(b: torch.Tensor, cfg: GemmConfig):
    """A host TMA descriptor of b [E, N_b, K] viewed as [E * N_b, K], block [BLOCK_N, BLOCK_K] (the kernel's B_DESC
    operand), or None where TMA cannot load it and B keeps pointer loads: no TensorDescriptor in this Triton; a GPU
    before sm_90 (the interpreter takes descriptors); rows not K-contiguous, not stacked evenly ([E * N_b] rows of one
    stride), or at a row stride / base address that is not a multiple of 16 bytes (a contiguous b needs K % 16 == 0);
    BLOCK_K * elem < 16 bytes or a block dimension over TMA_MAX_BOX."""
    E, Nb, K = b.shape
    if TensorDescriptor is None or b.numel() == 0:
        return None
    if not _interpret() and (not b.is_cuda or torch.version.hip is not None
                             or torch.cuda.get_device_capability(b.device)[0] < 9):
        return None
    row = b.stride(1) * b.element_size()
    if b.stride(2) != 1 or (E > 1 and b.stride(0) != Nb * b.stride(1)) or row % 16 or b.data_ptr() % 16:
        return None
    if cfg.BLOCK_K * b.element_size() < 16 or max(cfg.BLOCK_K, cfg.BLOCK_N) > TMA_MAX_BOX or E * Nb >= 2**31:
        return None
    return TensorDescriptor(b, [E * Nb, K], [b.stride(1), 1], [cfg.BLOCK_N, cfg.BLOCK_K])


def fp8_grouped_gemm(a, a_scale, b, b_scale, c, routing, cfg, layout: Fp8Layout, *, gated: bool, a_row_div: int,
                     activation: str = "silu", bias=None, topk_weights=None, out_amax=None,
                     amax_per_row: bool = False, a_from_amax: bool = False, c_scale=None,
                     b_desc: bool | None = None) -> torch.Tensor:
    """c[slot] = epilogue(sa * a[slot // a_row_div] @ (sb * b[expert(slot)]).T) for every routed slot.
    An `a` that is not fp8 is quantized tile by tile in the kernel (act "tensor": scale a_scale, or from the amax
    a_scale with a_from_amax; act "token": per row from the row amax in a_scale), exactly as act_quant would.
    out_amax: fold max |c| into out_amax[0], or with amax_per_row each slot's into out_amax[slot]. An fp8 c is
    written quantized with the static scale c_scale [1], exactly as act_quant would.
    b_desc: load B's tiles by TMA (True), by pointers (False), or as MOEQUANT_FP8_TMA says (None); TMA falls back to
    pointers where b_descriptor cannot describe b."""
    sorted_ids, expert_ids, total = routing
    N = b.shape[1] // 2 if gated else b.shape[1]
    K = b.shape[2]
    S = c.shape[0]
    P = sorted_ids.numel()
    if layout.weight == "block" or layout.act == "group":
        if BLOCK % cfg.BLOCK_K:
            raise ValueError(f"block/group fp8 scales need BLOCK_K to divide {BLOCK}, got {cfg.BLOCK_K}")
    a_hp = a.dtype != FP8_DTYPE
    if a_hp and layout.act not in ("tensor", "token"):
        raise ValueError(f"in-kernel activation quantization supports per-tensor and per-token scales, "
                         f"not {layout.act!r}")
    grid = (triton.cdiv(P, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N),)
    a_s = a_scale if a_scale.dim() == 2 else a_scale.view(-1, 1)
    bs = b_scale if b_scale.dim() == 3 else b_scale.view(b_scale.shape[0], -1, 1)
    out_quant = c.dtype == FP8_DTYPE
    if out_quant and (c_scale is None or out_amax is not None):
        raise ValueError("fp8_grouped_gemm: an fp8 output needs its static scale c_scale (and no out_amax)")
    c_out = c.view(torch.uint8) if out_quant else c  # e4m3 stored as bytes
    dummy = c_out
    desc = b_descriptor(b, cfg) if b_desc_wanted(b_desc, cfg.BLOCK_M) else None
    fp8_moe_gemm_kernel[grid](
        a, a_scale, b if desc is None else desc, b_scale, c_out, out_amax if out_amax is not None else a_scale,
        c_scale if c_scale is not None else a_scale, bias if bias is not None else dummy,
        topk_weights if topk_weights is not None else dummy,
        sorted_ids, expert_ids, total,
        N, K, S, P,
        a.stride(0), a.stride(1), a_s.stride(0), a_s.stride(1),
        b.stride(0), b.stride(1), b.stride(2), bs.stride(0), bs.stride(1), bs.stride(2),
        c.stride(0), c.stride(1),
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        A_ROW_DIV=a_row_div, GATED=gated, ACTIVATION=_ACT_CODE[activation],
        MUL_WEIGHT=topk_weights is not None, HAS_BIAS=bias is not None,
        A_SCALE=_A_CODE[layout.act], B_SCALE=_B_CODE[layout.weight],
        OUT_AMAX=0 if out_amax is None else 2 if amax_per_row else 1,
        IMPRECISE_ACC=None if FAST_ACCUM else min(cfg.BLOCK_K, 128),
        A_HP=a_hp, A_FROM_AMAX=a_from_amax, EPS=ACT_EPS, EMULATE_CAST=_interpret(), OUT_QUANT=out_quant,
        B_DESC=desc is not None, **cfg.launch_kwargs(),
    )
    return c


def fused_experts_fp8(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, layout: Fp8Layout, *,
                      a13_scale=None, a2_scale=None, activation="silu", w13_bias=None, w2_bias=None,
                      apply_router_weight_on_input=False, has_remote_experts=False, route=None) -> torch.Tensor:
    """out[t] = sum_k w[t,k] * (W2[e] q2(act(W13[e] q1(x[t]) + b13[e])) + b2[e]), e = topk_ids[t,k], with W the
    dequantized fp8 weights and q1, q2 the fp8 activation quantizers (static scales a13_scale / a2_scale [1] for
    act="tensor" when given, else dynamic). No host synchronisation (CUDA-graph safe). route (topk.DeferredRouting;
    topk_weights and topk_ids are its outputs): routing left to the kernels (the rows GEMV's GEMM1 routes; other
    paths route with the routing launch first)."""
    T, H = x.shape
    E, two_i, _ = w13.shape
    I = two_i // 2
    K = topk_ids.shape[1]
    if w13.dtype != FP8_DTYPE or w2.dtype != FP8_DTYPE:
        raise ValueError(f"fused_experts_fp8 needs {FP8_DTYPE} weights, got {w13.dtype} and {w2.dtype}")
    if T == 0:
        return torch.zeros(0, H, dtype=x.dtype, device=x.device)
    if rows_gemv(T, w13, w2, w13_scale, w2_scale, layout):
        return _fused_gemv_rows(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, layout, a13_scale, a2_scale,
                                activation, w13_bias, w2_bias, apply_router_weight_on_input, route)
    if route is not None:  # the kernels below read the routing: route with the routing launch first
        route.run()
    if use_gemv(T, K, E, slots_per_expert=0):
        return _fused_gemv(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, layout, a13_scale, a2_scale,
                           activation, w13_bias, w2_bias, apply_router_weight_on_input)
    S = T * K
    blocky = layout.weight == "block" or layout.act == "group"
    # few slots: GEMM2 quantizes GEMM1's fp32 activation itself (one launch less; re-reading A is cheap here)
    fuse2 = S <= FUSE_A2_SLOTS and layout.act in ("tensor", "token")
    # a static per-tensor stage-2 scale: GEMM1 writes its activation in e4m3 itself (no fp32 copy, no quantizer)
    static2 = layout.act == "tensor" and a2_scale is not None and not fuse2
    # that epilogue and GEMM2's e4m3 input are other kernels than the dynamic ones: their own tuning-cache entries
    # (H200, Qwen3-30B M=1: the dynamic path's best configs cost the static one 1.4 us)
    kind = "-static" if static2 else ""
    cfg1 = fp8_config("w13-fp8" + kind, T, E, I, H, True, x.device, K, blocky)
    cfg2 = fp8_config("w2-fp8" + kind, T, E, H, I, False, x.device, K, blocky)
    topk_weights = topk_weights.reshape(-1).float().contiguous()
    # few slots: GEMM1's routing is sorted by x's quantizer's first program (one launch fewer)
    align1 = one_program_align(topk_ids, E, cfg1.BLOCK_M)
    route1 = align1.routing if align1 is not None else moe_align(topk_ids, E, cfg1.BLOCK_M)
    route2 = route1 if cfg2.BLOCK_M == cfg1.BLOCK_M else moe_align(topk_ids, E, cfg2.BLOCK_M)

    dyn_tensor = layout.act == "tensor" and a2_scale is None
    # GEMM1's epilogue folds max|act| (per tensor, or per slot for per-token scales) into amax, so the activation's
    # quantizer (or GEMM2) makes one pass over it; x's quantizer zeroes amax first (no memset launch)
    amax = None
    if dyn_tensor:
        amax = torch.empty(1, dtype=torch.float32, device=x.device)
    elif layout.act == "token":
        amax = torch.empty(S, dtype=torch.float32, device=x.device)
    per_row = amax is not None and layout.act == "token"
    xq, xs = act_quant(x, layout.act, a13_scale, zero=amax, zero_per_row=K if per_row else 1, align=align1)
    new = torch.zeros if has_remote_experts else torch.empty
    s2 = a2_scale.reshape(1).float() if static2 else None
    inter = new(S, I, dtype=FP8_DTYPE if static2 else torch.float32, device=x.device)
    fp8_grouped_gemm(xq, xs, w13, w13_scale, inter, route1, cfg1, layout, gated=True, a_row_div=K,
                     activation=activation, bias=w13_bias,
                     topk_weights=topk_weights if apply_router_weight_on_input else None, out_amax=amax,
                     amax_per_row=per_row, c_scale=s2)
    if static2:
        iq, is_ = inter, s2
    elif fuse2:
        iq, is_ = inter, (a2_scale if a2_scale is not None else amax)
    else:
        iq, is_ = act_quant(inter, layout.act, a2_scale, amax=amax)
    y = new(S, H, dtype=x.dtype, device=x.device)
    fp8_grouped_gemm(iq, is_, w2, w2_scale, y, route2, cfg2, layout, gated=False, a_row_div=1, bias=w2_bias,
                     topk_weights=None if apply_router_weight_on_input else topk_weights,
                     a_from_amax=dyn_tensor)
    return moe_sum(y, T, K)


_GEMV_A_KIND = {"tensor": "tensor", "token": "row", "group": "group"}
# decode on the rows GEMV (fp8 weights, activations quantized in its programs): up to this many tokens, and experts
# of at most this many w13 bytes (rows_gemv)
ROWS_GEMV_TOKENS = int(os.environ.get("MOEQUANT_FP8_ROWS_GEMV_TOKENS", 1))
ROWS_MAX_EXPERT_BYTES = 8 << 20


def rows_gemv(T: int, w13, w2, w13_scale, w2_scale, layout: Fp8Layout) -> bool:
    """Whether T tokens take the rows GEMV (gemv.fp8_rows: per-tensor or per-channel weights with per-tensor or
    per-token activation scales, rows of a multiple of 16 bytes): up to ROWS_GEMV_TOKENS tokens with experts of at
    most ROWS_MAX_EXPERT_BYTES of w13, or whatever MOEQUANT_GEMV=always|never says (per-tensor dynamic scales read
    all of x in every GEMM1 program, so it is meant for few tokens). From the H200 at M=1 (us per forward, rows GEMV
    on the tensor-core body / tensor-core grouped GEMMs): Qwen3-30B (3 MB per expert) fp8-tensor 19.3 / 27.4, static
    19.9 / 25.4, fp8-channel 19.7 / 28.5; Mixtral (117 MB) fp8-tensor 125 / 100 (benchmarks/results/*-s13-*)."""
    if layout.weight == "block" or layout.act not in ("tensor", "token") or T == 0:
        return False
    if not (fp8_rows(gemv_weights(w13, w13_scale, layout.weight)) and fp8_rows(gemv_weights(w2, w2_scale,
                                                                                           layout.weight))):
        return False
    if gemv_mod.MODE in ("always", "never"):
        return gemv_mod.MODE == "always"
    return T <= ROWS_GEMV_TOKENS and w13[0].numel() * w13.element_size() <= ROWS_MAX_EXPERT_BYTES


def gemv_weights(w: torch.Tensor, scale: torch.Tensor, granularity: str) -> GemvWeights:
    """The GEMV kernel's view of fp8 weights with per-tensor [E], per-channel [E, N] or block [E, N/G, C/G] scales."""
    if granularity == "tensor":
        return GemvWeights("fp8", w, expert_scale=scale)
    if granularity == "channel":
        return GemvWeights("fp8", w, row_scale=scale)
    return GemvWeights("fp8", w, group=BLOCK, scale=scale)


def _fused_gemv(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, layout: Fp8Layout, a13_scale, a2_scale,
                activation, w13_bias, w2_bias, on_input) -> torch.Tensor:
    """The decode path (gemv.py): x's quantizer, GEMV1 (fp32 activation, folding max |act| for a dynamic per-tensor
    scale), the activation's quantizer, GEMV2 with the top-k sum."""
    amax = None
    if layout.act == "tensor" and a2_scale is None:
        amax = torch.empty(1, dtype=torch.float32, device=x.device)

    def quantize(a, stage):
        if stage == 1:  # also zeroes the amax buffer GEMV1 folds into
            q, s = act_quant(a, layout.act, a13_scale, zero=amax)
        else:
            q, s = act_quant(a, layout.act, a2_scale, amax=amax)
        return q, s, _GEMV_A_KIND[layout.act]

    return fused_experts_gemv(x, gemv_weights(w13, w13_scale, layout.weight), gemv_weights(w2, w2_scale, layout.weight),
                              topk_weights, topk_ids, activation=activation, w13_bias=w13_bias, w2_bias=w2_bias,
                              apply_router_weight_on_input=on_input, quantize=quantize, inter_dtype=torch.float32,
                              out_amax=amax)


def _fused_gemv_rows(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, layout: Fp8Layout, a13_scale, a2_scale,
                     activation, w13_bias, w2_bias, on_input, route) -> torch.Tensor:
    """The decode path on the rows GEMV (gemv.py, _gemv_fp8_rows.py): two launches. GEMM1 (routing itself when
    route is given) quantizes x in its programs (static scale, or from x's rows), writes its activation in fp32 and,
    for a dynamic stage-2 scale, one max |act| per program; GEMM2 quantizes that activation with the scale those
    maxima give (per tensor, or per slot), and sums over the top k."""
    T, H = x.shape
    K = topk_ids.shape[1]
    I = w13.shape[1] // 2
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:  # rows read by 8 / 16-byte vector loads
        x = x.clone(memory_format=torch.contiguous_format)
    g13 = gemv_weights(w13, w13_scale, layout.weight)
    g2 = gemv_weights(w2, w2_scale, layout.weight)
    kind = _GEMV_A_KIND[layout.act]
    if route is not None and on_input:  # GEMM1 weights its input: the routing comes first
        route.run()
        route = None
    topk_weights = topk_weights.reshape(-1)
    if topk_weights.dtype != torch.float32 or not topk_weights.is_contiguous():
        topk_weights = topk_weights.float().contiguous()
    static2 = kind == "tensor" and a2_scale is not None
    a1 = Fp8ActIn(kind, "input" if a13_scale is None else "static",
                  None if a13_scale is None else a13_scale.reshape(1).float())
    probe = Fp8ActIn(kind, "static")  # plans need the input kind only
    plan1 = plan_gemv(g13, T * K, topk_ids, down=False, top_k=K, a_quant=probe)
    plan2 = plan_gemv(g2, T, topk_ids, down=True, top_k=K, a_quant=probe)
    bufs = split_buffers(plan2, T, x.device)
    per_slot = plan1.programs // (T * K)  # GEMM1 programs (amax partials) per slot
    amax = None if static2 else torch.empty(T * K * per_slot, dtype=torch.float32, device=x.device)
    inter = torch.empty(T * K, I, dtype=torch.float32, device=x.device)
    # GEMM2 on the tensor-core body as GEMM1's programmatic dependent: it routes again, issues the weight loads of
    # its first STAGES steps and waits for GEMM1 (H200, Qwen3-30B M=1 fp8-tensor 19.9 -> 19.0 us, fp8-channel 20.4
    # -> 19.8 with one step; two steps 18.2-18.3 and 18.4: gemv.fp8_rows_heuristic)
    chain = route is not None and plan2.cfg.MMA and gemv_mod.chain_pdl(x, g13)
    gemv(x, g13, inter, topk_ids, down=False, top_k=K, activation=activation, bias=w13_bias,
         topk_weights=topk_weights if on_input else None, out_amax=amax, plan=plan1, zero_bufs=bufs, route=route,
         a_quant=a1, trigger=chain)
    if static2:
        a2 = Fp8ActIn(kind, "static", a2_scale.reshape(1).float())
    else:
        a2 = Fp8ActIn(kind, "amax", amax, amax.numel() if kind == "tensor" else per_slot)
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    return gemv(inter, g2, out, topk_ids, down=True, top_k=K, bias=w2_bias,
                topk_weights=None if on_input else topk_weights, plan=plan2, split_bufs=bufs, a_quant=a2,
                route=route if chain else None, pdl=chain)
