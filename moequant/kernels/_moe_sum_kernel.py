"""Triton body of moe_sum (launcher in moe_gemm.py): out[t, h] = sum_k y[t*K + k, h], accumulated in fp32.

T tokens, K top-k, H hidden; y [T*K, H] holds each slot's weighted expert output.
"""

import triton
import triton.language as tl


@triton.jit
def moe_sum_kernel(y_ptr, out_ptr, H, stride_y, stride_out, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (t * TOP_K + k) * stride_y + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)
