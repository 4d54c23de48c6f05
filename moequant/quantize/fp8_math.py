"""FP8 (e4m3fn) format math in pure torch: RTN quantize / dequantize of weights per tensor, per channel and per
128x128 block, the w1/w3 shared-scale requantization, and the activation quantizers (the torch twin of
moequant/kernels/_fp8_act_quant_kernel.py).

# T tokens, E experts, H hidden, I intermediate, K top-k, R rows (out), C columns (in), G group / block size (128)

Layouts are compressed-tensors' (float-quantized): q = clamp(w / s, -448, 448) cast to e4m3fn (round to nearest even),
w ~= q * s; scales are s = amax / 448 with an all-zero slice given a tiny positive scale instead of 0.
  tensor:  s [1]             channel: s [R, 1]             block: s [ceil(R/G), C/G], block (i, j) covers
  rows [iG, (i+1)G), cols [jG, (j+1)G).
Activations: s = max(amax, ACT_EPS) / 448 per tensor, per token (row) or per token-group of G columns; x / s is
computed in fp32 (division, not a reciprocal multiply, so the kernel and this twin agree bit for bit). Every division
here is by a tensor (div_by_max): torch on CUDA turns a division by a Python number into a multiply by its rounded
reciprocal, one ulp off the IEEE quotient for some amax, which moved fp8 ties (x / s = 21 -> 22 or 20) between the
GPU kernels and this twin.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
ACT_EPS = 1e-10  # smallest activation amax used for a scale (an all-zero row gets a positive scale)
WEIGHT_EPS = torch.finfo(torch.float32).eps  # compressed-tensors' replacement for a zero fp32 scale


def div_by_max(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 in fp32, correctly rounded on every device (a tensor divisor: no reciprocal multiply on CUDA)."""
    a = amax.float()
    return a / torch.full_like(a, FP8_MAX)


def _scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    s = div_by_max(amax)
    return torch.where(s == 0, torch.full_like(s, WEIGHT_EPS), s)


def quantize_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q = clamp(w / scale, -448, 448) -> e4m3fn, in fp32; `scale` broadcasts against w."""
    return (w.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w = q * scale in fp32 (`scale` broadcasts against q)."""
    return q.float() * scale.float()


def expand_block_scale(scale: torch.Tensor, rows: int, cols: int, block: int = BLOCK) -> torch.Tensor:
    """Block scales [..., ceil(R/G), ceil(C/G)] -> one scale per element [..., R, C]."""
    s = scale.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return s[..., :rows, :cols]


def quantize_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor RTN of w [R, C]: (q fp8 [R, C], scale fp32 [1])."""
    s = _scale_from_amax(w.abs().amax().reshape(1))
    return quantize_fp8(w, s), s


def quantize_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row RTN of w [..., R, C]: (q fp8, scale fp32 [..., R, 1])."""
    s = _scale_from_amax(w.abs().amax(dim=-1, keepdim=True))
    return quantize_fp8(w, s), s


def quantize_block(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-128x128-block RTN of w [..., R, C] (C a multiple of G): (q fp8, scale fp32 [..., ceil(R/G), C/G])."""
    R, C = w.shape[-2:]
    if C % block:
        raise ValueError(f"block quantization needs the input dim ({C}) to be a multiple of {block}")
    pad = (-R) % block
    wp = torch.nn.functional.pad(w.float(), (0, 0, 0, pad)) if pad else w.float()
    blocks = wp.unflatten(-2, (-1, block)).unflatten(-1, (-1, block))  # [..., R/G, G, C/G, G]
    s = _scale_from_amax(blocks.abs().amax(dim=(-3, -1)))
    return quantize_fp8(w, expand_block_scale(s, R, C, block)), s


def requantize_shared(q1: torch.Tensor, s1: torch.Tensor, q3: torch.Tensor, s3: torch.Tensor):
    """w1 and w3 halves with their own per-tensor scales -> one shared scale s = max(s1, s3), each half
    requantized: q_i' = rtn(q_i * s_i / s). Returns (q1', q3', s)."""
    s = torch.maximum(s1.float(), s3.float())
    return quantize_fp8(dequantize_fp8(q1, s1), s), quantize_fp8(dequantize_fp8(q3, s3), s), s


# --- activations -----------------------------------------------------------------------------------------------
def act_scale(amax: torch.Tensor) -> torch.Tensor:
    """s = max(amax, ACT_EPS) / 448 (fp32)."""
    return div_by_max(amax.float().clamp_min(ACT_EPS))


def act_quant_ref(x: torch.Tensor, granularity: str, scale: torch.Tensor | None = None,
                  group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations x [T, C] to fp8. granularity: "tensor" (static `scale` [1] when given, else dynamic),
    "token" (one scale per row), "group" (one per row and G columns; C a multiple of G).
    Returns (q fp8 [T, C], scales fp32: [1] | [T, 1] | [T, C/G])."""
    xf = x.float()
    if granularity == "tensor":
        s = scale.float().reshape(1) if scale is not None else act_scale(xf.abs().amax().reshape(1))
        return quantize_fp8(xf, s), s
    if granularity == "token":
        s = act_scale(xf.abs().amax(dim=1, keepdim=True)) if xf.shape[1] else torch.ones(xf.shape[0], 1)
        return quantize_fp8(xf, s), s
    if granularity == "group":
        T, C = xf.shape
        if C % group:
            raise ValueError(f"per-group activation quantization needs the width ({C}) to be a multiple of {group}")
        g = xf.view(T, C // group, group)
        s = act_scale(g.abs().amax(dim=2))
        return quantize_fp8(g, s[..., None]).view(T, C), s
    raise ValueError(f"unknown activation granularity {granularity!r}; expected 'tensor', 'token' or 'group'")


def act_fake_quant(x: torch.Tensor, granularity: str, scale: torch.Tensor | None = None,
                   group: int = BLOCK) -> torch.Tensor:
    """Quantize then dequantize activations (fp32 result), as act_quant_ref."""
    q, s = act_quant_ref(x, granularity, scale, group)
    if granularity == "group":
        T, C = q.shape
        return (q.float().view(T, C // group, group) * s[..., None]).view(T, C)
    return q.float() * s
