"""Checkpoint quantization format detection: config.json / hf_quant_config.json -> a scheme per MoE layer.

Sources: compressed-tensors (config groups with targets, `ignore` names and `re:` regexes, per-group formats),
ModelOpt (hf_quant_config.json or quant_method "modelopt": FP8, NVFP4), GPTQ (bits / group_size / desc_act / sym,
GPTQModel `dynamic` per-module rules), native fp8 (DeepSeek-style weight_block_size), gpt-oss's native mxfp4, and
unquantized checkpoints. Every expert projection of a layer must resolve to one scheme (FusedMoE holds one method).
Unsupported combinations raise an error that lists what is supported.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Sequence

from moequant.config import QuantConfig

SUPPORTED = (
    "unquantized (bf16/fp16/fp32); compressed-tensors: FP8 (static or dynamic per-tensor activations), FP8_DYNAMIC "
    "(per-channel weights, per-token activations), FP8_BLOCK, W4A16, W4A16_ASYM, W8A16 (pack-quantized, group or "
    "channel, optional act-order), NVFP4, NVFP4A16, MXFP4A16; ModelOpt FP8, FP8_PER_CHANNEL_PER_TOKEN, NVFP4; GPTQ "
    "4-bit (sym/asym) and 8-bit (sym); native fp8 (per-tensor or weight_block_size); gpt-oss mxfp4"
)


class UnsupportedFormatError(ValueError):
    """The checkpoint's quantization (or this combination of its settings) is not supported."""

    def __init__(self, what: str):
        super().__init__(f"{what}. Supported: {SUPPORTED}")


@dataclass(frozen=True)
class LayerScheme:
    """How one layer's experts are stored. config: what FusedMoE is built with; source: the producer's format
    family; storage: the tensor layout on disk (compressed-tensors format name, "gptq", "gptq_v2", "modelopt",
    "fp8-native", "gpt-oss-mxfp4" or "dense")."""

    config: QuantConfig
    source: str
    storage: str

    @property
    def scheme(self) -> str:
        return self.config.scheme


UNQUANTIZED = LayerScheme(QuantConfig("unquantized"), "unquantized", "dense")


def module_matches(name: str, pattern: str) -> bool:
    """Exclusion-list matching used by ModelOpt / native fp8 / mxfp4 configs: `re:` regex, fnmatch wildcards,
    or a dotted module path equal to the name, one of its parents, or a whole-component suffix of it."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")
    return f".{name}.".find(f".{pattern}.") >= 0


class QuantFormat:
    """Detected format of a checkpoint; `layer_scheme(names)` resolves a layer's expert projection modules."""

    source = "unquantized"

    def describe(self) -> str:
        return self.source

    def module_scheme(self, name: str) -> LayerScheme:
        return UNQUANTIZED

    def layer_scheme(self, names: Sequence[str]) -> LayerScheme:
        """The one scheme shared by all `names`; an error naming two modules that disagree otherwise."""
        first = self.module_scheme(names[0])
        for n in names[1:]:
            s = self.module_scheme(n)
            if s != first:
                raise UnsupportedFormatError(
                    f"experts of one layer are quantized differently: {names[0]} is {first.scheme} "
                    f"({first.storage}) but {n} is {s.scheme} ({s.storage}); a FusedMoE layer holds one scheme"
                )
        return first


# --- compressed-tensors -------------------------------------------------------------------------------------
def _enum(v) -> Any:
    return getattr(v, "value", v)


def ct_args_to_scheme(w, a, fmt: str, act_order: bool = False) -> LayerScheme:
    """compressed-tensors QuantizationArgs of weights (w) and input activations (a or None) -> LayerScheme."""
    wt, wb, ws = _enum(w.type), w.num_bits, _enum(w.strategy)
    at = None if a is None else (_enum(a.type), a.num_bits, _enum(a.strategy), _enum(a.dynamic))

    def scheme(name: str, **kw) -> LayerScheme:
        return LayerScheme(QuantConfig(name, **kw), "compressed-tensors", fmt)

    def unsupported() -> UnsupportedFormatError:
        acts = "none" if a is None else f"{at[0]}{at[1]} {at[2]} dynamic={at[3]}"
        return UnsupportedFormatError(
            f"compressed-tensors weights {wt}{wb} strategy={ws} symmetric={w.symmetric} group_size={w.group_size} "
            f"with input activations {acts} (format {fmt})"
        )

    if wt == "float" and wb == 8 and at is not None and at[:2] == ("float", 8):
        _, _, astrat, adyn = at
        if ws == "tensor" and astrat == "tensor":
            return scheme("fp8-tensor", activation_scheme="dynamic" if adyn is True else "static")
        if ws == "channel" and astrat == "token" and adyn is True:
            return scheme("fp8-channel")
        if ws == "block" and astrat == "group" and adyn is True and w.block_structure:
            return scheme("fp8-block", block_shape=tuple(w.block_structure))
        raise unsupported()
    if wt == "int" and a is None and ws in ("group", "channel"):
        group = w.group_size if ws == "group" else None
        if wb == 4:
            return scheme("w4a16" if w.symmetric else "w4a16-asym", group_size=group, symmetric=bool(w.symmetric),
                          act_order=act_order)
        if wb == 8 and w.symmetric:
            return scheme("w8a16", group_size=group, act_order=act_order)
        raise unsupported()
    if wt == "float" and wb == 4 and ws == "tensor_group" and w.group_size == 16:
        if a is None:
            return scheme("nvfp4a16", group_size=16)
        if at[:3] == ("float", 4, "tensor_group"):
            # the per-tensor input global scale is static (from the checkpoint); the per-16 scales are dynamic
            return scheme("nvfp4", group_size=16, activation_scheme="static")
        raise unsupported()
    if wt == "float" and wb == 4 and ws == "group" and w.group_size == 32 and a is None:
        return scheme("mxfp4", group_size=32)
    raise unsupported()


class CompressedTensorsFormat(QuantFormat):
    """quantization_config with quant_method "compressed-tensors", parsed by compressed-tensors itself."""

    source = "compressed-tensors"

    def __init__(self, qc: dict):
        from compressed_tensors.quantization import QuantizationConfig
        from compressed_tensors.utils.match import match_name

        self._match_name = match_name
        qc = dict(qc)
        if qc.get("sparsity_config") and (qc["sparsity_config"].get("format") or "dense") != "dense":
            raise UnsupportedFormatError(f"compressed-tensors sparsity format {qc['sparsity_config'].get('format')!r}")
        if qc.get("transform_config"):
            raise UnsupportedFormatError("compressed-tensors transforms (rotations, transform_config)")
        # compressed-tensors >= 0.19 refuses actorder "group" (older checkpoints carry weight_g_idx for it):
        # record it here and let the library validate the rest.
        self._act_order: dict[str, bool] = {}
        groups = {}
        for gname, group in (qc.get("config_groups") or {}).items():
            if isinstance(group, dict) and isinstance(group.get("weights"), dict):
                wargs = dict(group["weights"])
                self._act_order[gname] = wargs.get("actorder") in ("group", "dynamic", True)
                if self._act_order[gname]:
                    wargs["actorder"] = None
                group = {**group, "weights": wargs}
            groups[gname] = group
        qc["config_groups"] = groups
        known = set(QuantizationConfig.model_fields)
        self.config = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k in known})
        status = _enum(self.config.quantization_status)
        if status != "compressed":
            raise UnsupportedFormatError(f"compressed-tensors quantization_status {status!r} (expected 'compressed')")
        self.format = self.config.format
        self._cache: dict[str, LayerScheme] = {}

    def describe(self) -> str:
        return f"compressed-tensors ({self.format})"

    def _group_for(self, name: str):
        """The config group whose targets match `name` (an expert projection, a Linear): exact name first,
        then regex, then class name, as vLLM resolves them."""
        ranked = []
        for gname, group in self.config.config_groups.items():
            for t in group.targets:
                if t.startswith("re:"):
                    rank = 1 if self._match_name(name, t) else None
                else:
                    rank = 0 if t == name else (2 if t == "Linear" else None)
                if rank is not None:
                    ranked.append((rank, gname, group))
        return min(ranked, key=lambda r: r[0])[1:] if ranked else (None, None)

    def module_scheme(self, name: str) -> LayerScheme:
        if name in self._cache:
            return self._cache[name]
        ignored = any(self._match_name(name, ig) or ig == "Linear" for ig in self.config.ignore or [])
        gname, group = (None, None) if ignored else self._group_for(name)
        if group is None or group.weights is None:
            result = UNQUANTIZED
        else:
            fmt = _enum(group.format) or self.format
            if fmt in ("mixed-precision", None):
                raise UnsupportedFormatError(f"compressed-tensors group {gname} has no format of its own under a "
                                             f"mixed-precision checkpoint")
            result = ct_args_to_scheme(group.weights, group.input_activations, fmt, self._act_order.get(gname, False))
        self._cache[name] = result
        return result


# --- ModelOpt ----------------------------------------------------------------------------------------------
class ModelOptFormat(QuantFormat):
    source = "modelopt"
    _ALGOS = {
        "FP8": QuantConfig("fp8-tensor", activation_scheme="static"),
        "FP8_PER_CHANNEL_PER_TOKEN": QuantConfig("fp8-channel"),
        "NVFP4": QuantConfig("nvfp4", group_size=16, activation_scheme="static"),
    }

    def __init__(self, quant: dict):
        self.algo = str(quant.get("quant_algo") or "").upper()
        if self.algo not in self._ALGOS:
            raise UnsupportedFormatError(f"ModelOpt quant_algo {quant.get('quant_algo')!r}")
        config = self._ALGOS[self.algo]
        group = quant.get("group_size")
        if self.algo == "NVFP4" and group not in (None, 16):
            raise UnsupportedFormatError(f"ModelOpt NVFP4 with group_size {group}")
        self.scheme = LayerScheme(config, "modelopt", "modelopt")
        self.exclude = list(quant.get("exclude_modules") or quant.get("ignore") or [])

    def describe(self) -> str:
        return f"modelopt ({self.algo})"

    def module_scheme(self, name: str) -> LayerScheme:
        return UNQUANTIZED if any(module_matches(name, p) for p in self.exclude) else self.scheme


# --- GPTQ --------------------------------------------------------------------------------------------------
class GPTQFormat(QuantFormat):
    """AutoGPTQ / GPTQModel. GPTQModel's `dynamic` maps regexes to overrides; '-:' regexes exclude modules."""

    source = "gptq"

    def __init__(self, qc: dict):
        self.qc = qc
        self.storage = "gptq_v2" if qc.get("checkpoint_format") == "gptq_v2" else "gptq"
        if qc.get("checkpoint_format") not in (None, "gptq", "gptq_v2"):
            raise UnsupportedFormatError(f"GPTQ checkpoint_format {qc.get('checkpoint_format')!r}")
        self.dynamic = qc.get("dynamic") or {}

    def describe(self) -> str:
        return f"gptq ({self.storage}, {self.qc.get('bits')}-bit, group {self.qc.get('group_size')})"

    def _scheme(self, qc: dict) -> LayerScheme:
        bits, sym = qc.get("bits"), qc.get("sym", True)
        group = qc.get("group_size", 128)
        group = None if group in (-1, None) else int(group)
        act = bool(qc.get("desc_act", False))
        if bits == 4:
            name = "w4a16" if sym else "w4a16-asym"
        elif bits == 8 and sym:
            name = "w8a16"
        else:
            raise UnsupportedFormatError(f"GPTQ bits={bits} sym={sym}")
        config = QuantConfig(name, group_size=group, symmetric=bool(sym), act_order=act)
        return LayerScheme(config, "gptq", self.storage)

    def module_scheme(self, name: str) -> LayerScheme:
        for pattern, override in self.dynamic.items():
            if pattern.startswith("-:") and re.match(pattern[2:], name):
                return UNQUANTIZED
            if re.match(pattern.removeprefix("+:"), name) and not pattern.startswith("-:"):
                return self._scheme({**self.qc, **(override or {})})
        return self._scheme(self.qc)


# --- native fp8 (DeepSeek-V3, Qwen3-FP8) and gpt-oss mxfp4 ------------------------------------------------
class ExcludeListFormat(QuantFormat):
    """One scheme for every module except those on an exclusion list."""

    def __init__(self, source: str, scheme: LayerScheme, exclude: list[str], detail: str):
        self.source, self.scheme, self.exclude, self.detail = source, scheme, exclude, detail

    def describe(self) -> str:
        return f"{self.source} ({self.detail})"

    def module_scheme(self, name: str) -> LayerScheme:
        return UNQUANTIZED if any(module_matches(name, p) for p in self.exclude) else self.scheme


def _native_fp8(qc: dict) -> QuantFormat:
    exclude = list(qc.get("modules_to_not_convert") or qc.get("ignored_layers") or [])
    block = qc.get("weight_block_size")
    act = qc.get("activation_scheme", "dynamic")
    if block:
        if act != "dynamic":
            raise UnsupportedFormatError(f"native fp8 with weight_block_size and activation_scheme {act!r}")
        scheme = LayerScheme(QuantConfig("fp8-block", block_shape=tuple(block)), "fp8", "fp8-native")
        return ExcludeListFormat("fp8", scheme, exclude, f"block {tuple(block)}")
    scheme = LayerScheme(QuantConfig("fp8-tensor", activation_scheme=act), "fp8", "fp8-native")
    return ExcludeListFormat("fp8", scheme, exclude, f"per-tensor, {act} activations")


def detect_format(config: dict, hf_quant_config: dict | None = None) -> QuantFormat:
    """The checkpoint's format from config.json (and hf_quant_config.json when ModelOpt wrote one)."""
    if hf_quant_config is not None:
        producer = (hf_quant_config.get("producer") or {}).get("name", "")
        if producer and producer.lower() != "modelopt":
            raise UnsupportedFormatError(f"hf_quant_config.json from producer {producer!r}")
        return ModelOptFormat(hf_quant_config.get("quantization") or hf_quant_config)
    qc = config.get("quantization_config") or config.get("compression_config")
    if not qc:
        return QuantFormat()
    if isinstance(qc.get("quantization_config"), dict):  # older compression_config nesting
        qc = {**qc["quantization_config"], **{k: v for k, v in qc.items() if k != "quantization_config"}}
    method = str(qc.get("quant_method") or "").lower()
    if method in ("compressed-tensors", "compressed_tensors"):
        return CompressedTensorsFormat(qc)
    if method == "modelopt":
        return ModelOptFormat(qc.get("quantization") or qc)
    if method == "gptq":
        return GPTQFormat(qc)
    if method == "fp8":
        return _native_fp8(qc)
    if method == "mxfp4":
        scheme = LayerScheme(QuantConfig("mxfp4", group_size=32), "mxfp4", "gpt-oss-mxfp4")
        return ExcludeListFormat("mxfp4", scheme, list(qc.get("modules_to_not_convert") or []), "gpt-oss blocks/scales")
    raise UnsupportedFormatError(f"config.json quantization_config.quant_method {qc.get('quant_method')!r}")
