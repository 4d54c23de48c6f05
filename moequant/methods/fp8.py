"""FP8 (e4m3fn) MoE methods: `fp8-tensor`, `fp8-channel` (this file) and `fp8-block` (fp8_block.py).

E experts (local), H hidden, I intermediate per rank (I_p), G = 128.
Checkpoint layout (compressed-tensors float-quantized names, w13_/w2_ prefixed; what weight_loader fills):
  w13_weight fp8 [E, 2I, H], w2_weight fp8 [E, H, I] (stacked, tensor-parallel slices as the bf16 weights)
  fp8-tensor:  w13_weight_scale [E, 2] (w1, w3), w2_weight_scale [E]; static activations: w13_input_scale [E]
               (max of w1's and w3's), w2_input_scale [E]
  fp8-channel: w13_weight_scale [E, 2I, 1], w2_weight_scale [E, H, 1] (w2's rows are not sliced by tp)
Kernel layout (after process_weights_after_loading; fp32 scales):
  fp8-tensor:  w13_weight_scale [E] = max(s1, s3) with both halves requantized to it; w2_weight_scale [E];
               w13_input_scale / w2_input_scale [1] = the max over experts (warning when they differ)
  fp8-channel: w13_weight_scale [E, 2I], w2_weight_scale [E, H]
Activations: fp8-tensor per tensor (static input scales or dynamic), fp8-channel per token (dynamic).
`online=True`: w13_weight / w2_weight are created in params_dtype, take full-precision checkpoint tensors and are
RTN-quantized by process_weights_after_loading.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch

from moequant.methods.base import FusedMoEMethodBase, LoadSpec
from moequant.quantize import fp8_math as fm
from moequant.registry import register_method


def _fail(layer, name: str, what: str) -> ValueError:
    return ValueError(f"{layer.prefix or 'FusedMoE'}.{name}: {what}")


class Fp8MethodBase(FusedMoEMethodBase):
    """What the fp8 schemes share: fp8 weights, scale checks, the reference math and the Triton call.
    Subclasses set `weight_granularity` / `act_granularity` and the scale parameters."""

    compute_dtype: ClassVar[str] = "fp8"
    weight_granularity: ClassVar[str] = ""
    act_granularity: ClassVar[str] = ""
    supports_static: ClassVar[bool] = False

    def __init__(self, config, moe):
        super().__init__(config, moe)
        if config.activation_scheme == "static" and not self.supports_static:
            raise ValueError(f"{self.name}: activation_scheme='static' is only supported by fp8-tensor "
                             f"(its activations are quantized dynamically)")
        if config.online and config.activation_scheme == "static":
            raise ValueError(f"{self.name}: online quantization cannot provide static input scales; use "
                             f"activation_scheme='dynamic'")
        self.static = config.activation_scheme == "static"
        self.processed = False

    # --- parameters -----------------------------------------------------------------------------------------
    def create_weights(self, layer) -> None:
        E, H, I = self.moe.num_local_experts, self.moe.hidden_size, self.moe.intermediate_size_per_partition
        if self.config.online:
            dt = self.moe.params_dtype
            self.register(layer, "w13_weight", torch.zeros(E, 2 * I, H, dtype=dt), LoadSpec("stacked"))
            self.register(layer, "w2_weight", torch.zeros(E, H, I, dtype=dt), LoadSpec("stacked"))
        else:
            self.create_checkpoint_params(layer)
        self.create_bias(layer)

    def store_rtn(self, layer, w13, w2, quantize) -> None:
        """Checkpoint params holding quantize(w) -> (fp8 weight, its scale) of the whole w13 and w2 stacks (one call
        each: the per-channel and block quantizers work on [E, N, K] at once)."""
        self.create_checkpoint_params(layer, w13.device)
        for p, w in (("w13", w13), ("w2", w2)):
            q, s = quantize(w)
            getattr(layer, f"{p}_weight").data.copy_(q)
            getattr(layer, f"{p}_weight_scale").data.copy_(s)

    def create_checkpoint_params(self, layer, device: torch.device | None = None) -> None:
        if device is not None:
            with torch.device(device):
                return self.create_checkpoint_params(layer)
        E, H, I = self.moe.num_local_experts, self.moe.hidden_size, self.moe.intermediate_size_per_partition
        self.register(layer, "w13_weight", torch.zeros(E, 2 * I, H, dtype=fm.FP8_DTYPE), LoadSpec("stacked"))
        self.register(layer, "w2_weight", torch.zeros(E, H, I, dtype=fm.FP8_DTYPE), LoadSpec("stacked"))
        self.create_scale_params(layer)
        if self.static:
            nan = lambda: torch.full((E,), float("nan"))  # noqa: E731  (never loaded stays NaN, never 0)
            self.register(layer, "w13_input_scale", nan(), LoadSpec("per_expert_max"))
            self.register(layer, "w2_input_scale", nan(), LoadSpec("per_expert_max"))
        self.processed = False

    def create_scale_params(self, layer) -> None:
        raise NotImplementedError

    # --- loading --------------------------------------------------------------------------------------------
    def process_weights_after_loading(self, layer) -> None:
        if self.processed:
            return
        if self.config.online and layer.w13_weight.dtype != fm.FP8_DTYPE:  # full precision as loaded: RTN now
            self.quantize_dense(layer, layer.w13_weight.data, layer.w2_weight.data)
        for name in ("w13_weight_scale", "w2_weight_scale"):
            self.check_scale(layer, name, getattr(layer, name).data)
        self.to_kernel_layout(layer)
        if self.static:
            for name in ("w13_input_scale", "w2_input_scale"):
                self.collapse_input_scale(layer, name)
        self.processed = True

    def check_scale(self, layer, name: str, s: torch.Tensor) -> None:
        """Every scale finite and > 0; the error names the tensor, the expert (global id) and the shard."""
        bad = ~(torch.isfinite(s) & (s > 0))
        if not bad.any():
            return
        idx = bad.nonzero()[0].tolist()
        e = layer.global_expert_id(idx[0])
        shard = ""
        if name.startswith("w13_"):
            half = s.shape[1] // 2 if s.dim() > 1 else 1
            shard = f" (shard {'w1' if len(idx) > 1 and idx[1] < half else 'w3' if len(idx) > 1 else 'w1/w3'})"
        raise _fail(layer, name, f"expert {e}{shard}: scale {s[tuple(idx)].item()} at index {tuple(idx[1:])} is not "
                                 f"finite and positive (shape {tuple(s.shape)}); a zero or non-finite weight scale "
                                 f"cannot dequantize")

    def collapse_input_scale(self, layer, name: str) -> None:
        """Per-expert static input scales [E] -> their max [1]; NaN means never loaded (an error, never 0)."""
        s = getattr(layer, name).data.float()
        missing = torch.isnan(s).nonzero().flatten().tolist()
        if missing:
            raise _fail(layer, name, f"expert {layer.global_expert_id(missing[0])}: input scale missing (never loaded; "
                                     f"expected one value per expert, shape [{s.numel()}]); a static fp8 scheme needs "
                                     f"input_scale for every expert (or use activation_scheme='dynamic')")
        bad = (~(torch.isfinite(s) & (s > 0))).nonzero().flatten().tolist()
        if bad:
            raise _fail(layer, name, f"expert {layer.global_expert_id(bad[0])}: input scale {s[bad[0]].item()} is not "
                                     f"finite and positive")
        if not torch.all(s == s[0]):
            warnings.warn(f"{layer.prefix or 'FusedMoE'}.{name}: per-expert input scales differ "
                          f"(min {s.min().item():.4g}, max {s.max().item():.4g}); using their max for all experts",
                          stacklevel=3)
        self.register(layer, name, s.max().reshape(1), None)

    def to_kernel_layout(self, layer) -> None:
        raise NotImplementedError

    # --- math -----------------------------------------------------------------------------------------------
    def weight_scale(self, layer, name: str, e: int) -> torch.Tensor:
        """Expert e's scale in kernel layout, shaped to broadcast against its weight."""
        raise NotImplementedError

    def dequantize_expert(self, layer, e: int):
        w13 = fm.dequantize_fp8(layer.w13_weight[e], self.weight_scale(layer, "w13_weight_scale", e))
        w2 = fm.dequantize_fp8(layer.w2_weight[e], self.weight_scale(layer, "w2_weight_scale", e))
        return w13, w2

    def input_scale(self, layer, stage: int) -> torch.Tensor | None:
        if not self.static:
            return None
        return getattr(layer, "w13_input_scale" if stage == 1 else "w2_input_scale")

    def act_quant_ref(self, layer, a, stage: int):
        return fm.act_fake_quant(a, self.act_granularity, self.input_scale(layer, stage)).to(a.dtype)

    def routes_in_kernel(self, layer, x):
        """On the rows GEMV (kernels.fp8_gemm.rows_gemv) GEMM1 routes (kernels.gemv.gemv_routes)."""
        from moequant.kernels.fp8_gemm import Fp8Layout, rows_gemv
        from moequant.kernels.gemv import gemv_routes

        return self.processed and gemv_routes(x.shape[0]) and rows_gemv(
            x.shape[0], layer.w13_weight, layer.w2_weight, layer.w13_weight_scale, layer.w2_weight_scale,
            Fp8Layout(self.weight_granularity, self.act_granularity))

    def apply_triton(self, layer, x, topk_weights, topk_ids, route=None):
        from moequant.kernels.fp8_gemm import Fp8Layout, fused_experts_fp8

        return fused_experts_fp8(
            x, layer.w13_weight, layer.w2_weight, layer.w13_weight_scale, layer.w2_weight_scale,
            topk_weights, topk_ids, Fp8Layout(self.weight_granularity, self.act_granularity),
            a13_scale=self.input_scale(layer, 1), a2_scale=self.input_scale(layer, 2),
            activation=self.moe.activation,
            w13_bias=getattr(layer, "w13_bias", None), w2_bias=getattr(layer, "w2_bias", None),
            apply_router_weight_on_input=layer.apply_router_weight_on_input,
            has_remote_experts=layer.expert_map is not None, route=route,
        )


@register_method("fp8-tensor")
class Fp8TensorMoEMethod(Fp8MethodBase):
    """fp8 weights with one scale per expert and shard; fp8 activations per tensor (static or dynamic)."""

    weight_granularity = "tensor"
    act_granularity = "tensor"
    supports_static = True

    def create_scale_params(self, layer) -> None:
        E = self.moe.num_local_experts
        self.register(layer, "w13_weight_scale", torch.ones(E, 2), LoadSpec("per_shard"))
        self.register(layer, "w2_weight_scale", torch.ones(E), LoadSpec("per_shard"))

    def to_kernel_layout(self, layer) -> None:
        s13 = layer.w13_weight_scale.data.float()
        half = layer.w13_weight.shape[1] // 2
        w13 = layer.w13_weight.data
        q1, q3, s = fm.requantize_shared(w13[:, :half], s13[:, :1, None], w13[:, half:], s13[:, 1:, None])
        w13[:, :half].copy_(q1)
        w13[:, half:].copy_(q3)
        self.register(layer, "w13_weight_scale", s.reshape(-1).contiguous(), None)
        self.register(layer, "w2_weight_scale", layer.w2_weight_scale.data.float().reshape(-1).contiguous(), None)

    def weight_scale(self, layer, name, e):
        return getattr(layer, name)[e]

    def quantize_dense(self, layer, w13, w2) -> None:
        E, I = w13.shape[0], w13.shape[1] // 2
        self.create_checkpoint_params(layer, w13.device)
        for e in range(E):
            for j, rows in enumerate((slice(0, I), slice(I, 2 * I))):
                q, s = fm.quantize_tensor(w13[e, rows])
                layer.w13_weight.data[e, rows] = q
                layer.w13_weight_scale.data[e, j] = s[0]
            q, s = fm.quantize_tensor(w2[e])
            layer.w2_weight.data[e] = q
            layer.w2_weight_scale.data[e] = s[0]


@register_method("fp8-channel")
class Fp8ChannelMoEMethod(Fp8MethodBase):
    """fp8 weights with one scale per output row; fp8 activations per token (dynamic)."""

    weight_granularity = "channel"
    act_granularity = "token"

    def create_scale_params(self, layer) -> None:
        E, H, I = self.moe.num_local_experts, self.moe.hidden_size, self.moe.intermediate_size_per_partition
        self.register(layer, "w13_weight_scale", torch.ones(E, 2 * I, 1), LoadSpec("stacked"))
        self.register(layer, "w2_weight_scale", torch.ones(E, H, 1), LoadSpec("stacked", shard_w2=False))

    def to_kernel_layout(self, layer) -> None:
        for name in ("w13_weight_scale", "w2_weight_scale"):
            self.register(layer, name, getattr(layer, name).data.float().squeeze(-1).contiguous(), None)

    def weight_scale(self, layer, name, e):
        return getattr(layer, name)[e][:, None]

    def quantize_dense(self, layer, w13, w2) -> None:
        self.store_rtn(layer, w13, w2, fm.quantize_channel)


from moequant.methods import fp8_block  # noqa: E402,F401  (registers fp8-block)
