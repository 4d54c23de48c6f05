"""FP4 MoE methods: `nvfp4` (fp4 weights + fp4-emulated activations), `nvfp4a16` (fp4 weights, 16-bit activations)
and `mxfp4` (fp4 weights with E8M0 scales per 32, 16-bit activations; gpt-oss).

E experts (local), H hidden, I intermediate per rank. Checkpoint layout (compressed-tensors names, w13_/w2_ prefixed):
  w13_weight_packed uint8 [E, 2I, H/2], w2_weight_packed uint8 [E, H, I/2] (even element in the low nibble)
  nvfp4*: w13_weight_scale fp8 e4m3 [E, 2I, H/16], w2_weight_scale fp8 [E, H, I/16];
          w13_weight_scale_2 fp32 [E, 2] (w1, w3), w2_weight_scale_2 fp32 [E] (ModelOpt: x = fp4 * scale * scale_2);
          compressed-tensors' w13_/w2_weight_global_scale (= 1 / scale_2) load into the same parameters through
          size-0 alias parameters. nvfp4 only: w13_input_scale / w2_input_scale fp32 [E] (ModelOpt meaning,
          amax / (6*448); max of w1's and w3's), aliases w13_/w2_input_global_scale (the reciprocal).
  mxfp4:  w13_weight_scale uint8 E8M0 [E, 2I, H/32], w2_weight_scale uint8 [E, H, I/32] (x = fp4 * 2^(s-127)).
  Biases (has_bias): w13_bias [E, 2I], w2_bias [E, H] (the loaders de-interleave gpt-oss's gate/up columns).
Kernel layout (after process_weights_after_loading): the same tensors, with
  w13_weight_packed / w2_weight_packed and the block scales rows-contiguous (N stride 1), the packed bytes in the
  decode layout (kernels.fp4_word_layout: the 32 bits of each word of four rows permuted so that a GPU decodes
  them into bf16 in nine instructions; packed_bytes gives an expert's bytes back in the checkpoint's layout; the
  layer's fp4_decode_layout buffer, saved with its state dict, says the bytes are permuted),
  w13_weight_scale_2 [E, 2] holding one shared value per expert in both columns (the half with the smaller checkpoint
  value has its block scales requantized to the larger); dead experts (zero / NaN / inf scales) zeroed with a warning;
  nvfp4: w13_input_scale / w2_input_scale collapsed to [1] = the max over experts (NaN = dynamic per-tensor).
"""

from __future__ import annotations

import logging
import warnings
from typing import ClassVar

import torch

from moequant.kernels.fp4_word_layout import byte_layout, decode_layout
from moequant.methods.base import FusedMoEMethodBase, LoadSpec, rows_contiguous
from moequant.quantize import fp4_math as f4
from moequant.registry import register_method

log = logging.getLogger(__name__)


def _fail(layer, name: str, what: str) -> ValueError:
    return ValueError(f"{layer.prefix or 'FusedMoE'}.{name}: {what}")


def _reciprocal_loader(target: str, combine: str):
    """Custom loader of a compressed-tensors alias: writes 1 / value into `target` (per shard or max per expert) and
    records the load under the target's name for the completeness check."""

    def load(layer, param, loaded, shard_id, local_expert, tp_rank, tp_size) -> None:
        if loaded.numel() != 1:
            raise _fail(layer, target, f"expert {local_expert} shard {shard_id}: expected a single value for its "
                                       f"compressed-tensors reciprocal, got shape {tuple(loaded.shape)}")
        value = 1.0 / loaded.float().reshape(())
        dst = getattr(layer, target).data[local_expert]
        if combine == "max":
            dst.copy_(value if torch.isnan(dst) else torch.maximum(dst, value))
        elif shard_id == "w2":
            dst.copy_(value)
        else:
            dst[0 if shard_id == "w1" else 1] = value
        layer._loaded.add((target, local_expert, shard_id))

    return load


class Fp4MethodBase(FusedMoEMethodBase):
    """Shared by the fp4 schemes: packed weights, dead-expert handling, reference math, the Triton call."""

    group: ClassVar[int] = f4.NVFP4_GROUP
    act_fp4: ClassVar[bool] = False

    def __init__(self, config, moe):
        super().__init__(config, moe)
        if config.online:
            raise ValueError(f"{self.name}: online quantization is not supported; load an fp4 checkpoint or call "
                             f"layer.load_dense_weights (RTN)")
        if config.group_size not in (None, self.group):
            raise ValueError(f"{self.name}: group_size must be {self.group} (or None), got {config.group_size}")
        H, I = moe.hidden_size, moe.intermediate_size_per_partition
        for what, n in (("hidden_size", H), ("intermediate_size_per_partition", I)):
            if n % self.group:
                raise ValueError(f"{self.name}: {what}={n} must be a multiple of the scale group size {self.group}")
        self.processed = False

    def create_weights(self, layer) -> None:
        E, H, I = self.moe.num_local_experts, self.moe.hidden_size, self.moe.intermediate_size_per_partition
        self.register(layer, "w13_weight_packed", torch.zeros(E, 2 * I, H // 2, dtype=torch.uint8), LoadSpec("stacked"))
        self.register(layer, "w2_weight_packed", torch.zeros(E, H, I // 2, dtype=torch.uint8), LoadSpec("stacked"))
        self.register(layer, "w13_weight_scale", torch.zeros(E, 2 * I, H // self.group, dtype=self.scale_dtype),
                      LoadSpec("stacked"))
        self.register(layer, "w2_weight_scale", torch.zeros(E, H, I // self.group, dtype=self.scale_dtype),
                      LoadSpec("stacked"))
        self.create_extra(layer)
        self.create_bias(layer)
        # 1 once the packed bytes are in the decode layout; saved with the state dict, so that a processed layer's
        # state loaded into a fresh layer is not permuted a second time by its process_weights_after_loading
        layer.register_buffer("fp4_decode_layout", torch.zeros((), dtype=torch.uint8))
        self.processed = False

    scale_dtype: ClassVar[torch.dtype] = f4.FP8_DTYPE

    def create_extra(self, layer) -> None:
        """Scheme-specific parameters beyond packed weights and block scales."""

    # --- loading --------------------------------------------------------------------------------------------
    def process_weights_after_loading(self, layer) -> None:
        if self.processed:
            return
        self.fix_dead_experts(layer)
        self.finish(layer)
        permuted = self.in_decode_layout(layer)  # a processed layer's state dict, loaded here
        for p in ("w13", "w2"):  # bytes and block scales rows-contiguous: the GEMV reads four rows per 32-bit word
            name = f"{p}_weight_scale"
            self.register(layer, name, rows_contiguous(getattr(layer, name).data), None)
            name = f"{p}_weight_packed"  # in the kernels' decode layout (bits of each four-row word permuted)
            packed = rows_contiguous(getattr(layer, name).data)
            self.register(layer, name, packed if permuted else decode_layout(packed, inplace=True), None)
        layer.fp4_decode_layout.fill_(1)
        self.processed = True

    def in_decode_layout(self, layer) -> bool:
        """Whether the packed bytes are in the decode layout: after processing, or loaded from a processed layer's
        state dict (its fp4_decode_layout buffer)."""
        return self.processed or bool(layer.fp4_decode_layout)

    def packed_bytes(self, layer, prefix: str, e: int) -> torch.Tensor:
        """Expert e's fp4 bytes [N, K/2] in the checkpoint's layout (the reference's input), whether or not
        process_weights_after_loading has moved them to the decode layout."""
        packed = getattr(layer, f"{prefix}_weight_packed")[e]
        if not self.in_decode_layout(layer):
            return packed
        if packed.stride(0) != 1:  # a processed layer's state dict in a layer that has not processed its own yet
            packed = rows_contiguous(packed[None])[0]
        return byte_layout(packed)

    def dead_mask(self, layer, prefix: str) -> torch.Tensor:
        """[E] bool: experts whose `prefix` scales cannot dequantize."""
        raise NotImplementedError

    def fix_dead_experts(self, layer) -> None:
        """Experts calibration never reached (zero / NaN / inf scales): warn per expert and zero their weights, so
        their output is defined (act(0) = 0 plus biases), never NaN."""
        for prefix in ("w13", "w2"):
            dead = self.dead_mask(layer, prefix)
            for e in dead.nonzero().flatten().tolist():
                warnings.warn(f"{layer.prefix or 'FusedMoE'}.{prefix}: expert {layer.global_expert_id(e)} has zero, "
                              f"NaN or infinite scales (never calibrated?); its {prefix} weights are treated as zero",
                              stacklevel=2)
                self.zero_expert(layer, prefix, e)

    def zero_expert(self, layer, prefix: str, e: int) -> None:
        getattr(layer, f"{prefix}_weight_packed").data[e].zero_()
        getattr(layer, f"{prefix}_weight_scale").data[e].zero_()

    def finish(self, layer) -> None:
        """Scheme-specific conversion after dead experts are handled."""

    # --- math -----------------------------------------------------------------------------------------------
    def routes_in_kernel(self, layer, x):
        """nvfp4a16 on the decode GEMV: GEMM1 routes (kernels.gemv.gemv_routes). Not nvfp4 (its fp4 activations go
        through another GEMV kernel, which does not route) and not mxfp4: on the H200 routing in GEMM1 made
        nvfp4a16 1.0 us faster on Qwen3-30B at M=1 (20.3 -> 19.1-19.3 us) and mxfp4 slower (Qwen3-30B M=1 19.7 ->
        20.1-20.4, its GEMM1 on 8 warps, whose top-k crosses more warps; Mixtral M=8 441 -> 457)."""
        from moequant.kernels.gemv import gemv_routes, use_gemv

        T = x.shape[0]
        return (not self.act_fp4 and self.scale_dtype != torch.uint8 and gemv_routes(T)
                and use_gemv(T, layer.top_k, layer.local_num_experts, slots_per_expert=2))

    def apply_triton(self, layer, x, topk_weights, topk_ids, route=None):
        from moequant.kernels.fp4_gemm import fused_experts_fp4

        return fused_experts_fp4(
            x, layer.w13_weight_packed, layer.w13_weight_scale, layer.w2_weight_packed, layer.w2_weight_scale,
            topk_weights, topk_ids, scale_kind="e8m0" if self.scale_dtype == torch.uint8 else "fp8",
            w13_scale_2=getattr(layer, "w13_weight_scale_2", None),
            w2_scale_2=getattr(layer, "w2_weight_scale_2", None),
            w13_input_scale=getattr(layer, "w13_input_scale", None) if self.act_fp4 else None,
            w2_input_scale=getattr(layer, "w2_input_scale", None) if self.act_fp4 else None,
            act_fp4=self.act_fp4, activation=self.moe.activation,
            w13_bias=getattr(layer, "w13_bias", None), w2_bias=getattr(layer, "w2_bias", None),
            apply_router_weight_on_input=layer.apply_router_weight_on_input,
            has_remote_experts=layer.expert_map is not None, route=route,
        )


class Nvfp4Base(Fp4MethodBase):
    def uses_weight_scale_2_pattern(self) -> bool:
        return True

    def create_extra(self, layer) -> None:
        E = self.moe.num_local_experts
        nan = float("nan")
        self.register(layer, "w13_weight_scale_2", torch.full((E, 2), nan), LoadSpec("per_shard"))
        self.register(layer, "w2_weight_scale_2", torch.full((E,), nan), LoadSpec("per_shard"))
        # compressed-tensors spelling: the reciprocal, written into the *_scale_2 parameters (size-0 aliases)
        for p in ("w13", "w2"):
            self.register(layer, f"{p}_weight_global_scale", torch.zeros(0),
                          LoadSpec("custom", required=False, loader=_reciprocal_loader(f"{p}_weight_scale_2", "shard")))

    def dead_mask(self, layer, prefix):
        s2 = getattr(layer, f"{prefix}_weight_scale_2").data.float()
        s2 = s2.reshape(s2.shape[0], -1)
        bad = ~(torch.isfinite(s2) & (s2 > 0)).all(1)
        blocks = getattr(layer, f"{prefix}_weight_scale").data.float()
        return bad | torch.isnan(blocks).flatten(1).any(1)

    def zero_expert(self, layer, prefix, e):
        super().zero_expert(layer, prefix, e)
        getattr(layer, f"{prefix}_weight_scale_2").data[e] = 1.0

    def finish(self, layer) -> None:
        self.share_w13_scale_2(layer)

    def share_w13_scale_2(self, layer) -> None:
        """w1 and w3 of an expert share max(s1, s3); the other half's fp8 block scales are requantized by
        s_small / s_max."""
        s2 = layer.w13_weight_scale_2.data
        target = s2.max(dim=1).values
        differ = (s2[:, 0] != s2[:, 1]).nonzero().flatten().tolist()
        if differ:
            log.warning("%s: w1 and w3 have different weight_scale_2 for %d expert(s) (first: expert %d); requantizing "
                        "the block scales of the smaller half to the larger", layer.prefix or "FusedMoE", len(differ),
                        layer.global_expert_id(differ[0]))
        I = layer.w13_weight_scale.shape[1] // 2
        for e in differ:
            half = 0 if s2[e, 0] < s2[e, 1] else 1
            rows = slice(0, I) if half == 0 else slice(I, 2 * I)
            blk = layer.w13_weight_scale.data[e, rows]
            blk.copy_(f4.rescale_block_scales(blk, s2[e, half] / target[e]))
        s2.copy_(target[:, None].expand_as(s2))

    def dequantize_expert(self, layer, e):
        I = layer.w13_weight_packed.shape[1] // 2
        s2 = layer.w13_weight_scale_2
        w13 = self.packed_bytes(layer, "w13", e)
        w1 = f4.dequantize_nvfp4(w13[:I], layer.w13_weight_scale[e, :I], s2[e, 0])
        w3 = f4.dequantize_nvfp4(w13[I:], layer.w13_weight_scale[e, I:], s2[e, 1])
        w2 = f4.dequantize_nvfp4(self.packed_bytes(layer, "w2", e), layer.w2_weight_scale[e],
                                 layer.w2_weight_scale_2[e])
        return torch.cat([w1, w3]), w2

    def quantize_dense(self, layer, w13, w2) -> None:
        """RTN with one global scale per expert matrix (w1 and w3 share it), one expert at a time (the fp32
        temporaries of a whole stack peak near 35 GB for a Mixtral layer)."""
        for prefix, w in (("w13", w13), ("w2", w2)):
            for e in range(w.shape[0]):
                packed, scale, gs = f4.quantize_nvfp4(w[e])
                getattr(layer, f"{prefix}_weight_packed").data[e].copy_(packed)
                getattr(layer, f"{prefix}_weight_scale").data[e].copy_(scale)
                getattr(layer, f"{prefix}_weight_scale_2").data[e].copy_(1.0 / gs)  # broadcast: w1 and w3
        self.processed = False


@register_method("nvfp4a16")
class Nvfp4A16FusedMoEMethod(Nvfp4Base):
    """NVFP4 weights, bf16/fp16 activations."""


@register_method("nvfp4")
class Nvfp4FusedMoEMethod(Nvfp4Base):
    """NVFP4 weights and activations; activations: fp4 values with fp8 scales per 16 under the input global scale
    (static from the checkpoint, or dynamic per tensor when the checkpoint has none). Hopper emulates the fp4 dot."""

    act_fp4: ClassVar[bool] = True

    def create_extra(self, layer) -> None:
        super().create_extra(layer)
        E = self.moe.num_local_experts
        for p in ("w13", "w2"):
            self.register(layer, f"{p}_input_scale", torch.full((E,), float("nan")),
                          LoadSpec("per_expert_max", required=False))
            self.register(layer, f"{p}_input_global_scale", torch.zeros(0),
                          LoadSpec("custom", required=False, loader=_reciprocal_loader(f"{p}_input_scale", "max")))

    def finish(self, layer) -> None:
        super().finish(layer)
        for p in ("w13", "w2"):
            self.collapse_input_scale(layer, f"{p}_input_scale")

    def collapse_input_scale(self, layer, name: str) -> None:
        """[E] -> [1] = max over experts. None loaded: dynamic per-tensor scales, unless the config asks
        for static ones. Some missing: an error naming the expert. Zero / NaN / inf (uncalibrated): warned and
        skipped."""
        p = getattr(layer, name)
        s = p.data.float()
        if s.numel() == 1:
            return
        from moequant.weight_loading import expected_shards

        done = getattr(layer, "_loaded", set())
        loaded = torch.tensor([all((name, e, sh) in done for sh in expected_shards(name)) for e in range(s.numel())],
                              device=s.device)
        if not loaded.any():
            if self.config.activation_scheme == "static":
                raise _fail(layer, name, "activation_scheme='static' but no input scale was loaded")
            p.data = torch.full((1,), float("nan"), device=s.device)
            return
        if not loaded.all():
            e = (~loaded).nonzero()[0, 0].item()
            raise _fail(layer, name, f"expert {layer.global_expert_id(e)}: input scale missing (never loaded); "
                                     f"expected input_scale or input_global_scale for every expert")
        good = torch.isfinite(s) & (s > 0)
        for e in (~good).nonzero().flatten().tolist():
            warnings.warn(f"{layer.prefix or 'FusedMoE'}.{name}: expert {layer.global_expert_id(e)} has input scale "
                          f"{s[e].item()} (uncalibrated?); ignored in the max over experts", stacklevel=2)
        if not good.any():
            raise _fail(layer, name, "no expert has a finite positive input scale")
        p.data = s[good].max().reshape(1)

    def input_scale(self, layer, name: str, a: torch.Tensor) -> torch.Tensor:
        s = getattr(layer, name).data
        if s.numel() != 1:
            raise _fail(layer, name, "process_weights_after_loading() has not run")
        return f4.nvfp4_act_scale(a, s)

    def act_quant_ref(self, layer, a, stage):
        name = "w13_input_scale" if stage == 1 else "w2_input_scale"
        return f4.fake_quant_nvfp4_act(a, self.input_scale(layer, name, a))


@register_method("mxfp4")
class Mxfp4FusedMoEMethod(Fp4MethodBase):
    """MXFP4 weights (E8M0 scales per 32), bf16/fp16 activations; gpt-oss uses has_bias and activation swigluoai."""

    group: ClassVar[int] = f4.MXFP4_GROUP
    scale_dtype: ClassVar[torch.dtype] = torch.uint8

    def dead_mask(self, layer, prefix):
        return (getattr(layer, f"{prefix}_weight_scale").data == 255).flatten(1).any(1)  # 255 = E8M0 NaN

    def dequantize_expert(self, layer, e):
        return (f4.dequantize_mxfp4(self.packed_bytes(layer, "w13", e), layer.w13_weight_scale[e]),
                f4.dequantize_mxfp4(self.packed_bytes(layer, "w2", e), layer.w2_weight_scale[e]))

    def quantize_dense(self, layer, w13, w2) -> None:
        """RTN, one expert at a time (bounded fp32 temporaries)."""
        for prefix, w in (("w13", w13), ("w2", w2)):
            for e in range(w.shape[0]):
                packed, scale = f4.quantize_mxfp4(w[e])
                getattr(layer, f"{prefix}_weight_packed").data[e].copy_(packed)
                getattr(layer, f"{prefix}_weight_scale").data[e].copy_(scale)
        self.processed = False
