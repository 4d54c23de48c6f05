"""moe_align: group token slots by expert into blocks of BM rows, each block owned by one expert.

S = T*K token slots (slot s = t*K + k), E experts (local), BM block size, P padded capacity.
Outputs (same as moe_align_ref): sorted_ids [P] int32 (slot ids, S = padding), expert_ids [P/BM] int32 (-1 past the
used blocks), num_post_padded [1] int32. Negative ids (experts on other ranks) are dropped.
"""

from __future__ import annotations

import torch
import triton

from moequant.kernels._align_kernel import moe_align_kernel
from moequant.kernels.reference import moe_align_ref, padded_capacity

MAX_TRITON_SLOTS = 4096  # one program sorts up to this many slots; larger batches use the torch twin (prefill)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    S = topk_ids.numel()
    if S > MAX_TRITON_SLOTS or S == 0:
        return moe_align_ref(topk_ids, num_experts, block_m)
    device = topk_ids.device
    P = padded_capacity(S, num_experts, block_m)
    nb = P // block_m
    e_bins = triton.next_power_of_2(num_experts + 1)
    slots = max(16, triton.next_power_of_2(S))
    sorted_ids = torch.empty(P, dtype=torch.int32, device=device)
    expert_ids = torch.empty(nb, dtype=torch.int32, device=device)
    total = torch.empty(1, dtype=torch.int32, device=device)
    scratch = torch.empty(2 * e_bins, dtype=torch.int32, device=device)
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    moe_align_kernel[(1,)](
        ids, sorted_ids, expert_ids, total, scratch, S, num_experts, P, nb,
        BLOCK_M=block_m, SLOTS=slots, E_BINS=e_bins, CHUNK=min(256, max(16, e_bins)),
        num_warps=4 if slots <= 1024 else 8,
    )
    return sorted_ids, expert_ids, total
