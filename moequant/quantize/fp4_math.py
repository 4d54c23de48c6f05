"""FP4 (e2m1) format math in pure torch: NVFP4 (fp8 e4m3 scale per 16 + fp32 second-level scale) and MXFP4 (E8M0 scale
per 32). Layouts are compressed-tensors' so the offline quantizer can reuse them.

# R rows (output channels), C columns (input channels), leading batch dims allowed (e.g. E experts)
Packing: uint8 [..., C/2], element 2j in the low nibble, 2j+1 in the high nibble; nibble = sign (bit 3) | index into
E2M1_VALUES = {0, .5, 1, 1.5, 2, 3, 4, 6}.
NVFP4: scale fp8 e4m3 [..., C/16]; dequant x = fp4 * scale * weight_scale_2, weight_scale_2 = 1 / weight_global_scale
       (ModelOpt spelling: weight_scale_2 = amax / (6 * 448); compressed-tensors: weight_global_scale = 6 * 448 / amax).
MXFP4: scale uint8 E8M0 [..., C/32]; dequant x = fp4 * 2^(s - 127).
"""

from __future__ import annotations

import torch

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_MAX = 6.0
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
NVFP4_GROUP = 16
MXFP4_GROUP = 32
E8M0_BIAS = 127


def e2m1_table(device=None) -> torch.Tensor:
    """fp32 [16]: the value of each nibble (indices 8..15 are the negatives; nibble 8 is -0.0)."""
    pos = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([pos, -pos])


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 value (ties to the even mantissa, as compressed-tensors' cast_to_fp4), saturating at +-6; same dtype."""
    a = x.abs()
    r = torch.zeros_like(a)
    # thresholds: (upper edge, inclusive?, value) walked from the top; ties go to the value with the even mantissa
    r = torch.where(a > 0.25, torch.full_like(a, 0.5), r)
    r = torch.where(a >= 0.75, torch.full_like(a, 1.0), r)
    r = torch.where(a > 1.25, torch.full_like(a, 1.5), r)
    r = torch.where(a >= 1.75, torch.full_like(a, 2.0), r)
    r = torch.where(a > 2.5, torch.full_like(a, 3.0), r)
    r = torch.where(a >= 3.5, torch.full_like(a, 4.0), r)
    r = torch.where(a > 5.0, torch.full_like(a, 6.0), r)
    return torch.where(x < 0, -r, r)


def pack_fp4(q: torch.Tensor) -> torch.Tensor:
    """e2m1 values [..., C] (C even) -> uint8 [..., C/2]; bit-exact with compressed-tensors' pack_fp4_to_uint8."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_fp4: the last dim must be even, got shape {tuple(q.shape)}")
    a2 = (q.float().abs() * 2).to(torch.int64)  # 0,1,2,3,4,6,8,12
    idx = (a2 >= 1).to(torch.uint8) + (a2 >= 2) + (a2 >= 3) + (a2 >= 4) + (a2 >= 6) + (a2 >= 8) + (a2 >= 12)
    nib = idx.to(torch.uint8) | (torch.signbit(q).to(torch.uint8) << 3)
    nib = nib.reshape(*q.shape[:-1], q.shape[-1] // 2, 2)
    return nib[..., 0] | (nib[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., C/2] -> e2m1 values [..., C] in `dtype`; bit-exact with compressed-tensors' unpack_fp4_from_uint8."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_fp4: expected uint8 packed fp4, got {packed.dtype}")
    lo = (packed & 0x0F).long()
    hi = (packed >> 4).long()
    nib = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return e2m1_table(packed.device)[nib].to(dtype)


def _groups(x: torch.Tensor, g: int, what: str) -> torch.Tensor:
    if x.shape[-1] % g:
        raise ValueError(f"{what}: the input dim ({x.shape[-1]}) must be a multiple of the group size {g}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)


# --- NVFP4 ----------------------------------------------------------------------------------------------------------
def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' weight_global_scale = 448 * 6 / amax (fp32); 1.0 where amax is 0 or not finite."""
    amax = amax.float()
    gs = FP8_MAX * FP4_MAX / amax.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where(torch.isfinite(gs) & (amax > 0), gs, torch.ones_like(gs))


def quantize_nvfp4(w: torch.Tensor, global_scale: torch.Tensor | None = None):
    """RTN: w [..., R, C] -> (packed uint8 [..., R, C/2], scale fp8 [..., R, C/16], global_scale fp32 [...]).

    global_scale (CT meaning) defaults to 448*6/amax over each [R, C] matrix; block scale = fp8(amax_16 / 6 * gs);
    q = e2m1(w / (scale / gs))."""
    wf = w.float()
    if global_scale is None:
        global_scale = nvfp4_global_scale(wf.abs().amax(dim=(-2, -1)))
    gs = global_scale.float().reshape(*global_scale.shape, 1, 1, 1)
    blocks = _groups(wf, NVFP4_GROUP, "quantize_nvfp4")
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = (amax / FP4_MAX * gs).clamp(max=FP8_MAX).to(FP8_DTYPE)
    eff = scale.float() / gs
    q = torch.where(eff > 0, round_to_e2m1(blocks / torch.where(eff > 0, eff, torch.ones_like(eff))), 0.0)
    q = q.clamp(-FP4_MAX, FP4_MAX).reshape(wf.shape)
    return pack_fp4(q), scale.squeeze(-1), global_scale.float()


def dequantize_nvfp4(packed: torch.Tensor, scale: torch.Tensor, weight_scale_2: torch.Tensor | float) -> torch.Tensor:
    """fp32 [..., R, C] = fp4 * scale (per 16 columns) * weight_scale_2 (a scalar per matrix, ModelOpt meaning)."""
    v = unpack_fp4(packed)
    s = scale.float().repeat_interleave(NVFP4_GROUP, dim=-1)
    ws2 = torch.as_tensor(weight_scale_2, dtype=torch.float32, device=packed.device)
    if ws2.dim():
        ws2 = ws2.reshape(*ws2.shape, 1, 1)
    return v * s * ws2


def nvfp4_act_codes(x: torch.Tensor, input_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 activation quantization along the last dim, the one implementation of it (the reference and the
    kernels' activation quantizer both call it, so that values exactly on an e2m1 rounding boundary, common with
    fp16/bf16 inputs, round the same way in both): gs = 1 / input_scale (input_scale = amax / (6*448), ModelOpt),
    block scale fp8(amax_16 / 6 * gs), q = e2m1(x / (scale / gs)). Returns (q [..., C/16, 16], scale [..., C/16, 1]
    as fp32 values, gs), all fp32; x ~= q * scale / gs."""
    gs = 1.0 / input_scale.float()
    blocks = _groups(x.float(), NVFP4_GROUP, "nvfp4 activation quantization")
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = (amax / FP4_MAX * gs).clamp(max=FP8_MAX).to(FP8_DTYPE).float()
    eff = scale / gs
    q = torch.where(eff > 0, round_to_e2m1(blocks / torch.where(eff > 0, eff, torch.ones_like(eff))), 0.0)
    return q, scale, gs


def nvfp4_act_scale(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """The activation's per-tensor scale [1] fp32: input_scale (ModelOpt meaning, amax / (6*448)), or where it is NaN
    the dynamic one, max |x| / (6*448), at least fp32's smallest normal. No host sync."""
    dyn = (x.float().abs().amax() / (FP4_MAX * FP8_MAX)).clamp(min=torch.finfo(torch.float32).tiny)
    s = input_scale.float().reshape(1)
    return torch.where(torch.isnan(s), dyn.reshape(1), s)


def fake_quant_nvfp4_act(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 activation fake-quant (nvfp4_act_codes): q * scale / gs in x's dtype (math in fp32)."""
    q, scale, gs = nvfp4_act_codes(x, input_scale)
    return (q * (scale / gs)).reshape(x.shape).to(x.dtype)


def rescale_block_scales(scale: torch.Tensor, ratio: torch.Tensor | float) -> torch.Tensor:
    """fp8 block scales re-expressed for a larger second-level scale: fp8(scale * ratio) with ratio = old / new <= 1."""
    return (scale.float() * ratio).clamp(max=FP8_MAX).to(FP8_DTYPE)


# --- MXFP4 ----------------------------------------------------------------------------------------------------------
def quantize_mxfp4(w: torch.Tensor):
    """RTN (OCP MX, as compressed-tensors): w [..., R, C] -> (packed uint8 [..., R, C/2], scale uint8 E8M0 [..., R, C/32]).

    s = 127 + p - 2 with 2^p = amax_32 rounded to a power of two (down, up when its mantissa is >= 1.75), clamped to
    [0, 254] (127 - 2 for an all-zero group); q = e2m1(w / 2^(s-127))."""
    blocks = _groups(w.float(), MXFP4_GROUP, "quantize_mxfp4")
    amax = blocks.abs().amax(-1, keepdim=True)
    m, e = torch.frexp(amax)  # amax = m * 2^e, m in [0.5, 1): floor(log2 amax) = e - 1
    e = e - 1 + (m >= 0.875).to(e.dtype)  # mantissa >= 1.75 rounds up to the next power (compressed-tensors' rule)
    exp = torch.where(amax > 0, e, torch.zeros_like(e)) - 2 + E8M0_BIAS
    exp = exp.clamp(0, 254)
    scale = torch.pow(2.0, (exp - E8M0_BIAS).float())
    q = round_to_e2m1(blocks / scale).clamp(-FP4_MAX, FP4_MAX).reshape(w.shape)
    return pack_fp4(q), exp.squeeze(-1).to(torch.uint8)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 -> fp32 2^(s-127) (255, the E8M0 NaN, maps to NaN)."""
    f = torch.pow(2.0, scale.to(torch.int32).float() - E8M0_BIAS)
    return torch.where(scale == 255, torch.full_like(f, float("nan")), f)


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 [..., R, C] = fp4 * 2^(s - 127) per 32 columns."""
    return unpack_fp4(packed) * e8m0_to_float(scale).repeat_interleave(MXFP4_GROUP, dim=-1)
