"""Sweep the decode (GEMV) kernel's block sizes through the whole layer forward and cache the winners.

For each shape, scheme and token count M, one GEMV (up: gate/up + activation, down: W2 + top-k sum) at a time gets
candidate configs while the other keeps its current best; each candidate is timed as FusedMoE forwards (CUDA graph)
over bench_moe's REPLICAS input sets routed to different experts, so weights come from DRAM as in a model's decode
step. The search is coordinate-wise from the cached or the heuristic config (the faster over TUNE_CONFIRM
alternating timings each; every round's winner is confirmed the same way: tune_moe.search): STAGES (rows kernel),
BLOCK_N, NG (groups per chunk), num_warps, SPLIT_K and PART_SPLIT (GEMM2 of the rows kernel), PREFETCH (int4,
A16 fp4), UNIT (A16 fp4), MMA (fp8 rows: the tensor-core body, whose own axes are BLOCK_N 16 / 32, num_warps and
STAGES 1-3), TUNE_GEMV_PASSES times. Winners go into the tuning cache
(moequant/kernels/configs/<device>.json) under gemv.kernel_name (e.g. "gemv-up-int4-g128").
Shape legend: M tokens, E experts, K top-k, H hidden, I intermediate.

    python benchmarks/tune_gemv.py --schemes w4a16:g128,nvfp4a16,fp8-tensor --shapes qwen3-30b-a3b --ms 1
    TUNE_WORKERS=8 TUNE_GEMV_GRID=1 python benchmarks/tune_gemv.py --schemes nvfp4a16 --shapes mixtral-8x7b
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_moe import REPLICAS, SHAPES, make_inputs, random_layer  # noqa: E402
from benchmarks.precompile import Precompiler  # noqa: E402
from benchmarks.tune_moe import CONFIRM, confirmed, layer_tuner_main, search, time_config  # noqa: E402

PASSES = int(os.environ.get("TUNE_GEMV_PASSES", 1))
# TUNE_WORKERS=N (or TUNE_GEMV_WORKERS): compile each round's candidates in N worker processes first
# (benchmarks/precompile.py; the H200 session of 2026-11-29: 91 fp4 configs in 11 s).
# TUNE_GEMV_GRID=1: before the coordinate passes, time the grid of every applicable axis's current value and its
# neighbours (see grid); meant for use with workers.
GRID = os.environ.get("TUNE_GEMV_GRID") == "1"
# TUNE_GEMV_AXES='{"up": {"BLOCK_N": [4, 8, 16], "NG": [4, 8, 16]}, "down": {...}}': the grid is instead the full
# product of the values given for each GEMV (axes not given keep the current value; axes that do not apply are
# dropped; a GEMV not named keeps its config: no grid for it), so a search is not confined to one step around the
# start. Implies TUNE_GEMV_GRID=1.
EXPLICIT = json.loads(os.environ.get("TUNE_GEMV_AXES") or "{}")
GRID = GRID or bool(EXPLICIT)
AXES = {"STAGES": (1, 2, 3, 4), "BLOCK_N": (1, 2, 4, 8, 16, 32, 64, 128), "NG": (1, 2, 4, 8, 16, 32, 64, 128),
        "num_warps": (2, 4, 8), "SPLIT_K": (1, 2, 4, 8), "PART_SPLIT": (False, True), "PREFETCH": (False, True),
        "UNIT": (2, 4, 8), "MMA": (False, True)}
# the fp8 rows GEMV's tensor-core body (GemvConfig.MMA): 16 or 32 rows, 1-16 warps splitting the reduction, 1-3 steps
# of loads in flight; NG and the splits mean nothing to it
MMA_AXES = {"BLOCK_N": (16, 32), "num_warps": (1, 2, 4, 8, 16), "STAGES": (1, 2, 3), "MMA": (False, True)}


class Recorder:
    """Wraps gemv.gemv_config to remember which kernel (name, E, N, C) each GEMV of the forward asked for and the
    config it got."""

    def __init__(self, gv):
        self.gv, self.orig, self.asked, self.got = gv, gv.gemv_config, {}, {}

    def __call__(self, parts, N, w, T, down, grid_rows=1, rows=False, f32=False):
        self.asked[down] = (self.gv.kernel_name(w, down, rows, f32), w.data.shape[0], N, w.columns)
        self.got[down] = self.orig(parts, N, w, T, down, grid_rows, rows, f32)
        return self.got[down]

    def __enter__(self):
        self.gv.gemv_config = self
        return self

    def __exit__(self, *exc):
        self.gv.gemv_config = self.orig
        self.gv.OVERRIDE.clear()


def heuristic_configs(gv, rec: Recorder, run) -> dict:
    """Both GEMVs' configs as the heuristic picks them, the tuning cache set aside: a second starting point, since
    one coordinate-descent pass can stop far from the best (Mixtral w4a16 GEMM2: 89 against 104 us)."""
    saved_cache, saved_override = gv.cached_entry, dict(gv.OVERRIDE)
    gv.cached_entry = lambda *a, **k: None
    gv.OVERRIDE.clear()
    try:
        run()
        return dict(rec.got)
    finally:
        gv.cached_entry = saved_cache
        gv.OVERRIDE.update(saved_override)


def applies(axis: str, name: str, down: bool, cfg=None) -> bool:
    """Whether an axis means anything for the GEMV kernel `name` (gemv.kernel_name) at config cfg (the fp8 rows
    GEMV's tensor-core body, cfg.MMA, reads other axes than its CUDA-core body)."""
    rows = "int" in name or "rows" in name
    if axis == "MMA":
        return "fp8" in name and rows
    if "fp8" in name and rows and cfg is not None and cfg.MMA:
        return axis in MMA_AXES
    if "fp8" in name and axis in ("STAGES", "PREFETCH", "UNIT", "PART_SPLIT"):
        return False  # the fp8 rows GEMV: plain steps, GEMM2 always one expert per program
    if axis in ("SPLIT_K", "PART_SPLIT"):
        return down and rows  # only GEMM2 of the rows kernel (int, A16 fp4) splits
    if axis == "STAGES":  # only the rows kernel pipelines its steps (A16 fp4's bf16x2 path: when not PREFETCH)
        return rows
    if axis == "PREFETCH":
        return "int4" in name or "rows" in name  # its bf16x2 paths (int4, A16 fp4) double-buffer their loads
    if axis == "UNIT":
        return "rows" in name and "fp4" in name  # byte columns per tile element: A16 fp4's bf16x2 path
    return True


def grid(cfg, name: str, down: bool) -> list:
    """Every combination of the current values and neighbours (one step each way) of BLOCK_N, NG and (GEMM2)
    SPLIT_K, num_warps 4 / 8 (GEMM1), and PREFETCH and UNIT (4, 8) where they apply, for A16 fp4 STAGES 1 / 3 without
    PREFETCH: 108 fp4 GEMM1 configs, 162 fp4 GEMM2 configs; or, with TUNE_GEMV_AXES, the full product of the values
    given there (only the current config for a GEMV it does not name)."""
    def near(axis):
        vals, i = _axis_values(cfg, axis)
        return vals[max(0, i - 1):i + 2]

    given = EXPLICIT.get("down" if down else "up")
    if EXPLICIT and given is None:  # the other GEMV's sweep was asked for, not this one's (a fp4 GEMM2 default grid
        return [cfg]  # alone is 162 configs: a device call that named only GEMM1 ran past its limit)
    if given is not None:
        axes = {a: v for a, v in given.items() if applies(a, name, down, cfg)}
        return [dataclasses.replace(cfg, **dict(zip(axes, combo))) for combo in itertools.product(*axes.values())]
    if cfg.MMA:  # the fp8 tensor-core body: both block sizes, the warps around the current, 1-3 steps in flight
        axes = {"BLOCK_N": MMA_AXES["BLOCK_N"], "num_warps": near("num_warps"), "STAGES": MMA_AXES["STAGES"]}
        return [dataclasses.replace(cfg, **dict(zip(axes, combo))) for combo in itertools.product(*axes.values())]

    axes = {"BLOCK_N": near("BLOCK_N"), "NG": near("NG")}
    if not down:
        axes["num_warps"] = (4, 8)
    for axis, vals in (("PREFETCH", (False, True)), ("UNIT", (4, 8)), ("SPLIT_K", near("SPLIT_K"))):
        if applies(axis, name, down):
            axes[axis] = vals
    fp4_rows = "fp4" in name and "rows" in name
    if fp4_rows:  # its loads either double-buffered in registers (PREFETCH) or pipelined through shared memory
        axes["STAGES"] = (1, 3)
    combos = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    return [dataclasses.replace(cfg, **c) for c in combos if not (fp4_rows and c["PREFETCH"] and c["STAGES"] > 1)]


def configure(overrides: dict) -> None:
    """A precompile worker's configs for one job: {down: GemvConfig} for both GEMVs."""
    import moequant.kernels.gemv as gv

    gv.OVERRIDE.clear()
    gv.OVERRIDE.update(overrides)


def _axis_values(cfg, axis: str) -> tuple[tuple, int]:
    """An axis's values (MMA_AXES' for a tensor-core config) and the index of cfg's (0 when off the axis)."""
    vals = MMA_AXES[axis] if cfg.MMA and axis in MMA_AXES else AXES[axis]
    return vals, vals.index(getattr(cfg, axis)) if getattr(cfg, axis) in vals else 0


def switch_body(cfg, mma: bool):
    """cfg on the other fp8 rows body: the tensor-core one takes 16 or 32 rows (the nearest), no split, one step in
    flight to start from; the CUDA-core one keeps the rest."""
    if not mma:
        return dataclasses.replace(cfg, MMA=False, STAGES=1)
    return dataclasses.replace(cfg, MMA=True, BLOCK_N=32 if cfg.BLOCK_N >= 32 else 16, NG=1, SPLIT_K=1, STAGES=1)


def neighbours(cfg, axis: str):
    if axis == "MMA":
        return [switch_body(cfg, not cfg.MMA)]
    vals, i = _axis_values(cfg, axis)
    return [dataclasses.replace(cfg, **{axis: vals[j]}) for j in (i - 2, i - 1, i + 1, i + 2) if 0 <= j < len(vals)]


def tune(shape_name: str, scheme: str, ms, seed: int = 0) -> dict:
    import moequant.kernels.gemv as gv
    from moequant.kernels.tuning import cache_key

    sh = SHAPES[shape_name]
    layer = random_layer(shape_name, scheme, "cuda", seed)
    torch.cuda.empty_cache()  # quantizing the dense weights left its peak reserved; workers need the memory
    out: dict = {}
    pre = Precompiler(shape_name, scheme, configure)
    with Recorder(gv) as rec, torch.no_grad():
        for M in ms:
            # REPLICAS input sets route to different experts, so each forward streams weights the previous one did
            # not leave in L2 (as in a model's decode step; Qwen3-30B's 8 routed experts fit in L2 otherwise)
            inputs = make_inputs(sh, M, "cuda", torch.Generator(device="cuda").manual_seed(M), REPLICAS)
            gv.OVERRIDE.clear()
            rec.asked.clear()

            def run():
                for x, logits in inputs:
                    layer(x, logits)

            run()
            if set(rec.asked) != {False, True}:
                print(f"{shape_name} {scheme} M={M}: the forward does not take the GEMV path", flush=True)
                continue
            cur = dict(rec.got)  # the cache's choice (or the heuristic's without one) ...
            gv.OVERRIDE.update(cur)
            base = best_t = time_config(run) / REPLICAS
            heuristic = heuristic_configs(gv, rec, run)  # ... or the heuristic's, whichever is faster, is the start
            if heuristic != cur:  # (both timed CONFIRM times, alternating: one timing each picked the wrong one)
                win, t_h, t_c = confirmed(gv.OVERRIDE.update, run, cur, heuristic, REPLICAS, max(CONFIRM, 1),
                                          "start (cache / heuristic)")
                base, best_t, cur = t_c, min(t_h, t_c), heuristic if win else cur
            if GRID:
                for down in (False, True):
                    cands = grid(cur[down], rec.asked[down][0], down)
                    pre(M, [{down: c, not down: cur[not down]} for c in cands])
                    best_t, cur[down] = search(gv.OVERRIDE, down, run, cands, cur[down], REPLICAS)
            for _ in range(PASSES):
                for down in (False, True):
                    for axis in AXES:
                        if not applies(axis, rec.asked[down][0], down, cur[down]):
                            continue
                        cands = neighbours(cur[down], axis)
                        pre(M, [{down: c, not down: cur[not down]} for c in cands])
                        best_t, cur[down] = search(gv.OVERRIDE, down, run, cands, cur[down], REPLICAS)
            print(f"{shape_name:16s} {scheme:22s} M={M:5d}: {base:8.1f} -> {best_t:8.1f} us  up {cur[False]}  "
                  f"down {cur[True]}", flush=True)
            for down in (False, True):
                name, E, N, C = rec.asked[down]
                out.setdefault(cache_key(name, E, N, C), {})[str(M)] = dataclasses.asdict(cur[down])
    pre.close()
    del layer
    torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    sys.exit(layer_tuner_main(tune, __doc__.splitlines()[0], "tune_gemv.py",
                              "w4a16:g128,nvfp4a16,fp8-tensor,fp8-channel"))
