"""Read one layer's expert tensors from a checkpoint into a FusedMoE through its public loading API.

E experts (global), H hidden, I intermediate, I_p = I / tp, R rows / C columns of one expert's tensor on this
tensor-parallel rank, tp ranks. Per-expert layouts go through `FusedMoE.make_expert_params_mapping` + `weight_loader`:
the Linear `{block}.experts.{e}.{proj}` is read through its producer's source (tensor_sources: compressed-tensors names
for every format) and its tensor `{suffix}` becomes parameter `w13_{suffix}` / `w2_{suffix}`. Fused layouts (gpt-oss,
bf16 or MXFP4 blocks/scales) are cut into the same per-expert w1/w2/w3 tensors first. Experts of other
expert-parallel ranks are never read (except their static input scales, one value each: see _fold_input_scales);
with tensor parallelism only this rank's rows (w1/w3) or columns (w2) are read from disk and placed in a full-size
buffer whose other rows/columns are left unwritten, which the weight loader never looks at (it checks the
checkpoint's full shape, then narrows to the same slice). Tensors tensor parallelism does not split (weight_shape,
w1/w3's g_idx, w2's act-order or per-channel scales) are read whole.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from moequant.loaders.formats import UNQUANTIZED, LayerScheme
from moequant.loaders.safetensors_index import CheckpointError, TensorIndex
from moequant.loaders.tensor_sources import Entry, Need, entries
from moequant.methods.base import get_load_spec

if TYPE_CHECKING:
    from moequant.layer import FusedMoE
    from moequant.loaders.architectures import ArchSpec

# Reads a region of the checkpoint tensor: region(tuple of ints/slices) -> tensor
Reader = Callable[[tuple], torch.Tensor]


def _local(layer: "FusedMoE", expert: int) -> bool:
    return layer.expert_map is None or int(layer.expert_map[expert]) >= 0


def _slicing(layer: "FusedMoE", name: str, param: torch.Tensor):
    """(shard_w13, shard_w2, per-expert shape) of the parameter a checkpoint tensor lands in; None = read it whole.
    Custom-loaded parameters that are sliced like stacked ones: int weight_packed (rows of w1/w3, words of w2's
    columns), w2's g_idx (its I entries), and fp8-block's weight_scale_inv alias (sliced as weight_scale)."""
    spec = get_load_spec(param)
    if spec is None:
        return None
    if spec.kind == "stacked":
        return spec.shard_w13, spec.shard_w2, tuple(param.shape[1:])
    if name.endswith("_weight_packed"):
        return True, True, tuple(param.shape[1:])
    if name.endswith("_weight_scale_inv") and name[:-4] in layer._parameters:
        return _slicing(layer, name[:-4], layer._parameters[name[:-4]])
    if name == "w2_weight_g_idx":
        return False, True, tuple(param.shape[1:])
    return None


def _tp_plan(layer: "FusedMoE", name: str, param, shard: str, full_shape: tuple[int, ...]):
    """(dim, start, size) of this rank's slice of a checkpoint tensor, or None to read it whole."""
    sl = _slicing(layer, name, param) if layer.tp_size > 1 else None
    if sl is None:
        return None
    shard_w13, shard_w2, dst = sl
    if shard in ("w1", "w3"):
        if not shard_w13 or not full_shape:
            return None
        half = dst[0] // 2
        return (0, layer.tp_rank * half, half) if full_shape[0] == half * layer.tp_size else None
    if not shard_w2 or not full_shape:
        return None
    cols = dst[-1]
    return (len(full_shape) - 1, layer.tp_rank * cols, cols) if full_shape[-1] == cols * layer.tp_size else None


def _read_for_param(layer, name: str, param, shard: str, ent: Entry) -> torch.Tensor:
    """The checkpoint tensor for `param`, reading only this rank's slice when tensor-parallel."""
    plan = _tp_plan(layer, name, param, shard, ent.shape)
    if plan is None:
        return ent.read(())
    dim, start, size = plan
    region = tuple(slice(None) for _ in range(dim)) + (slice(start, start + size),)
    part = ent.read(region)
    full = torch.empty(ent.shape, dtype=part.dtype)  # rows/columns of other ranks stay unwritten and unread
    full.narrow(dim, start, size).copy_(part)
    return full


def _call_loader(layer, param, loaded, key: str, where: str, shard: str, expert: int) -> None:
    try:
        layer.weight_loader(param, loaded, key, shard, expert)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where}: tensor {key}: {e}") from None


def _need(layer: "FusedMoE", shard: str) -> Need:
    """The rows (w1/w3) or input columns (w2) of an expert Linear this tensor-parallel rank holds."""
    if layer.tp_size == 1:
        return Need(shard)
    Ip = layer.intermediate_size_per_partition
    part = slice(layer.tp_rank * Ip, (layer.tp_rank + 1) * Ip)
    return Need(shard, rows=part) if shard in ("w1", "w3") else Need(shard, cols=part)


# compressed-tensors names a parameter may also be loaded through (size-0 alias parameters of the methods)
_ALIASES = {"weight_scale_2": ("weight_global_scale",), "weight_scale": ("weight_scale_inv",),
            "input_scale": ("input_global_scale",)}


def _check_required(layer: "FusedMoE", ents: dict[str, Entry], module: str, shard: str, expert: int) -> None:
    """Every tensor the layer's scheme needs from this Linear is present: an error naming the file and tensor."""
    prefix = "w2_" if shard == "w2" else "w13_"
    static = layer.quant_config.activation_scheme == "static"
    for pname, p in layer.named_parameters(recurse=False):
        spec = get_load_spec(p)
        if spec is None or not pname.startswith(prefix) or pname.endswith("_bias"):
            continue
        name = pname[len(prefix):]
        required = spec.required or (name == "input_scale" and static)
        if required and name not in ents and not any(a in ents for a in _ALIASES.get(name, ())):
            file = next(iter(ents.values())).file
            alts = " or ".join(f"{module}.{n}" for n in (name, *_ALIASES.get(name, ())))
            raise CheckpointError(f"{file}: missing tensor {alts} (expert {expert} of {layer.global_num_experts}; "
                                  f"the {layer.quant_config.scheme} layer needs it; the Linear has "
                                  f"{', '.join(e.key.rsplit('.', 1)[-1] for e in ents.values())})")


def _load_entries(layer, params, ents: dict[str, Entry], shard: str, expert: int, scheme: str) -> None:
    for name, ent in ents.items():
        pname = ("w2_" if shard == "w2" else "w13_") + name
        param = params.get(pname)
        if param is None:
            raise CheckpointError(
                f"{ent.file}: tensor {ent.key} has no place in the {scheme} layer (it would load into '{pname}'; the "
                f"layer's parameters are {', '.join(params)}); the checkpoint's format and the scheme disagree"
            )
        _call_loader(layer, param, _read_for_param(layer, pname, param, shard, ent), ent.key, ent.file, shard, expert)


def load_per_expert(layer: "FusedMoE", index: TensorIndex, spec: "ArchSpec", block: str,
                    ls: LayerScheme = UNQUANTIZED) -> None:
    """Per-expert keys {block}.experts.{e}.{gate|up|down}.{suffix} -> the layer's parameters. Only this rank's
    experts are read, and of each only this tensor-parallel rank's rows / columns."""
    gate, down, up = spec.proj_names
    E = layer.global_num_experts
    mapping = {ckpt: (prefix, e, shard)
               for prefix, ckpt, e, shard in layer.make_expert_params_mapping(gate, down, up, E)}
    params = dict(layer.named_parameters(recurse=False))
    head = f"{block}."
    by_linear: dict[tuple[int, str], list[str]] = {}
    for key in index.with_prefix(f"{block}.experts."):
        parts = key[len(head):].split(".", 3)
        entry = mapping.get(".".join(parts[:3]) + ".") if len(parts) == 4 else None
        if entry is None:
            raise CheckpointError(f"{index.info(key).file}: tensor {key} is not a {gate}/{up}/{down} tensor of "
                                  f"experts 0..{E - 1} (the config says {E} experts)")
        by_linear.setdefault((entry[1], entry[2]), []).append(parts[3])
    shard_proj = {"w1": gate, "w2": down, "w3": up}
    for e in range(E):
        for shard in ("w1", "w2", "w3"):
            if _local(layer, e) and (e, shard) not in by_linear:
                raise CheckpointError(f"{index.folder}: missing tensor {block}.experts.{e}.{shard_proj[shard]}.* "
                                      f"(expert {e} of {E})")
    for (e, shard), suffixes in sorted(by_linear.items()):
        module = f"{block}.experts.{e}.{shard_proj[shard]}"
        if not _local(layer, e):
            _fold_input_scales(layer, params, index, module, suffixes, ls, shard)
            continue
        ents = entries(index, module, suffixes, ls, _need(layer, shard))
        _check_required(layer, ents, module, shard, e)
        _load_entries(layer, params, ents, shard, e, ls.scheme)


_INPUT_SCALES = ("input_scale", "input_global_scale")


def _fold_input_scales(layer, params, index, module: str, suffixes: list[str], ls: LayerScheme, shard: str) -> None:
    """Static input scales are collapsed to one max over all experts. An expert-parallel rank reads the other
    experts' input scales too (one value each) and folds them into its first expert's max, so every rank quantizes
    activations with the same scale as the unsharded layer and the ranks' outputs sum to its output."""
    wanted = [s for s in suffixes if s in _INPUT_SCALES]
    if not wanted:
        return
    first_local = layer.global_expert_id(0)
    for name, ent in entries(index, module, wanted, ls, Need(shard)).items():
        param = params.get(("w2_" if shard == "w2" else "w13_") + name)
        if param is not None:
            _call_loader(layer, param, ent.read(()), ent.key, ent.file, shard, first_local)


# --- gpt-oss: all experts in fused tensors --------------------------------------------------------------------------
def _gpt_oss_tensors(layer, index: TensorIndex, spec: "ArchSpec", block: str, mxfp4: bool) -> dict[str, str]:
    """Check the fused tensors' presence, shapes and dtypes; {what: key}."""
    f = spec.fused
    E, H = layer.global_num_experts, layer.hidden_size
    I = layer.intermediate_size_per_partition * layer.tp_size
    gu, dn = f"{block}.experts.{f.gate_up}", f"{block}.experts.{f.down}"
    if mxfp4:
        names = {"gate_up": gu + "_blocks", "gate_up_scales": gu + "_scales", "down": dn + "_blocks",
                 "down_scales": dn + "_scales"}
        shapes = {"gate_up": (E, 2 * I, H // 32, 16), "gate_up_scales": (E, 2 * I, H // 32),
                  "down": (E, H, I // 32, 16), "down_scales": (E, H, I // 32)}
    else:
        names, shapes = {"gate_up": gu, "down": dn}, {"gate_up": (E, H, 2 * I), "down": (E, I, H)}
    if layer.has_bias:
        names |= {"gate_up_bias": gu + f.bias_suffix, "down_bias": dn + f.bias_suffix}
        shapes |= {"gate_up_bias": (E, 2 * I), "down_bias": (E, H)}
    for what, key in names.items():
        if key not in index:
            hint = ""
            if not mxfp4 and index.with_prefix(key + "_blocks"):
                hint = " (it holds MXFP4 *_blocks/*_scales, but config.json has no mxfp4 quantization_config)"
            raise CheckpointError(f"{index.folder}: missing tensor {key}{hint}")
        info = index.info(key)
        if info.shape != shapes[what]:
            raise CheckpointError(f"{info.file}: tensor {key} has shape {list(info.shape)}, expected "
                                  f"{list(shapes[what])} from config.json (E={E}, H={H}, I={I})")
        quantized = mxfp4 and not what.endswith("bias")
        if quantized and info.torch_dtype != torch.uint8:
            raise CheckpointError(f"{info.file}: tensor {key} has dtype {info.dtype}, expected U8 (MXFP4)")
        if not quantized and not info.torch_dtype.is_floating_point:
            raise CheckpointError(f"{info.file}: tensor {key} has dtype {info.dtype}; unquantized gpt-oss tensors "
                                  f"need floating-point values")
    return names


def _gpt_oss_entries(index: TensorIndex, names: dict[str, str], e: int, shard: str, I: int, H: int,
                     mxfp4: bool) -> dict[str, Entry]:
    """Expert e's w1 / w3 / w2 as compressed-tensors-named entries. bf16: w1 = gate_up[e][:, 0::2]^T [I, H],
    w3 = gate_up[e][:, 1::2]^T, w2 = down[e]^T [H, I]. MXFP4 (rows = outputs): w1 = rows 0::2 of the blocks
    [2I, H/32, 16] as weight_packed [I, H/2] with their E8M0 scales [I, H/32], w3 = rows 1::2, w2 = blocks
    [H, I/32, 16] -> [H, I/2]."""

    def ent(what, shape, read):
        info = index.info(names[what])
        return Entry(names[what], str(info.file), shape, info.torch_dtype, read)

    if shard in ("w1", "w3"):
        first = 0 if shard == "w1" else 1

        def rows_of(region):  # rows [a, b) of w1/w3 are rows 2a+first, 2a+first+2, ... of gate_up
            r = region[0] if region else slice(0, I)
            return slice(2 * r.start + first, 2 * r.stop, 2)

        if not mxfp4:
            return {"weight": ent("gate_up", (I, H), lambda region: index.read(
                names["gate_up"], (e, slice(None), rows_of(region))).t())}
        return {
            "weight_packed": ent("gate_up", (I, H // 2), lambda region: index.read(
                names["gate_up"], (e, rows_of(region))).flatten(1)),
            "weight_scale": ent("gate_up_scales", (I, H // 32), lambda region: index.read(
                names["gate_up_scales"], (e, rows_of(region)))),
        }

    def cols_of(region, per):  # columns [a, b) of w2 (in units of `per` input channels)
        c = region[-1] if region else slice(0, I // per)
        return c

    if not mxfp4:
        return {"weight": ent("down", (H, I), lambda region: index.read(names["down"], (e, cols_of(region, 1))).t())}

    def packed(region):
        c = cols_of(region, 2)  # bytes of 2 values; 16 bytes a block of 32
        return index.read(names["down"], (e, slice(None), slice(c.start // 16, c.stop // 16))).flatten(1)

    return {
        "weight_packed": ent("down", (H, I // 2), packed),
        "weight_scale": ent("down_scales", (H, I // 32), lambda region: index.read(
            names["down_scales"], (e, slice(None), cols_of(region, 32)))),
    }


def load_fused_gpt_oss(layer: "FusedMoE", index: TensorIndex, spec: "ArchSpec", block: str,
                       ls: LayerScheme = UNQUANTIZED) -> None:
    """gpt-oss: gate_up [E, H, 2I] (gate = even columns, up = odd) and down [E, I, H], or their MXFP4 blocks
    ({name}_blocks uint8 [E, 2I, H/32, 16] / [E, H, I/32, 16], gate = even rows) with E8M0 {name}_scales
    [E, 2I, H/32] / [E, H, I/32]; biases [E, 2I] (interleaved as gate_up) / [E, H]."""
    mxfp4 = ls.storage == "gpt-oss-mxfp4"
    if ls.scheme not in ("unquantized", "mxfp4") or (ls.scheme == "mxfp4") != mxfp4:
        raise CheckpointError(f"{index.folder}: gpt-oss experts stored as {ls.scheme} ({ls.source}, {ls.storage}) "
                              f"cannot be loaded; supported: bf16 fused tensors or the original MXFP4 blocks/scales")
    names = _gpt_oss_tensors(layer, index, spec, block, mxfp4)
    E, H = layer.global_num_experts, layer.hidden_size
    I = layer.intermediate_size_per_partition * layer.tp_size
    params = dict(layer.named_parameters(recurse=False))
    for e in range(E):
        if not _local(layer, e):
            continue
        for shard in ("w1", "w3", "w2"):
            _load_entries(layer, params, _gpt_oss_entries(index, names, e, shard, I, H, mxfp4), shard, e, ls.scheme)
        if layer.has_bias:
            gub_key, db_key = names["gate_up_bias"], names["down_bias"]
            gub, gub_file = index.read(gub_key, (e,)), str(index.info(gub_key).file)
            _call_loader(layer, params["w13_bias"], gub[0::2], gub_key, gub_file, "w1", e)
            _call_loader(layer, params["w13_bias"], gub[1::2], gub_key, gub_file, "w3", e)
            _call_loader(layer, params["w2_bias"], index.read(db_key, (e,)), db_key, str(index.info(db_key).file),
                         "w2", e)
