"""Compile tuning candidates in worker processes before they are timed (tune_gemv.py, tune_quant.py).

Triton compiles a config's kernels the first time a forward launches them, which for the quantized kernels takes
seconds, while timing a compiled config takes a fraction of one; so each round's candidates are compiled in
parallel first, and the tuner's timing loop finds them in Triton's on-disk cache. Each worker holds a copy of the
layer with E = top-k experts (the number of experts is no kernel constant and no argument of the tuned kernels: the
same kernels, a fraction of the memory and of the quantization time). A job is (M, payload): the worker calls the
tuner's configure(payload) (a module-level function, so it pickles by name) to install the candidate's configs, then
runs one forward of M tokens. Workers: TUNE_WORKERS (or TUNE_GEMV_WORKERS), 0 = off.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys

import torch

from benchmarks.bench_moe import SHAPES, build_layer, make_weights

WORKERS = int(os.environ.get("TUNE_WORKERS", os.environ.get("TUNE_GEMV_WORKERS", 0)))

_WORKER: dict = {}


def _init(shape_name: str, scheme: str, configure) -> None:
    sh = dataclasses.replace(SHAPES[shape_name], E=SHAPES[shape_name].K)
    w13, w2 = make_weights(sh, "cuda", torch.Generator(device="cuda").manual_seed(0))
    _WORKER.update(layer=build_layer(sh, scheme, w13, w2, "cuda"), shape=sh, configure=configure)


def _compile(job) -> None:
    """One forward of M tokens with the payload's configs installed: compiles (or finds) their kernels."""
    M, payload = job
    sh = _WORKER["shape"]
    _WORKER["configure"](payload)
    try:
        with torch.no_grad():
            _WORKER["layer"](torch.randn(M, sh.H, device="cuda", dtype=torch.bfloat16),
                             torch.randn(M, sh.E, device="cuda"))
        torch.cuda.synchronize()
    except Exception as exc:  # rejected configs are timed as inf by the parent
        print(f"    precompile rejected: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)


class Precompiler:
    """Compiles candidates' kernels in `workers` processes (no-op without workers): pre(M, payloads)."""

    def __init__(self, shape_name: str, scheme: str, configure, workers: int = WORKERS):
        self.pool = None
        if workers > 0:
            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(workers, _init, (shape_name, scheme, configure))

    def __call__(self, M: int, payloads) -> None:
        if self.pool is not None and payloads:
            self.pool.map(_compile, [(M, p) for p in payloads], chunksize=1)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
