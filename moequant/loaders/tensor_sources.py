"""One Linear's tensors on disk, presented under compressed-tensors' names (what the FusedMoE methods load).

N output rows, K input columns of the Linear (out x in), G group size, b bits, P = 32 / b values per int32 word.
Each producer stores a quantized Linear `{module}.{suffix}` its own way; a source turns the module's on-disk suffixes
into `Entry`s named by compressed-tensors suffixes (weight, weight_packed, weight_scale, weight_zero_point,
weight_g_idx, weight_shape, weight_global_scale / weight_scale_2, input_scale / input_global_scale, weight_scale_inv),
each with its full shape in compressed-tensors' layout and a reader of any region of it, so tensor-parallel ranks
read only their rows or columns:

  compressed-tensors (all formats), native fp8 (DeepSeek weight_scale_inv): the names as stored.
  ModelOpt: NVFP4 `weight` (uint8 [N, K/2]) -> weight_packed; FP8 per-channel weight_scale [N] -> [N, 1].
  GPTQ: qweight [K/P, N], qzeros [groups, N/P], scales [groups, N], g_idx [K] -> converted per Linear with
        quantize.gptq_format.gptq_to_compressed_tensors (bit exact); a tensor-parallel rank reads its columns (w1/w3)
        or input rows (w2) of qweight and scales, plus the small qzeros / g_idx whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from moequant.loaders.formats import LayerScheme
from moequant.loaders.safetensors_index import CheckpointError, TensorIndex

BITS = {"w4a16": 4, "w4a16-asym": 4, "w8a16": 8}


@dataclass(frozen=True)
class Entry:
    """A compressed-tensors-named tensor of one Linear: on-disk key (for errors), file, full shape, dtype and
    read(region) -> tensor[region] for a tuple of slices in compressed-tensors coordinates."""

    key: str
    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[tuple], torch.Tensor]


@dataclass(frozen=True)
class Need:
    """The rows (w1/w3: output rows) or input columns (w2) of the Linear this rank needs; None = all."""

    shard: str
    rows: slice | None = None
    cols: slice | None = None


def _direct(index: TensorIndex, key: str, shape=None, post=None) -> Entry:
    info = index.info(key)
    if post is None:
        read = lambda region: index.read(key, region)  # noqa: E731
    else:
        read = lambda region: post(index.read(key, region))  # noqa: E731
    return Entry(key, str(info.file), tuple(shape or info.shape), info.torch_dtype, read)


def entries(index: TensorIndex, module: str, suffixes: list[str], ls: LayerScheme, need: Need) -> dict[str, Entry]:
    """The Linear `module`'s tensors ({module}.{suffix} on disk) under compressed-tensors names."""
    if ls.source == "gptq":
        return _gptq(index, module, suffixes, ls, need)
    out: dict[str, Entry] = {}
    scheme = ls.scheme
    for suffix in suffixes:
        key = f"{module}.{suffix}"
        if suffix in ("weight_zero_point", "input_zero_point") and _zero_point_unused(index, key, ls):
            continue
        name, shape, post = suffix, None, None
        if ls.source == "modelopt" and suffix == "weight" and scheme.startswith("nvfp4"):
            name = "weight_packed"
        elif ls.source == "modelopt" and suffix == "weight_scale" and scheme == "fp8-channel" \
                and len(index.info(key).shape) == 1:
            shape, post = (index.info(key).shape[0], 1), (lambda t: t.reshape(-1, 1))
        elif ls.storage == "fp8-native" and suffix == "weight_scale_inv" and scheme == "fp8-tensor":
            name = "weight_scale"
        if name in out:
            raise CheckpointError(f"{out[name].file}: {module} has both {out[name].key} and {key}")
        out[name] = _direct(index, key, shape, post)
    return out


def _zero_point_unused(index: TensorIndex, key: str, ls: LayerScheme) -> bool:
    """Older compressed-tensors versions also wrote all-zero zero points for symmetric schemes: skip those (a
    non-zero one is kept, and then has no place in the layer: an error naming it)."""
    asym_weights = ls.scheme == "w4a16-asym" and key.endswith("weight_zero_point")
    return not asym_weights and not bool(index.read(key).ne(0).any())


# --- GPTQ --------------------------------------------------------------------------------------------------------
_GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def _gptq(index: TensorIndex, module: str, suffixes: list[str], ls: LayerScheme, need: Need) -> dict[str, Entry]:
    """GPTQ tensors -> compressed-tensors entries, converted once per Linear (lazily, on the first read)."""
    extra = sorted(set(suffixes) - set(_GPTQ_SUFFIXES))
    if extra:
        raise CheckpointError(f"{index.info(f'{module}.{extra[0]}').file}: tensor {module}.{extra[0]} is not a GPTQ "
                              f"tensor (expected {', '.join(_GPTQ_SUFFIXES)})")
    missing = [s for s in ("qweight", "qzeros", "scales") if s not in suffixes]
    if missing:
        where = index.info(f"{module}.{suffixes[0]}").file if suffixes else index.folder
        raise CheckpointError(f"{where}: missing tensor {module}.{missing[0]} (GPTQ needs qweight, qzeros, scales)")
    cfg = ls.config
    bits = BITS[cfg.scheme]
    per = 32 // bits
    keys = {s: f"{module}.{s}" for s in suffixes}
    infos = {s: index.info(k) for s, k in keys.items()}
    qw, sc = infos["qweight"], infos["scales"]
    if qw.torch_dtype != torch.int32 or len(qw.shape) != 2 or len(sc.shape) != 2:
        raise CheckpointError(f"{qw.file}: tensor {keys['qweight']} must be a 2-D int32 [K/{per}, N] and "
                              f"{keys['scales']} 2-D [groups, N]; got {qw.dtype} {list(qw.shape)} and "
                              f"{sc.dtype} {list(sc.shape)}")
    K, N = qw.shape[0] * per, qw.shape[1]
    groups = sc.shape[0]
    file = str(qw.file)
    cache: dict[str, torch.Tensor] = {}

    def convert() -> dict[str, torch.Tensor]:
        if not cache:
            cache.update(_gptq_convert(index, keys, ls, need, K, N, groups, bits, module))
        return cache

    def entry(name: str, shape: tuple[int, ...], dtype: torch.dtype, key: str) -> Entry:
        return Entry(key, file, shape, dtype, lambda region: convert()[name][region].clone() if region
                     else convert()[name])

    out = {
        "weight_packed": entry("weight_packed", (N, K // per), torch.int32, keys["qweight"]),
        "weight_scale": entry("weight_scale", (N, groups), sc.torch_dtype, keys["scales"]),
        "weight_shape": entry("weight_shape", (2,), torch.int64, keys["qweight"]),
    }
    if not cfg.symmetric:
        out["weight_zero_point"] = entry("weight_zero_point", (N // per, groups), torch.int32, keys["qzeros"])
    if cfg.act_order:
        if "g_idx" not in keys:
            raise CheckpointError(f"{file}: missing tensor {module}.g_idx (desc_act=True needs it)")
        out["weight_g_idx"] = entry("weight_g_idx", (K,), torch.int32, keys["g_idx"])
    return out


def _gptq_convert(index, keys, ls, need: Need, K, N, groups, bits, module) -> dict[str, torch.Tensor]:
    """Read what this rank needs, convert with gptq_to_compressed_tensors, return full-shape tensors (the rows or
    columns of other ranks hold placeholders that the weight loader never reads)."""
    from moequant.quantize.gptq_format import gptq_to_compressed_tensors

    per = 32 // bits
    cfg = ls.config

    def read(s, region=()):
        return index.read(keys[s], region) if s in keys else None

    g_idx = read("g_idx")
    if need.rows is not None:  # w1/w3: this rank's output rows = GPTQ columns; convert just those
        r = need.rows
        qweight, scales = read("qweight", (slice(None), r)), read("scales", (slice(None), r))
        qzeros = read("qzeros", (slice(None), slice(r.start // per, r.stop // per)))
    elif need.cols is not None:  # w2: this rank's input rows of qweight (and groups of scales when sharded)
        c = need.cols
        qweight = torch.zeros(K // per, N, dtype=torch.int32)
        qweight[c.start // per: c.stop // per] = read("qweight", (slice(c.start // per, c.stop // per),))
        G = K // groups
        if cfg.act_order or cfg.group_size is None:
            scales = read("scales")
        else:
            scales = torch.ones(groups, N, dtype=index.info(keys["scales"]).torch_dtype)
            scales[c.start // G: c.stop // G] = read("scales", (slice(c.start // G, c.stop // G),))
        qzeros = read("qzeros")
    else:
        qweight, scales, qzeros = read("qweight"), read("scales"), read("qzeros")
    try:
        ct = gptq_to_compressed_tensors(qweight, qzeros, scales, g_idx, bits=bits, sym=cfg.symmetric,
                                        desc_act=cfg.act_order, checkpoint_format=ls.storage, name=module)
    except ValueError as e:
        raise CheckpointError(f"{index.info(keys['qweight']).file}: {e}") from None
    if "weight_g_idx" in ct and not cfg.act_order:
        raise CheckpointError(f"{index.info(keys['g_idx']).file}: tensor {keys['g_idx']} is not the plain grouping "
                              f"k // G, but the config says desc_act=False; refusing to ignore it")
    ct["weight_shape"] = torch.tensor([N, K], dtype=torch.int64)
    if need.rows is not None:  # place the rank's rows into full-size tensors
        r = need.rows
        full_rows = {"weight_packed": (N, r), "weight_scale": (N, r),
                     "weight_zero_point": (N // per, slice(r.start // per, r.stop // per))}
        for name, (n, rows) in full_rows.items():
            if name in ct:
                t = ct[name]
                buf = torch.zeros((n, *t.shape[1:]), dtype=t.dtype)
                buf[rows] = t
                ct[name] = buf
    return ct
