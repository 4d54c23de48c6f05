"""moe_align: group token slots by expert into blocks of BM rows, each block owned by one expert.

S = T*K token slots (slot s = t*K + k), E experts (local), BM block size, P padded capacity.
Outputs (as moe_align_ref): sorted_ids [P] int32 (slot ids, S = padding), expert_ids [P/BM] int32 (-1 past the
used blocks), num_post_padded [1] int32. Negative ids (experts on other ranks) are dropped. Up to SORT_SLOTS slots the
order within an expert is ascending (bit-identical to the twin); beyond, it is the order the scatter's atomics give.
"""

from __future__ import annotations

import torch
import triton

from moequant.kernels._align_kernel import (
    align_count_kernel, align_offsets_kernel, align_scatter_kernel, moe_align_kernel)
from moequant.kernels.reference import moe_align_ref, padded_capacity

SORT_SLOTS = 1024  # up to this many slots one program sorts them (deterministic order); more: count/scatter kernels


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    S = topk_ids.numel()
    if S == 0:
        return moe_align_ref(topk_ids, num_experts, block_m)
    device = topk_ids.device
    P = padded_capacity(S, num_experts, block_m)
    nb = P // block_m
    e_bins = triton.next_power_of_2(num_experts + 1)
    expert_ids = torch.empty(nb, dtype=torch.int32, device=device)
    total = torch.empty(1, dtype=torch.int32, device=device)
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    chunk = max(16, min(64 if S > SORT_SLOTS else 32, triton.next_power_of_2(nb)))
    if S <= SORT_SLOTS:
        sorted_ids = torch.empty(P, dtype=torch.int32, device=device)
        scratch = torch.empty(2 * e_bins, dtype=torch.int32, device=device)
        moe_align_kernel[(1,)](
            ids, sorted_ids, expert_ids, total, scratch, S, num_experts, P, nb,
            BLOCK_M=block_m, SLOTS=max(16, triton.next_power_of_2(S)), E_BINS=e_bins,
            FILL=min(1024, triton.next_power_of_2(P)), CHUNK=chunk, num_warps=4,
        )
        return sorted_ids, expert_ids, total
    block = 1024
    counts = torch.zeros(e_bins, dtype=torch.int32, device=device)
    cursor = torch.empty(e_bins, dtype=torch.int32, device=device)
    sorted_ids = torch.full((P,), S, dtype=torch.int32, device=device)
    align_count_kernel[(triton.cdiv(S, block),)](ids, counts, S, num_experts, BLOCK=block, E_BINS=e_bins)
    align_offsets_kernel[(1,)](counts, cursor, expert_ids, total, num_experts, nb,
                               BLOCK_M=block_m, E_BINS=e_bins, CHUNK=chunk, num_warps=8)
    align_scatter_kernel[(triton.cdiv(S, block),)](ids, cursor, sorted_ids, S, BLOCK=block)
    return sorted_ids, expert_ids, total
