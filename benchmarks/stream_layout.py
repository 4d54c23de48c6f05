"""Does the rows-contiguous int word layout cost streaming speed? A kernel that only streams a decode GEMM1's words
(the Qwen3-30B-A3B shape, int4, 8 experts) in the GEMV's access pattern, read from the layout the methods store
([E, N, C/8] with N stride 1: each program reads BN rows x 4 bytes of a word column, the next column N words away)
and from a row-quad tiled one ([E, N/4, C/8, 4]: four rows' words of consecutive columns contiguous).

# E experts, CW = C/8 int4 words per row (C = H = 2048: 256), N = 2I rows of w13 (1536; gate rows [0, N/2), up rows
# [N/2, N)), S = 8 slots (one token's top-k), BN rows per program and part, GW word columns per step
Each program (slot, row block) XORs its gate and up words (no load is dead) and stores one int32; the graph replays
one launch on each of REPLICAS buffers, so no launch finds its bytes in L2.

    python benchmarks/stream_layout.py --out benchmarks/results/<date>-<card>-stream-layout.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.stream_floor import REPLICAS, xor_combine  # noqa: E402

E, CW, N, S = 128, 256, 1536, 8
CONFIGS = ((8, 64, 4), (8, 128, 4), (8, 256, 4), (16, 64, 4), (32, 32, 4), (8, 64, 8))  # (BN, GW, num_warps)


@triton.jit
def _expert(slot):
    return (slot * 13) % 128  # a fixed spread of experts over the slots


@triton.jit
def rows_kernel(src, out, CW, N, BN: tl.constexpr, GW: tl.constexpr):
    """Words [E, N, CW] with N stride 1: word (n, j) at j * N + n."""
    slot = tl.program_id(0)
    base = src + _expert(slot).to(tl.int64) * CW * N + tl.program_id(1) * BN
    n = tl.arange(0, BN)[None, :]
    acc = tl.zeros((GW, BN), tl.int32)
    for c in range(0, CW // GW):
        j = c * GW + tl.arange(0, GW)[:, None]
        acc ^= tl.load(base + j * N + n)  # gate rows
        acc ^= tl.load(base + j * N + n + N // 2)  # up rows
    tl.store(out + slot * tl.num_programs(1) + tl.program_id(1), tl.reduce(tl.reduce(acc, 1, xor_combine), 0, xor_combine))


@triton.jit
def tiled_kernel(src, out, CW, N, BN: tl.constexpr, GW: tl.constexpr):
    """Words [E, N/4, CW, 4]: word (n, j) at (n // 4) * CW * 4 + j * 4 + n % 4."""
    slot = tl.program_id(0)
    base = src + _expert(slot).to(tl.int64) * CW * N
    n = tl.program_id(1) * BN + tl.arange(0, BN)[None, :]
    rows = (n // 4) * (CW * 4) + n % 4
    acc = tl.zeros((GW, BN), tl.int32)
    for c in range(0, CW // GW):
        j = c * GW + tl.arange(0, GW)[:, None]
        acc ^= tl.load(base + rows + j * 4)
        acc ^= tl.load(base + rows + (N // 2) * CW + j * 4)
    tl.store(out + slot * tl.num_programs(1) + tl.program_id(1), tl.reduce(tl.reduce(acc, 1, xor_combine), 0, xor_combine))


def tile(words: torch.Tensor) -> torch.Tensor:
    """[E, N, CW] words (any strides) -> the row-quad tiled layout [E, N/4, CW, 4], contiguous."""
    e, n, cw = words.shape
    return words.reshape(e, n // 4, 4, cw).transpose(2, 3).contiguous()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="JSON path for the table")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("stream_layout.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton.testing

    bufs = [torch.randint(0, 2**31, (E * CW * N,), dtype=torch.int32, device="cuda") for _ in range(REPLICAS)]
    mb = S * CW * N * 4 / 1e6
    rows = []
    for bn, gw, warps in CONFIGS:
        out = torch.empty(S * (N // 2 // bn), dtype=torch.int32, device="cuda")
        row = {"BN": bn, "GW": gw, "num_warps": warps, "MB": mb}
        for name, kernel in (("rows", rows_kernel), ("tiled", tiled_kernel)):
            def run():
                for b in bufs:  # the layouts hold the same number of words: the tiled kernel reads b as tiled
                    kernel[(S, N // 2 // bn)](b, out, CW, N, BN=bn, GW=gw, num_warps=warps)
            row[f"{name}_us"] = triton.testing.do_bench_cudagraph(run, rep=50) * 1e3 / REPLICAS
        rows.append(row)
        print(f"BN {bn:3d} GW {gw:3d} warps {warps}: rows-contiguous {row['rows_us']:6.2f} us "
              f"({mb / row['rows_us']:.2f} TB/s)  tiled {row['tiled_us']:6.2f} us ({mb / row['tiled_us']:.2f} TB/s)",
              flush=True)
    if args.out:
        meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "cuda": torch.version.cuda, "date": str(datetime.date.today())}
        with open(args.out, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
