"""Forwards of one layer for Nsight Compute: warm-up (compiles), then --iters forwards to profile.

    ncu --clock-control none -k regex:gemv --launch-skip 8 python benchmarks/ncu_forward.py --shape mixtral-8x7b \
        --scheme w4a16:g128 --m 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_moe import SHAPES, random_layer  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="mixtral-8x7b", choices=sorted(SHAPES))
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--scheme", default="w4a16:g128")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--iters", type=int, default=2)
    args = p.parse_args(argv)
    sh = SHAPES[args.shape]
    layer = random_layer(args.shape, args.scheme)
    x = torch.randn(args.m, sh.H, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(args.m, sh.E, device="cuda")
    for _ in range(args.warmup + args.iters):
        layer(x, logits)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
