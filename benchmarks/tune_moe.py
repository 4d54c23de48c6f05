"""Sweep block sizes of the grouped expert GEMMs on this GPU and write the tuning cache moequant reads.

For each shape (the benchmark's) and token count M, each of GEMM1 (w13, gated) and GEMM2 (w2) is timed alone in a CUDA
graph for every candidate config of its regime; the fastest is written to moequant/kernels/configs/<device>.json
(see moequant/kernels/tuning.py for the format). Shape legend: M tokens, E experts, K top-k, H hidden, I intermediate.

    python benchmarks/tune_moe.py [--shapes qwen3-30b,...] [--ms 1,8,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_moe import GPU_MS, GPU_SHAPES, SHAPES  # noqa: E402  (one list of shapes for both scripts)


def candidates(M: int, E: int, K: int):
    """Configs worth timing for this many slots per expert (the heuristic's regimes, widened)."""
    from moequant.kernels.tuning import GemmConfig

    per_expert = M * K / E
    if per_expert <= 4 or M <= 8:  # bandwidth-bound: narrow N tiles for more programs, deep K pipelines
        grid = itertools.product([16], [16, 32, 64, 128], [128, 256], [1], [4], [3, 4])
    elif per_expert <= 64:
        grid = itertools.product([32, 64], [64, 128], [64, 128], [8], [4], [3, 4])
    else:  # tensor-core-bound
        grid = itertools.product([64, 128], [64, 128, 256], [64, 128], [8], [4, 8], [3, 4])
    return [GemmConfig(*c) for c in grid]


VERBOSE = os.environ.get("TUNE_VERBOSE") == "1"
# TUNE_CONFIRM=N: a config that beat the incumbent on one timing must beat it again over N timings of each,
# alternating (confirmed); 0 lets single timings decide
CONFIRM = int(os.environ.get("TUNE_CONFIRM", 3))


def time_config(run) -> float:
    import triton.testing

    try:
        run()
        torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(run, rep=30, return_mode="median") * 1e3
    except Exception as exc:  # a config the compiler or the chip rejects (shared memory, registers)
        print(f"    rejected: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
        return float("inf")


def confirmed(apply, run, incumbent, challenger, runs: int = 1, n: int | None = None, label=""):
    """(challenger wins, its time, the incumbent's time): both installed by apply(config) and timed n (default
    CONFIRM) times, alternating (incumbent first), each side's median; the winner is left installed. A single
    timing swings by more than the gains a tuner looks for: on the H200 (2026-11-30) tune_gemv timed the cached
    Mixtral nvfp4a16 GEMV configs once at 75.5 us, which ab_forward's processes settle at 73.0, and started from
    the heuristic's configs instead."""
    times = {False: [], True: []}
    for _ in range(CONFIRM if n is None else n):
        for side, cfg in ((False, incumbent), (True, challenger)):
            apply(cfg)
            times[side].append(time_config(run) / runs)
    t_inc, t_ch = statistics.median(times[False]), statistics.median(times[True])
    win = t_ch < t_inc
    apply(challenger if win else incumbent)
    if VERBOSE:
        print(f"    {label}: confirm {t_ch:8.2f} against {t_inc:8.2f} us: {'kept' if win else 'dropped'}", flush=True)
    return win, t_ch, t_inc


def search(override: dict, key, run, cands, best, runs: int = 1):
    """Times run (runs forwards per call) with override[key] = the incumbent `best`, then each candidate (the other
    GEMM keeps its config): (time, config) of the fastest candidate, or of the incumbent when none beats it;
    override[key] is left at the winner. The incumbent is timed here, after the caller's precompile round, like the
    candidates: a baseline timed before it measured 2 us faster than the same config among the candidates (H200,
    Qwen3-30B fp8 tune_quant), so no candidate could have won. The fastest candidate then has to win again against
    the incumbent over CONFIRM alternating timings each (confirmed; the times returned are those medians), unless
    the incumbent failed to run. TUNE_VERBOSE=1 prints every time."""
    incumbent = best
    override[key] = best
    best_t = inc_t = time_config(run) / runs
    if VERBOSE:
        print(f"    {key}: {best_t:8.2f} us  {best} (incumbent)", flush=True)
    for cand in cands:
        override[key] = cand
        t = time_config(run) / runs
        if VERBOSE:
            print(f"    {key}: {t:8.2f} us  {cand}", flush=True)
        if t < best_t:
            best_t, best = t, cand
    if best != incumbent and CONFIRM > 0 and inc_t != float("inf"):
        win, t_ch, t_inc = confirmed(lambda c: override.__setitem__(key, c), run, incumbent, best, runs,
                                     label=str(key))
        best, best_t = (best, t_ch) if win else (incumbent, t_inc)
    override[key] = best
    return best_t, best


def tune_shape(name: str, ms, dtype=torch.bfloat16) -> dict:
    from moequant.kernels.align import moe_align
    from moequant.kernels.moe_gemm import grouped_gemm
    from moequant.kernels.tuning import cache_key

    sh = SHAPES[name]
    E, K, H, I = sh.E, sh.K, sh.H, sh.I
    dev = "cuda"
    w13 = torch.randn(E, 2 * I, H, device=dev, dtype=dtype) * 0.02
    w2 = torch.randn(E, H, I, device=dev, dtype=dtype) * 0.02
    out = {cache_key("w13", E, I, H): {}, cache_key("w2", E, H, I): {}}
    for M in ms:
        x = torch.randn(M, H, device=dev, dtype=dtype)
        ids = torch.stack([torch.randperm(E, device=dev)[:K] for _ in range(M)]).int()
        w = torch.rand(M * K, device=dev)
        inter = torch.randn(M * K, I, device=dev, dtype=dtype)
        y = torch.empty(M * K, H, device=dev, dtype=dtype)
        for gemm, key in (("w13", cache_key("w13", E, I, H)), ("w2", cache_key("w2", E, H, I))):
            best, best_t = None, float("inf")
            for cfg in candidates(M, E, K):
                route = moe_align(ids, E, cfg.BLOCK_M)
                if gemm == "w13":
                    run = lambda: grouped_gemm(x, w13, inter, route, cfg, gated=True, a_row_div=K)
                else:
                    run = lambda: grouped_gemm(inter, w2, y, route, cfg, gated=False, a_row_div=1, topk_weights=w)
                t = time_config(run)
                if t < best_t:
                    best, best_t = cfg, t
            print(f"{name:18s} M={M:5d} {gemm}: {best_t:9.1f} us  {best}", flush=True)
            out[key][str(M)] = best.launch_kwargs()
        del x, inter, y
    del w13, w2
    torch.cuda.empty_cache()
    return out


def write_cache(configs: dict, folder: str | None = None) -> Path:
    """Merge {cache key: {M: config}} into this GPU's tuning cache (default moequant/kernels/configs), atomically."""
    import triton

    from moequant.kernels.tuning import CACHE_VERSION, CONFIG_DIR, device_slug

    device = torch.cuda.get_device_name()
    folder = Path(folder) if folder else CONFIG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{device_slug(device)}.json"
    data = json.loads(path.read_text()) if path.is_file() else {"version": CACHE_VERSION, "configs": {}}
    for key, table in configs.items():
        data["configs"].setdefault(key, {}).update(table)
    data.update(device=device, torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat(), version=CACHE_VERSION)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def layer_tuner_main(tune, description: str, prog: str, default_schemes: str, argv=None) -> int:
    """Command line shared by the layer-forward tuners (tune_quant.py, tune_gemv.py): tune(shape, scheme, ms) ->
    {cache key: {M: config}} for every shape x scheme, merged into the tuning cache."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--schemes", default=default_schemes)
    p.add_argument("--shapes", default="qwen3-30b-a3b,mixtral-8x7b")
    p.add_argument("--ms", default="1")
    p.add_argument("--out", default=None, help="folder for the cache (default: moequant/kernels/configs)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{prog} needs a CUDA GPU", file=sys.stderr)
        return 2
    update: dict = {}
    for shape in args.shapes.split(","):
        for scheme in args.schemes.split(","):
            for key, table in tune(shape, scheme, [int(m) for m in args.ms.split(",")]).items():
                update.setdefault(key, {}).update(table)
    print(f"wrote {write_cache(update, args.out)}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(GPU_SHAPES))
    p.add_argument("--ms", default=",".join(map(str, GPU_MS)))
    p.add_argument("--out", default=None, help="folder for the cache (default: moequant/kernels/configs)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_moe.py needs a CUDA GPU", file=sys.stderr)
        return 2
    update = {}
    for name in args.shapes.split(","):
        update.update(tune_shape(name, [int(m) for m in args.ms.split(",")]))
    path = write_cache(update, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
