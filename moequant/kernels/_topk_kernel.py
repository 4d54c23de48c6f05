"""Triton bodies of fused_topk and fused_topk_gather (launchers: topk.py).

T tokens, E experts (padded to E_PAD, a power of two), K top-k, C columns of x.
scores = softmax(logits) or sigmoid(logits); K rounds of (max, lowest index at the max, mask it);
weights optionally renormalised over the K, then multiplied by the routed scaling factor.
fused_topk_gather also writes out[t*K + k, j] = x[t, sort_idx[ids[t, k], j]]: each slot's row of x in its expert's
act-order (sorted) column order, in the routing launch (grid (T, K, cdiv(C, BLOCK)); every program routes its token).
"""

import triton
import triton.language as tl


@triton.jit
def _topk_row(logits_ptr, t, E, stride_t, scale, TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
              SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr):
    """(weights fp32 [K_PAD], ids int32 [K_PAD], k positions [K_PAD]) of token t; entries k >= TOP_K are unused."""
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
    return w * scale, ids, ks


@triton.jit
def fused_topk_kernel(
    logits_ptr, weights_ptr, ids_ptr, E, stride_t, scale,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    w, ids, ks = _topk_row(logits_ptr, t, E, stride_t, scale, TOP_K, K_PAD, E_PAD, SIGMOID, RENORMALIZE)
    tl.store(weights_ptr + t * TOP_K + ks, w, mask=ks < TOP_K)
    tl.store(ids_ptr + t * TOP_K + ks, ids, mask=ks < TOP_K)


@triton.jit
def fused_topk_gather_kernel(
    logits_ptr, weights_ptr, ids_ptr, x_ptr, sidx_ptr, out_ptr, E, C, stride_t, stride_xm, stride_ie, stride_om,
    scale, TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, SIGMOID: tl.constexpr,
    RENORMALIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    chunk = tl.program_id(2)
    w, ids, ks = _topk_row(logits_ptr, t, E, stride_t, scale, TOP_K, K_PAD, E_PAD, SIGMOID, RENORMALIZE)
    if k == 0:
        if chunk == 0:
            tl.store(weights_ptr + t * TOP_K + ks, w, mask=ks < TOP_K)
            tl.store(ids_ptr + t * TOP_K + ks, ids, mask=ks < TOP_K)
    e = tl.sum(tl.where(ks == k, ids, 0), 0).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < C
    cols = tl.load(sidx_ptr + e * stride_ie + offs, mask=ok, other=0).to(tl.int64)
    vals = tl.load(x_ptr + t * stride_xm + cols, mask=ok, other=0.0)
    tl.store(out_ptr + (t * TOP_K + k) * stride_om + offs, vals, mask=ok)
