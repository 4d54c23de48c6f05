"""`moequant` command line: `demo` (the default with no arguments for now), `methods` and `inspect`.

Later issues add `quantize`, `validate`, `inspect` and `bench` here; only implemented commands are offered.
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
    i = sub.add_parser("inspect", help="print a checkpoint's architecture, MoE geometry, scheme per layer and size")
    _inspect_cli().build_parser(i)
    i.set_defaults(func=lambda a: _inspect_cli().run(a))
    return p


def _inspect_cli():
    from moequant.loaders import inspect_cli

    return inspect_cli


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo"])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
