"""Sweep the one-launch nvfp4a16 decode kernel (kernels.gemv_fused) through the layer forward and cache its config
only where it beats the two-launch GEMV path.

For each shape and token count M, every candidate (GEMM1's BLOCK_N dividing I, NG, num_warps, PREFETCH, and PRE2:
GEMM2's weights loaded before GEMM1) is timed as FusedMoE forwards (CUDA graph) over bench_moe's REPLICAS input sets.
The fastest is then timed against the two-launch path, alternating (tune_moe.confirmed); only a win goes into the
tuning cache (moequant/kernels/configs/<device>.json, key "gemv-fused-fp4-g16,E=..,N=I,K=H"), and "auto" takes the
one-launch path exactly where such an entry exists (gemv_fused.fuses). Where the two launches win, an entry already
in the cache is reported, to be removed by hand. Shape legend: M tokens, E experts, H hidden, I intermediate.

    python benchmarks/tune_fused.py --shapes qwen3-30b-a3b --ms 1
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_moe import REPLICAS, SHAPES, make_inputs, random_layer  # noqa: E402
from benchmarks.tune_moe import confirmed, layer_tuner_main, time_config  # noqa: E402

AXES = dict(BLOCK_N=(16, 32, 64), NG=(32, 64, 128), num_warps=(4, 8), PREFETCH=(False, True), PRE2=(False, True))


def candidates(I: int, H: int, G: int) -> list[dict]:
    """Every combination of AXES whose BLOCK_N divides I and whose step (NG groups of G columns) is at most H, with
    UNIT 8 byte columns (at most G / 2)."""
    out = []
    for values in itertools.product(*AXES.values()):
        c = dict(zip(AXES, values), UNIT=min(8, G // 2))
        if I % c["BLOCK_N"] == 0 and c["NG"] * G <= max(H, G):
            out.append(c)
    return out


def tune(shape_name: str, scheme: str, ms) -> dict:
    """{cache key: {M: entry}} for the Ms where the one-launch kernel wins (nvfp4a16 only)."""
    import moequant.kernels.gemv_fused as gf
    from moequant.kernels.gemv import GemvConfig
    from moequant.kernels.tuning import cache_key

    if scheme != "nvfp4a16":
        raise SystemExit(f"tune_fused.py: the one-launch kernel serves nvfp4a16, got --schemes {scheme}")
    shape = SHAPES[shape_name]
    layer = random_layer(shape_name, scheme)
    G = 16
    key = cache_key(f"{gf.KERNEL}-g{G}", shape.E, shape.I, shape.H)
    saved = gf.MODE, gf.CONFIG

    def apply(entry):
        if entry is None:
            gf.MODE, gf.CONFIG = "never", None
        else:
            cfg = {k: v for k, v in entry.items() if k != "PRE2"}
            gf.MODE, gf.CONFIG = "always", (GemvConfig(**cfg), entry["PRE2"])

    table = {}
    try:
        for M in ms:
            inputs = make_inputs(shape, M, "cuda", torch.Generator(device="cuda").manual_seed(M), REPLICAS)

            def run():
                for x, logits in inputs:
                    layer(x, logits)

            timed = []
            for cand in candidates(shape.I, shape.H, G):
                apply(cand)
                timed.append((time_config(run) / REPLICAS, sorted(cand.items())))
                print(f"  {shape_name} M={M} {dict(timed[-1][1])}: {timed[-1][0]:.2f} us", flush=True)
            best = dict(min(timed)[1])
            win, t_one, t_two = confirmed(apply, run, None, best, runs=REPLICAS, label=f"{shape_name} M={M}")
            print(f"{shape_name} M={M}: one launch {t_one:.2f} us {best}, two launches {t_two:.2f} us", flush=True)
            if win:
                table[str(M)] = best
            else:
                print(f"  two launches win: no entry for M={M} (remove {key} [{M}] from the cache if present)")
    finally:
        gf.MODE, gf.CONFIG = saved
    return {key: table} if table else {}


def main(argv=None) -> int:
    return layer_tuner_main(tune, __doc__.splitlines()[0], "tune_fused.py", "nvfp4a16", argv)


if __name__ == "__main__":
    sys.exit(main())
