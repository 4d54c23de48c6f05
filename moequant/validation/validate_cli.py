"""`moequant validate REF QUANT [--layers ...] [--tokens N] [--calib FILE] [--json PATH] [--plot PATH] [--device D]`.

Exit status: 0 when the comparison ran, 1 when QUANT produced NaN/inf somewhere (reported per expert), 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys

from moequant.validation.api import DEFAULT_SEQ_LEN, DEFAULT_TOKENS  # noqa: F401  (light: api imports torch lazily)

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.description = ("Compare a quantized MoE checkpoint (QUANT) with its original (REF): per-layer and per-expert "
                     "SQNR, routing changes, and end to end perplexity, KL and top-1 agreement.")
    p.add_argument("ref", help="the original (fp16/bf16) checkpoint: folder or hub id")
    p.add_argument("quant", help="the quantized checkpoint: any folder or hub id moequant opens")
    p.add_argument("--layers", default=None, help="MoE layers to compare, e.g. '0-3,7' (default: all)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"token positions evaluated (default "
                   f"{DEFAULT_TOKENS})")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="window length for the model runs")
    p.add_argument("--calib", default=None, help="UTF-8 text file to evaluate on (default: held-out stdlib files)")
    p.add_argument("--json", dest="json_path", default=None, help="write every figure to this JSON file")
    p.add_argument("--plot", dest="plot_path", default=None, help="write a PNG plot (needs matplotlib)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=_DTYPES, help="block/model dtype (auto: fp32 CPU, bf16 GPU)")
    p.add_argument("--inputs", default="auto", choices=("auto", "real", "random"),
                   help="layer-wise inputs: REF's hidden states (real), RMS-scaled Gaussian (random), auto")
    p.add_argument("--no-end-to-end", dest="end_to_end", action="store_false", help="layer-wise figures only")
    p.add_argument("--experts", action="store_true", help="also print a table per layer with every expert")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from moequant.loaders.safetensors_index import CheckpointError
    from moequant.validation.api import validate
    from moequant.validation.inputs import ValidationError

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        report = validate(args.ref, args.quant, layers=args.layers, tokens=args.tokens, calib=args.calib,
                          device=args.device, json_path=args.json_path, plot_path=args.plot_path, dtype=dtype,
                          seq_len=args.seq_len, inputs=args.inputs, end_to_end=args.end_to_end, seed=args.seed)
    except (ValidationError, CheckpointError, ImportError, FileNotFoundError) as e:
        print(f"moequant validate: error: {e}", file=sys.stderr)
        return 2
    from rich.console import Console

    report.print(Console(), experts=args.experts)
    if args.json_path:
        print(f"wrote {args.json_path}")
    if args.plot_path:
        print(f"wrote {args.plot_path}")
    return 1 if report.nonfinite_experts else 0


def main(argv: list[str] | None = None) -> int:
    p = build_parser(argparse.ArgumentParser(prog="moequant validate"))
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
