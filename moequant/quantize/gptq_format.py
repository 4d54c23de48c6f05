"""GPTQ (AutoGPTQ / GPTQModel) Linear tensors -> compressed-tensors pack-quantized tensors, bit-exactly.

# N output rows, K input columns, G group size, b bits (4 or 8), P = 32 / b values per int32 word
GPTQ stores unsigned u in [0, 2^b) and z (zero) per group and output column, lowest bits first:
  qweight int32 [K/P, N] (packed along the input dim), qzeros int32 [groups, N/P] (packed along the output dim),
  scales [groups, N], g_idx int32 [K]; w[n, k] = (u[k, n] - z[g(k), n]) * scales[g(k), n].
  checkpoint_format "gptq" (v1) stores z - 1, "gptq_v2" stores z.
compressed-tensors: q = u - 2^(b-1), zp = z - 2^(b-1) (dropped when symmetric, which needs z = 2^(b-1)),
  weight_packed [N, K*b/32], weight_scale [N, groups], weight_zero_point [N*b/32, groups], weight_shape [N, K],
  weight_g_idx [K] when desc_act (or any g_idx other than k // G).
"""

from __future__ import annotations

import torch

from moequant.quantize import int_math as im


def _unpack_unsigned(packed: torch.Tensor, bits: int, n: int, dim: int) -> torch.Tensor:
    """GPTQ words -> unsigned ints (int32) with n values along dim."""
    return im.unpack_int32(packed, bits, n, dim).to(torch.int32) + (1 << (bits - 1))


def gptq_to_compressed_tensors(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                               g_idx: torch.Tensor | None, bits: int = 4, sym: bool = True, desc_act: bool = False,
                               checkpoint_format: str = "gptq", name: str = "gptq") -> dict[str, torch.Tensor]:
    """Convert one GPTQ Linear's tensors (names as in the docstring) to compressed-tensors tensors."""
    im._check_bits(bits)
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"{name}: checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    for t, tn in ((qweight, "qweight"), (qzeros, "qzeros")):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise ValueError(f"{name}.{tn}: expected a 2-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    per = 32 // bits
    K, N = qweight.shape[0] * per, qweight.shape[1]
    groups = scales.shape[0]
    if tuple(scales.shape) != (groups, N):
        raise ValueError(f"{name}.scales: expected shape [groups, {N}], got {tuple(scales.shape)}")
    if tuple(qzeros.shape) != (groups, -(-N // per)):
        raise ValueError(f"{name}.qzeros: expected shape {(groups, -(-N // per))}, got {tuple(qzeros.shape)}")
    if K % groups:
        raise ValueError(f"{name}: {groups} groups do not divide the input dim {K}")
    G = K // groups
    if g_idx is None:
        g_idx = im.default_g_idx(K, G, qweight.device)
    if tuple(g_idx.shape) != (K,):
        raise ValueError(f"{name}.g_idx: expected shape [{K}], got {tuple(g_idx.shape)}")
    g_idx = g_idx.to(torch.int32)
    im.check_g_idx(g_idx, groups, f"{name}.g_idx")

    u = _unpack_unsigned(qweight, bits, K, dim=0)  # [K, N]
    z = _unpack_unsigned(qzeros, bits, N, dim=1)  # [groups, N]
    if checkpoint_format == "gptq":
        z = z + 1  # v1 stores zero - 1
    half = 1 << (bits - 1)
    if int(z.min()) < 0 or int(z.max()) > (1 << bits) - 1:
        raise ValueError(f"{name}.qzeros: zero points must lie in [0, {(1 << bits) - 1}] after the "
                         f"{checkpoint_format} convention, got range [{int(z.min())}, {int(z.max())}]")
    out = {
        "weight_packed": im.pack_int32((u - half).to(torch.int8).t().contiguous(), bits, dim=1),
        "weight_scale": scales.t().contiguous(),
        "weight_shape": torch.tensor([N, K], dtype=torch.int64),
    }
    if sym:
        if not bool((z == half).all()):
            raise ValueError(f"{name}.qzeros: sym=True needs every zero point = {half}, got range "
                             f"[{int(z.min())}, {int(z.max())}] (is checkpoint_format {checkpoint_format!r} right?)")
    else:
        out["weight_zero_point"] = im.pack_int32((z - half).to(torch.int8).t().contiguous(), bits, dim=0)
    if desc_act or not torch.equal(g_idx, im.default_g_idx(K, G, g_idx.device)):
        out["weight_g_idx"] = g_idx
    return out
