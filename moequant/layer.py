"""FusedMoE: route tokens to experts, run the method's expert computation, reduce across ranks.

T tokens, E experts (global), E_local on this rank, H hidden, I intermediate (I_p per tensor-parallel rank), K top-k.
Parameters follow vLLM: w13_weight [E_local, 2*I_p, H] (gate rows, then up rows), w2_weight [E_local, H, I_p].
out[t] = sum_k w[t,k] * W2[e] act(W1[e] x[t], W3[e] x[t]),  e = topk_ids[t,k].
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import nn

from moequant.config import QuantConfig
from moequant.methods.base import MoEGeometry
from moequant.parallel import all_reduce_, determine_expert_map
from moequant.registry import get_method
from moequant.weight_loading import SHARD_IDS, check_complete, load_expert_shard

Backend = Literal["auto", "triton", "reference"]
ACTIVATIONS = ("silu", "gelu", "swigluoai")


def _not_implemented(flag: str, value) -> None:
    raise NotImplementedError(f"FusedMoE({flag}={value!r}) is not implemented yet")


class FusedMoE(nn.Module):
    """A Mixture-of-Experts block's experts with a pluggable quantization method (see `moequant.list_methods()`).

    The seed's constructor arguments, plus keyword-only tp_rank / ep_rank (this process's ranks) and backend
    ("auto": Triton on CUDA, the torch reference elsewhere; "triton"; "reference").
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        params_dtype: torch.dtype | None = None,
        reduce_results: bool = False,
        renormalize: bool = True,
        use_grouped_topk: bool = False,
        num_expert_group: int | None = None,
        topk_group: int | None = None,
        quant_config: QuantConfig | str | None = None,
        tp_size: int | None = None,
        ep_size: int | None = None,
        dp_size: int | None = None,
        prefix: str = "",
        custom_routing_function: Callable | None = None,
        scoring_func: str = "softmax",
        routed_scaling_factor: float = 1.0,
        e_score_correction_bias: torch.Tensor | None = None,
        apply_router_weight_on_input: bool = False,
        activation: str = "silu",
        enable_eplb: bool = False,
        num_redundant_experts: int = 0,
        has_bias: bool = False,
        *,
        tp_rank: int = 0,
        ep_rank: int = 0,
        backend: Backend = "auto",
    ):
        super().__init__()
        if enable_eplb:
            _not_implemented("enable_eplb", enable_eplb)
        if num_redundant_experts:
            _not_implemented("num_redundant_experts", num_redundant_experts)
        if dp_size not in (None, 1):
            _not_implemented("dp_size", dp_size)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {scoring_func!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if apply_router_weight_on_input and top_k != 1:
            raise ValueError("apply_router_weight_on_input=True needs top_k == 1")
        if backend not in ("auto", "triton", "reference"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
        self.tp_size, self.tp_rank = tp_size or 1, tp_rank
        self.ep_size, self.ep_rank = ep_size or 1, ep_rank
        if not 0 <= tp_rank < self.tp_size:
            raise ValueError(f"tp_rank must be in [0, tp_size={self.tp_size}), got {tp_rank}")
        if intermediate_size % self.tp_size:
            raise ValueError(f"intermediate_size={intermediate_size} is not divisible by tp_size={self.tp_size}")

        self.global_num_experts = num_experts
        self.local_num_experts, expert_map = determine_expert_map(self.ep_size, ep_rank, num_experts)
        self.register_buffer("expert_map", expert_map, persistent=False)
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size_per_partition = intermediate_size // self.tp_size
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.reduce_results = reduce_results
        self.renormalize = renormalize
        self.use_grouped_topk = use_grouped_topk
        self.num_expert_group = num_expert_group
        self.topk_group = topk_group
        self.custom_routing_function = custom_routing_function
        self.scoring_func = scoring_func
        self.routed_scaling_factor = routed_scaling_factor
        self.e_score_correction_bias = e_score_correction_bias
        self.apply_router_weight_on_input = apply_router_weight_on_input
        self.activation = activation
        self.has_bias = has_bias
        self.prefix = prefix
        self.backend = backend

        self.quant_config = QuantConfig.parse(quant_config)
        geometry = MoEGeometry(
            num_experts=num_experts, num_local_experts=self.local_num_experts, hidden_size=hidden_size,
            intermediate_size_per_partition=self.intermediate_size_per_partition, top_k=top_k, activation=activation,
            has_bias=has_bias, params_dtype=self.params_dtype, tp_rank=tp_rank, tp_size=self.tp_size,
        )
        self.quant_method = get_method(self.quant_config.scheme)(self.quant_config, geometry)
        self.quant_method.create_weights(self)
        self._loaded: set[tuple[str, int, str]] = set()

    # --- routing ------------------------------------------------------------------------------------------------
    @staticmethod
    def select_experts(hidden_states, router_logits, top_k, use_grouped_topk, renormalize, topk_group=None,
                       num_expert_group=None, custom_routing_function=None, scoring_func="softmax",
                       routed_scaling_factor=1.0, e_score_correction_bias=None, indices_type=torch.int32):
        """(topk_weights fp32 [T,K], topk_ids int32 [T,K]); see moequant.routing.select_experts."""
        from moequant.routing import select_experts

        return select_experts(
            hidden_states, router_logits, top_k, use_grouped_topk, renormalize, topk_group=topk_group,
            num_expert_group=num_expert_group, custom_routing_function=custom_routing_function,
            scoring_func=scoring_func, routed_scaling_factor=routed_scaling_factor,
            e_score_correction_bias=e_score_correction_bias, indices_type=indices_type,
        )

    def route(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k weights and global expert ids for each token, with this layer's routing settings.
        The plain softmax/sigmoid top-k runs as one Triton launch on the Triton backend."""
        return self._route(hidden_states, router_logits, self._fused_routing(hidden_states, router_logits))

    def _route(self, hidden_states: torch.Tensor, router_logits: torch.Tensor, fused: bool):
        """route, with _fused_routing's answer already known."""
        if fused:
            from moequant.kernels.topk import fused_topk

            return fused_topk(router_logits, self.top_k, self.renormalize, self.scoring_func,
                              self.routed_scaling_factor)
        return self.select_experts(
            hidden_states, router_logits, self.top_k, self.use_grouped_topk, self.renormalize,
            topk_group=self.topk_group, num_expert_group=self.num_expert_group,
            custom_routing_function=self.custom_routing_function, scoring_func=self.scoring_func,
            routed_scaling_factor=self.routed_scaling_factor, e_score_correction_bias=self.e_score_correction_bias,
        )

    def _fused_routing(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> bool:
        """Plain softmax/sigmoid top-k on the Triton backend: routing runs as one Triton launch (checked logits)."""
        plain = (not self.use_grouped_topk and self.custom_routing_function is None
                 and self.e_score_correction_bias is None)
        if not plain or self.resolved_backend(hidden_states) != "triton":
            return False
        if router_logits.dim() != 2 or router_logits.shape != (hidden_states.shape[0], self.global_num_experts):
            raise ValueError(f"router_logits must be [T, {self.global_num_experts}] with T = "
                             f"{hidden_states.shape[0]}, got {tuple(router_logits.shape)}")
        return True

    def to_local_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Global expert ids -> this rank's local ids; -1 for experts held by other ranks."""
        if self.expert_map is None:
            return topk_ids
        return self.expert_map[topk_ids.long()]

    def global_expert_id(self, local: int) -> int:
        if self.expert_map is None:
            return local
        return int((self.expert_map == local).nonzero()[0, 0])

    # --- forward ------------------------------------------------------------------------------------------------
    def resolved_backend(self, x: torch.Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        return "triton" if x.is_cuda else "reference"

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if hidden_states.dim() != 2 or hidden_states.shape[1] != self.hidden_size:
            raise ValueError(f"hidden_states must be [T, {self.hidden_size}], got {tuple(hidden_states.shape)}")
        fused = self._fused_routing(hidden_states, router_logits)
        order = None
        if fused and self.expert_map is None:
            order = self.quant_method.slot_column_order(self, hidden_states)
            if not self.apply_router_weight_on_input and self.quant_method.routes_in_kernel(self, hidden_states):
                from moequant.kernels.gemv import rows_launch_pdl
                from moequant.kernels.topk import deferred_routing, routed_rows

                # no routing launch; with a column order, one launch writes the slots' rows without routing
                route = deferred_routing(router_logits, self.top_k, self.renormalize, self.scoring_func,
                                         self.routed_scaling_factor)
                rows = None if order is None else routed_rows(router_logits, self.top_k, hidden_states, order,
                                                              pdl=rows_launch_pdl(hidden_states))
                return self.experts_forward(hidden_states, route.weights, route.ids, slot_rows=rows, route=route)
        if order is not None:  # routing also writes each slot's x row in its expert's column order (one launch)
            from moequant.kernels.topk import fused_topk_gather

            topk_weights, topk_ids, rows = fused_topk_gather(
                router_logits, self.top_k, self.renormalize, self.scoring_func, self.routed_scaling_factor,
                hidden_states, order)
            return self.experts_forward(hidden_states, topk_weights, topk_ids, slot_rows=rows)
        topk_weights, topk_ids = self._route(hidden_states, router_logits, fused)
        return self.experts_forward(hidden_states, topk_weights, topk_ids)

    def experts_forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                        slot_rows: torch.Tensor | None = None, route=None) -> torch.Tensor:
        """The expert part of forward for given routing (global ids). slot_rows: x's rows per slot in the order
        the method's slot_column_order asked for; route: the routing itself, left to the method's kernel
        (routes_in_kernel; topk_weights and topk_ids are its outputs, written there). Triton backend only."""
        local_ids = self.to_local_ids(topk_ids)
        if self.resolved_backend(x) == "triton":
            extra = {} if slot_rows is None else {"slot_rows": slot_rows}
            if route is not None:
                extra["route"] = route
            out = self.quant_method.apply_triton(self, x, topk_weights, local_ids, **extra)
        else:
            compute = torch.float64 if x.dtype == torch.float64 else torch.float32
            out = self.quant_method.apply_reference(self, x, topk_weights, local_ids, compute).to(x.dtype)
        if self.reduce_results and self.tp_size * self.ep_size > 1:
            all_reduce_(out)
        return out

    # --- weight loading -----------------------------------------------------------------------------------------
    @classmethod
    def make_expert_params_mapping(cls, ckpt_gate_proj_name: str, ckpt_down_proj_name: str, ckpt_up_proj_name: str,
                                   num_experts: int, num_redundant_experts: int = 0) -> list[tuple[str, str, int, str]]:
        """[(param_name_prefix, ckpt_weight_name, expert_id, shard_id)], e.g.
        ("experts.w13_", "experts.3.gate_proj.", 3, "w1"): a checkpoint key containing ckpt_weight_name maps to
        the parameter named by replacing it with param_name_prefix."""
        if num_redundant_experts:
            _not_implemented("num_redundant_experts", num_redundant_experts)
        return [
            ("experts.w13_" if shard in ("w1", "w3") else "experts.w2_", f"experts.{e}.{name}.", e, shard)
            for e in range(num_experts)
            for shard, name in (("w1", ckpt_gate_proj_name), ("w2", ckpt_down_proj_name), ("w3", ckpt_up_proj_name))
        ]

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, weight_name: str, shard_id: str,
                      expert_id: int | None, return_success: bool = False) -> bool | None:
        """Load one expert's w1/w2/w3 tensor (or, with a 3-D tensor and expert_id None, all experts at once)
        into `param`. Experts held by other EP ranks are skipped (returns False with return_success)."""
        if shard_id not in SHARD_IDS:
            raise ValueError(f"{weight_name}: shard_id must be one of {SHARD_IDS}, got {shard_id!r}")
        name = next((n for n, p in self.named_parameters(recurse=False) if p is param), None)
        if name is None:
            raise ValueError(f"{weight_name}: the parameter is not one of {self.prefix or 'FusedMoE'}'s parameters")
        if (name.startswith("w13_") and shard_id == "w2") or (name.startswith("w2_") and shard_id != "w2"):
            raise ValueError(f"{weight_name}: shard {shard_id} cannot load into {name}")
        if expert_id is None:
            if loaded_weight.shape[0] != self.global_num_experts:
                raise ValueError(
                    f"{weight_name}: a tensor holding all experts must have {self.global_num_experts} rows in dim 0, "
                    f"got shape {tuple(loaded_weight.shape)}"
                )
            ok = [self._load_one(name, param, loaded_weight[e], shard_id, e) for e in range(self.global_num_experts)]
            return any(ok) if return_success else None
        if not 0 <= expert_id < self.global_num_experts:
            raise ValueError(f"{weight_name}: expert_id {expert_id} out of range [0, {self.global_num_experts})")
        ok = self._load_one(name, param, loaded_weight, shard_id, expert_id)
        return ok if return_success else None

    def _load_one(self, name, param, loaded, shard_id, expert_id) -> bool:
        local = expert_id if self.expert_map is None else int(self.expert_map[expert_id])
        if local < 0:
            return False
        load_expert_shard(self, param, loaded, shard_id, local)
        self._loaded.add((name, local, shard_id))
        return True

    def process_weights_after_loading(self) -> None:
        """Check everything required was loaded (when anything was), then the method's one-time conversion."""
        if self._loaded:
            check_complete(self, self._loaded)
        self.quant_method.process_weights_after_loading(self)

    def load_dense_weights(self, w13: torch.Tensor, w2: torch.Tensor, w13_bias: torch.Tensor | None = None,
                           w2_bias: torch.Tensor | None = None) -> None:
        """Put full-precision local weights (w13 [E_local, 2I_p, H], w2 [E_local, H, I_p]) in the layer, quantizing
        them with the method's RTN when the scheme is quantized, then run process_weights_after_loading."""
        E, H, I = self.local_num_experts, self.hidden_size, self.intermediate_size_per_partition
        if tuple(w13.shape) != (E, 2 * I, H) or tuple(w2.shape) != (E, H, I):
            raise ValueError(f"load_dense_weights: expected w13 {(E, 2 * I, H)} and w2 {(E, H, I)}, "
                             f"got {tuple(w13.shape)} and {tuple(w2.shape)}")
        for bname, b in (("w13_bias", w13_bias), ("w2_bias", w2_bias)):
            if b is not None:
                if not self.has_bias:
                    raise ValueError(f"load_dense_weights: {bname} given but the layer has has_bias=False")
                getattr(self, bname).data.copy_(b)
        self.quant_method.quantize_dense(self, w13, w2)
        self.quant_method.process_weights_after_loading(self)

    def extra_repr(self) -> str:
        return (f"E={self.global_num_experts} (local {self.local_num_experts}), K={self.top_k}, H={self.hidden_size}, "
                f"I_p={self.intermediate_size_per_partition}, scheme={self.quant_config.scheme}, "
                f"activation={self.activation}, tp={self.tp_rank}/{self.tp_size}, ep={self.ep_rank}/{self.ep_size}")
