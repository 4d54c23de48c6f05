"""Integer (int4 / int8) group-wise weight math in compressed-tensors' layout (pack-quantized).

# N output rows, K input columns, G group size (K for per channel), b bits (4 or 8)
Signed values q in [-2^(b-1), 2^(b-1) - 1] are stored as u = q + 2^(b-1) in int32 words, 32/b values a word,
element i of a word at bits [i*b, (i+1)*b) (lowest first), packed along the input dim (weights) or along the output
dim (zero points). Dequantized w[n, k] = (q[n, k] - zp[n, g(k)]) * scale[n, g(k)], g(k) = k // G or g_idx[k].
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"num_bits must be one of {SUPPORTED_BITS}, got {bits}")


def qrange(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """int8 q [R, C] (or [..., R, C]) -> int32 packed along `dim` (0 or 1 of the last two), as pack_to_int32."""
    _check_bits(bits)
    if q.dtype != torch.int8:
        raise ValueError(f"pack_int32: expected int8 values, got {q.dtype}")
    if dim in (0, -2):
        return pack_int32(q.transpose(-1, -2), bits, 1).transpose(-1, -2).contiguous()
    per = 32 // bits
    C = q.shape[-1]
    words = -(-C // per)
    u = (q.to(torch.int64) + (1 << (bits - 1)))
    u = torch.nn.functional.pad(u, (0, words * per - C))
    u = u.reshape(*q.shape[:-1], words, per)
    shifts = torch.arange(per, dtype=torch.int64, device=q.device) * bits
    packed = (u << shifts).sum(-1)  # < 2^32, fits int64
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """int32 packed along `dim` -> int8 signed values with `n` elements along that dim."""
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"unpack_int32: expected int32 words, got {packed.dtype}")
    if dim in (0, -2):
        return unpack_int32(packed.transpose(-1, -2), bits, n, 1).transpose(-1, -2).contiguous()
    per = 32 // bits
    if packed.shape[-1] != -(-n // per):
        raise ValueError(f"unpack_int32: {packed.shape[-1]} words cannot hold {n} {bits}-bit values "
                         f"(expected {-(-n // per)} words)")
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    u = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    u = u.reshape(*packed.shape[:-1], -1)[..., :n]
    return (u - (1 << (bits - 1))).to(torch.int8)


def default_g_idx(k: int, group_size: int, device=None) -> torch.Tensor:
    return torch.arange(k, dtype=torch.int32, device=device) // group_size


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None,
               g_idx: torch.Tensor | None = None, group_size: int | None = None) -> torch.Tensor:
    """w = (q - zp[:, g]) * scale[:, g] in fp32 (q int8 [N, K]; scale / zp [N, groups]); per channel when
    scale has one column. Same operation order as compressed-tensors' dequantize, so fp32 results are bit-exact."""
    K = q.shape[-1]
    if g_idx is None:
        G = K // scale.shape[-1] if group_size is None else group_size
        g_idx = default_g_idx(K, G, q.device)
    g = g_idx.long()
    s = scale.float()[..., g]
    w = q.float()
    if zero_point is not None:
        w = w - zero_point.float()[..., g]
    return w * s


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool = True):
    """Round-to-nearest of w [N, K] per group of `group_size` input columns (None: per output channel).
    Returns (q int8 [N, K], scale fp32 [N, groups], zero_point int8 [N, groups] or None), with compressed-tensors'
    min-max rule: symmetric scale = max|w| / ((qmax - qmin) / 2); asymmetric scale = (max - min) / (qmax - qmin),
    zp = round(qmin - min / scale); q = clamp(round(w / scale) + zp, qmin, qmax)."""
    _check_bits(bits)
    N, K = w.shape
    G = K if group_size is None else group_size
    if K % G:
        raise ValueError(f"quantize_rtn: group size {G} does not divide the input dim {K}")
    qmin, qmax = qrange(bits)
    wg = w.float().reshape(N, K // G, G)
    lo = wg.amin(-1).clamp(max=0)
    hi = wg.amax(-1).clamp(min=0)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zp = None
        q = torch.clamp(torch.round(wg / scale[..., None]), qmin, qmax)
    else:
        scale = (hi - lo) / (qmax - qmin)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
        q = torch.clamp(torch.round(wg / scale[..., None]) + zp[..., None], qmin, qmax)
        zp = zp.to(torch.int8)
    return q.reshape(N, K).to(torch.int8), scale, zp


def check_g_idx(g_idx: torch.Tensor, num_groups: int, name: str, full_cover: bool = True) -> None:
    """g_idx values must lie in [0, num_groups) and (full_cover) every group must own at least one channel."""
    if g_idx.numel() == 0:
        return
    lo, hi = int(g_idx.min()), int(g_idx.max())
    if lo < 0 or hi >= num_groups:
        raise ValueError(f"{name}: g_idx values must lie in [0, {num_groups}), got range [{lo}, {hi}]")
    if full_cover:
        counts = torch.bincount(g_idx.long().flatten(), minlength=num_groups)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            raise ValueError(f"{name}: g_idx does not cover every group: group {int(empty[0])} of {num_groups} "
                             f"has no input channel")
