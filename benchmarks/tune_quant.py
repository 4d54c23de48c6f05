"""Sweep block sizes of the quantized (int, fp4, fp8) grouped expert GEMMs through the whole layer forward.

Unlike tune_moe.py (which times each unquantized GEMM alone), this times one FusedMoE forward (CUDA graph) per candidate
while the launcher's `get_config` (fp8: `fp8_config`) is replaced for one GEMM (w13 or w2) at a time, the other keeping
its current best; the winners go into the same tuning cache (moequant/kernels/configs/<device>.json) under the kernel
names the launchers ask for (e.g. "w13-int4", "w2-fp8", "w13-fp8-block"). Each timed step runs bench_moe's REPLICAS
input sets routed to different experts, so small M reads its weights from DRAM (Qwen3-30B's eight routed experts
would otherwise stay in the 50 MB L2). Shape legend: M tokens, E experts, K top-k, H hidden, I intermediate.

    python benchmarks/tune_quant.py --schemes w4a16:g128,nvfp4a16 --shapes qwen3-30b-a3b --ms 1
    python benchmarks/tune_quant.py --schemes fp8-tensor,fp8-tensor+static,fp8-channel --shapes mixtral-8x7b --ms 1
    TUNE_WORKERS=8 python benchmarks/tune_quant.py ...   (compile each GEMM's candidates in 8 processes first)
"""

from __future__ import annotations

import importlib
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_moe import REPLICAS, SHAPES, make_inputs, random_layer  # noqa: E402
from benchmarks.precompile import Precompiler  # noqa: E402
from benchmarks.tune_moe import layer_tuner_main, search, time_config  # noqa: E402

LAUNCHERS = ("moequant.kernels.int_gemm", "moequant.kernels.fp4_gemm")  # get_config(kernel, M, E, N, K, ...)
FP8_LAUNCHER = "moequant.kernels.fp8_gemm"  # fp8_config(kernel, M, E, N, K, gated, device, top_k, block_scales)


def candidates(M: int, E: int, K: int, fp8: bool = False):
    """Decode (few slots per expert): BLOCK_M 16, weights streamed in wide K steps; prefill: square-ish tiles.
    fp8 also tries 4 pipeline stages (its 1-byte operands leave the shared memory for them)."""
    from moequant.kernels.tuning import GemmConfig

    stages = [3, 4] if fp8 else [3]
    if M * K / E <= 8:  # few slots per expert: stream the weights
        grid = itertools.product([16], [32, 64, 128], [128, 256, 512], [1], [4, 8], stages)
    else:
        grid = itertools.product([32, 64, 128], [64, 128], [64, 128], [8], [4, 8], stages)
    return [GemmConfig(*c) for c in grid]


class ConfigOverride:
    """Replaces get_config in the launcher modules: `fixed[gemm]` for kernels named gemm-*, else the original."""

    def __init__(self):
        self.mods = [importlib.import_module(m) for m in LAUNCHERS]
        self.fp8_mod = importlib.import_module(FP8_LAUNCHER)
        self.orig = self.mods[0].get_config
        self.orig_fp8 = self.fp8_mod.fp8_config
        self.fixed: dict[str, object] = {}
        self.asked: dict[str, tuple] = {}

    def __call__(self, kernel, M, E, N, K, gated, device, top_k=1):
        gemm = kernel.split("-")[0]
        self.asked[gemm] = (kernel, E, N, K)
        cfg = self.fixed.get(gemm)
        return cfg if cfg is not None else self.orig(kernel, M, E, N, K, gated=gated, device=device, top_k=top_k)

    def fp8(self, kernel, M, E, N, K, gated, device, top_k, block_scales):
        gemm = kernel.split("-")[0]
        self.asked[gemm] = (kernel + ("-block" if block_scales else ""), E, N, K)
        cfg = self.fixed.get(gemm)
        if cfg is None:
            return self.orig_fp8(kernel, M, E, N, K, gated, device, top_k, block_scales)
        if block_scales and 128 % cfg.BLOCK_K:  # timed as rejected
            raise ValueError(f"fp8 block scales need BLOCK_K to divide 128, got {cfg.BLOCK_K}")
        return cfg

    def __enter__(self):
        for m in self.mods:
            m.get_config = self
        self.fp8_mod.fp8_config = self.fp8
        return self

    def __exit__(self, *exc):
        for m in self.mods:
            m.get_config = self.orig
        self.fp8_mod.fp8_config = self.orig_fp8


_WORKER_OVERRIDE: list = []  # a precompile worker's ConfigOverride, installed on its first job


def configure(fixed: dict) -> None:
    """A precompile worker's configs for one job: {gemm: GemmConfig} (w13 and w2)."""
    if not _WORKER_OVERRIDE:
        _WORKER_OVERRIDE.append(ConfigOverride().__enter__())
    _WORKER_OVERRIDE[0].fixed = dict(fixed)


def tune(shape_name: str, scheme: str, ms, seed: int = 0) -> dict:
    from moequant.kernels.tuning import cache_key

    sh = SHAPES[shape_name]
    layer = random_layer(shape_name, scheme, "cuda", seed)
    torch.cuda.empty_cache()  # quantizing the dense weights left its peak reserved; workers need the memory
    out: dict = {}
    pre = Precompiler(shape_name, scheme, configure)
    with ConfigOverride() as ov, torch.no_grad():
        for M in ms:
            inputs = make_inputs(sh, M, "cuda", torch.Generator(device="cuda").manual_seed(M), REPLICAS)

            def run():
                for x, logits in inputs:
                    layer(x, logits)

            ov.fixed = {}
            ov.asked = {}
            run()
            if set(ov.asked) != {"w13", "w2"}:
                print(f"{shape_name} {scheme} M={M}: the forward does not take the grouped GEMMs", flush=True)
                continue
            base = time_config(run) / REPLICAS
            for gemm in ("w13", "w2"):  # w2 against the forward with w13's winner
                cands = candidates(M, sh.E, sh.K, fp8="fp8" in ov.asked[gemm][0])
                pre(M, [{**ov.fixed, gemm: cfg} for cfg in cands])
                best_t, best = search(ov.fixed, gemm, run, cands, None, REPLICAS)
                kernel, E, N, K = ov.asked[gemm]
                print(f"{shape_name:16s} {scheme:22s} M={M:5d} {gemm:3s}: {base:8.1f} -> {best_t:8.1f} us  {best}",
                      flush=True)
                if best is not None:
                    out.setdefault(cache_key(kernel, E, N, K), {})[str(M)] = best.launch_kwargs()
            del inputs
    pre.close()
    del layer
    torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    sys.exit(layer_tuner_main(tune, __doc__.splitlines()[0], "tune_quant.py", "w4a16:g128,nvfp4a16"))
