"""Tensor- and expert-parallel helpers.

E experts (global), E_local on this rank; tensor parallelism splits I into I_p = I / tp_size per rank.
"""

from __future__ import annotations

import torch


def determine_expert_map(ep_size: int, ep_rank: int, global_num_experts: int) -> tuple[int, torch.Tensor | None]:
    """Linear placement: each rank holds E // ep_size consecutive experts, the last rank also the remainder.

    Returns (local_num_experts, expert_map) where expert_map[e_global] = e_local or -1 (None when ep_size == 1).
    """
    if ep_size < 1 or not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank must be in [0, ep_size); got ep_rank={ep_rank}, ep_size={ep_size}")
    if ep_size == 1:
        return global_num_experts, None
    base = global_num_experts // ep_size
    if base == 0:
        raise ValueError(f"ep_size={ep_size} is larger than the number of experts ({global_num_experts})")
    local = base + (global_num_experts % ep_size if ep_rank == ep_size - 1 else 0)
    start = ep_rank * base
    expert_map = torch.full((global_num_experts,), -1, dtype=torch.int32)
    expert_map[start : start + local] = torch.arange(local, dtype=torch.int32)
    return local, expert_map


def shard_range(total: int, tp_rank: int, tp_size: int, what: str) -> tuple[int, int]:
    """(start, size) of rank tp_rank's equal slice of `total`; `what` names the dimension in errors."""
    if total % tp_size:
        raise ValueError(f"{what}={total} is not divisible by tp_size={tp_size}")
    size = total // tp_size
    return tp_rank * size, size


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` in place over the default process group (needed when tp_size * ep_size > 1 and reduce_results)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "reduce_results=True with tp_size*ep_size > 1 needs an initialised torch.distributed process group; "
            "initialise one or build the layer with reduce_results=False and sum the ranks' outputs yourself"
        )
    dist.all_reduce(t)
    return t
