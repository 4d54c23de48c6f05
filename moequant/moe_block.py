"""MoEBlock: a checkpoint's whole MoE block (router + routed experts + optional shared experts) as one module.

T tokens, E experts, H hidden, I_s shared-expert intermediate (per tensor-parallel rank).

    logits = x @ W_router^T (+ b_router)                 fp32 [T, E]
    out    = FusedMoE(x, logits)                          [T, H]
    shared = W_down act(W_gate x) * (W_up x)              [T, H]   (DeepSeek shared_experts, Qwen2-MoE shared_expert)
    shared = sigmoid(x @ w_sg^T) * shared                          (Qwen2-MoE's shared_expert_gate)
    out    = out + shared

With tensor or expert parallelism each rank's block returns its partial output; the ranks' outputs sum to the
full block output (shared experts are split like the experts across tensor-parallel ranks and computed only on
expert-parallel rank 0).
"""

from __future__ import annotations

import torch
from torch import nn

from moequant.layer import FusedMoE


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), plain Linear layers without bias (a shared expert)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu", dtype=None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, dtype=dtype)
        if activation not in ("silu", "gelu"):
            raise ValueError(f"shared experts support activation silu or gelu, got {activation!r}")
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        act = nn.functional.silu(g) if self.activation == "silu" else nn.functional.gelu(g)
        return self.down_proj(act * self.up_proj(x))


class MoEBlock(nn.Module):
    """router (fp32 nn.Linear, never quantized) -> FusedMoE -> + shared experts. forward: [..., H] -> [..., H]."""

    def __init__(self, router: nn.Linear, experts: FusedMoE, shared: GatedMLP | None = None,
                 shared_gate: nn.Linear | None = None, e_score_correction_bias: torch.Tensor | None = None):
        super().__init__()
        self.router = router
        self.experts = experts
        self.shared = shared
        self.shared_gate = shared_gate
        if e_score_correction_bias is not None:
            self.register_buffer("e_score_correction_bias", e_score_correction_bias)
        else:
            self.e_score_correction_bias = None

    @property
    def hidden_size(self) -> int:
        return self.experts.hidden_size

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 router logits [T, E] for x [T, H]."""
        w = self.router.weight
        return nn.functional.linear(x.to(w.dtype), w, self.router.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        if shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must be [..., {self.hidden_size}], got {tuple(shape)}")
        x = hidden_states.reshape(-1, shape[-1])
        # the FusedMoE keeps a plain reference; follow the buffer through .to(device)
        self.experts.e_score_correction_bias = self.e_score_correction_bias
        out = self.experts(x, self.router_logits(x))
        if self.shared is not None:
            xs = x.to(self.shared.gate_proj.weight.dtype)
            s = self.shared(xs)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(xs)) * s
            out = out + s.to(out.dtype)
        return out.reshape(shape)
