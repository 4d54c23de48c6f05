"""Per-kernel GPU time of one FusedMoE forward (torch profiler), to see where a decode step's time goes.

    python benchmarks/profile_forward.py --shape qwen3-30b-a3b --m 1 [--scheme unquantized]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_moe import SHAPES, build_layer, make_weights  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--scheme", default="unquantized", help="as bench_moe's --schemes, e.g. w4a16:g128+actorder")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_forward.py needs a CUDA GPU", file=sys.stderr)
        return 2

    sh = SHAPES[args.shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    layer = build_layer(sh, args.scheme, *make_weights(sh, "cuda", gen), "cuda")
    with torch.device("cuda"):
        xs = [torch.randn(args.m, sh.H, dtype=torch.bfloat16) for _ in range(8)]
        ls = [torch.randn(args.m, sh.E) for _ in range(8)]
    for x, lg in zip(xs, ls):
        layer(x, lg)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for x, lg in zip(xs, ls):
            layer(x, lg)
        torch.cuda.synchronize()
    print(f"{args.shape} M={args.m} scheme={args.scheme}: GPU time per kernel over 8 forwards")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
