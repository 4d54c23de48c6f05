"""Triton body of fused_topk (launcher: topk.py): one program per token row.

T tokens, E experts (padded to E_PAD, a power of two), K top-k.
scores = softmax(logits) or sigmoid(logits); K rounds of (max, lowest index at the max, mask it);
weights optionally renormalised over the K, then multiplied by the routed scaling factor.
"""

import triton
import triton.language as tl


@triton.jit
def fused_topk_kernel(
    logits_ptr, weights_ptr, ids_ptr, E, stride_t, scale,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, E_PAD)
    valid = offs < E
    x = tl.load(logits_ptr + t * stride_t + offs, mask=valid, other=-float("inf")).to(tl.float32)
    if SIGMOID:
        s = tl.sigmoid(x)
    else:
        m = tl.max(x, 0)
        p = tl.exp(x - m)
        p = tl.where(valid, p, 0.0)
        s = p / tl.sum(p, 0)
    s = tl.where(valid, s, -float("inf"))
    ks = tl.arange(0, K_PAD)
    w = tl.zeros([K_PAD], dtype=tl.float32)
    ids = tl.zeros([K_PAD], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(s, 0)
        idx = tl.min(tl.where(s == best, offs, E_PAD), 0)
        w = tl.where(ks == k, best, w)
        ids = tl.where(ks == k, idx, ids)
        s = tl.where(offs == idx, -float("inf"), s)
    if RENORMALIZE:
        w = w / tl.sum(tl.where(ks < TOP_K, w, 0.0), 0)
    w = w * scale
    tl.store(weights_ptr + t * TOP_K + ks, w, mask=ks < TOP_K)
    tl.store(ids_ptr + t * TOP_K + ks, ids, mask=ks < TOP_K)
