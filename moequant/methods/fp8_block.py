"""`fp8-block`: fp8 e4m3fn weights with one scale per 128x128 block, activations quantized per token-group of 128.

E experts (local), H hidden, I intermediate per rank (I_p), G = 128 (I_p and H must be multiples of G).
Checkpoint layout: w13_weight fp8 [E, 2I, H], w2_weight fp8 [E, H, I]; w13_weight_scale [E, 2I/G, H/G] (w1 blocks
then w3 blocks, sliced by tp rank as the weight rows), w2_weight_scale [E, H/G, I/G] (columns sliced by tp rank).
DeepSeek-V3 names the scales `weight_scale_inv` (the same values: w = q * s): the alias parameters
w13_weight_scale_inv / w2_weight_scale_inv load into w13_weight_scale / w2_weight_scale and are dropped afterwards.
Kernel layout: the same tensors with fp32 scales.
"""

from __future__ import annotations

import torch

from moequant.methods.base import LoadSpec
from moequant.methods.fp8 import Fp8MethodBase
from moequant.quantize import fp8_math as fm
from moequant.registry import register_method

G = fm.BLOCK


def _alias_loader(target: str):
    """A custom LoadSpec loader writing a `weight_scale_inv` tensor into `target` and recording it as loaded."""

    def load(layer, param, loaded, shard_id, local_expert, tp_rank, tp_size):
        from moequant.weight_loading import load_expert_shard

        load_expert_shard(layer, getattr(layer, target), loaded, shard_id, local_expert)
        layer._loaded.add((target, local_expert, shard_id))

    return load


@register_method("fp8-block")
class Fp8BlockMoEMethod(Fp8MethodBase):
    """fp8 weights with 128x128 block scales (applied per K-step); fp8 activations per token-group of 128."""

    weight_granularity = "block"
    act_granularity = "group"

    def __init__(self, config, moe):
        super().__init__(config, moe)
        if config.block_shape not in (None, (G, G)):
            raise ValueError(f"fp8-block supports block_shape ({G}, {G}) only, got {config.block_shape}")
        H, I = moe.hidden_size, moe.intermediate_size_per_partition
        for what, n in (("hidden_size", H), ("intermediate_size per tensor-parallel rank", I)):
            if n % G:
                raise ValueError(f"fp8-block needs {what} to be a multiple of {G}, got {n} (expected scale shapes "
                                 f"w13_weight_scale [E, 2I/{G}, H/{G}], w2_weight_scale [E, H/{G}, I/{G}])")

    def create_scale_params(self, layer) -> None:
        E, H, I = self.moe.num_local_experts, self.moe.hidden_size, self.moe.intermediate_size_per_partition
        self.register(layer, "w13_weight_scale", torch.ones(E, 2 * I // G, H // G), LoadSpec("stacked"))
        self.register(layer, "w2_weight_scale", torch.ones(E, H // G, I // G), LoadSpec("stacked"))
        for name in ("w13_weight_scale", "w2_weight_scale"):
            self.register(layer, name + "_inv", torch.empty(0),
                          LoadSpec("custom", required=False, loader=_alias_loader(name)))

    def to_kernel_layout(self, layer) -> None:
        for name in ("w13_weight_scale", "w2_weight_scale"):
            self.register(layer, name, getattr(layer, name).data.float().contiguous(), None)
            if name + "_inv" in layer._parameters:
                del layer._parameters[name + "_inv"]

    def weight_scale(self, layer, name, e):
        w = layer.w13_weight if name.startswith("w13_") else layer.w2_weight
        return fm.expand_block_scale(getattr(layer, name)[e], w.shape[1], w.shape[2])

    def quantize_dense(self, layer, w13, w2) -> None:
        self.store_rtn(layer, w13, w2, fm.quantize_block)
