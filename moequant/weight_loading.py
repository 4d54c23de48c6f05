"""Writes one checkpoint tensor (an expert's w1, w2 or w3 piece of some parameter) into a FusedMoE parameter.

The parameter's `LoadSpec` (moequant.methods.base) says where it goes; tensor-parallel slicing of rows/columns is done
here for weights and their scales alike. Shape legend: E experts, R rows, C columns, tp tensor-parallel size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moequant.methods.base import LoadSpec, get_load_spec

if TYPE_CHECKING:
    from moequant.layer import FusedMoE

SHARD_IDS = ("w1", "w2", "w3")


def param_name(layer: "FusedMoE", param: torch.Tensor) -> str:
    for name, p in layer.named_parameters(recurse=False):
        if p is param:
            return name
    return "<unregistered parameter>"


def check_shape(layer, param, loaded: torch.Tensor, expected, local_expert, shard_id) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(
            f"{layer.prefix or 'FusedMoE'}.{param_name(layer, param)}: expert {local_expert} shard {shard_id}: "
            f"checkpoint tensor has shape {tuple(loaded.shape)}, expected {tuple(expected)}"
        )


def _check_dtype(layer, param, loaded: torch.Tensor, local_expert, shard_id) -> torch.Tensor:
    """Floats convert to the parameter's float dtype; integer and fp8 data must match exactly."""
    exact = (not param.dtype.is_floating_point) or param.dtype.itemsize == 1 or loaded.dtype.itemsize == 1
    if loaded.dtype == param.dtype:
        return loaded
    if exact or not loaded.dtype.is_floating_point:
        raise ValueError(
            f"{layer.prefix or 'FusedMoE'}.{param_name(layer, param)}: expert {local_expert} shard {shard_id}: "
            f"checkpoint tensor has dtype {loaded.dtype}, expected {param.dtype}"
        )
    return loaded.to(param.dtype)


def load_expert_shard(layer: "FusedMoE", param: torch.nn.Parameter, loaded: torch.Tensor, shard_id: str,
                      local_expert: int) -> None:
    """Write `loaded` (one expert's w1/w2/w3 tensor from the checkpoint) into `param[local_expert]`."""
    spec = get_load_spec(param) or LoadSpec("stacked")
    tp_rank, tp_size = layer.tp_rank, layer.tp_size
    if spec.kind == "custom":
        spec.loader(layer, param, loaded, shard_id, local_expert, tp_rank, tp_size)
        return
    loaded = _check_dtype(layer, param, loaded, local_expert, shard_id)
    dst = param.data[local_expert]
    is_w13 = shard_id in ("w1", "w3")
    if spec.kind == "stacked":
        if is_w13:
            half = dst.shape[0] // 2
            rows = half * tp_size if spec.shard_w13 else half
            check_shape(layer, param, loaded, (rows, *dst.shape[1:]), local_expert, shard_id)
            part = loaded.narrow(0, tp_rank * half, half) if spec.shard_w13 else loaded
            (dst[:half] if shard_id == "w1" else dst[half:]).copy_(part)
        else:
            cols = dst.shape[-1] * tp_size if spec.shard_w2 else dst.shape[-1]
            check_shape(layer, param, loaded, (*dst.shape[:-1], cols), local_expert, shard_id)
            part = loaded.narrow(-1, tp_rank * dst.shape[-1], dst.shape[-1]) if spec.shard_w2 else loaded
            dst.copy_(part)
        return
    if loaded.numel() != 1:
        raise ValueError(
            f"{layer.prefix or 'FusedMoE'}.{param_name(layer, param)}: expert {local_expert} shard {shard_id}: "
            f"expected a single value, got shape {tuple(loaded.shape)}"
        )
    value = loaded.reshape(())
    if spec.kind == "per_shard":
        if is_w13:
            dst[0 if shard_id == "w1" else 1] = value
        else:
            dst.copy_(value)
    elif spec.kind == "per_expert_max":
        dst.copy_(value if torch.isnan(dst) else torch.maximum(dst, value))
    else:
        raise ValueError(f"unknown LoadSpec kind {spec.kind!r}")


def expected_shards(name: str) -> tuple[str, ...]:
    return ("w1", "w3") if name.startswith("w13_") else ("w2",)


def check_complete(layer: "FusedMoE", loaded: set[tuple[str, int, str]]) -> None:
    """Every required (param, local expert, shard) must have been loaded; name the first missing ones."""
    missing = []
    for name, p in layer.named_parameters(recurse=False):
        spec = get_load_spec(p)
        if spec is None or not spec.required:
            continue
        for e in range(layer.local_num_experts):
            for s in expected_shards(name):
                if (name, e, s) not in loaded:
                    missing.append(f"{name}[expert {layer.global_expert_id(e)}, {s}]")
    if missing:
        more = f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        raise ValueError(f"{layer.prefix or 'FusedMoE'}: tensors never loaded: {', '.join(missing[:8])}{more}")
