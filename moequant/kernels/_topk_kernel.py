"""Triton bodies of fused_topk and fused_topk_gather (launchers: topk.py).

T tokens, E experts (padded to E_PAD, a power of two), K top-k, C columns of x.
scores = softmax(logits) or sigmoid(logits); the K largest (ties to the lower index) chosen on the logits, which
order the same (_topk_row); weights optionally renormalised over the K, then multiplied by the routed scaling factor.
fused_topk_gather also writes out[t*K + k, j] = x[t, sort_idx[ids[t, k], j]]: each slot's row of x in its expert's
act-order (sorted) column order, in the routing launch (grid (T, K, cdiv(C, BLOCK)); every program routes its token).
routed_rows_kernel writes the same rows without routing (grid (T, E, cdiv(C, BLOCK))): expert e's programs rank e
among the token's keys (rank = the number of larger keys; the k-th largest has rank k) and store only when rank < K.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents


@triton.jit
def _ordered(x):
    """fp32 -> int32 whose signed order is x's order (a negative float gets its magnitude bits flipped); its own
    inverse."""
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _key(x, index, E_PAD: tl.constexpr):
    """int64 key ordered(x) << 32 | (E_PAD - 1 - index) of logit x (fp32, -0 already +0) of expert index: distinct,
    larger for a larger logit and, at equal logits, for the lower index (the top-k's and the ranking's one order)."""
    return (_ordered(x).to(tl.int64) << 32) | (E_PAD - 1 - index).to(tl.int64)


@triton.jit
def _row_keys(logits_ptr, t, E, stride_t, E_PAD: tl.constexpr):
    """(int64 keys [E_PAD], logits fp32 [E_PAD]) of token t's row (_key; -inf past E; -0 taken as +0)."""
    offs = tl.arange(0, E_PAD)
    x = tl.load(logits_ptr + t * stride_t + offs, mask=offs < E, other=-float("inf")).to(tl.float32) + 0.0
    return _key(x, offs, E_PAD), x


@triton.jit
def _topk_choice(logits_ptr, t, E, stride_t, K_PAD: tl.constexpr, E_PAD: tl.constexpr):
    """(ids int32 [K_PAD], their logits fp32 [K_PAD], the row's logits [E_PAD] (-inf past E), k positions [K_PAD])
    of token t's K_PAD largest logits, largest first, ties to the lower index: one bitonic top-k (tl.topk) of the
    row's keys (_row_keys)."""
    key, x = _row_keys(logits_ptr, t, E, stride_t, E_PAD)
    best = tl.topk(key, K_PAD)  # descending
    ids = (E_PAD - 1 - (best & 0xFFFFFFFF)).to(tl.int32)
    xk = _ordered((best >> 32).to(tl.int32)).to(tl.float32, bitcast=True)
    return ids, xk, x, tl.arange(0, K_PAD)


@triton.jit
def _topk_weights(xk, x, ks, scale, TOP_K: tl.constexpr, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr):
    """The routing weights of the chosen logits xk [K_PAD] (entries k >= TOP_K unused): sigmoid, or softmax over the
    row x (only its denominator is needed: the top k's own exponentials when renormalising), then renormalised over
    the K if asked, times scale."""
    if SIGMOID:
        w = tl.sigmoid(xk)
    else:
        m = tl.max(xk, 0)  # the row's largest logit
        w = tl.exp(xk - m)
        if not RENORMALIZE:
            w = w / tl.sum(tl.exp(x - m), 0)  # exp(-inf) = 0 past E
    if RENORMALIZE:
        w = w / tl.sum(tl.where(ks < TOP_K, w, 0.0), 0)
    return w * scale


@triton.jit
def _topk_row(logits_ptr, t, E, stride_t, scale, TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
              SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr):
    """(weights fp32 [K_PAD], ids int32 [K_PAD], k positions [K_PAD]) of token t; entries k >= TOP_K are unused.
    Softmax and sigmoid are increasing, so the top k of the scores are those of the logits (_topk_choice); only
    their K scores are computed (plus, for softmax without renormalisation, its denominator) (_topk_weights).
    Measured on the H200 (E=128, K=8, one token): 1.9 us per launch against 2.4 for K rounds of (max, lowest
    index at the max) over the softmax scores."""
    ids, xk, x, ks = _topk_choice(logits_ptr, t, E, stride_t, K_PAD, E_PAD)
    return _topk_weights(xk, x, ks, scale, TOP_K, SIGMOID, RENORMALIZE), ids, ks


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


@triton.jit
def routed_rows_kernel(
    logits_ptr, x_ptr, sidx_ptr, out_ptr, E, C, stride_t, stride_xm, stride_ie, stride_om,
    TOP_K: tl.constexpr, E_PAD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # the next launch (the GEMV's GEMM1, a programmatic dependent) may start routing now
        gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < C
    # the copy does not wait for the ranking: expert e's columns of x are loaded alongside the logits, and only
    # the store depends on the rank (a predicate, not a branch the loads could sink into)
    cols = tl.load(sidx_ptr + e.to(tl.int64) * stride_ie + offs, mask=ok, other=0)
    vals = tl.load(x_ptr + t * stride_xm + cols, mask=ok, other=0.0)
    key, _ = _row_keys(logits_ptr, t, E, stride_t, E_PAD)
    key_e = _key(tl.load(logits_ptr + t * stride_t + e).to(tl.float32) + 0.0, e, E_PAD)
    rank = tl.sum((key > key_e).to(tl.int32), 0)
    tl.store(out_ptr + (t * TOP_K + rank) * stride_om + offs, vals, mask=ok & (offs * 0 + rank < TOP_K))
