"""gather_slot_columns: a per-slot copy of the activations in each routed expert's act-order column order, so the
grouped int GEMMs read contiguous rows instead of gathering columns in their tensor-core loads.

S = T*K token slots, C columns. Torch twin: moequant.kernels.reference.gather_slot_columns_ref.
"""

from __future__ import annotations

import torch
import triton

from moequant.kernels._gather_kernel import gather_slot_columns_kernel

BLOCK = 1024  # columns per program


def gather_slot_columns(a: torch.Tensor, sort_idx: torch.Tensor, topk_ids: torch.Tensor, row_div: int,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """out[s, k] = a[s // row_div, sort_idx[topk_ids[s], k]] for every slot s routed to a local expert (ids >= 0;
    the other rows of out are left as given, zeros when out is None and some slot is remote).
    a [S / row_div, C]; sort_idx int32 [E, C]; topk_ids [T, K] with T*K = S."""
    ids = topk_ids.reshape(-1)
    S, C = ids.numel(), a.shape[1]
    if sort_idx.shape[1] != C or a.shape[0] * row_div != S:
        raise ValueError(f"gather_slot_columns: a {tuple(a.shape)} with row_div {row_div}, sort_idx "
                         f"{tuple(sort_idx.shape)} and {S} slots do not match")
    if out is None:
        out = torch.zeros(S, C, dtype=a.dtype, device=a.device)
    if S:
        block = min(BLOCK, triton.next_power_of_2(C))
        gather_slot_columns_kernel[(S, triton.cdiv(C, block))](
            a, sort_idx, ids, out, C, a.stride(0), a.stride(1), sort_idx.stride(0), out.stride(0),
            ROW_DIV=row_div, BLOCK=block, num_warps=4)
    return out
