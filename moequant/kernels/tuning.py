"""Block sizes for the grouped expert GEMMs: one place, a heuristic plus an optional generated cache.

The cache (written by `benchmarks/tune_moe.py` on the GPU) is JSON at moequant/kernels/configs/<device>.json:
{"version": 1, "device": name, "configs": {"<kernel>,E=<E>,N=<N>,K=<K>": {"<M>": {BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
num_warps, num_stages}}}}; the entry with the nearest M (tokens, on a log scale) is used. M tokens, E experts, N output cols, K reduction.
"""

from __future__ import annotations

import functools
import math
import json
import os
import re
from dataclasses import asdict, dataclass
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


def heuristic_config(M: int, E: int, N: int, K: int, gated: bool, interpret: bool = False) -> GemmConfig:
    """Decode (few slots per expert): small BM, wide K tiles, deep pipeline (bandwidth-bound).
    Prefill: large square tiles (tensor-core-bound). The gated GEMM1 carries two accumulators, so its BN is halved."""
    if interpret:
        return GemmConfig(16, 32, 32, 1, 4, 1)
    per_expert = M * 1.0 / max(E, 1)
    if per_expert <= 4 or M <= 32:
        cfg = GemmConfig(16, 64, 128, 1, 4, 4)
    elif per_expert <= 32:
        cfg = GemmConfig(32, 64, 128, 8, 4, 4)
    elif per_expert <= 128:
        cfg = GemmConfig(64, 128, 64, 8, 4, 4)
    else:
        cfg = GemmConfig(128, 128, 64, 8, 8, 4)
    if gated and cfg.BLOCK_N >= 128:
        cfg = GemmConfig(cfg.BLOCK_M, cfg.BLOCK_N // 2, cfg.BLOCK_K, cfg.GROUP_M, cfg.num_warps, cfg.num_stages)
    return cfg


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


def get_config(kernel: str, M: int, E: int, N: int, K: int, gated: bool, device: torch.device) -> GemmConfig:
    """Tuned config for (kernel, E, N, K) at the nearest M when the cache has one, else the heuristic."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda" and not interpret:
        table = _load_cache(torch.cuda.get_device_name(device)).get(cache_key(kernel, E, N, K))
        if table:
            best = min(table, key=lambda m: abs(math.log2(int(m)) - math.log2(max(M, 1))))
            return GemmConfig(**table[best])
    return heuristic_config(M, E, N, K, gated, interpret)
