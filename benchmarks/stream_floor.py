"""The floor under a decode GEMV: how long a Triton kernel takes only to stream a GEMV's bytes on this card, and
GEMM1's and GEMM2's byte counts as two launches back to back (with and without an empty routing-like launch
first), each launch a CUDA graph node, reading weights from DRAM.

Why: at M=1 on a shape of many small experts (Qwen3-30B-A3B, 19 MB of int4 per token) the GEMVs run near
1.4 TB/s; whether a 2x bar is in reach depends on what any kernel needs to move those bytes in one or two launches,
which this measures rather than assumes.

# B bytes per launch, WORDS int32 per program and step (each thread's loads 16 bytes wide), STEPS steps per program,
# P = cdiv(B / 4, WORDS * STEPS) programs, PREFETCH: the next step's loads issued before this step's sum
Each program XORs its contiguous slab of WORDS * STEPS words (so no load is dead) and stores one int32; the graph
replays REPLICAS launches, each on its own buffer, so no launch finds its bytes in L2.

    python benchmarks/stream_floor.py                                 # the benchmark shapes' GEMV byte counts
    python benchmarks/stream_floor.py --mb 12.6,6.3 --out benchmarks/results/<date>-<card>-stream-floor.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_moe import SHAPES, measure_card  # noqa: E402

REPLICAS = 8
WORDS = (512, 1024, 2048, 4096)
STEPS = (1, 2, 4, 8, 16)
FORMAT_BYTES = {"int4": 0.5, "fp8": 1.0, "bf16": 2.0}  # bytes per weight element (scales not counted)


@triton.jit
def xor_combine(a, b):
    """tl.reduce's combine: XOR (every loaded word reaches the stored result, so no load is dead)."""
    return a ^ b


@triton.jit
def stream_kernel(src_ptr, out_ptr, n_words, WORDS: tl.constexpr, STEPS: tl.constexpr, PREFETCH: tl.constexpr):
    """out[p] = XOR of words [p * WORDS * STEPS, (p + 1) * WORDS * STEPS) of src (those below n_words)."""
    base = tl.program_id(0).to(tl.int64) * (WORDS * STEPS)
    offs = tl.arange(0, WORDS)
    acc = tl.zeros((WORDS,), dtype=tl.int32)
    if PREFETCH:
        nxt = tl.load(src_ptr + base + offs, mask=base + offs < n_words, other=0)
        for s in range(STEPS):
            cur = nxt
            o = base + (s + 1) * WORDS + offs
            nxt = tl.load(src_ptr + o, mask=(o < n_words) & (s + 1 < STEPS), other=0)
            acc ^= cur
    else:
        for s in range(STEPS):
            o = base + s * WORDS + offs
            acc ^= tl.load(src_ptr + o, mask=o < n_words, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.reduce(acc, 0, xor_combine))


@triton.jit
def empty_kernel(out_ptr):
    """One program storing one word: the cost of a launch in a graph (routing's launch, without its work)."""
    tl.store(out_ptr, 0)


def gemv_mbytes(shape: str, fmt: str) -> tuple[float, float]:
    """(GEMM1, GEMM2) weight MB one decode token streams: top-k experts' [2I, H] and [H, I] matrices."""
    sh = SHAPES[shape]
    b = FORMAT_BYTES[fmt]
    return sh.K * 2 * sh.I * sh.H * b / 1e6, sh.K * sh.H * sh.I * b / 1e6


class Stream:
    """REPLICAS buffers of `mb` MB and the launch of one config on buffer r."""

    def __init__(self, mb: float, device: str):
        self.n_words = max(16, int(mb * 1e6) // 64 * 16)  # a multiple of 16 words: the loads stay 16 bytes wide
        self.bufs = [torch.randint(-2**31, 2**31 - 1, (self.n_words,), dtype=torch.int32, device=device)
                     for _ in range(REPLICAS)]
        self.out = torch.empty(triton.cdiv(self.n_words, min(WORDS)), dtype=torch.int32, device=device)

    def programs(self, words: int, steps: int) -> int:
        return triton.cdiv(self.n_words, words * steps)

    def launch(self, r: int, words: int, steps: int, prefetch: bool) -> None:
        stream_kernel[(self.programs(words, steps),)](self.bufs[r], self.out, self.n_words, WORDS=words,
                                                      STEPS=steps, PREFETCH=prefetch, num_warps=4)


def _time_us(fn, device: str) -> float:
    """Microseconds per replica of fn(r) for r in range(REPLICAS): a CUDA graph of all of them on the GPU (median of
    its replays), plain calls on the CPU (the interpreter: correctness, not speed)."""
    for r in range(REPLICAS):
        fn(r)
    if device != "cuda":
        t0 = time.perf_counter()
        for r in range(REPLICAS):
            fn(r)
        return (time.perf_counter() - t0) / REPLICAS * 1e6
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for r in range(REPLICAS):
            fn(r)
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / REPLICAS)
    return statistics.median(times)


def sweep(st: Stream, device: str, configs) -> list[dict]:
    rows = []
    for words, steps, prefetch in configs:
        if st.programs(words, steps) < 1:
            continue
        us = _time_us(lambda r: st.launch(r, words, steps, prefetch), device)
        rows.append({"words": words, "steps": steps, "prefetch": prefetch, "programs": st.programs(words, steps),
                     "us": us, "GBps": st.n_words * 4 / us / 1e3})
    return sorted(rows, key=lambda r: r["us"])


def measure(pairs, device: str, configs) -> dict:
    """For each (GEMM1 MB, GEMM2 MB): each launch's best config, the pair back to back, the pair after an empty
    launch, and one launch of both byte counts; plus an empty launch alone."""
    out = {"empty_launch_us": None, "pairs": []}
    dummy = torch.empty(1, dtype=torch.int32, device=device)
    out["empty_launch_us"] = _time_us(lambda r: empty_kernel[(1,)](dummy), device)
    for mb1, mb2 in pairs:
        s1, s2, both = Stream(mb1, device), Stream(mb2, device), Stream(mb1 + mb2, device)
        r1, r2, rb = sweep(s1, device, configs), sweep(s2, device, configs), sweep(both, device, configs)
        c1 = (r1[0]["words"], r1[0]["steps"], r1[0]["prefetch"])
        c2 = (r2[0]["words"], r2[0]["steps"], r2[0]["prefetch"])
        pair = _time_us(lambda r: (s1.launch(r, *c1), s2.launch(r, *c2)), device)
        routed = _time_us(lambda r: (empty_kernel[(1,)](dummy), s1.launch(r, *c1), s2.launch(r, *c2)), device)
        out["pairs"].append({"mb": [mb1, mb2], "gemm1": r1[:5], "gemm2": r2[:5], "one_launch": rb[:3],
                             "pair_us": pair, "empty_then_pair_us": routed})
        del s1, s2, both
    return out


def default_pairs() -> list[tuple[float, float, str]]:
    return [(*gemv_mbytes(s, f), f"{s} {f}") for s in ("qwen3-30b-a3b", "mixtral-8x7b") for f in FORMAT_BYTES]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", default=None, help="GEMM1,GEMM2 MB of one pair (default: the benchmark shapes' GEMVs "
                                              "in int4, fp8 and bf16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.mb:
        try:
            mb1, mb2 = (float(v) for v in args.mb.split(","))
        except ValueError:
            raise SystemExit(f"stream_floor: --mb takes two numbers, GEMM1,GEMM2 MB; got {args.mb!r}")
        pairs = [(mb1, mb2, args.mb)]
    elif args.device == "cuda":
        pairs = default_pairs()
    else:
        raise SystemExit("stream_floor: on the CPU (the interpreter) pass --mb with small sizes, e.g. 0.004,0.002")
    configs = list(itertools.product(WORDS, STEPS, (False, True)))
    if args.device != "cuda":  # the interpreter: a few configs, to check the tool, not the card
        configs = [(512, 1, False), (512, 2, True)]
    meta = measure_card(args.device)
    res = measure([(a, b) for a, b, _ in pairs], args.device, configs)
    for (_, _, name), row in zip(pairs, res["pairs"]):
        row["name"] = name
    print(f"{meta['card']}  copy {meta['copy_bandwidth_GBps'] or 0:.0f} GB/s  empty launch "
          f"{res['empty_launch_us']:.1f} us")
    print(f"{'pair':24} {'MB':>12} {'GEMM1 us':>9} {'GEMM2 us':>9} {'pair us':>8} {'+empty':>8} {'one us':>8} "
          f"{'GEMM1 cfg (words, steps, prefetch, programs)':>44}")
    for row in res["pairs"]:
        g1, g2, one = row["gemm1"][0], row["gemm2"][0], row["one_launch"][0]
        cfg = f"{g1['words']}, {g1['steps']}, {int(g1['prefetch'])}, {g1['programs']}"
        print(f"{row['name']:24} {row['mb'][0]:5.1f}+{row['mb'][1]:5.1f} {g1['us']:9.1f} {g2['us']:9.1f} "
              f"{row['pair_us']:8.1f} {row['empty_then_pair_us']:8.1f} {one['us']:8.1f} {cfg:>44}")
    if args.out:
        path = Path(args.out)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(meta, **res), indent=1) + "\n")
        tmp.replace(path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
