"""Round-to-nearest quantization of one Linear weight into compressed-tensors tensors, with compressed-tensors' own
scale math (`calculate_qparams`, `generate_gparam`) and compressors, so the bytes equal llm-compressor's RTN output.

# R rows (out), C columns (in), G group size, B block (128 x 128)
min/max are taken per strategy over w in its own dtype (as llm-compressor's min-max observer does):
  tensor [1] | channel [R, 1] | group / tensor_group [R, C/G] | block [ceil(R/B), ceil(C/B)] (zero-padded).
symmetric scale = max(|min|, |max|) / ((qmax - qmin) / 2); asymmetric scale = (max - min) / (qmax - qmin),
zp = qmin - min / scale; nvfp4: scale = fp8(gs * amax_16 / 6), gs = 448 * 6 / amax over the fused gate+up pair;
mxfp4: scale = E8M0 exponent of amax_32. Zero scales become the scale dtype's eps (finite for dead experts).
"""

from __future__ import annotations

import warnings

import torch


def weight_minmax(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-strategy (min, max) of w [R, C] in w's dtype; shapes as in the module docstring."""
    from compressed_tensors.quantization.utils import maybe_pad_tensor_for_block_quant

    strategy = _enum(args.strategy)
    if strategy == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if strategy == "channel":
        return w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    if strategy in ("group", "tensor_group"):
        if w.shape[-1] % args.group_size:
            raise ValueError(f"input dim {w.shape[-1]} is not a multiple of the group size {args.group_size}")
        g = w.unflatten(-1, (-1, args.group_size))
        return g.amin(-1), g.amax(-1)
    if strategy == "block":
        bh, bw = args.block_structure
        p = maybe_pad_tensor_for_block_quant(w, (bh, bw))
        b = p.reshape(p.shape[0] // bh, bh, p.shape[1] // bw, bw).transpose(1, 2).flatten(-2)
        return b.amin(-1), b.amax(-1)
    raise ValueError(f"weight strategy {strategy!r} is not supported")


def global_scale(weights: list[torch.Tensor]) -> torch.Tensor:
    """NVFP4 second-level scale shared by `weights` (gate and up of one expert): 448 * 6 / max|w| (fp32 [1])."""
    from compressed_tensors.quantization.utils import generate_gparam

    amax = torch.stack([w.abs().amax() for w in weights]).amax().reshape(1)
    return generate_gparam(-amax, amax)


def weight_qparams(w: torch.Tensor, args, gscale: torch.Tensor | None = None):
    """(scale in w's dtype, zero point or None) for w [R, C] under QuantizationArgs `args`."""
    from compressed_tensors.quantization.utils import calculate_qparams

    lo, hi = weight_minmax(w, args)
    scale, zp = calculate_qparams(lo, hi, args, global_scale=gscale)
    sdtype = w.dtype if w.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16
    return scale.to(sdtype), (None if args.symmetric else zp.to(args.zp_dtype or torch.int8))


def input_qparams(amax: torch.Tensor, scheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Static input scales from a calibration amax: fp8 `input_scale` = amax / 448 (in `dtype`), nvfp4
    `input_global_scale` = 448 * 6 / amax (fp32); {} when activations are dynamic or absent."""
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    a = scheme.input_activations
    if a is None or a.dynamic is True:
        return {}
    amax = amax.float().reshape(1)
    if _enum(a.strategy) == "tensor_group":
        return {"input_global_scale": generate_gparam(-amax, amax)}
    scale, _ = calculate_qparams(-amax, amax, a)
    return {"input_scale": scale.to(dtype)}


def compress(w: torch.Tensor, scheme, scale: torch.Tensor, zp: torch.Tensor | None = None,
             gscale: torch.Tensor | None = None, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """Quantize + pack w with given qparams through the scheme format's compressed-tensors compressor.
    Returns {suffix: tensor} (e.g. weight_packed, weight_scale, weight_shape, ...), all contiguous."""
    from compressed_tensors.compressors import BaseCompressor

    sd = {"weight": w, "weight_scale": scale}
    if zp is not None:
        sd["weight_zero_point"] = zp
    if gscale is not None:
        sd["weight_global_scale"] = gscale
    sd.update(extra or {})
    comp = BaseCompressor.get_value_from_registry(_enum(scheme.format))
    out = comp.compress(sd, scheme)
    return {k: v.contiguous() for k, v in out.items()}


def quantize_weight(w: torch.Tensor, scheme, name: str = "weight", gscale: torch.Tensor | None = None,
                    extra: dict | None = None) -> dict[str, torch.Tensor]:
    """RTN of one Linear weight w [R, C] (kept in its dtype) -> compressed tensors {suffix: tensor}.
    TENSOR_GROUP schemes need `gscale` (see global_scale); an all-zero weight warns and gets finite scales."""
    if not w.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point weight to quantize, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D Linear weight [out, in], got shape {list(w.shape)}")
    if w.device.type != "meta" and not bool(w.any()):
        warnings.warn(f"{name}: all-zero weight (dead expert?); writing finite placeholder scales")
    args = scheme.weights
    if _enum(args.strategy) == "tensor_group" and gscale is None:
        gscale = global_scale([w])
    try:
        scale, zp = weight_qparams(w, args, gscale)
    except ValueError as e:
        raise ValueError(f"{name} {list(w.shape)}: {e}") from None
    return compress(w, scheme, scale, zp, gscale, extra)


def _enum(v):
    return getattr(v, "value", v)
