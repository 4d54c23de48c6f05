"""Unquantized experts: fp32 / fp16 / bf16 weights, the same dtype for activations.

E experts (local), H hidden, I_p intermediate per rank. w13_weight [E, 2I_p, H], w2_weight [E, H, I_p].
"""

from __future__ import annotations

import torch

from moequant.methods.base import FusedMoEMethodBase, LoadSpec
from moequant.registry import register_method


@register_method("unquantized")
class UnquantizedFusedMoEMethod(FusedMoEMethodBase):
    """Plain weights; apply = grouped GEMMs with the gated activation fused in."""

    def create_weights(self, layer) -> None:
        E, H, I = self.moe.num_local_experts, self.moe.hidden_size, self.moe.intermediate_size_per_partition
        dt = self.moe.params_dtype
        if dt not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"unquantized MoE needs params_dtype fp64 (reference only), fp32, fp16 or bf16, got {dt}")
        self.register(layer, "w13_weight", torch.empty(E, 2 * I, H, dtype=dt), LoadSpec("stacked"))
        self.register(layer, "w2_weight", torch.empty(E, H, I, dtype=dt), LoadSpec("stacked"))
        self.create_bias(layer)

    def dequantize_expert(self, layer, e: int):
        return layer.w13_weight[e], layer.w2_weight[e]

    def quantize_dense(self, layer, w13, w2) -> None:
        layer.w13_weight.data.copy_(w13)
        layer.w2_weight.data.copy_(w2)

    def apply_triton(self, layer, x, topk_weights, topk_ids):
        from moequant.kernels.moe_gemm import fused_experts

        return fused_experts(
            x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids,
            activation=self.moe.activation,
            w13_bias=getattr(layer, "w13_bias", None), w2_bias=getattr(layer, "w2_bias", None),
            apply_router_weight_on_input=layer.apply_router_weight_on_input,
            has_remote_experts=layer.expert_map is not None,
        )
