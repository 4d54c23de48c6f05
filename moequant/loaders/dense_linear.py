"""A plain (non-expert) Linear of a checkpoint as an fp32 weight [N, K], dequantized with moequant's own math.

N output rows, K input columns, G group size, b bits, P = 32 / b. Used for shared experts and their gates, which
run as dense MLPs: quantized ones are dequantized once on load (activations are then not quantized).
  unquantized:   w = weight
  int (w4a16, w4a16-asym, w8a16, GPTQ through its conversion):
                 w[n, k] = (q[n, k] - zp[n, g(k)]) * scale[n, g(k)], g(k) = g_idx[k] or k // G
  fp8:           w = q * s, s per tensor [1], per row [N, 1] or per 128x128 block (weight_scale / weight_scale_inv)
  nvfp4:         w = fp4 * scale (per 16) * weight_scale_2 (= 1 / weight_global_scale)
  mxfp4:         w = fp4 * 2^(scale - 127) (per 32)
"""

from __future__ import annotations

import torch

from moequant.loaders.formats import LayerScheme
from moequant.loaders.safetensors_index import CheckpointError, TensorIndex
from moequant.loaders.tensor_sources import BITS, Entry, Need, entries
from moequant.quantize import fp4_math as f4
from moequant.quantize import fp8_math as fm
from moequant.quantize import int_math as im


def _get(ents: dict[str, Entry], module: str, *names: str) -> Entry:
    for n in names:
        if n in ents:
            return ents[n]
    file = next(iter(ents.values())).file
    raise CheckpointError(f"{file}: missing tensor {' or '.join(f'{module}.{n}' for n in names)} "
                          f"(needed to dequantize {module})")


def dequantize_entries(ents: dict[str, Entry], ls: LayerScheme, module: str, shape: tuple[int, int]) -> torch.Tensor:
    """fp32 [N, K] from a Linear's compressed-tensors-named entries (see the module docstring)."""
    N, K = shape
    scheme = ls.scheme
    if scheme in BITS:
        bits = BITS[scheme]
        q = im.unpack_int32(_get(ents, module, "weight_packed").read(()), bits, K)
        s = _get(ents, module, "weight_scale").read(())
        zp = None
        if "weight_zero_point" in ents:
            zp = im.unpack_int32(ents["weight_zero_point"].read(()), bits, N, dim=0)
        g_idx = ents["weight_g_idx"].read(()) if "weight_g_idx" in ents else None
        G = ls.config.group_size or K
        return im.dequantize(q, s, zp, g_idx=g_idx, group_size=None if g_idx is not None else G)
    if scheme.startswith("fp8"):
        q = _get(ents, module, "weight").read(())
        s = _get(ents, module, "weight_scale", "weight_scale_inv").read(()).float()
        if scheme == "fp8-block":
            s = fm.expand_block_scale(s, N, K)
        elif s.numel() == N and N != 1:
            s = s.reshape(N, 1)
        else:
            s = s.reshape(1, 1) if s.numel() == 1 else s
        return fm.dequantize_fp8(q, s)
    if scheme in ("nvfp4", "nvfp4a16"):
        packed = _get(ents, module, "weight_packed").read(())
        scale = _get(ents, module, "weight_scale").read(())
        if "weight_scale_2" in ents:
            s2 = ents["weight_scale_2"].read(()).float().reshape(())
        else:
            s2 = 1.0 / _get(ents, module, "weight_global_scale").read(()).float().reshape(())
        return f4.dequantize_nvfp4(packed, scale, s2)
    if scheme == "mxfp4":
        return f4.dequantize_mxfp4(_get(ents, module, "weight_packed").read(()), _get(ents, module, "weight_scale")
                                   .read(()))
    raise CheckpointError(f"{module}: cannot dequantize a {scheme} Linear")


def out_features(ents: dict[str, Entry], module: str) -> int:
    """N of a Linear from its weight / packed weight."""
    return _get(ents, module, "weight", "weight_packed").shape[0]


def linear_entries(index: TensorIndex, module: str, ls: LayerScheme) -> dict[str, Entry]:
    head = module + "."
    suffixes = [k[len(head):] for k in index.with_prefix(head)]
    suffixes = [s for s in suffixes if "." not in s]
    if not suffixes:
        raise CheckpointError(f"{index.folder}: missing tensor {module}.weight (no tensor of {module})")
    return entries(index, module, suffixes, ls, Need("w1"))


def dense_weight(index: TensorIndex, module: str, ls: LayerScheme, shape: tuple[int, int],
                 region: tuple = ()) -> torch.Tensor:
    """fp32 weight[region] of the Linear `module` with full shape [N, K] = `shape`. Unquantized weights are read
    region by region; quantized ones are read whole, dequantized, then cut."""
    ents = linear_entries(index, module, ls)
    if ls.scheme == "unquantized":
        ent = _get(ents, module, "weight")
        if ent.shape != tuple(shape):
            raise CheckpointError(f"{ent.file}: tensor {ent.key} has shape {list(ent.shape)}, expected {list(shape)}")
        if not ent.dtype.is_floating_point:
            raise CheckpointError(f"{ent.file}: tensor {ent.key} has dtype {ent.dtype}, expected a floating-point "
                                  f"type (config.json says {module} is not quantized)")
        return ent.read(region).float()
    try:
        w = dequantize_entries(ents, ls, module, shape)
    except (ValueError, RuntimeError) as e:
        file = next(iter(ents.values())).file
        raise CheckpointError(f"{file}: {module} ({ls.scheme}, {ls.source}): cannot dequantize: {e}") from None
    if tuple(w.shape) != tuple(shape):
        file = next(iter(ents.values())).file
        raise CheckpointError(f"{file}: {module} dequantizes to shape {list(w.shape)}, expected {list(shape)}")
    return w[region] if region else w
