"""`moequant` command line: `quantize` (the default with no arguments: quantize and validate the built-in demo model),
`validate`, `inspect`, `methods` and `demo` (one random layer against its float64 reference).
"""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from moequant.demo import run_demo

    return run_demo(tokens=args.tokens, seed=args.seed, scheme=args.scheme)


def _methods(args: argparse.Namespace) -> int:
    from moequant.registry import get_method, list_methods

    for name in list_methods():
        cls = get_method(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:14s} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from moequant.registry import list_methods

    p = argparse.ArgumentParser(prog="moequant", description="Quantized Mixture-of-Experts layers.")
    sub = p.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="build a random MoE layer and print its output error against the reference")
    d.add_argument("--tokens", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--scheme", default="unquantized", choices=list_methods())
    d.set_defaults(func=_demo)
    m = sub.add_parser("methods", help="list the registered MoE quantization schemes")
    m.set_defaults(func=_methods)
    q = sub.add_parser("quantize", help="quantize an MoE checkpoint into compressed-tensors format (no SRC: the "
                                        "built-in demo model, then validate it)")
    _sub("moequant.quantize.quantize_cli").build_parser(q)
    q.set_defaults(func=lambda a: _sub("moequant.quantize.quantize_cli").run(a))
    v = sub.add_parser("validate", help="compare a quantized checkpoint with its original, per layer and end to end")
    _sub("moequant.validation.validate_cli").build_parser(v)
    v.set_defaults(func=lambda a: _sub("moequant.validation.validate_cli").run(a))
    i = sub.add_parser("inspect", help="print a checkpoint's architecture, MoE geometry, scheme per layer and size")
    _sub("moequant.loaders.inspect_cli").build_parser(i)
    i.set_defaults(func=lambda a: _sub("moequant.loaders.inspect_cli").run(a))
    return p


def _sub(module: str):
    """A subcommand's module (build_parser, run); imported when the parser is built, its heavy imports inside run."""
    import importlib

    return importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["quantize"])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
