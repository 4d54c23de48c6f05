"""moe_align: group token slots by expert into blocks of BM rows, each block owned by one expert.

S = T*K token slots (slot s = t*K + k), E experts (local), BM block size, P padded capacity.
Outputs (as moe_align_ref): sorted_ids [P] int32 (slot ids, S = padding), expert_ids [P/BM] int32 (-1 past the
used blocks), num_post_padded [1] int32. Negative ids (experts on other ranks) are dropped. Up to SORT_SLOTS slots the
order within an expert is ascending (bit-identical to the twin); beyond, it is the order the scatter's atomics give.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from moequant.kernels._align_kernel import (
    align_count_kernel, align_offsets_kernel, align_scatter_kernel, moe_align_kernel)
from moequant.kernels.reference import moe_align_ref, padded_capacity

SORT_SLOTS = 1024  # up to this many slots one program sorts them (deterministic order); more: count/scatter kernels


@dataclass(frozen=True)
class OneProgramAlign:
    """moe_align of few slots (<= SORT_SLOTS) as one program: its outputs (routing: sorted_ids, expert_ids, total)
    and the arguments of moe_align_kernel, so another kernel's first program can run it in its own launch (the fp8 x
    quantizer does: one launch fewer per forward)."""

    routing: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    args: tuple
    consts: dict


def _outputs(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """What both align paths start from: P, blocks, expert bins, int32 ids, and the expert_ids / total outputs."""
    S = topk_ids.numel()
    P = padded_capacity(S, num_experts, block_m)
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    expert_ids = torch.empty(P // block_m, dtype=torch.int32, device=ids.device)
    total = torch.empty(1, dtype=torch.int32, device=ids.device)
    return P, P // block_m, triton.next_power_of_2(num_experts + 1), ids, expert_ids, total


def one_program_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> OneProgramAlign | None:
    """The one-program plan of moe_align(topk_ids, num_experts, block_m), or None for more than SORT_SLOTS slots
    (or none)."""
    S = topk_ids.numel()
    if S == 0 or S > SORT_SLOTS:
        return None
    P, nb, e_bins, ids, expert_ids, total = _outputs(topk_ids, num_experts, block_m)
    sorted_ids = torch.empty(P, dtype=torch.int32, device=ids.device)
    scratch = torch.empty(2 * e_bins, dtype=torch.int32, device=ids.device)
    consts = dict(BLOCK_M=block_m, SLOTS=max(16, triton.next_power_of_2(S)), E_BINS=e_bins,
                  FILL=min(1024, triton.next_power_of_2(P)), CHUNK=max(16, min(32, triton.next_power_of_2(nb))))
    return OneProgramAlign((sorted_ids, expert_ids, total),
                           (ids, sorted_ids, expert_ids, total, scratch, S, num_experts, P, nb), consts)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    S = topk_ids.numel()
    if S == 0:
        return moe_align_ref(topk_ids, num_experts, block_m)
    plan = one_program_align(topk_ids, num_experts, block_m)
    if plan is not None:
        moe_align_kernel[(1,)](*plan.args, **plan.consts, num_warps=4)
        return plan.routing
    P, nb, e_bins, ids, expert_ids, total = _outputs(topk_ids, num_experts, block_m)
    device = ids.device
    chunk = max(16, min(64, triton.next_power_of_2(nb)))
    block = 1024
    counts = torch.zeros(e_bins, dtype=torch.int32, device=device)
    cursor = torch.empty(e_bins, dtype=torch.int32, device=device)
    sorted_ids = torch.full((P,), S, dtype=torch.int32, device=device)
    align_count_kernel[(triton.cdiv(S, block),)](ids, counts, S, num_experts, BLOCK=block, E_BINS=e_bins)
    align_offsets_kernel[(1,)](counts, cursor, expert_ids, total, num_experts, nb,
                               BLOCK_M=block_m, E_BINS=e_bins, CHUNK=chunk, num_warps=8)
    align_scatter_kernel[(triton.cdiv(S, block),)](ids, cursor, sorted_ids, S, BLOCK=block)
    return sorted_ids, expert_ids, total
