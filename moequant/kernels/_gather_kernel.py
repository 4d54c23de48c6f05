"""Triton body of gather_slot_columns (launcher: gather.py): each token slot's activation row in its expert's
act-order (sorted) column order.

S token slots, C columns, E experts (local), R = rows of a per slot's row index (slot // R).
out[s, k] = a[s // R, sort_idx[e_s, k]] with e_s = topk_ids[s]; slots routed to another rank (e_s < 0) are left as
they are (the GEMMs skip them). Grid (S, cdiv(C, BLOCK)).
"""

import triton
import triton.language as tl


@triton.jit
def gather_slot_columns_kernel(a_ptr, sidx_ptr, ids_ptr, out_ptr, C, stride_am, stride_ak, stride_ie, stride_om,
                               ROW_DIV: tl.constexpr, BLOCK: tl.constexpr):
    slot = tl.program_id(0)
    e = tl.load(ids_ptr + slot)
    if e < 0:
        return
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < C
    cols = tl.load(sidx_ptr + e.to(tl.int64) * stride_ie + offs, mask=ok, other=0).to(tl.int64)
    row = a_ptr + (slot // ROW_DIV).to(tl.int64) * stride_am
    vals = tl.load(row + cols * stride_ak, mask=ok, other=0.0)
    tl.store(out_ptr + slot.to(tl.int64) * stride_om + offs, vals, mask=ok)
