"""Decode with GEMM2 fused into GEMM1 (int weights on the rows kernel): one launch after routing instead of two.

At M=1 on a model of many small experts (Qwen3-30B-A3B: 8 of 128 routed, 19 MB of int4) the two GEMV launches spend
most of their time ramping up and draining rather than streaming. Here each GEMM1 program (slot, BN rows of I) goes
on to multiply its BN activations with the matching columns of w2 and adds its partial sums of all H outputs into
an fp32 accumulator [T, H]; the last program to arrive at a block of BLOCK_H outputs casts it into out and zeroes it
(_gemv_fused_down.py). No program waits for another. The price: T * K * cdiv(I, BN) * H atomic adds.

The accumulator and its counters are a per-device workspace, zero between launches (each launch leaves them zero),
allocated on first use: launches that share one must not run concurrently on different streams.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from moequant.kernels.gemv import (PACKED, GemvConfig, GemvWeights, gemv, kernel_name, plan_gemv, rows_heuristic,
                                   uses_rows_kernel)
from moequant.kernels.tuning import cached_entry

# auto | never; default never: on the H200 never faster than two launches (Qwen3-30B w4a16 M=1 17.8 vs 17.5 us,
# Mixtral 75.3 vs 63.4; benchmarks/results/2026-11-29-NVIDIA_H200-gemv-s8-fused-down-not-kept.txt)
MODE = os.environ.get("MOEQUANT_GEMV_FUSED", "never")
STEP_WORDS = 2048  # w2 words per program and step of the fused GEMM2 (16 per thread of 4 warps)
MAX_BLOCKS = 64  # output blocks per token (the kernel counts them in one vector of 64)
OVERRIDE: list[GemvConfig] = []  # [config] while benchmarks/tune_gemv.py sweeps the fused kernel

_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


@dataclass(frozen=True)
class FusedDown:
    """What GEMM1's programs need for GEMM2: w2, the accumulator acc fp32 [T, H] and counters int32 [T, NB], out
    [T, H], the routing weights (None when applied on the input), bf16x2 products (packed), rows per step."""

    w2: GemvWeights
    acc: torch.Tensor
    count: torch.Tensor
    out: torch.Tensor
    topk_weights: torch.Tensor | None
    packed: bool
    block_h: int

    def kernel_args(self) -> list:
        d, s = self.w2.data, self.w2.scale
        return [d, s, self.acc, self.count, self.out, d.shape[1], d.stride(0), d.stride(2), s.stride(0), s.stride(2),
                self.out.stride(0)]


def fused_down_ok(x: torch.Tensor, w13: GemvWeights, w2: GemvWeights, *, biases: bool) -> bool:
    """Whether this decode can fuse GEMM2 into GEMM1: symmetric int weights with group scales of one format on the
    rows kernel, in input order (act-order's output permutation scatters GEMM1's rows over w2's columns), no biases,
    A16, and at most MAX_BLOCKS output blocks per token."""
    if MODE == "never" or biases:
        return False
    if not (w13.fmt == w2.fmt == "int" and w13.bits == w2.bits and w13.group is not None and w13.group == w2.group):
        return False
    if w2.zero_point is not None or w13.zero_point is not None or w2.sort_idx is not None:
        return False
    if w13.sort_idx is not None or w13.out_perm is not None or not uses_rows_kernel(w13) or not uses_rows_kernel(w2):
        return False
    return x.dtype in (torch.float16, torch.bfloat16, torch.float32)


def fused_config(w13: GemvWeights, w2: GemvWeights, T: int, K: int) -> GemvConfig:
    """The tuned cache's entry (name gemv-fused-int4-g128 etc.) near T, else GEMM1's rows heuristic with BLOCK_N a
    multiple of a word's elements and BLOCK_H rows so that a step reads about STEP_WORDS words of w2."""
    if OVERRIDE:
        return OVERRIDE[0]
    E, two_i = w13.data.shape[0], w13.data.shape[1]
    I, H = two_i // 2, w2.data.shape[1]
    name = kernel_name(w13, down=False).replace("gemv-up-", "gemv-fused-")
    entry = cached_entry(name, T, E, I, H, w13.data.device)
    if entry is not None:
        return GemvConfig(**entry)
    sms = torch.cuda.get_device_properties(w13.data.device).multi_processor_count if w13.data.is_cuda else 0
    G = w13.group
    cfg = rows_heuristic("int", w13.per_unit, G, I, triton.cdiv(H, G), 2, T * K, False, sms)
    bn = max(cfg.BLOCK_N, w13.per_unit)
    kw = bn // w2.per_unit
    bh = min(triton.next_power_of_2(H), max(128, STEP_WORDS // kw))
    return GemvConfig(bn, cfg.NG, cfg.num_warps, PREFETCH=cfg.PREFETCH, BLOCK_H=bh)


def _workspace(device: torch.device, T: int, H: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The zeroed accumulator [T, H] and counters [T, blocks] of this device and shape (see the module docstring)."""
    key = (device, T, H, blocks)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.zeros(T, H, dtype=torch.float32, device=device),
                            torch.zeros(T, blocks, dtype=torch.int32, device=device))
    return _WORKSPACES[key]


def fused_experts_gemv_fused(x, w13: GemvWeights, w2: GemvWeights, topk_weights, topk_ids, *, activation="silu",
                             apply_router_weight_on_input=False, cfg: GemvConfig | None = None) -> torch.Tensor:
    """out[t] = sum_k w[t,k] * W2[e] act(W13[e] x[t]), e = topk_ids[t, k]: one launch (fused_down_ok must hold)."""
    T, H = x.shape
    K = topk_ids.shape[1]
    I = w13.data.shape[1] // 2
    cfg = cfg or fused_config(w13, w2, T, K)
    if cfg.BLOCK_N % w13.per_unit:
        raise ValueError(f"fused GEMV: BLOCK_N {cfg.BLOCK_N} must be a multiple of {w13.per_unit} (a word's "
                         f"elements: each program's slice of w2's columns is whole words)")
    blocks = triton.cdiv(H, cfg.BLOCK_H)
    if blocks > MAX_BLOCKS:
        raise ValueError(f"fused GEMV: BLOCK_H {cfg.BLOCK_H} gives {blocks} output blocks per token for H = {H}, "
                         f"at most {MAX_BLOCKS}")
    topk_weights = topk_weights.reshape(-1).float().contiguous()
    inter = torch.empty(T * K, I, dtype=x.dtype, device=x.device)
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    acc, count = _workspace(x.device, T, H, blocks)
    packed = (PACKED and w2.bits == 4 and x.dtype == torch.bfloat16 and x.is_cuda
              and os.environ.get("TRITON_INTERPRET") != "1")
    fused = FusedDown(w2, acc, count, out, None if apply_router_weight_on_input else topk_weights, packed,
                      cfg.BLOCK_H)
    plan = plan_gemv(w13, inter.shape[0], topk_ids, down=False, top_k=K, cfg=cfg)
    gemv(x, w13, inter, topk_ids, down=False, top_k=K, activation=activation,
         topk_weights=topk_weights if apply_router_weight_on_input else None, plan=plan, fused=fused)
    return out
