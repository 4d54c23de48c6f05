"""What a quantize run writes: which Linears are quantized, the ignore list, and every output tensor's name, dtype and
shape (planned before any weight is read, so shards can be laid out and resumed deterministically).

Output order: tensors outside the decoder layers that come first in the model (embeddings), then layer 0, 1, ...,
then the rest (final norm, lm_head); source order inside each group. So a run holds at most one layer's quantized
experts while it fills a shard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


@dataclass
class Plan:
    targets: list[str]  # module names quantized, in output order
    ignore: list[str]  # config.json ignore list
    config_targets: list[str]  # config group targets
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # output tensor -> (dtype, shape), in output order
    sources: dict[str, tuple[str, str | None]]  # output tensor -> (module or source tensor, suffix or None = copy)


def expert_modules(ckpt) -> set[str]:
    names = set()
    for L in ckpt.moe_layers:
        names.update(ckpt.spec.expert_module_names(ckpt.block_prefix(L), ckpt.settings.num_experts))
    return names


def ignored_modules(ckpt) -> list[str]:
    """Routers (and Qwen2-MoE's shared_expert_gate) of every MoE layer, and lm_head: never quantized."""
    out = []
    for L in ckpt.moe_layers:
        b = ckpt.block_prefix(L)
        out.append(f"{b}.{ckpt.spec.router}")
        if ckpt.spec.shared_gate and f"{b}.{ckpt.spec.shared_gate}.weight" in ckpt.index:
            out.append(f"{b}.{ckpt.spec.shared_gate}")
    return out + ["lm_head"]


def _is_linear_weight(name: str, info) -> bool:
    if not name.endswith(".weight") or len(info.shape) != 2 or not info.torch_dtype.is_floating_point:
        return False
    last = name[: -len(".weight")].rsplit(".", 1)[-1]
    return "embed" not in name and "norm" not in last and "lm_head" not in name and layer_of(name) is not None


def ordered_names(ckpt) -> list[str]:
    idx = ckpt.index
    files = {f: i for i, f in enumerate(sorted(idx.files))}
    pos = {n: (files[idx.info(n).file], idx.info(n).start) for n in idx.names()}
    seen_layer = False
    groups = {}
    for n in sorted(pos, key=pos.get):
        L = layer_of(n)
        seen_layer |= L is not None
        groups[n] = (L if L is not None else (-1 if not seen_layer and "embed" in n else 1 << 30), pos[n])
    return sorted(groups, key=groups.get)


def _output_specs(scheme, dtype: torch.dtype, shape: tuple[int, ...], mod: str) -> dict:
    """{suffix: (dtype, shape)} the compressor writes for a [R, C] weight, found by quantizing a meta tensor."""
    from moequant.quantize import rtn

    w = torch.empty(shape, dtype=dtype, device="meta")
    gs = torch.ones(1, device="meta") if getattr(scheme.weights.strategy, "value", None) == "tensor_group" else None
    extra = rtn.input_qparams(torch.ones(1, device="meta"), scheme, w.dtype)
    out = {}
    for suffix, t in rtn.quantize_weight(w, scheme, mod, gs, extra).items():
        tshape, tdtype = tuple(t.shape), t.dtype
        if suffix == "weight_zero_point":  # the compressor skips zero-point packing on meta tensors
            bits = scheme.weights.num_bits
            tshape, tdtype = (-(-tshape[0] * bits // 32), tshape[1]), torch.int32
        out[suffix] = (tdtype, tshape)
    return out


def make_plan(ckpt, scheme, targets: str) -> Plan:
    """Targets "experts" (the routed experts' Linears) or "all" (every decoder-layer Linear but routers)."""
    experts = expert_modules(ckpt)
    ignore = ignored_modules(ckpt)
    ig = set(ignore)
    mods, specs, sources, shapes = [], {}, {}, {}
    for n in ordered_names(ckpt):
        info = ckpt.index.info(n)
        mod = n[: -len(".weight")] if n.endswith(".weight") else None
        quant = mod is not None and mod not in ig and (
            mod in experts or (targets == "all" and _is_linear_weight(n, info)))
        if not quant:
            specs[n] = (info.torch_dtype, tuple(info.shape))
            sources[n] = (n, None)
            continue
        mods.append(mod)
        key = (tuple(info.shape), info.torch_dtype)
        if key not in shapes:
            shapes[key] = _output_specs(scheme, info.torch_dtype, tuple(info.shape), mod)
        for suffix, spec in shapes[key].items():
            specs[f"{mod}.{suffix}"] = spec
            sources[f"{mod}.{suffix}"] = (mod, suffix)
    if targets == "experts":
        procs = "|".join(re.escape(p) for p in ckpt.spec.proj_names)
        config_targets = [rf"re:.*\.experts\.\d+\.({procs})$"]
    else:
        config_targets = ["Linear"]
    return Plan(mods, ignore, config_targets, specs, sources)
