"""Integer weight-only MoE methods: `w4a16`, `w4a16-asym`, `w8a16` (group size 32/64/128 or per channel, optional
act-order g_idx). Activations stay bf16/fp16.

E experts (local), H hidden, I_p intermediate per rank, I = I_p * tp, G group size (H or I for per channel),
b bits, P = 32 / b values per int32 word.
Checkpoint layout (compressed-tensors pack-quantized names, w13_/w2_ prefixed; what weight_loader fills):
  w13_weight_packed int32 [E, 2I_p, H/P], w2_weight_packed int32 [E, H, I_p/P]  (q + 2^(b-1), lowest bits first)
  w13_weight_scale [E, 2I_p, H/G], w2_weight_scale [E, H, I_p/G] (with act-order: [E, H, I/G], not sharded by tp)
  w13_weight_zero_point int32 [E, 2I_p/P, H/G], w2_weight_zero_point [E, H/P, I_p/G | I/G]  (asymmetric only)
  w13_weight_shape int64 [E, 2, 2] (w1, w3), w2_weight_shape [E, 2]  (checked against the layer's geometry)
  w13_weight_g_idx int32 [E, H], w2_weight_g_idx [E, I_p]  (act-order only; group of each input channel)
Kernel layout (after process_weights_after_loading):
  *_weight_packed: same words, but with act-order the input channels are sorted by group (stable), so every group is
    contiguous; *_sort_idx int32 [E, K] keeps, for sorted position j, the original input channel (the GEMMs read a
    per-slot copy of the activations in sorted order, kernels/gather.py); *_weight_g_idx becomes the sorted g_idx
    (non-decreasing).
  *_weight_zero_point: unpacked, int8 [E, N, groups]; scales keep their values (params dtype).
  Words, scales and zero points are stored rows-contiguous (N stride 1, methods.base.rows_contiguous): the decode
  GEMV loads one packed column of several rows per vector load, and its scale loads then share the words' register
  layout (K-contiguous scales made Triton move every step's products through shared memory).
Dequantized w[n, k_sorted] = (q - zp[n, g]) * scale[n, g], g = g_idx_sorted[k_sorted] (k // G without act-order).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from moequant.methods.base import FusedMoEMethodBase, LoadSpec, rows_contiguous
from moequant.quantize import int_math as im
from moequant.registry import register_method


def _fail(layer, name: str, what: str) -> ValueError:
    return ValueError(f"{layer.prefix or 'FusedMoE'}.{name}: {what}")


def _pname(layer, param) -> str:
    from moequant.weight_loading import param_name

    return param_name(layer, param)


def _load_packed(layer, param, loaded, shard_id, e, tp_rank, tp_size) -> None:
    """Stacked load of weight_packed with an error that names weight_shape when the words do not fit."""
    name = _pname(layer, param)
    m = layer.quant_method
    dst = param.data[e]
    if loaded.dtype != torch.int32:
        raise _fail(layer, name, f"expert {e} shard {shard_id}: expected int32 packed words, got {loaded.dtype}")
    if shard_id in ("w1", "w3"):
        half = dst.shape[0] // 2
        want = (half * tp_size, dst.shape[1])
        logical = (half * tp_size, m.moe.hidden_size)
    else:
        want = (dst.shape[0], dst.shape[1] * tp_size)
        logical = (dst.shape[0], m.moe.intermediate_size_per_partition * tp_size)
    if tuple(loaded.shape) != want:
        raise _fail(layer, name, f"expert {e} shard {shard_id}: packed shape {tuple(loaded.shape)} does not match "
                                 f"weight_shape {list(logical)} at {m.bits} bits (expected {list(want)}; a different "
                                 f"bit width or scheme between w1/w3/w2?)")
    if shard_id in ("w1", "w3"):
        part = loaded.narrow(0, tp_rank * half, half)
        (dst[:half] if shard_id == "w1" else dst[half:]).copy_(part)
    else:
        dst.copy_(loaded.narrow(1, tp_rank * dst.shape[1], dst.shape[1]))


def _load_shape(layer, param, loaded, shard_id, e, tp_rank, tp_size) -> None:
    """weight_shape is per-expert metadata: check it equals the layer's (full, unsharded) geometry."""
    H, I = layer.quant_method.moe.hidden_size, layer.quant_method.moe.intermediate_size_per_partition * tp_size
    want = [H, I] if shard_id == "w2" else [I, H]
    got = [int(v) for v in loaded.flatten().tolist()]
    if got != want:
        raise _fail(layer, _pname(layer, param), f"expert {e} shard {shard_id}: weight_shape {got} does not match the "
                                                 f"layer, expected {want}")
    dst = param.data[e]
    if shard_id == "w2":
        dst.copy_(torch.tensor(want, device=dst.device))
    else:
        dst[0 if shard_id == "w1" else 1].copy_(torch.tensor(want, device=dst.device))


def _load_g_idx(layer, param, loaded, shard_id, e, tp_rank, tp_size) -> None:
    """w13: g_idx [H] shared by w1 and w3 (same input x, so the same act-order); w2: g_idx [I] sliced by tp rank."""
    name = _pname(layer, param)
    dst = param.data[e]
    n = dst.shape[0] * (tp_size if shard_id == "w2" else 1)
    if loaded.dim() != 1 or loaded.shape[0] != n or loaded.dtype.is_floating_point:
        raise _fail(layer, name, f"expert {e} shard {shard_id}: expected an integer g_idx of shape [{n}], got "
                                 f"{loaded.dtype} {tuple(loaded.shape)}")
    if shard_id == "w2":
        dst.copy_(loaded.narrow(0, tp_rank * dst.shape[0], dst.shape[0]).to(torch.int32))
        return
    seen = layer.quant_method._g13_seen
    if e in seen and not torch.equal(dst, loaded.to(device=dst.device, dtype=torch.int32)):
        raise _fail(layer, name, f"expert {e}: w1 and w3 carry different g_idx; they share the input, so act-order "
                                 f"must give them the same grouping")
    seen.add(e)
    dst.copy_(loaded.to(torch.int32))


class IntWeightOnlyMethod(FusedMoEMethodBase):
    """Group-wise int weights, bf16/fp16 activations; see the module docstring for the layouts."""

    bits: ClassVar[int] = 4
    symmetric: ClassVar[bool] = True

    def __init__(self, config, moe):
        super().__init__(config, moe)
        H, Ip = moe.hidden_size, moe.intermediate_size_per_partition
        G = config.group_size
        if G is not None and G not in (32, 64, 128):
            raise ValueError(f"{self.name}: group_size must be 32, 64, 128 or None (per channel), got {G}")
        if config.act_order and G is None:
            raise ValueError(f"{self.name}: act_order needs a group size (g_idx is meaningless per channel)")
        if not config.symmetric and self.symmetric:
            raise ValueError(f"{self.name}: symmetric=False given; use scheme 'w4a16-asym'")
        per = 32 // self.bits
        w2_k = Ip * moe.tp_size if config.act_order else Ip
        for what, k in (("hidden_size", H), ("intermediate_size_per_partition", Ip)):
            if k % per:
                raise ValueError(f"{self.name}: {what}={k} must be a multiple of {per} to pack {self.bits}-bit values")
        if G is not None:
            for what, k in (("hidden_size", H), ("intermediate size of w2's groups", w2_k)):
                if k % G:
                    raise ValueError(f"{self.name}: group_size {G} does not divide {what}={k}")
            if not config.act_order and Ip % G:
                raise ValueError(f"{self.name}: group_size {G} does not divide intermediate_size_per_partition={Ip}")
        if not self.symmetric and Ip % per:
            raise ValueError(f"{self.name}: zero points pack {per} output rows a word; I_p={Ip} must be a multiple")
        self.act_order = config.act_order
        self.processed = False
        self._g13_seen: set[int] = set()
        self.uniform_groups: dict[str, bool] = {}

    # --- geometry -------------------------------------------------------------------------------------------
    def groups(self, k: int) -> int:
        return 1 if self.config.group_size is None else k // self.config.group_size

    def w2_full_k(self) -> int:
        Ip = self.moe.intermediate_size_per_partition
        return Ip * self.moe.tp_size if (self.act_order or self.config.group_size is None) else Ip

    # --- parameters -----------------------------------------------------------------------------------------
    def create_weights(self, layer) -> None:
        self.create_checkpoint_params(layer)
        self.create_bias(layer)

    def create_checkpoint_params(self, layer, device=None) -> None:
        E, H, Ip = self.moe.num_local_experts, self.moe.hidden_size, self.moe.intermediate_size_per_partition
        per, dt = 32 // self.bits, self.moe.params_dtype
        kw = {"device": device}
        g13 = self.groups(H)
        g2 = self.groups(self.w2_full_k()) if (self.act_order or self.config.group_size is None) else self.groups(Ip)
        w2_sharded = not (self.act_order or self.config.group_size is None)
        packed = LoadSpec("custom", loader=_load_packed)
        self.register(layer, "w13_weight_packed", torch.zeros(E, 2 * Ip, H // per, dtype=torch.int32, **kw), packed)
        self.register(layer, "w2_weight_packed", torch.zeros(E, H, Ip // per, dtype=torch.int32, **kw), packed)
        self.register(layer, "w13_weight_scale", torch.ones(E, 2 * Ip, g13, dtype=dt, **kw), LoadSpec("stacked"))
        self.register(layer, "w2_weight_scale", torch.ones(E, H, g2, dtype=dt, **kw),
                      LoadSpec("stacked", shard_w2=w2_sharded))
        shape = LoadSpec("custom", loader=_load_shape)
        self.register(layer, "w13_weight_shape", torch.zeros(E, 2, 2, dtype=torch.int64, **kw), shape)
        self.register(layer, "w2_weight_shape", torch.zeros(E, 2, dtype=torch.int64, **kw), shape)
        if not self.symmetric:
            self.register(layer, "w13_weight_zero_point", torch.zeros(E, 2 * Ip // per, g13, dtype=torch.int32, **kw),
                          LoadSpec("stacked"))
            self.register(layer, "w2_weight_zero_point", torch.zeros(E, H // per, g2, dtype=torch.int32, **kw),
                          LoadSpec("stacked", shard_w2=w2_sharded))
        if self.act_order:
            gspec = LoadSpec("custom", loader=_load_g_idx)
            self.register(layer, "w13_weight_g_idx", torch.full((E, H), -1, dtype=torch.int32, **kw), gspec)
            self.register(layer, "w2_weight_g_idx", torch.full((E, Ip), -1, dtype=torch.int32, **kw), gspec)
        self.processed = False
        self._g13_seen = set()

    # --- loading --------------------------------------------------------------------------------------------
    def process_weights_after_loading(self, layer) -> None:
        if self.processed:
            return
        for name in ("w13_weight_scale", "w2_weight_scale"):
            s = getattr(layer, name).data
            bad = ~(torch.isfinite(s) & (s > 0))
            if bad.any():
                idx = bad.nonzero()[0].tolist()
                raise _fail(layer, name, f"expert {layer.global_expert_id(idx[0])}: scale at {tuple(idx[1:])} is "
                                         f"{s[tuple(idx)].item()}, expected finite and positive")
        H, Ip = self.moe.hidden_size, self.moe.intermediate_size_per_partition
        for p, k, n in (("w13", H, 2 * Ip), ("w2", Ip, H)):
            packed = getattr(layer, f"{p}_weight_packed").data
            if not self.symmetric:
                zp = im.unpack_int32(getattr(layer, f"{p}_weight_zero_point").data, self.bits, n, dim=0)
                self.register(layer, f"{p}_weight_zero_point", rows_contiguous(zp), None)
            if self.act_order:
                g = getattr(layer, f"{p}_weight_g_idx").data
                ng = getattr(layer, f"{p}_weight_scale").shape[-1]
                full = p == "w13" or self.moe.tp_size == 1
                for e in range(g.shape[0]):
                    im.check_g_idx(g[e], ng, f"{layer.prefix or 'FusedMoE'}.{p}_weight_g_idx[expert "
                                             f"{layer.global_expert_id(e)}]", full_cover=full)
                sort_idx = torch.argsort(g.long(), dim=-1, stable=True)
                q = im.unpack_int32(packed, self.bits, k)
                q = torch.gather(q, 2, sort_idx[:, None, :].expand(-1, n, -1))
                self.register(layer, f"{p}_weight_packed", im.pack_int32(q.contiguous(), self.bits), None)
                self.register(layer, f"{p}_weight_g_idx", torch.gather(g, 1, sort_idx).contiguous(), None)
                self.register(layer, f"{p}_sort_idx", sort_idx.to(torch.int32).contiguous(), None)
                if p == "w2":  # GEMM1's decode kernel writes its output in this order (inverse permutation)
                    self.register(layer, "w2_inv_sort_idx", torch.argsort(sort_idx, dim=-1).to(torch.int32), None)
                # equal-size groups after the sort: the kernel reads scales by k // G (decided once, here)
                ref = im.default_g_idx(k, self.config.group_size, g.device)
                self.uniform_groups[p] = bool((getattr(layer, f"{p}_weight_g_idx").data == ref).all())
            for name in ("weight_packed", "weight_scale"):
                self.register(layer, f"{p}_{name}", rows_contiguous(getattr(layer, f"{p}_{name}").data), None)
        self.processed = True

    # --- math -----------------------------------------------------------------------------------------------
    def _dequant(self, layer, p: str, e: int, k: int) -> torch.Tensor:
        q = im.unpack_int32(getattr(layer, f"{p}_weight_packed")[e], self.bits, k)
        s = getattr(layer, f"{p}_weight_scale")[e]
        zp = None if self.symmetric else getattr(layer, f"{p}_weight_zero_point")[e]
        if not self.act_order:
            G = k if self.config.group_size is None else self.config.group_size
            return im.dequantize(q, s, zp, group_size=G)
        w_sorted = im.dequantize(q, s, zp, g_idx=getattr(layer, f"{p}_weight_g_idx")[e])
        w = torch.empty_like(w_sorted)
        w[:, getattr(layer, f"{p}_sort_idx")[e].long()] = w_sorted
        return w

    def dequantize_expert(self, layer, e: int):
        if not self.processed:
            raise RuntimeError(f"{self.name}: call process_weights_after_loading before running the layer")
        H, Ip = self.moe.hidden_size, self.moe.intermediate_size_per_partition
        return self._dequant(layer, "w13", e, H), self._dequant(layer, "w2", e, Ip)

    def quantize_dense(self, layer, w13, w2) -> None:
        """RTN per group (g_idx = k // G when act_order: the identity grouping)."""
        if self.act_order and self.moe.tp_size > 1:
            raise ValueError(f"{self.name}: quantize_dense with act_order needs the full w2 (tp_size=1)")
        self.create_checkpoint_params(layer, w13.device)
        E, H, Ip = w13.shape[0], self.moe.hidden_size, self.moe.intermediate_size_per_partition
        G = self.config.group_size
        for e in range(E):
            for p, w in (("w13", w13[e]), ("w2", w2[e])):
                q, s, zp = im.quantize_rtn(w, self.bits, G, self.symmetric)
                getattr(layer, f"{p}_weight_packed").data[e] = im.pack_int32(q, self.bits)
                getattr(layer, f"{p}_weight_scale").data[e] = s.to(self.moe.params_dtype)
                if zp is not None:
                    getattr(layer, f"{p}_weight_zero_point").data[e] = im.pack_int32(zp, self.bits, dim=0)
                if self.act_order:
                    getattr(layer, f"{p}_weight_g_idx").data[e] = im.default_g_idx(w.shape[1], G, w.device)
            layer.w13_weight_shape.data[e] = torch.tensor([Ip, H], device=w13.device)
            layer.w2_weight_shape.data[e] = torch.tensor([H, Ip], device=w13.device)

    def kernel_weights(self, layer, p: str):
        from moequant.kernels.int_gemm import IntWeights

        return IntWeights(
            packed=getattr(layer, f"{p}_weight_packed"), scale=getattr(layer, f"{p}_weight_scale"),
            zero_point=None if self.symmetric else getattr(layer, f"{p}_weight_zero_point"),
            g_idx=getattr(layer, f"{p}_weight_g_idx", None) if self.act_order else None,
            sort_idx=getattr(layer, f"{p}_sort_idx", None) if self.act_order else None,
            uniform_groups=self.uniform_groups.get(p, True),
            inv_sort_idx=getattr(layer, f"{p}_inv_sort_idx", None) if self.act_order else None)

    def slot_column_order(self, layer, x):
        """Act-order on the decode path (kernels.gemv.use_gemv): w13's sort_idx, so that one launch before GEMM1
        writes each slot's x row in its expert's sorted column order (the routing launch, fused_topk_gather, or
        routed_rows when GEMM1 routes), not a gather launch of its own."""
        return layer.w13_sort_idx if self.act_order and self._on_decode_gemv(layer, x.shape[0]) else None

    def routes_in_kernel(self, layer, x):
        """On the decode GEMV: GEMM1 routes (kernels.gemv.gemv_routes); with act-order it reads the slots' rows of x
        in sorted column order from kernels.topk.routed_rows, a launch that does not route."""
        from moequant.kernels.gemv import gemv_routes

        return gemv_routes(x.shape[0]) and self._on_decode_gemv(layer, x.shape[0])

    def _on_decode_gemv(self, layer, T: int) -> bool:
        """Whether T tokens take the decode GEMV (kernels.gemv.use_gemv) with the processed, uniform-group layout."""
        from moequant.kernels.gemv import use_gemv

        return (T > 0 and self.processed and all(self.uniform_groups.get(p, True) for p in ("w13", "w2"))
                and use_gemv(T, layer.top_k, layer.local_num_experts))

    def apply_triton(self, layer, x, topk_weights, topk_ids, slot_rows=None, route=None):
        from moequant.kernels.int_gemm import IntLayout, fused_experts_int

        if not self.processed:
            raise RuntimeError(f"{self.name}: call process_weights_after_loading before running the layer")
        layout = IntLayout(bits=self.bits, group_size=self.config.group_size, symmetric=self.symmetric,
                           act_order=self.act_order)
        return fused_experts_int(
            x, self.kernel_weights(layer, "w13"), self.kernel_weights(layer, "w2"), topk_weights, topk_ids, layout,
            activation=self.moe.activation,
            w13_bias=getattr(layer, "w13_bias", None), w2_bias=getattr(layer, "w2_bias", None),
            apply_router_weight_on_input=layer.apply_router_weight_on_input,
            has_remote_experts=layer.expert_map is not None, slot_rows=slot_rows, route=route,
        )


@register_method("w4a16")
class W4A16MoEMethod(IntWeightOnlyMethod):
    """int4 symmetric weights (q in [-8, 7]) per group; bf16/fp16 activations."""

    bits = 4
    symmetric = True


@register_method("w4a16-asym")
class W4A16AsymMoEMethod(IntWeightOnlyMethod):
    """int4 weights with int4 zero points per group; bf16/fp16 activations."""

    bits = 4
    symmetric = False


@register_method("w8a16")
class W8A16MoEMethod(IntWeightOnlyMethod):
    """int8 symmetric weights (q in [-128, 127]) per group; bf16/fp16 activations."""

    bits = 8
    symmetric = True
