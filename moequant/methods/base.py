"""FusedMoEMethodBase: the lifecycle every scheme follows.

create_weights -> (checkpoint) weight_loader -> process_weights_after_loading -> apply.
A method declares its parameters with a `LoadSpec` saying how a checkpoint tensor of one expert and shard lands in them;
the layer's `weight_loader` reads that spec, so no scheme needs hooks in the layer.

Shape legend: E experts (local), H hidden, I_p intermediate per tensor-parallel rank, T tokens, K top-k.
w13 params are [E, 2*R, C] (gate rows first, then up); w2 params are [E, R, C].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Literal

import torch

from moequant.config import QuantConfig

if TYPE_CHECKING:
    from moequant.layer import FusedMoE

LoadKind = Literal["stacked", "per_shard", "per_expert_max", "custom"]


@dataclass(frozen=True)
class LoadSpec:
    """How a checkpoint tensor (one expert, one of w1/w2/w3) is written into a parameter.

    stacked:        w13 param [E, 2R, C]: w1 -> rows [:R], w3 -> rows [R:], checkpoint [R*tp, C] sliced on dim 0 by the
                    tp rank (unless shard_w13 is False); w2 param [E, R, C]: checkpoint [R, C*tp] sliced on dim 1
                    (unless shard_w2 is False, e.g. per-row scales or act-order group scales).
    per_shard:      w13 param [E, 2] (w1 -> [:, 0], w3 -> [:, 1]), w2 param [E]; the checkpoint holds one value.
    per_expert_max: param [E], one value per expert; w1's and w3's values are combined by max. The parameter
                    starts as NaN so a value that was never loaded is caught, never read as 0.
    custom:         loader(layer, param, loaded, shard_id, local_expert, tp_rank, tp_size) does the write.
    required:       process_weights_after_loading checks every (expert, shard) of this param was loaded once any
                    checkpoint tensor went through weight_loader.
    """

    kind: LoadKind = "stacked"
    shard_w13: bool = True
    shard_w2: bool = True
    required: bool = True
    loader: Callable[..., None] | None = None


def set_load_spec(param: torch.nn.Parameter, spec: LoadSpec) -> torch.nn.Parameter:
    param.moe_load_spec = spec
    return param


def get_load_spec(param: torch.Tensor) -> LoadSpec | None:
    return getattr(param, "moe_load_spec", None)


@dataclass(frozen=True)
class MoEGeometry:
    """What a method needs to know about its layer."""

    num_experts: int  # global E
    num_local_experts: int
    hidden_size: int
    intermediate_size_per_partition: int
    top_k: int
    activation: str
    has_bias: bool
    params_dtype: torch.dtype
    tp_rank: int = 0
    tp_size: int = 1


class FusedMoEMethodBase:
    """Base of every MoE method. Subclasses register with `@register_method(name)`.

    Capabilities are class attributes, checked once when the layer is built:
    `activations`: the activations its kernels support; `compute_dtype`: the tensor-core dtype of the GEMMs
    ("bf16" or "fp8"), which the benchmark uses to pick the dense rate to compare against.
    """

    name: ClassVar[str] = ""
    activations: ClassVar[tuple[str, ...]] = ("silu", "gelu", "swigluoai")
    compute_dtype: ClassVar[str] = "bf16"
    supports_bias: ClassVar[bool] = True

    def __init__(self, config: QuantConfig, moe: MoEGeometry):
        self.config = config
        self.moe = moe
        if moe.activation not in self.activations:
            raise ValueError(f"method {self.name!r} does not support activation={moe.activation!r}; it supports {self.activations}")
        if moe.has_bias and not self.supports_bias:
            raise ValueError(f"method {self.name!r} does not support has_bias=True")

    # --- lifecycle -------------------------------------------------------------------------------------------
    def create_weights(self, layer: "FusedMoE") -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: "FusedMoE") -> None:
        """Checkpoint layout -> kernel layout, once. Default: nothing to do."""

    def uses_weight_scale_2_pattern(self) -> bool:
        """True for FP4 methods whose per-tensor scale is named weight_scale_2."""
        return False

    # --- math -----------------------------------------------------------------------------------------------
    def dequantize_expert(self, layer: "FusedMoE", e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's weights in fp32: (w13 [2I_p, H], w2 [H, I_p]). Used by the reference path."""
        raise NotImplementedError

    def act_quant_ref(self, layer: "FusedMoE", a: torch.Tensor, stage: int) -> torch.Tensor:
        """Fake-quantize a GEMM input (stage 1: x before w13, stage 2: the activation before w2). Identity here."""
        return a

    def quantize_dense(self, layer: "FusedMoE", w13: torch.Tensor, w2: torch.Tensor) -> None:
        """RTN-quantize full-precision weights (w13 [E, 2I_p, H], w2 [E, H, I_p]) into the layer's parameters."""
        raise NotImplementedError

    def slot_column_order(self, layer: "FusedMoE", x: torch.Tensor) -> torch.Tensor | None:
        """Column order [E, H] in which apply_triton wants each routed slot's row of x, written by the routing launch
        and passed as apply_triton(..., slot_rows=[T*K, H]); None (the default): x as it is."""
        return None

    def routes_in_kernel(self, layer: "FusedMoE", x: torch.Tensor) -> bool:
        """Whether apply_triton takes the plain top-k routing as route= (kernels.topk.DeferredRouting, topk_weights
        and topk_ids its unwritten outputs) and routes inside its first expert launch; False (the default): the
        layer routes first."""
        return False

    def apply_triton(self, layer: "FusedMoE", x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"method {self.name!r} has no Triton path yet; use backend='reference'")

    def apply_reference(self, layer: "FusedMoE", x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                        compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The pure-torch path: dequantized experts, fake-quantized activations, math in `compute_dtype`."""
        from moequant.kernels.reference import fused_moe_ref

        return fused_moe_ref(
            x, topk_weights, topk_ids,
            expert_weights=lambda e: self.dequantize_expert(layer, e),
            num_experts=self.moe.num_local_experts,
            activation=self.moe.activation,
            w13_bias=getattr(layer, "w13_bias", None),
            w2_bias=getattr(layer, "w2_bias", None),
            act_quant=lambda a, stage: self.act_quant_ref(layer, a, stage),
            apply_router_weight_on_input=layer.apply_router_weight_on_input,
            compute_dtype=compute_dtype,
        )

    # --- helpers for subclasses -----------------------------------------------------------------------------
    @staticmethod
    def register(layer: "FusedMoE", name: str, tensor: torch.Tensor, spec: LoadSpec | None) -> torch.nn.Parameter:
        """Register `tensor` as a frozen parameter `name` on the layer with its load spec."""
        param = torch.nn.Parameter(tensor, requires_grad=False)
        if spec is not None:
            set_load_spec(param, spec)
        layer.register_parameter(name, param)
        return param

    def create_bias(self, layer: "FusedMoE") -> None:
        """Optional biases w13_bias [E, 2I_p] and w2_bias [E, H] in params_dtype (shared by all schemes)."""
        if not self.moe.has_bias:
            return
        E, H, I = self.moe.num_local_experts, self.moe.hidden_size, self.moe.intermediate_size_per_partition
        dt = self.moe.params_dtype
        self.register(layer, "w13_bias", torch.zeros(E, 2 * I, dtype=dt), LoadSpec("custom", loader=_load_bias))
        self.register(layer, "w2_bias", torch.zeros(E, H, dtype=dt), LoadSpec("custom", loader=_load_bias))


def rows_contiguous(packed: torch.Tensor) -> torch.Tensor:
    """The same [E, N, C'] values stored with the N (output row) dimension contiguous: strides (N*C', 1, N).

    Packed int and fp4 weights are kept this way after loading: the decode GEMV then reads several rows of one packed
    column per vector load, so each unpacked activation value serves several rows in registers (H200, M=1: int4 and
    fp4 GEMVs 1.3-1.6x faster than K-contiguous); the grouped GEMMs read [K, N] tiles either way (int's got faster,
    fp4's slower: fp4 therefore takes the GEMV path up to 2 slots per expert). Shapes, values and every torch op are
    unchanged (only the strides differ)."""
    if packed.dim() != 3 or packed.stride(1) == 1:
        return packed
    return packed.transpose(1, 2).contiguous().transpose(1, 2)


def _load_bias(layer, param, loaded, shard_id, local_expert, tp_rank, tp_size) -> None:
    """w1/w3 biases [I] are sliced by tp rank into halves of w13_bias; w2's bias [H] is added once (rank 0 only),
    so that summing the tensor-parallel ranks' outputs counts it once."""
    from moequant.weight_loading import check_shape

    dst = param.data[local_expert]
    if shard_id == "w2":
        check_shape(layer, param, loaded, dst.shape, local_expert, shard_id)
        dst.copy_(loaded if tp_rank == 0 else torch.zeros_like(loaded))
        return
    half = dst.shape[0] // 2
    full = half * tp_size
    check_shape(layer, param, loaded, (full,), local_expert, shard_id)
    part = loaded.narrow(0, tp_rank * half, half)
    (dst[:half] if shard_id == "w1" else dst[half:]).copy_(part)
