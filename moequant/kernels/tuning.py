"""Block sizes for the grouped expert GEMMs: one place, a heuristic plus an optional generated cache.

The cache (written by `benchmarks/tune_moe.py` on the GPU) is JSON at moequant/kernels/configs/<device>.json:
{"version": 1, "device": name, "configs": {"<kernel>,E=<E>,N=<N>,K=<K>": {"<M>": {BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
num_warps, num_stages}}}}; the entry with the nearest M (tokens, on a log scale) is used when within 4x of M. M tokens, E experts, N output cols, K reduction.
"""

from __future__ import annotations

import functools
import math
import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

CACHE_VERSION = 1
CONFIG_DIR = Path(__file__).with_name("configs")


@dataclass(frozen=True)
class GemmConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def launch_kwargs(self) -> dict:
        return asdict(self)


def heuristic_config(M: int, E: int, N: int, K: int, gated: bool, top_k: int = 1,
                     interpret: bool = False) -> GemmConfig:
    """By token slots per expert s = M*top_k/E. Decode (s <= 4): BM 16, narrow N tiles (more programs streaming
    weights), BK 128: bandwidth-bound. Prefill (s > 64): 128 x 128 tiles, 8 warps: tensor-core-bound.
    Read off the H200 sweep of benchmarks/tune_moe.py."""
    if interpret:
        return GemmConfig(16, 32, 32, 1, 4, 1)
    s = M * top_k / max(E, 1)
    if s <= 4:
        return GemmConfig(16, 128 if N >= 8192 else 32 if gated else 64, 128, 1, 4, 4 if gated else 3)
    if s <= 16:
        return GemmConfig(32, 64, 128, 8, 4, 3)
    if s <= 64:
        return GemmConfig(64, 64 if gated else 128, 64, 8, 4, 3)
    return GemmConfig(128, 128, 64, 8, 8, 4 if gated else 3)


def device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


@functools.lru_cache(maxsize=None)
def _load_cache(device_name: str) -> dict:
    path = Path(os.environ.get("MOEQUANT_TUNING_DIR", CONFIG_DIR)) / f"{device_slug(device_name)}.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.get("version") != CACHE_VERSION:
        return {}
    return data.get("configs", {})


def cache_key(kernel: str, E: int, N: int, K: int) -> str:
    return f"{kernel},E={E},N={N},K={K}"


MAX_LOG2_DISTANCE = 2  # a cached entry serves token counts within 4x of the M it was tuned at


def cached_entry(kernel: str, M: int, E: int, N: int, K: int, device: torch.device) -> dict | None:
    """The cache's entry (launch parameters) for (kernel, E, N, K) at the M nearest on a log scale, if within
    MAX_LOG2_DISTANCE."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    table = _load_cache(torch.cuda.get_device_name(device)).get(cache_key(kernel, E, N, K))
    if not table:
        return None
    dist = {m: abs(math.log2(int(m)) - math.log2(max(M, 1))) for m in table}
    best = min(dist, key=dist.get)
    return table[best] if dist[best] <= MAX_LOG2_DISTANCE else None


def cached_config(kernel: str, M: int, E: int, N: int, K: int, device: torch.device) -> GemmConfig | None:
    entry = cached_entry(kernel, M, E, N, K, device)
    return GemmConfig(**entry) if entry is not None else None


def get_config(kernel: str, M: int, E: int, N: int, K: int, gated: bool, device: torch.device,
               top_k: int = 1) -> GemmConfig:
    """Tuned config for (kernel, E, N, K) near M when the cache has one, else the heuristic."""
    cfg = cached_config(kernel, M, E, N, K, device)
    if cfg is not None:
        return cfg
    return heuristic_config(M, E, N, K, gated, top_k, os.environ.get("TRITON_INTERPRET") == "1")


SHARED_MEMORY_BUDGET = 200 * 1024  # bytes of pipelined A and B tiles per program (H100/H200 allow 227 KB)


def fit_shared_memory(cfg: GemmConfig, element_size: int, gated: bool) -> GemmConfig:
    """cfg with fewer pipeline stages, then a smaller BLOCK_K, until stages * (BM*BK + BN*BK*(2 if gated)) elements
    fit SHARED_MEMORY_BUDGET; tuned for 2-byte inputs, the bf16 configs overflow with fp32 (4-byte) inputs."""
    def need(c: GemmConfig) -> int:
        return c.num_stages * (c.BLOCK_M + c.BLOCK_N * (2 if gated else 1)) * c.BLOCK_K * element_size

    while need(cfg) > SHARED_MEMORY_BUDGET:
        if cfg.num_stages > 2:
            cfg = replace(cfg, num_stages=cfg.num_stages - 1)
        elif cfg.BLOCK_K > 16:
            cfg = replace(cfg, BLOCK_K=cfg.BLOCK_K // 2)
        else:
            break
    return cfg
