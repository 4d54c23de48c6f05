"""The built-in demo: a random Qwen3-MoE-shaped layer (small), routed tokens, and the error of the fast path against
the float64 reference, per backend available on this machine."""

from __future__ import annotations

import os
import time

import torch

DEMO_SHAPE = dict(num_experts=16, top_k=4, hidden_size=256, intermediate_size=128)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def run_demo(tokens: int = 64, seed: int = 0, scheme: str = "unquantized") -> int:
    from rich.console import Console
    from rich.table import Table

    from moequant import FusedMoE

    g = torch.Generator().manual_seed(seed)
    E, K, H, I = (DEMO_SHAPE[k] for k in ("num_experts", "top_k", "hidden_size", "intermediate_size"))
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    x = torch.randn(tokens, H, generator=g)
    logits = torch.randn(tokens, E, generator=g)

    runs = [("reference", "cpu", torch.float32)]
    if torch.cuda.is_available():
        runs.append(("triton", "cuda", torch.bfloat16))
    elif os.environ.get("TRITON_INTERPRET") == "1":
        runs.append(("triton", "cpu", torch.float16))

    truth = FusedMoE(E, K, H, I, params_dtype=torch.float64, backend="reference")
    truth.load_dense_weights(w13.double(), w2.double())
    ref = truth(x.double(), logits)

    table = Table(title=f"moequant demo: E={E} K={K} H={H} I={I}, {tokens} tokens, scheme {scheme}")
    for col in ("backend", "device", "dtype", "rel. error vs float64", "time (ms)"):
        table.add_column(col)
    for backend, device, dtype in runs:
        layer = FusedMoE(E, K, H, I, params_dtype=dtype, quant_config=scheme, backend=backend).to(device)
        layer.load_dense_weights(w13.to(device, dtype), w2.to(device, dtype))
        xd, ld = x.to(device, dtype), logits.to(device)
        t0 = time.perf_counter()
        out = layer(xd, ld)
        if device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        table.add_row(backend, device, str(dtype).removeprefix("torch."), f"{_rel(out.cpu(), ref):.2e}", f"{ms:.1f}")
    Console().print(table)
    return 0
