"""A plain float64 per-expert, per-token loop: the ground truth the layer is checked against."""

import torch

from moequant.kernels.reference import gated_activation_ref


def moe_loop_f64(x, w13, w2, topk_weights, topk_ids, activation="silu", b13=None, b2=None):
    """out[t] = sum_k w[t,k] * (W2[e] act(W13[e] x[t] + b13[e]) + b2[e]) computed token by token in float64."""
    T, H = x.shape
    I = w13.shape[1] // 2
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            h = w13[e].double() @ x[t].double()
            if b13 is not None:
                h = h + b13[e].double()
            a = gated_activation_ref(h[:I], h[I:], activation)
            y = w2[e].double() @ a
            if b2 is not None:
                y = y + b2[e].double()
            out[t] += float(topk_weights[t, k]) * y
    return out
