"""A/B timing of the FusedMoE forward between code versions or settings, each variant in its own processes.

A variant is NAME, NAME:rev=GIT_REV (that commit's moequant/ and benchmarks/, unpacked into a temporary folder and put
first on the worker's sys.path), NAME:tree=DIR (a folder already holding moequant/ and benchmarks/, e.g. a
`git archive` unpacked where the repository's history is not at hand) or NAME:env=KEY=VALUE[;KEY=VALUE] (environment
switches, e.g. MOEQUANT_FP8_TMA=off).
Rounds alternate the variants (A B A B ...), each round a fresh process per variant that builds the layers once and
times every scheme `--repeats` times (bench_moe's graph replay over its 8 input sets). In a fresh process the first CUDA
graph of the layer replays faster than every later one (H200: 0.45-0.6 us at Qwen3-30B M=1, see
benchmarks/results/2026-11-30-NVIDIA_H200-s15-notes.txt), so the summary uses the repetitions after the first.

    python -m benchmarks.ab_forward --shape qwen3-30b-a3b --m 1 --schemes fp8-channel,nvfp4a16 \
        --variant old:rev=HEAD~1 --variant new --rounds 2 --repeats 3 --out ab.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run by path: this repository after any tree a worker was given on PYTHONPATH
    sys.path.append(str(REPO))


@dataclass
class Variant:
    name: str
    rev: str | None = None
    tree: Path | None = None
    env: dict[str, str] = field(default_factory=dict)


def parse_variant(text: str) -> Variant:
    """NAME, NAME:rev=REV, NAME:tree=DIR or NAME:env=K=V[;K=V]."""
    name, _, spec = text.partition(":")
    if not name or any(c in name for c in " /"):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME[:rev=REV|:tree=DIR|:env=K=V[;K=V]]")
    if not spec:
        return Variant(name)
    kind, _, value = spec.partition("=")
    if kind == "rev" and value:
        return Variant(name, rev=value)
    if kind == "tree" and value:
        tree = Path(value).resolve()
        if not (tree / "moequant" / "__init__.py").is_file() or not (tree / "benchmarks").is_dir():
            raise argparse.ArgumentTypeError(f"--variant {text!r}: {tree} holds no moequant/__init__.py and "
                                             "benchmarks/")
        return Variant(name, tree=tree)
    if kind == "env" and value:
        pairs = [p.partition("=") for p in value.split(";")]
        if any(not k or not sep for k, sep, _ in pairs):
            raise argparse.ArgumentTypeError(f"--variant {text!r}: env settings are KEY=VALUE, separated by ';'")
        return Variant(name, env={k: v for k, _, v in pairs})
    raise argparse.ArgumentTypeError(f"--variant {text!r}: after the name, 'rev=REV', 'tree=DIR' or 'env=KEY=VALUE' "
                                     "expected")


def unpack_rev(rev: str, dest: Path) -> Path:
    """moequant/ and benchmarks/ of git revision rev, unpacked under dest (the worker's first import path)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "tree.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", str(REPO), "archive", rev, "moequant", "benchmarks"], stdout=f, check=True)
    with tarfile.open(archive) as t:
        t.extractall(dest / "tree", filter="data")
    return dest / "tree"


def worker(args) -> int:
    """Build every scheme's layer once and print one JSON line per scheme with its repeated timings."""
    import torch

    import moequant
    from benchmarks import bench_moe as bm

    sh = bm.SHAPES[args.shape]
    device = args.device
    w13, w2 = bm.make_weights(sh, device, torch.Generator(device=device).manual_seed(args.seed))
    for scheme in args.schemes:
        layer = bm.build_layer(sh, scheme, w13, w2, device)
        inputs = bm.make_inputs(sh, args.m, device, torch.Generator(device=device).manual_seed(args.seed + 1),
                                bm.REPLICAS if device == "cuda" else 2)
        times = []
        for _ in range(args.repeats):
            t = bm.time_forward(layer, inputs, device)
            times.append((t["graph_s"] if t["graph_s"] is not None else t["eager_s"]) * 1e6)
        err, _ = bm.rel_error(layer, *inputs[0])
        print(json.dumps({"scheme": scheme, "us": [round(v, 3) for v in times], "rel_err": err,
                          "moequant": str(Path(moequant.__file__).parent.parent)}), flush=True)
        del layer
        bm._free()
    return 0


def run_variant(v: Variant, tree: Path | None, args) -> list[dict]:
    env = {**os.environ, **v.env}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree) if tree else "", str(REPO), env.get("PYTHONPATH", ""))
                                        if p)
    # this file runs the worker whatever the variant (an older tree need not have it); moequant and bench_moe come
    # from the variant's tree, first on the path
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--shape", args.shape, "--m", str(args.m),
           "--schemes", ",".join(args.schemes), "--repeats", str(args.repeats), "--device", args.device,
           "--seed", str(args.seed)]
    proc = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ab_forward: variant {v.name!r} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def summarize(records: list[dict]) -> list[dict]:
    """Per (variant, scheme): every timing, and min / median of the settled ones (each process's first dropped when
    it has more than one)."""
    groups: dict[tuple[str, str], list[list[float]]] = {}
    for r in records:
        groups.setdefault((r["variant"], r["scheme"]), []).append(r["us"])
    out = []
    for (variant, scheme), runs in groups.items():
        settled = [t for us in runs for t in (us[1:] if len(us) > 1 else us)]
        out.append({"variant": variant, "scheme": scheme, "runs": runs, "settled_min_us": min(settled),
                    "settled_median_us": statistics.median(settled)})
    return out


def parse_args(argv):
    from benchmarks.bench_moe import SHAPES

    p = argparse.ArgumentParser(prog="ab_forward", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--schemes", type=lambda s: [x for x in s.split(",") if x], default=["unquantized"])
    p.add_argument("--variant", dest="variants", type=parse_variant, action="append", default=[])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON lines: every process's timings, then the summary")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        p.error("--rounds and --repeats must be at least 1")
    if not args.worker and len({v.name for v in args.variants}) < 2:
        p.error("give at least two --variant with different names")
    if args.device == "cpu" and args.shape != "tiny":
        p.error("--device cpu runs only the tiny shape")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    records = []
    with tempfile.TemporaryDirectory(prefix="ab_forward-") as tmp:
        trees = {v.name: unpack_rev(v.rev, Path(tmp) / v.name) if v.rev else v.tree for v in args.variants}
        for rnd in range(args.rounds):
            for v in args.variants:
                for rec in run_variant(v, trees[v.name], args):
                    records.append({"variant": v.name, "round": rnd, **rec})
                    print(f"round {rnd} {v.name:>12s} {rec['scheme']:>24s} "
                          + " ".join(f"{t:9.2f}" for t in rec["us"]) + f"  rel_err {rec['rel_err']:.1e}", flush=True)
    summary = summarize(records)
    print(f"{'variant':>12s} {'scheme':>24s} {'settled min':>12s} {'median':>9s} (us)")
    for s in summary:
        print(f"{s['variant']:>12s} {s['scheme']:>24s} {s['settled_min_us']:12.2f} {s['settled_median_us']:9.2f}")
    if args.out:
        tmp_out = args.out.with_name(args.out.name + ".tmp")
        tmp_out.write_text("".join(json.dumps(r) + "\n" for r in records + [{"summary": summary}]))
        tmp_out.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
