"""A plain (non-expert) Linear of a checkpoint as an fp32 weight [N, K], dequantized with moequant's own math.

N output rows, K input columns, G group size, b bits, P = 32 / b. Used for shared experts and their gates, which
run as dense MLPs: quantized ones are dequantized once on load (activations are then not quantized).
  unquantized:   w = weight
  int (w4a16, w4a16-asym, w8a16, GPTQ through its conversion):
                 w[n, k] = (q[n, k] - zp[n, g(k)]) * scale[n, g(k)], g(k) = g_idx[k] or k // G
  fp8:           w = q * s, s per tensor [1], per row [N, 1] or per 128x128 block (weight_scale / weight_scale_inv)
  nvfp4:         w = fp4 * scale (per 16) * weight_scale_2 (= 1 / weight_global_scale)
  mxfp4:         w = fp4 * 2^(scale - 127) (per 32)

Tensor parallelism asks for a region: rows [r0, r1) (gate_proj / up_proj) or columns [c0, c1) (down_proj). Each
tensor is read only over the whole words / groups / blocks covering the region, dequantized, then trimmed; since
dequantization is elementwise, the result is bit-identical to dequantizing everything and cutting.
  rows:     weight, weight_packed and every scale by rows; fp8 block scales by the covering 128-row blocks; int zero
            points (packed P to a word along the rows, [ceil(N/P), groups]) by the covering words: exactly the rank's
            words when r0 and r1 are multiples of P, otherwise one extra word at an unaligned end, unpacked and trimmed.
  columns:  int weight_packed by the covering words (P columns each), scales / zero points by the covering groups
            of G (per-channel: their one column), fp8 weight by columns and block scales by the covering 128-column
            blocks, nvfp4 / mxfp4 packed bytes and scales by the covering 16- / 32-column groups.
A region aligned to the packing / groups / blocks reads exactly its share; an unaligned end reads at most one extra
word / group / block, never the whole tensor. Read whole (the layout allows no cut):
  - act-order (weight_g_idx) under a column cut: the columns' groups are scattered, so down_proj's weight_scale and
    weight_zero_point are read whole (as vLLM's load_full_w2 does); weight_packed and g_idx are still read by columns;
    under a row cut g_idx is read whole (every column's group is needed),
  - per-row scales under a column cut (down_proj's fp8-channel / int per-channel scale), per-tensor scales,
    weight_global_scale / weight_scale_2 (one value each),
  - GPTQ (qweight [K/P, N], ...): converted to compressed-tensors layout whole, then cut,
  - nvfp4 / mxfp4 with K not a multiple of the group size is an error (no such checkpoint exists).
weight_shape and input scales are not read (a dense Linear quantizes no activations). Shapes are checked against
[N, K] before any region is read, so a wrong tensor is an error naming its file and key, never a partial read.
"""

from __future__ import annotations

import math

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


def _span(s: slice, unit: int, total: int) -> slice:
    """The whole units (words, groups, blocks) of `unit` elements covering elements [s.start, s.stop)."""
    return slice(s.start // unit, min(-(-s.stop // unit), -(-total // unit)))


def _expect(ent: Entry, shape: tuple[int, ...], module: str, what: str) -> None:
    if tuple(ent.shape) != tuple(shape):
        raise CheckpointError(f"{ent.file}: tensor {ent.key} has shape {list(ent.shape)}, expected {list(shape)} "
                              f"({what} of {module})")


def _norm(s: slice, n: int) -> slice:
    start, stop, step = s.indices(n)
    if step != 1:
        raise ValueError(f"dense_weight: region slices must have step 1, got {s}")
    return slice(start, max(start, stop))


def dequantize_entries(ents: dict[str, Entry], ls: LayerScheme, module: str, shape: tuple[int, int],
                       rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
    """fp32 w[rows, cols] of the [N, K] Linear from its compressed-tensors-named entries (see the module docstring),
    reading only the covering words / groups / blocks of each tensor, or a tensor whole where its layout does not
    allow cutting it (scalars, act-order scales and zero points under a column cut)."""
    N, K = shape
    rows, cols = _norm(rows, N), _norm(cols, K)
    r0, c0 = rows.start, cols.start
    scheme = ls.scheme
    if scheme in BITS:
        bits = BITS[scheme]
        P = 32 // bits
        wp = _get(ents, module, "weight_packed")
        _expect(wp, (N, -(-K // P)), module, f"int32 words of {P} {bits}-bit values")
        if wp.dtype != torch.int32:
            raise CheckpointError(f"{wp.file}: tensor {wp.key} has dtype {wp.dtype}, expected int32 packed words")
        ws = _span(cols, P, K)  # whole words holding the columns
        w_first = ws.start * P
        q = im.unpack_int32(wp.read((rows, ws)), bits, min(ws.stop * P, K) - w_first)
        q = q[:, c0 - w_first: cols.stop - w_first]
        sc = _get(ents, module, "weight_scale")
        if len(sc.shape) != 2 or sc.shape[0] != N:
            raise CheckpointError(f"{sc.file}: tensor {sc.key} has shape {list(sc.shape)}, expected [{N}, groups] "
                                  f"(scales of {module})")
        groups = sc.shape[1]
        g_idx_ent = ents.get("weight_g_idx")
        zp_ent = ents.get("weight_zero_point")
        if g_idx_ent is not None:  # act-order: the columns' groups are scattered, read g_idx's columns
            _expect(g_idx_ent, (K,), module, "one group per input column")
            g = g_idx_ent.read((cols,)).long()
            if g.numel() and (int(g.min()) < 0 or int(g.max()) >= groups):
                raise CheckpointError(f"{g_idx_ent.file}: tensor {g_idx_ent.key} holds group indices outside "
                                      f"[0, {groups}) ({module} has {groups} scale groups)")
            gs = slice(None)  # all groups: an act-order column range's groups are not contiguous
        else:
            G = ls.config.group_size or K
            groups = -(-K // G)
            _expect(sc, (N, groups), module, f"scales [N, ceil(K / {G})]")
            gs = _span(cols, G, K)
            g = torch.arange(c0, cols.stop) // G - gs.start
        s = sc.read((rows, gs))
        zp = None
        if zp_ent is not None:
            _expect(zp_ent, (-(-N // P), groups), module, f"zero points packed {P} to an int32 word along the rows")
            zs = _span(rows, P, N)  # whole words holding the rows
            z_first = zs.start * P
            zp = im.unpack_int32(zp_ent.read((zs, gs)), bits, min(zs.stop * P, N) - z_first, dim=0)
            zp = zp[r0 - z_first: rows.stop - z_first]
        return im.dequantize(q, s, zp, g_idx=g)
    if scheme.startswith("fp8"):
        w_ent = _get(ents, module, "weight")
        _expect(w_ent, (N, K), module, "fp8 weight")
        sc = _get(ents, module, "weight_scale", "weight_scale_inv")
        if scheme == "fp8-block":
            BR, BC = tuple(ls.config.block_shape or (fm.BLOCK, fm.BLOCK))
            _expect(sc, (-(-N // BR), -(-K // BC)), module, f"one scale per {BR}x{BC} block")
            rs, cs = _span(rows, BR, N), _span(cols, BC, K)  # whole blocks holding the region
            s = sc.read((rs, cs)).float().repeat_interleave(BR, dim=0).repeat_interleave(BC, dim=1)
            s = s[r0 - rs.start * BR: rows.stop - rs.start * BR, c0 - cs.start * BC: cols.stop - cs.start * BC]
        elif math.prod(sc.shape) == N and N != 1:  # per output row: [N, 1] or [N]
            s = sc.read((rows,)).float().reshape(-1, 1)
        elif math.prod(sc.shape) == 1:  # per tensor
            s = sc.read(()).float().reshape(1, 1)
        else:
            raise CheckpointError(f"{sc.file}: tensor {sc.key} has shape {list(sc.shape)}: neither one scale nor "
                                  f"one per output row ({N}) of {module}")
        return fm.dequantize_fp8(w_ent.read((rows, cols)), s)
    if scheme in ("nvfp4", "nvfp4a16", "mxfp4"):
        G = f4.NVFP4_GROUP if scheme != "mxfp4" else f4.MXFP4_GROUP
        packed, sc = _get(ents, module, "weight_packed"), _get(ents, module, "weight_scale")
        _expect(packed, (N, K // 2), module, "two fp4 values per byte")
        _expect(sc, (N, K // G), module, f"one scale per {G} columns")
        if K % G:
            raise CheckpointError(f"{packed.file}: {module}: the input dim {K} is not a multiple of the {scheme} "
                                  f"group size {G}")
        gs = _span(cols, G, K)  # whole groups: G / 2 bytes each
        p = packed.read((rows, slice(gs.start * G // 2, gs.stop * G // 2)))
        s = sc.read((rows, gs))
        if scheme == "mxfp4":
            w = f4.dequantize_mxfp4(p, s)
        else:
            if "weight_scale_2" in ents:
                s2 = ents["weight_scale_2"].read(()).float().reshape(())
            else:
                s2 = 1.0 / _get(ents, module, "weight_global_scale").read(()).float().reshape(())
            w = f4.dequantize_nvfp4(p, s, s2)
        return w[:, c0 - gs.start * G: cols.stop - gs.start * G]
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
    """fp32 weight[region] of the Linear `module` with full shape [N, K] = `shape`; region is (), (rows,) or
    (slice(None), cols). Only the region's share of each tensor is read (see the module docstring)."""
    ents = linear_entries(index, module, ls)
    if len(region) > 2 or not all(isinstance(r, slice) for r in region):
        raise ValueError(f"dense_weight: region must be up to two slices, got {region!r}")
    rows, cols = (tuple(region) + (slice(None), slice(None)))[:2]
    if ls.scheme == "unquantized":
        ent = _get(ents, module, "weight")
        if ent.shape != tuple(shape):
            raise CheckpointError(f"{ent.file}: tensor {ent.key} has shape {list(ent.shape)}, expected {list(shape)}")
        if not ent.dtype.is_floating_point:
            raise CheckpointError(f"{ent.file}: tensor {ent.key} has dtype {ent.dtype}, expected a floating-point "
                                  f"type (config.json says {module} is not quantized)")
        return ent.read(region).float()
    try:
        w = dequantize_entries(ents, ls, module, shape, rows, cols)
    except (ValueError, RuntimeError) as e:
        file = next(iter(ents.values())).file
        raise CheckpointError(f"{file}: {module} ({ls.scheme}, {ls.source}): cannot dequantize: {e}") from None
    want = (len(range(*rows.indices(shape[0]))), len(range(*cols.indices(shape[1]))))
    if tuple(w.shape) != want:
        file = next(iter(ents.values())).file
        raise CheckpointError(f"{file}: {module} dequantizes to shape {list(w.shape)}, expected {list(want)}")
    return w
