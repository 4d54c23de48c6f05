"""Read one layer's expert tensors from a checkpoint into a FusedMoE through its public loading API.

E experts (global), R rows / C columns of one expert's tensor on this tensor-parallel rank, tp ranks.
Per-expert layouts go through `FusedMoE.make_expert_params_mapping` + `weight_loader`: the key
`{block}.experts.{e}.{proj}.{suffix}` becomes parameter `w13_{suffix}` / `w2_{suffix}`. Fused layouts (gpt-oss) are cut
into the same per-expert w1/w2/w3 tensors first. Experts of other expert-parallel ranks are never read; with
tensor parallelism only this rank's rows (w1/w3) or columns (w2) are read from disk and placed in a full-size
buffer whose other rows/columns are left unwritten, which the weight loader never looks at (it checks the
checkpoint's full shape, then narrows to the same slice).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from moequant.loaders.safetensors_index import CheckpointError, TensorIndex
from moequant.methods.base import get_load_spec

if TYPE_CHECKING:
    from moequant.layer import FusedMoE
    from moequant.loaders.architectures import ArchSpec

# Reads a region of the checkpoint tensor: region(tuple of ints/slices) -> tensor
Reader = Callable[[tuple], torch.Tensor]


def _local(layer: "FusedMoE", expert: int) -> bool:
    return layer.expert_map is None or int(layer.expert_map[expert]) >= 0


def _tp_plan(layer: "FusedMoE", param: torch.nn.Parameter, shard: str, full_shape: tuple[int, ...]):
    """(dim, start, size) of this rank's slice of a checkpoint tensor, or None to read it whole."""
    spec = get_load_spec(param)
    if layer.tp_size == 1 or spec is None or spec.kind != "stacked":
        return None
    dst = param.shape[1:]
    if shard in ("w1", "w3"):
        if not spec.shard_w13:
            return None
        half = dst[0] // 2
        return (0, layer.tp_rank * half, half) if full_shape[0] == half * layer.tp_size else None
    if not spec.shard_w2:
        return None
    cols = dst[-1]
    return (len(full_shape) - 1, layer.tp_rank * cols, cols) if full_shape[-1] == cols * layer.tp_size else None


def _read_for_param(layer, param, shard: str, full_shape: tuple[int, ...], dtype: torch.dtype, read: Reader):
    """The checkpoint tensor for `param`, reading only this rank's slice when tensor-parallel."""
    plan = _tp_plan(layer, param, shard, full_shape)
    if plan is None:
        return read(())
    dim, start, size = plan
    region = tuple(slice(None) for _ in range(dim)) + (slice(start, start + size),)
    part = read(region)
    full = torch.empty(full_shape, dtype=dtype)  # rows/columns of other ranks stay unwritten and unread
    full.narrow(dim, start, size).copy_(part)
    return full


def _call_loader(layer, param, loaded, key: str, where: str, shard: str, expert: int) -> None:
    try:
        layer.weight_loader(param, loaded, key, shard, expert)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where}: tensor {key}: {e}") from None


def load_per_expert(layer: "FusedMoE", index: TensorIndex, spec: "ArchSpec", block: str,
                    skip_suffixes: tuple[str, ...] = ()) -> None:
    """Per-expert keys {block}.experts.{e}.{gate|up|down}.{suffix} -> the layer's parameters."""
    gate, down, up = spec.proj_names
    E = layer.global_num_experts
    mapping = {ckpt: (prefix, e, shard)
               for prefix, ckpt, e, shard in layer.make_expert_params_mapping(gate, down, up, E)}
    params = dict(layer.named_parameters(recurse=False))
    head = f"{block}."
    keys = index.with_prefix(f"{block}.experts.")
    present = set()
    for key in keys:
        parts = key[len(head):].split(".", 3)
        entry = mapping.get(".".join(parts[:3]) + ".") if len(parts) == 4 else None
        if entry is None:
            raise CheckpointError(f"{index.info(key).file}: tensor {key} is not a {gate}/{up}/{down} tensor of "
                                  f"experts 0..{E - 1} (the config says {E} experts)")
        present.add((entry[1], entry[2]))
    shard_proj = {"w1": gate, "w2": down, "w3": up}
    for e in range(E):
        for shard in ("w1", "w2", "w3"):
            if _local(layer, e) and (e, shard) not in present:
                raise CheckpointError(f"{index.folder}: missing tensor {block}.experts.{e}.{shard_proj[shard]}.* "
                                      f"(expert {e} of {E})")
    for key in keys:
        rel = key[len(head):]
        parts = rel.split(".", 3)
        prefix, e, shard = mapping[".".join(parts[:3]) + "."]
        if not _local(layer, e) or parts[3] in skip_suffixes:
            continue
        name = (prefix + parts[3])[len("experts."):]
        param = params.get(name)
        info = index.info(key)
        if param is None:
            raise CheckpointError(
                f"{info.file}: tensor {key} has no place in the {layer.quant_config.scheme} layer (it would load into "
                f"'{name}'; the layer's parameters are {', '.join(params)}); the checkpoint's format and the "
                f"scheme disagree"
            )
        loaded = _read_for_param(layer, param, shard, info.shape, info.torch_dtype,
                                 lambda region, k=key: index.read(k, region))
        _call_loader(layer, param, loaded, key, str(info.file), shard, e)


def load_fused_gpt_oss(layer: "FusedMoE", index: TensorIndex, spec: "ArchSpec", block: str) -> None:
    """gpt-oss: gate_up [E, H, 2I] (gate = even columns, up = odd), down [E, I, H], biases [E, 2I] / [E, H].
    Expert e's w1 = gate_up[e][:, 0::2]^T [I, H], w3 = gate_up[e][:, 1::2]^T, w2 = down[e]^T [H, I]."""
    f = spec.fused
    E, H = layer.global_num_experts, layer.hidden_size
    I = layer.intermediate_size_per_partition * layer.tp_size
    names = {"gate_up": f"{block}.experts.{f.gate_up}", "down": f"{block}.experts.{f.down}"}
    shapes = {"gate_up": (E, H, 2 * I), "down": (E, I, H)}
    if layer.has_bias:
        names |= {"gate_up_bias": names["gate_up"] + f.bias_suffix, "down_bias": names["down"] + f.bias_suffix}
        shapes |= {"gate_up_bias": (E, 2 * I), "down_bias": (E, H)}
    for what, key in names.items():
        if key not in index:
            blocks = index.with_prefix(key + "_blocks")
            hint = " (it holds MXFP4 *_blocks/*_scales: quantized gpt-oss loading is not wired yet)" if blocks else ""
            raise CheckpointError(f"{index.folder}: missing tensor {key}{hint}")
        info = index.info(key)
        if info.shape != shapes[what]:
            raise CheckpointError(f"{info.file}: tensor {key} has shape {list(info.shape)}, expected "
                                  f"{list(shapes[what])} from config.json (E={E}, H={H}, I={I})")
        if not info.torch_dtype.is_floating_point:
            raise CheckpointError(f"{info.file}: tensor {key} has dtype {info.dtype}; unquantized gpt-oss experts "
                                  f"need floating-point weights")
    params = dict(layer.named_parameters(recurse=False))
    w13, w2 = params["w13_weight"], params["w2_weight"]
    gate_up, down = names["gate_up"], names["down"]
    dt_gu, dt_d = index.info(gate_up).torch_dtype, index.info(down).torch_dtype
    gu_file, d_file = str(index.info(gate_up).file), str(index.info(down).file)
    for e in range(E):
        if not _local(layer, e):
            continue
        for shard, first in (("w1", 0), ("w3", 1)):
            # rows [a, b) of w1 are columns 2a+first, 2a+first+2, ... of gate_up[e]
            def read_w13(region, e=e, first=first):
                rows = region[0] if region else slice(0, I)
                cols = slice(2 * rows.start + first, 2 * rows.stop, 2)
                return index.read(gate_up, (e, slice(None), cols)).t()
            loaded = _read_for_param(layer, w13, shard, (I, H), dt_gu, read_w13)
            _call_loader(layer, w13, loaded, gate_up, gu_file, shard, e)

        def read_w2(region, e=e):
            cols = region[1] if region else slice(0, I)
            return index.read(down, (e, cols)).t()
        loaded = _read_for_param(layer, w2, "w2", (H, I), dt_d, read_w2)
        _call_loader(layer, w2, loaded, down, d_file, "w2", e)
        if layer.has_bias:
            gub_key, db_key = names["gate_up_bias"], names["down_bias"]
            gub, gub_file = index.read(gub_key, (e,)), str(index.info(gub_key).file)
            _call_loader(layer, params["w13_bias"], gub[0::2], gub_key, gub_file, "w1", e)
            _call_loader(layer, params["w13_bias"], gub[1::2], gub_key, gub_file, "w3", e)
            _call_loader(layer, params["w2_bias"], index.read(db_key, (e,)), db_key, str(index.info(db_key).file),
                         "w2", e)
