"""Per-architecture facts as data: where an MoE block's tensors live and which config.json keys give its geometry.

E experts, K top-k, H hidden, I expert intermediate size. A new architecture is one `ArchSpec` entry in ARCHITECTURES.
Key templates use `{layer}`; expert tensors are `{block}.experts.{e}.{proj}.{suffix}` (per expert on disk) or, for
fused layouts, `{block}.experts.{name}` holding all experts (`fused`).
Config settings are `(key, default)`: the value of config[key] when present, else the default; key None = fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Setting = tuple[str | None, Any]
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu"}


@dataclass(frozen=True)
class FusedExperts:
    """All experts in 3-D tensors. layout "gpt-oss": gate_up [E, H, 2I] with gate in even and up in odd columns
    (biases [E, 2I] interleaved the same way), down [E, I, H] (+ bias [E, H])."""

    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    bias_suffix: str = "_bias"
    layout: str = "gpt-oss"


@dataclass(frozen=True)
class ArchSpec:
    name: str
    architectures: tuple[str, ...]  # config.json "architectures"
    model_types: tuple[str, ...]  # config.json "model_type"
    blocks: tuple[str, ...]  # MoE block prefixes, the first one present in the checkpoint wins
    num_experts: tuple[str, ...]  # config keys, first present wins
    intermediate: tuple[str, ...]
    top_k: tuple[str, ...] = ("num_experts_per_tok",)
    hidden: tuple[str, ...] = ("hidden_size",)
    num_layers: tuple[str, ...] = ("num_hidden_layers",)
    router: str = "gate"  # router Linear inside the block: {block}.{router}.weight [E, H]
    router_bias: bool = False  # {block}.{router}.bias [E]
    correction_bias: str | None = None  # DeepSeek-V3: {block}.{correction_bias} [E], used when present
    proj_names: tuple[str, str, str] = ("gate_proj", "down_proj", "up_proj")  # (gate, down, up), as FusedMoE takes them
    fused: FusedExperts | None = None
    expert_bias: bool = False  # experts carry biases (gpt-oss)
    shared: str | None = None  # shared expert MLP inside the block ({shared}.gate_proj/up_proj/down_proj)
    shared_gate: str | None = None  # Qwen2-MoE: out += sigmoid(x @ gate^T) * shared(x), gate [1, H]
    scoring_func: Setting = (None, "softmax")
    renormalize: Setting = (None, True)
    routed_scaling_factor: Setting = (None, 1.0)
    activation: Setting = ("hidden_act", "silu")  # mapped through ACTIVATIONS unless the key is None
    # grouped top-k (DeepSeek): used when topk_method is one of grouped_methods and n_group > 1
    n_group: str | None = None
    topk_group: str | None = None
    topk_method: Setting = (None, None)
    grouped_methods: tuple[str, ...] = ()
    # which layers are MoE layers: L >= config[first_dense], L % config[layer_freq] == 0,
    # (L + 1) % config[sparse_step] == 0, L not in config[mlp_only]
    first_dense: str | None = None
    layer_freq: str | None = None
    sparse_step: str | None = None
    mlp_only: str | None = None
    required_values: dict[str, Any] = field(default_factory=dict)  # config values the math hard-codes

    def expert_module_names(self, block: str, num_experts: int) -> list[str]:
        """Module names of a layer's expert projections, as quantization configs name them."""
        if self.fused is not None:
            return [f"{block}.experts.{self.fused.gate_up}", f"{block}.experts.{self.fused.down}"]
        return [f"{block}.experts.{e}.{p}" for e in range(num_experts) for p in self.proj_names]


_DEEPSEEK_COMMON = dict(
    blocks=("model.layers.{layer}.mlp",), num_experts=("n_routed_experts",), intermediate=("moe_intermediate_size",),
    shared="shared_experts", renormalize=("norm_topk_prob", False),
    routed_scaling_factor=("routed_scaling_factor", 1.0),
    n_group="n_group", topk_group="topk_group", grouped_methods=("group_limited_greedy", "noaux_tc"),
    first_dense="first_k_dense_replace", layer_freq="moe_layer_freq",
)

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(
        name="mixtral", architectures=("MixtralForCausalLM",), model_types=("mixtral",),
        blocks=("model.layers.{layer}.block_sparse_moe", "model.layers.{layer}.mlp"),
        num_experts=("num_local_experts",), intermediate=("intermediate_size",), proj_names=("w1", "w2", "w3"),
    ),
    ArchSpec(
        name="qwen2_moe", architectures=("Qwen2MoeForCausalLM",), model_types=("qwen2_moe",),
        blocks=("model.layers.{layer}.mlp",), num_experts=("num_experts",), intermediate=("moe_intermediate_size",),
        shared="shared_expert", shared_gate="shared_expert_gate", renormalize=("norm_topk_prob", False),
        sparse_step="decoder_sparse_step", mlp_only="mlp_only_layers",
    ),
    ArchSpec(
        name="qwen3_moe", architectures=("Qwen3MoeForCausalLM",), model_types=("qwen3_moe",),
        blocks=("model.layers.{layer}.mlp",), num_experts=("num_experts", "num_local_experts"),
        intermediate=("moe_intermediate_size",), renormalize=("norm_topk_prob", False),
        sparse_step="decoder_sparse_step", mlp_only="mlp_only_layers",
    ),
    ArchSpec(
        name="olmoe", architectures=("OlmoeForCausalLM",), model_types=("olmoe",),
        blocks=("model.layers.{layer}.mlp",), num_experts=("num_experts",), intermediate=("intermediate_size",),
        renormalize=("norm_topk_prob", False),
    ),
    ArchSpec(
        name="deepseek_v2", architectures=("DeepseekV2ForCausalLM",), model_types=("deepseek_v2",),
        scoring_func=("scoring_func", "softmax"), topk_method=("topk_method", "greedy"), **_DEEPSEEK_COMMON,
    ),
    ArchSpec(
        name="deepseek_v3", architectures=("DeepseekV3ForCausalLM",), model_types=("deepseek_v3", "kimi_k2"),
        scoring_func=("scoring_func", "sigmoid"), topk_method=("topk_method", "noaux_tc"),
        correction_bias="gate.e_score_correction_bias", **_DEEPSEEK_COMMON,
    ),
    ArchSpec(
        name="gpt_oss", architectures=("GptOssForCausalLM",), model_types=("gpt_oss",),
        blocks=("model.layers.{layer}.mlp",), num_experts=("num_local_experts",), intermediate=("intermediate_size",),
        router="router", router_bias=True, fused=FusedExperts(), expert_bias=True, activation=(None, "swigluoai"),
        required_values={"swiglu_alpha": 1.702, "swiglu_limit": 7.0},
    ),
)


def find_architecture(config: dict) -> ArchSpec:
    """The table entry for config.json's "architectures" (or, failing that, its "model_type")."""
    archs = config.get("architectures") or []
    for spec in ARCHITECTURES:
        if any(a in spec.architectures for a in archs):
            return spec
    for spec in ARCHITECTURES:
        if config.get("model_type") in spec.model_types:
            return spec
    known = ", ".join(a for s in ARCHITECTURES for a in s.architectures)
    raise ValueError(f"config.json: unsupported architecture {archs or None} (model_type "
                     f"{config.get('model_type')!r}); supported: {known}")


def config_int(config: dict, keys: tuple[str, ...], what: str) -> int:
    for k in keys:
        v = config.get(k)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"config.json: {k} ({what}) must be a positive integer, got {v!r}")
            return v
    raise ValueError(f"config.json: missing {what} (one of the keys {', '.join(keys)})")


def setting(config: dict, s: Setting) -> Any:
    key, default = s
    if key is None:
        return default
    v = config.get(key)
    return default if v is None else v


@dataclass(frozen=True)
class MoESettings:
    """An architecture's MoE geometry and routing as read from config.json (the same for every MoE layer)."""

    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    scoring_func: str
    renormalize: bool
    use_grouped_topk: bool
    num_expert_group: int | None
    topk_group: int | None
    routed_scaling_factor: float
    activation: str
    has_bias: bool
    router_bias: bool


def read_settings(config: dict, spec: ArchSpec) -> MoESettings:
    for key, want in spec.required_values.items():
        got = config.get(key, want)
        if got != want:
            raise ValueError(f"config.json: {key}={got!r}, but {spec.name}'s activation is implemented for "
                             f"{want!r} only")
    act_key, act_default = spec.activation
    if act_key is None:
        activation = act_default
    else:
        raw = config.get(act_key) or act_default
        if raw not in ACTIVATIONS:
            raise ValueError(f"config.json: {act_key}={raw!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        activation = ACTIVATIONS[raw]
    scoring = setting(config, spec.scoring_func)
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"config.json: {spec.scoring_func[0]}={scoring!r}; supported: softmax, sigmoid")
    method = setting(config, spec.topk_method)
    n_group = config.get(spec.n_group) if spec.n_group else None
    topk_group = config.get(spec.topk_group) if spec.topk_group else None
    grouped = method in spec.grouped_methods and isinstance(n_group, int) and n_group > 1
    if method is not None and method not in spec.grouped_methods and method != "greedy":
        raise ValueError(f"config.json: topk_method={method!r}; supported: greedy, {', '.join(spec.grouped_methods)}")
    E = config_int(config, spec.num_experts, "number of experts")
    K = config_int(config, spec.top_k, "experts per token")
    if K > E:
        raise ValueError(f"config.json: {K} experts per token but only {E} experts")
    if grouped and (E % n_group or not isinstance(topk_group, int) or not 1 <= topk_group <= n_group):
        raise ValueError(f"config.json: grouped top-k needs n_group dividing {E} experts and 1 <= topk_group <= "
                         f"n_group; got n_group={n_group}, topk_group={topk_group}")
    return MoESettings(
        num_experts=E, top_k=K,
        hidden_size=config_int(config, spec.hidden, "hidden size"),
        intermediate_size=config_int(config, spec.intermediate, "expert intermediate size"),
        num_layers=config_int(config, spec.num_layers, "number of layers"),
        scoring_func=scoring, renormalize=bool(setting(config, spec.renormalize)),
        use_grouped_topk=grouped, num_expert_group=n_group if grouped else None,
        topk_group=topk_group if grouped else None,
        routed_scaling_factor=float(setting(config, spec.routed_scaling_factor)),
        activation=activation, has_bias=spec.expert_bias, router_bias=spec.router_bias,
    )


def moe_layer_indices(config: dict, spec: ArchSpec, num_layers: int) -> list[int]:
    """Layers that hold an MoE block (dense layers such as DeepSeek's first_k_dense_replace are left out)."""
    first = int(config.get(spec.first_dense) or 0) if spec.first_dense else 0
    freq = int(config.get(spec.layer_freq) or 1) if spec.layer_freq else 1
    step = int(config.get(spec.sparse_step) or 1) if spec.sparse_step else 1
    dense = set(config.get(spec.mlp_only) or []) if spec.mlp_only else set()
    return [L for L in range(num_layers)
            if L >= first and L % freq == 0 and (L + 1) % step == 0 and L not in dense]
