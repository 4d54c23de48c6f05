"""Sweep block sizes of the quantized (int, fp4) grouped expert GEMMs through the whole layer forward.

Unlike tune_moe.py (which times each unquantized GEMM alone), this times one FusedMoE forward (CUDA graph) per candidate
while the launcher's `get_config` is replaced for one GEMM (w13 or w2) at a time, the other keeping its current best; the
winners go into the same tuning cache (moequant/kernels/configs/<device>.json) under the kernel names the launchers ask
for (e.g. "w13-int4"). Shape legend: M tokens, E experts, K top-k, H hidden, I intermediate.

    python benchmarks/tune_quant.py --schemes w4a16:g128,nvfp4a16 --shapes qwen3-30b-a3b --ms 1
"""

from __future__ import annotations

import importlib
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_moe import SHAPES, make_inputs, random_layer  # noqa: E402
from benchmarks.tune_moe import layer_tuner_main, time_config  # noqa: E402

LAUNCHERS = ("moequant.kernels.int_gemm", "moequant.kernels.fp4_gemm")  # fp8 reads the cache in fp8_config


def candidates(M: int, E: int, K: int):
    from moequant.kernels.tuning import GemmConfig

    if M * K / E <= 8:  # few slots per expert: stream the weights
        grid = itertools.product([16], [32, 64, 128], [128, 256, 512], [1], [4, 8], [3])
    else:
        grid = itertools.product([32, 64, 128], [64, 128], [64, 128], [8], [4, 8], [3])
    return [GemmConfig(*c) for c in grid]


class ConfigOverride:
    """Replaces get_config in the launcher modules: `fixed[gemm]` for kernels named gemm-*, else the original."""

    def __init__(self):
        self.mods = [importlib.import_module(m) for m in LAUNCHERS]
        self.orig = self.mods[0].get_config
        self.fixed: dict[str, object] = {}
        self.asked: dict[str, tuple] = {}

    def __call__(self, kernel, M, E, N, K, gated, device, top_k=1):
        gemm = kernel.split("-")[0]
        self.asked[gemm] = (kernel, E, N, K)
        cfg = self.fixed.get(gemm)
        return cfg if cfg is not None else self.orig(kernel, M, E, N, K, gated=gated, device=device, top_k=top_k)

    def __enter__(self):
        for m in self.mods:
            m.get_config = self
        return self

    def __exit__(self, *exc):
        for m in self.mods:
            m.get_config = self.orig


def tune(shape_name: str, scheme: str, ms, seed: int = 0) -> dict:
    from moequant.kernels.tuning import cache_key

    sh = SHAPES[shape_name]
    layer = random_layer(shape_name, scheme, "cuda", seed)
    out: dict = {}
    with ConfigOverride() as ov, torch.no_grad():
        for M in ms:
            inputs = make_inputs(sh, M, "cuda", torch.Generator(device="cuda").manual_seed(M), 1)
            ov.fixed = {}
            layer(*inputs[0])
            base = time_config(lambda: layer(*inputs[0]))
            for gemm in ("w13", "w2"):
                best, best_t = None, base
                for cfg in candidates(M, sh.E, sh.K):
                    ov.fixed[gemm] = cfg
                    t = time_config(lambda: layer(*inputs[0]))
                    if t < best_t:
                        best, best_t = cfg, t
                ov.fixed[gemm] = best
                kernel, E, N, K = ov.asked[gemm]
                print(f"{shape_name:16s} {scheme:22s} M={M:5d} {gemm:3s}: {base:8.1f} -> {best_t:8.1f} us  {best}",
                      flush=True)
                if best is not None:
                    out.setdefault(cache_key(kernel, E, N, K), {})[str(M)] = best.launch_kwargs()
            del inputs
    del layer
    torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    sys.exit(layer_tuner_main(tune, __doc__.splitlines()[0], "tune_quant.py", "w4a16:g128,nvfp4a16"))
