"""Triton body of moe_align (see align.py): one program sorts all token slots by expert.

S token slots (padded to SLOTS, a power of two), E experts (E_BINS >= E + 1 bins, bin E collects dropped slots),
BM block size, P padded capacity, NB = P / BM blocks.
"""

import triton
import triton.language as tl


@triton.jit
def moe_align_kernel(
    topk_ids_ptr, sorted_ids_ptr, expert_ids_ptr, total_ptr, scratch_ptr,
    S, E, P, NB,
    BLOCK_M: tl.constexpr, SLOTS: tl.constexpr, E_BINS: tl.constexpr, CHUNK: tl.constexpr,
):
    offs = tl.arange(0, SLOTS)
    in_range = offs < S
    ids = tl.load(topk_ids_ptr + offs, mask=in_range, other=-1)
    ids = tl.where(in_range & (ids >= 0), ids, E)
    bins = tl.arange(0, E_BINS)
    counts = tl.histogram(ids, E_BINS)
    counts = tl.where(bins < E, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pend = tl.cumsum(padded, 0)
    cend = tl.cumsum(counts, 0)
    tl.store(scratch_ptr + bins, pend - padded)
    tl.store(scratch_ptr + E_BINS + bins, cend - counts)
    total = tl.sum(padded, 0)
    tl.store(total_ptr, total)
    # padding slots hold S, an id no token has
    for start in range(0, P, CHUNK):
        o = start + tl.arange(0, CHUNK)
        tl.store(sorted_ids_ptr + o, tl.zeros([CHUNK], dtype=tl.int32) + S, mask=o < P)
    # expert of block b = number of experts whose padded range ends at or before b * BM
    for start in range(0, NB, CHUNK):
        b = start + tl.arange(0, CHUNK)
        pos = b * BLOCK_M
        ended = (pend[None, :] <= pos[:, None]) & (bins[None, :] < E)
        e = tl.sum(ended.to(tl.int32), 1)
        e = tl.where(pos < total, e, -1)
        tl.store(expert_ids_ptr + b, e, mask=b < NB)
    tl.debug_barrier()
    # stable sort by expert: key = expert * SLOTS + slot
    keys = tl.sort(ids * SLOTS + offs)
    se = keys // SLOTS
    slot = keys % SLOTS
    valid = se < E
    pstart = tl.load(scratch_ptr + se, mask=valid, other=0)
    cstart = tl.load(scratch_ptr + E_BINS + se, mask=valid, other=0)
    tl.store(sorted_ids_ptr + pstart + (offs - cstart), slot, mask=valid)
