"""GPTQ for integer group / channel weights (Frantar et al. 2022), with static groups and weight act-order.

# R rows (out), C columns (in), G group size, B block of columns (128)
Minimises ||(W - Q) X||^2 over the calibration inputs X [C, T] with H = 2 X X^T / T:
  H += damp * mean(diag H) * I (dead columns, diag 0, get H_ii = 1 and W_:i = 0);
  act-order ("weight"/"static"): columns visited in order of decreasing diag(H), groups stay k // G (no g_idx);
  U = chol(H^-1)^T (upper); for column j in visiting order: q_j = Q(w_j), err_j = (w_j - q_j) / U_jj,
  w_k -= err_j * U_jk for later columns k (lazily within blocks of B columns, then for the rest).
Scales / zero points are the RTN min-max ones of the original weight per group (static groups), so the output format
is exactly compressed-tensors' pack-quantized without g_idx.
"""

from __future__ import annotations

import torch


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, tokens: int, scale: torch.Tensor,
                  zero_point: torch.Tensor | None, bits: int, group_size: int | None, act_order: bool = True,
                  damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """GPTQ of w [R, C] with input Hessian sum x x^T [C, C] over `tokens` tokens and fixed qparams
    (scale/zero_point [R, groups]); returns the dequantized weight (fp32 [R, C], values (q - zp) * scale), on
    hessian's device."""
    dev = hessian.device
    W = w.to(dev, torch.float32).clone()
    R, C = W.shape
    H = hessian.to(torch.float32) * (2.0 / max(tokens, 1))
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    G = C if group_size is None else group_size
    gidx = torch.arange(C, device=dev) // G
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(C, device=dev)
    W, H, gidx = W[:, perm], H[perm][:, perm], gidx[perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(C, device=dev)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    s = scale.to(dev, torch.float32)[:, gidx]  # [R, C] in visiting order
    z = (zero_point.to(dev, torch.float32)[:, gidx] if zero_point is not None else torch.zeros_like(s))
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    Q = torch.zeros_like(W)
    for b0 in range(0, C, block):
        b1 = min(b0 + block, C)
        W1, U1, Err = W[:, b0:b1].clone(), U[b0:b1, b0:b1], torch.zeros(R, b1 - b0, device=dev)
        for j in range(b1 - b0):
            col, d = W1[:, j], U1[j, j]
            q = torch.clamp(torch.round(col / s[:, b0 + j]) + z[:, b0 + j], qmin, qmax)
            dq = (q - z[:, b0 + j]) * s[:, b0 + j]
            Q[:, b0 + j] = dq
            e = (col - dq) / d
            W1[:, j:] -= e[:, None] * U1[j, j:][None, :]
            Err[:, j] = e
        W[:, b1:] -= Err @ U[b0:b1, b1:]
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out
