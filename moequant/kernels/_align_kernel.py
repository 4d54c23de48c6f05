"""Triton bodies of moe_align (see align.py). Few slots (decode): one program sorts all token slots by expert.

S token slots (padded to SLOTS, a power of two), E experts (E_BINS >= E + 1 bins, bin E collects dropped slots),
BM block size, P padded capacity, NB = P / BM blocks.
"""

import triton
import triton.language as tl


@triton.jit
def moe_align_kernel(
    topk_ids_ptr, sorted_ids_ptr, expert_ids_ptr, total_ptr, scratch_ptr,
    S, E, P, NB,
    BLOCK_M: tl.constexpr, SLOTS: tl.constexpr, E_BINS: tl.constexpr, FILL: tl.constexpr, CHUNK: tl.constexpr,
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
    for start in range(0, P, FILL):
        o = start + tl.arange(0, FILL)
        tl.store(sorted_ids_ptr + o, tl.zeros([FILL], dtype=tl.int32) + S, mask=o < P)
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


# --- many slots (prefill): count -> offsets -> scatter, over many programs --------------------------------------


@triton.jit
def align_count_kernel(topk_ids_ptr, counts_ptr, S, E, BLOCK: tl.constexpr, E_BINS: tl.constexpr):
    """counts[e] += number of slots of this program's BLOCK routed to expert e."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < S
    ids = tl.load(topk_ids_ptr + offs, mask=in_range, other=-1)
    ids = tl.where(in_range & (ids >= 0), ids, E)
    bins = tl.arange(0, E_BINS)
    tl.atomic_add(counts_ptr + bins, tl.histogram(ids, E_BINS), mask=bins < E)


@triton.jit
def align_offsets_kernel(counts_ptr, cursor_ptr, expert_ids_ptr, total_ptr, E, NB,
                         BLOCK_M: tl.constexpr, E_BINS: tl.constexpr, CHUNK: tl.constexpr):
    """One program: padded start of each expert (-> cursor), the expert of each block, the padded total."""
    bins = tl.arange(0, E_BINS)
    counts = tl.load(counts_ptr + bins, mask=bins < E, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pend = tl.cumsum(padded, 0)
    tl.store(cursor_ptr + bins, pend - padded, mask=bins < E)
    total = tl.sum(padded, 0)
    tl.store(total_ptr, total)
    for start in range(0, NB, CHUNK):
        b = start + tl.arange(0, CHUNK)
        pos = b * BLOCK_M
        e = tl.sum(((pend[None, :] <= pos[:, None]) & (bins[None, :] < E)).to(tl.int32), 1)
        tl.store(expert_ids_ptr + b, tl.where(pos < total, e, -1), mask=b < NB)


@triton.jit
def align_scatter_kernel(topk_ids_ptr, cursor_ptr, sorted_ids_ptr, S, BLOCK: tl.constexpr):
    """sorted_ids[cursor[e]++] = slot. Order within an expert's blocks is arbitrary: every output row of the grouped
    GEMMs depends only on its own slot, so results do not depend on it."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(topk_ids_ptr + offs, mask=offs < S, other=-1)
    ok = (offs < S) & (ids >= 0)
    dest = tl.atomic_add(cursor_ptr + ids, 1, mask=ok)
    tl.store(sorted_ids_ptr + dest, offs, mask=ok)
