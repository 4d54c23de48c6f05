"""`moequant quantize [SRC] [OUT] --scheme ... --algo rtn|gptq ...`: argument parser and runner (cli.py wires it).

With no SRC this is the main job: the built-in demo model is quantized (w4a16) into ./moequant-out and validated.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moequant.quantize.schemes import SCHEMES


def _shard_size(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
    t = text.strip().upper()
    for u, m in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * m)
    return int(t)


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("src", nargs="?", default=None,
                   help="checkpoint folder or hub id (default: the built-in demo model)")
    p.add_argument("out", nargs="?", default="moequant-out", help="output folder (default: ./moequant-out)")
    p.add_argument("--scheme", default="w4a16", choices=list(SCHEMES))
    p.add_argument("--group-size", type=int, default=None,
                   help="integer schemes: group size (default 128, or the largest of 64/32 dividing every input dim); "
                        "-1 = per output channel")
    p.add_argument("--algo", default="rtn", choices=["rtn", "gptq"])
    p.add_argument("--calib", default=None, help="calibration text file (default for the demo model: its training "
                                                 "stdlib source)")
    p.add_argument("--num-samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--targets", default="experts", choices=["experts", "all"],
                   help="experts: the routed experts' Linears; all: also attention / dense / shared-expert Linears")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (calibration and GPTQ)")
    p.add_argument("--min-tokens", type=int, default=64, help="GPTQ: experts with fewer routed tokens use RTN")
    p.add_argument("--no-act-order", dest="act_order", action="store_false", help="GPTQ without activation ordering")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, a fraction of mean(diag H)")
    p.add_argument("--max-shard-size", type=_shard_size, default="4GB", help="output shard size, e.g. 4GB, 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary table")
    p.add_argument("--validate", dest="validate", action="store_true", default=None,
                   help="after quantizing, validate OUT against SRC (default: on for the built-in demo model)")
    p.add_argument("--no-validate", dest="validate", action="store_false", help="skip the validation")
    p.add_argument("--json", dest="json_path", default=None, help="validation: write every figure to this JSON file")
    return p


def run(args: argparse.Namespace) -> int:
    from moequant.quantize.api import quantize_checkpoint

    overwrite = args.overwrite
    if args.src is None and not overwrite and (Path(args.out) / "quantize_report.json").is_file():
        print(f"moequant quantize: replacing {args.out} (an earlier moequant output of the demo model)")
        overwrite = True
    try:
        out = quantize_checkpoint(
            args.src, args.out, scheme=args.scheme, group_size=args.group_size, algo=args.algo, calib=args.calib,
            num_samples=args.num_samples, seq_len=args.seq_len, targets=args.targets, device=args.device,
            overwrite=overwrite, progress=not args.quiet, min_tokens=args.min_tokens, act_order=args.act_order,
            damp=args.damp, max_shard_bytes=args.max_shard_size)
    except (ValueError, FileExistsError, FileNotFoundError, NotImplementedError) as e:
        import sys

        print(f"moequant quantize: error: {e}", file=sys.stderr)
        return 2
    print(out)
    if args.validate is False or (args.validate is None and args.src is not None):
        return 0
    return _validate(args, out)


def _validate(args: argparse.Namespace, out) -> int:
    """The main job's second half: OUT against its source, layer-wise and end to end, printed as a table."""
    from moequant.data import demo_model_path
    from moequant.validation.validate_cli import build_parser as validate_parser
    from moequant.validation.validate_cli import run as validate_run

    ref = str(args.src if args.src is not None else demo_model_path())
    vargs = validate_parser(argparse.ArgumentParser()).parse_args([ref, str(out), "--device", args.device])
    vargs.calib, vargs.json_path = args.calib, args.json_path
    print(f"\nvalidating {out} against {ref}")
    return validate_run(vargs)
