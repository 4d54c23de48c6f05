"""One-launch decode for A16 fp4 weights (bf16 activations, GPU): routing, GEMM1, activation and GEMM2 in one kernel
(_gemv_fused_fp4.py), where fused_experts_gemv's two-launch path routes in GEMM1 and chains GEMM2 to it.

The two-launch forward's structure alone (its loads, routing, reductions and launches, with every product removed)
took 15.65 us on the H200 for Qwen3-30B at one token (benchmarks/results, s21 notes); this path drops the second
launch, its routing and its wait, and the intermediate's round trip through memory, for fp32 reductions in L2.
H200, nvfp4a16 M=1 (benchmarks/results, s22): Qwen3-30B 16.18 -> 15.68 us with the tuned config (GEMM1 BLOCK_N 32,
NG 32, 4 warps, PREFETCH, PRE2; benchmarks/tune_fused.py); with the two-launch GEMM1's config 18.2. Mixtral with
that config: 82.7 against 66.1 (not profiled, not swept), so there "auto" keeps two launches (no tuned entry).

The accumulator rows and counters are a workspace per (device, tokens, hidden) that every forward leaves zeroed (the
last program of each token clears its row): allocated zeroed on first use, outside CUDA graph capture (a forward
captured before any eager one of its shape takes the two-launch path instead). Forwards of one shape running
concurrently on several streams would share it: they are not supported.
"""

from __future__ import annotations

import os

import torch
import triton

from moequant.kernels._gemv_fused_fp4 import gemv_fused_fp4_kernel
from moequant.kernels.gemv import GemvConfig, GemvWeights, _row_words, fp4_unit, plan_gemv, uses_packed
from moequant.kernels.moe_gemm import _ACT_CODE
from moequant.kernels.tuning import cached_entry

MODE = os.environ.get("MOEQUANT_GEMV_FUSED", "auto")  # auto | always | never (see fuses)
MAX_TOKENS = 1  # fuses: tokens up to which "auto" takes the one-launch path
KERNEL = "gemv-fused-fp4"  # the tuning cache's name (plus -gG): entries only where measured faster than two launches
HB_MAX = 4096  # output elements the last program casts per step (of every accumulator row)
REPLICAS = 1  # accumulator rows per token
CONFIG: tuple[GemvConfig, bool] | None = None  # (GEMM1's config, PRE2), set by benchmarks while they sweep
_WORKSPACE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def fuses(x: torch.Tensor, w13: GemvWeights, w2: GemvWeights, route, *, biases: bool, act_quant: bool,
          apply_router_weight_on_input: bool) -> bool:
    """Whether fp4_gemm's decode (w13, w2: its fp4 GemvWeights, rows checked by check_word_rows) takes the one-launch
    path instead of fused_experts_gemv: nvfp4a16 weights (second-level scales; mxfp4 has none, and routes first) on
    the bf16x2 path (bf16 activations in order, GPU), routing left to the kernel (route), no biases, up to MAX_TOKENS
    tokens where the tuned cache has an entry for the shape (it is only tuned where measured faster than two
    launches; always: any number and shape); MOEQUANT_GEMV_FUSED=never turns it off."""
    if MODE == "never" or route is None or biases or act_quant or apply_router_weight_on_input:
        return False
    if w13.expert_scale is None or w2.expert_scale is None or not (uses_packed(w13, x) and uses_packed(w2, x)):
        return False
    return MODE == "always" or x.shape[0] <= MAX_TOKENS and _tuned(w13, x.shape[0]) is not None


def _tuned(w13: GemvWeights, T: int) -> dict | None:
    """The tuned cache's entry for this kernel and shape near T tokens (GemvConfig fields plus PRE2)."""
    E, two_i, _ = w13.data.shape
    return cached_entry(f"{KERNEL}-g{w13.group}", T, E, two_i // 2, w13.columns, w13.data.device)


def fused_config(w13: GemvWeights, T: int, top_k: int, ids: torch.Tensor) -> tuple[GemvConfig, bool]:
    """(GEMM1's config, PRE2) of the one-launch kernel: CONFIG (sweeps), else the tuned entry, else the two-launch
    GEMM1's config without PRE2."""
    if CONFIG is not None:
        return CONFIG
    entry = _tuned(w13, T)
    if entry is not None:
        entry = dict(entry)
        pre2 = entry.pop("PRE2", False)
        return GemvConfig(**entry), pre2
    return plan_gemv(w13, T * top_k, ids, down=False, top_k=top_k).cfg, False


def _workspace(x: torch.Tensor, H: int, R: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Zeroed fp32 accumulator rows [T, R, H] and int32 counters [T] for this device (None while a CUDA graph is being
    captured and none exists yet)."""
    T = x.shape[0]
    key = (x.device, T, R, H)
    ws = _WORKSPACE.get(key)
    if ws is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        ws = (torch.zeros(T, R, H, dtype=torch.float32, device=x.device),
              torch.zeros(T, dtype=torch.int32, device=x.device))
        _WORKSPACE[key] = ws
    return ws


def _tile(BI: int, G: int, H: int) -> tuple[int, int, int]:
    """GEMM2 share's tile: U2 byte columns per element (at most 8, G/2 and BI/2), BQ2 quads per step (all H/4 up to
    512), R accumulator rows per token; MOEQUANT_GEMV_FUSED_TILE="U2,BQ2,R" overrides."""
    env = os.environ.get("MOEQUANT_GEMV_FUSED_TILE")
    if env:
        try:
            u2, bq2, r = (int(v) for v in env.split(","))
        except ValueError:
            raise ValueError(f"MOEQUANT_GEMV_FUSED_TILE must be three integers U2,BQ2,R, got {env!r}") from None
        return u2, bq2, r
    return min(8, G // 2, BI // 2), min(512, triton.next_power_of_2(H // 4)), REPLICAS


def fused_decode_fp4(x: torch.Tensor, w13: GemvWeights, w2: GemvWeights, route, activation: str = "silu"
                     ) -> torch.Tensor | None:
    """out[t] = sum_k w[t, k] W2[e_k] bf16(act(W13[e_k] x[t])) in one launch (route's weights and ids are written too);
    None when it cannot run here (GEMM1's tile does not divide I, or no workspace under graph capture)."""
    T, H = x.shape
    K = route.top_k
    I = w13.data.shape[1] // 2
    cfg, pre2 = fused_config(w13, T, K, route.ids)
    if I % cfg.BLOCK_N:
        return None
    G = w13.group
    u2, bq2, r = _tile(cfg.BLOCK_N, G, H)
    ws = _workspace(x, H, r)
    if ws is None:
        return None
    acc, count = ws
    w13_words, s13 = _row_words(w13.data), _row_words(w13.scale.view(torch.uint8))
    w2_words, s2 = _row_words(w2.data), _row_words(w2.scale.view(torch.uint8))
    es13, es2 = w13.expert_scale, w2.expert_scale
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    num_g1 = triton.cdiv(H, G)
    grid = (T * K, I // cfg.BLOCK_N)
    gemv_fused_fp4_kernel[grid](
        x, route.logits, w13_words, s13, es13, w2_words, s2, es2, route.weights, route.ids, acc, count, out,
        route.scale, I, H, num_g1, route.logits.shape[1],
        x.stride(0), route.logits.stride(0), *w13_words.stride(), *s13.stride(),
        *es13.stride(), *w2_words.stride(), *s2.stride(), es2.stride(0), out.stride(0),
        TOP_K=K, **route.consts(), ACTIVATION=_ACT_CODE[activation], SCALE_KIND=1 if w13.scale_kind == "e8m0" else 0,
        G=G, EVEN=H % (cfg.NG * G) == 0, PREFETCH=cfg.PREFETCH, UNIT=fp4_unit(cfg, G), BLOCK_N=cfg.BLOCK_N,
        NG=cfg.NG, U2=u2, BQ2=bq2, EVEN2=(H // 4) % bq2 == 0, R=r,
        HB=min(HB_MAX, triton.next_power_of_2(H)), PRE2=pre2 and bq2 == H // 4, num_warps=cfg.num_warps)
    return out
