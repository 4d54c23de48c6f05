"""`moequant inspect PATH_OR_ID`: architecture, MoE geometry, routing, scheme per layer and size of a checkpoint.
Reads config.json and the safetensors headers only."""

from __future__ import annotations

import argparse
import json
import sys


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="moequant inspect", description=__doc__)
    p.add_argument("checkpoint", help="local folder or Hugging Face repo id")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--offline", action="store_true", help="use the Hugging Face cache only (like HF_HUB_OFFLINE=1)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def format_summary(d: dict) -> str:
    g = d["geometry"]
    routing = f"{g['scoring_func']}, top-{g['top_k']}, renormalize={g['renormalize']}"
    if g["use_grouped_topk"]:
        routing += f", grouped top-k ({g['num_expert_group']} groups, keep {g['topk_group']})"
    if d["e_score_correction_bias"]:
        routing += ", e_score_correction_bias"
    if g["routed_scaling_factor"] != 1.0:
        routing += f", routed_scaling_factor={g['routed_scaling_factor']}"
    if g["router_bias"]:
        routing += ", router bias"
    shared = "none"
    if d["shared_expert_intermediate_size"]:
        gate = " with sigmoid gate" if d["shared_expert_gate"] else ""
        shared = f"I_s={d['shared_expert_intermediate_size']}{gate}"
    lines = [
        f"checkpoint     {d['checkpoint']}",
        f"architecture   {d['architecture']} (table entry {d['table_entry']})",
        f"layers         {d['num_layers']} (MoE: {d['moe_layers']})",
        f"geometry       E={g['num_experts']} K={g['top_k']} H={g['hidden_size']} I={g['intermediate_size']} "
        f"activation={g['activation']}" + (" +expert biases" if g["has_bias"] else ""),
        f"routing        {routing}",
        f"shared experts {shared}",
        f"format         {d['format']}",
    ]
    lines += [f"scheme         {scheme}: layers {layers}" for scheme, layers in d["schemes"].items()]
    lines.append(f"size           {_size(d['size_bytes'])} in {d['shards']} file(s), {d['tensors']} tensors; "
                 f"experts {_size(d['expert_bytes_per_layer'])} per MoE layer")
    return "\n".join(lines)


def inspect_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    from moequant.checkpoint import open_checkpoint

    try:
        with open_checkpoint(args.checkpoint, args.revision, local_files_only=args.offline) as ckpt:
            summary = ckpt.describe()
    except (OSError, ValueError, NotImplementedError) as e:
        print(f"moequant inspect: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(inspect_main())
