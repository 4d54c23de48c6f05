"""Open an MoE checkpoint (local folder or hub id) and build its MoE blocks as moequant modules.

E experts, K top-k, H hidden, I expert intermediate size, I_s shared-expert intermediate size.

    ckpt = moequant.open_checkpoint("Qwen/Qwen3-30B-A3B")          # reads config.json and the shard headers only
    ckpt.moe_layers, ckpt.settings, ckpt.scheme_of(ckpt.moe_layers[0])
    block = ckpt.moe_block(ckpt.moe_layers[0], device="cuda")     # router + FusedMoE + shared experts
    y = block(x)                                                   # x [T, H] -> [T, H]
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from moequant.config import QuantConfig
from moequant.loaders.architectures import (
    ArchSpec, MoESettings, find_architecture, moe_layer_indices, read_settings,
)
from moequant.loaders.formats import LayerScheme, QuantFormat, detect_format
from moequant.loaders.safetensors_index import CheckpointError, TensorIndex

def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {what} ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object")
    return data


class Checkpoint:
    """A checkpoint folder with its architecture, MoE geometry, quantization format and lazily read tensors."""

    def __init__(self, folder: str | os.PathLike, name: str | None = None):
        self.folder = Path(folder)
        self.name = name or str(self.folder)
        self.config = _read_json(self.folder / "config.json", "config.json")
        hq = self.folder / "hf_quant_config.json"
        self.hf_quant_config = _read_json(hq, "hf_quant_config.json") if hq.is_file() else None
        self.spec: ArchSpec = find_architecture(self.config)
        self.settings: MoESettings = read_settings(self.config, self.spec)
        self.format: QuantFormat = detect_format(self.config, self.hf_quant_config)
        self.index = TensorIndex(self.folder)
        try:
            self.moe_layers: tuple[int, ...] = tuple(moe_layer_indices(self.config, self.spec, self.num_layers))
            if not self.moe_layers:
                raise CheckpointError(f"{self.folder}/config.json: no layer of the {self.num_layers} is an MoE layer")
            self._block_template = self._find_block_template()
            self._check_layers()
            first = self.block_prefix(self.moe_layers[0])
            self.has_correction_bias = bool(self.spec.correction_bias) and \
                f"{first}.{self.spec.correction_bias}" in self.index
            self.shared_intermediate_size = self._shared_size(first)
        except BaseException:
            self.index.close()
            raise
        self._schemes: dict[int, LayerScheme] = {}

    # --- what the checkpoint is ----------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.spec.name]
        return archs[0]

    @property
    def num_layers(self) -> int:
        return self.settings.num_layers

    def block_prefix(self, layer: int) -> str:
        return self._block_template.format(layer=layer)

    def _find_block_template(self) -> str:
        L = self.moe_layers[0]
        for template in self.spec.blocks:
            if f"{template.format(layer=L)}.{self.spec.router}.weight" in self.index:
                return template
        tried = ", ".join(f"{t.format(layer=L)}.{self.spec.router}.weight" for t in self.spec.blocks)
        raise CheckpointError(f"{self.folder}: config.json says layer {L} is an MoE layer of a {self.spec.name} model, "
                              f"but the checkpoint has no router tensor (looked for {tried})")

    def _check_layers(self) -> None:
        """Router [E, H] in every MoE layer, none in dense layers: the config and the tensors must agree."""
        s, moe = self.settings, set(self.moe_layers)
        for L in range(self.num_layers):
            key = f"{self.block_prefix(L)}.{self.spec.router}.weight"
            if L not in moe:
                if key in self.index:
                    raise CheckpointError(f"{self.index.info(key).file}: config.json makes layer {L} a dense layer, "
                                          f"but the checkpoint has the router tensor {key}")
                continue
            if key not in self.index:
                raise CheckpointError(f"{self.folder}: config.json makes layer {L} an MoE layer, but the checkpoint "
                                      f"has no router tensor {key}")
            info = self.index.info(key)
            if info.shape != (s.num_experts, s.hidden_size):
                raise CheckpointError(f"{info.file}: router {key} has shape {list(info.shape)}, but config.json gives "
                                      f"[E, H] = [{s.num_experts}, {s.hidden_size}]")
            if not info.torch_dtype.is_floating_point:
                raise CheckpointError(f"{info.file}: router {key} has dtype {info.dtype}; routers must be unquantized")

    def _shared_size(self, block: str) -> int:
        """I_s from the shared expert's gate_proj [I_s, H] (its weight or packed weight); 0 without shared experts."""
        from moequant.loaders.dense_linear import linear_entries, out_features

        if not self.spec.shared:
            return 0
        prefix = f"{block}.{self.spec.shared}."
        if not self.index.with_prefix(prefix):
            return 0
        module = prefix + "gate_proj"
        return out_features(linear_entries(self.index, module, self.format.module_scheme(module)), module)

    # --- quantization --------------------------------------------------------------------------------------
    def _require_moe(self, layer: int) -> None:
        if layer not in self.moe_layers:
            raise ValueError(f"layer {layer} is not an MoE layer of {self.name}; "
                             f"MoE layers: {_ranges(self.moe_layers)}")

    def layer_scheme(self, layer: int) -> LayerScheme:
        """The scheme, producer format and on-disk layout of `layer`'s experts."""
        self._require_moe(layer)
        if layer not in self._schemes:
            names = self.spec.expert_module_names(self.block_prefix(layer), self.settings.num_experts)
            self._schemes[layer] = self.format.layer_scheme(names)
        return self._schemes[layer]

    def scheme_of(self, layer: int) -> QuantConfig:
        """The QuantConfig a FusedMoE for `layer` is built with."""
        return self.layer_scheme(layer).config

    # --- sizes and summary ---------------------------------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        return self.index.total_bytes

    def expert_bytes(self, layer: int) -> int:
        self._require_moe(layer)
        return sum(self.index.info(k).nbytes for k in self.index.with_prefix(f"{self.block_prefix(layer)}.experts."))

    def describe(self) -> dict:
        """A JSON-ready summary: architecture, geometry, routing, scheme per layer, sizes."""
        by_scheme: dict[str, list[int]] = {}
        for L in self.moe_layers:
            s = self.layer_scheme(L)
            by_scheme.setdefault(f"{s.scheme} ({s.source}, {s.storage})", []).append(L)
        return {
            "checkpoint": self.name,
            "architecture": self.architecture,
            "table_entry": self.spec.name,
            "num_layers": self.num_layers,
            "moe_layers": _ranges(self.moe_layers),
            "geometry": dataclasses.asdict(self.settings),
            "e_score_correction_bias": self.has_correction_bias,
            "shared_expert_intermediate_size": self.shared_intermediate_size,
            "shared_expert_gate": bool(self.spec.shared_gate and self.shared_intermediate_size),
            "format": self.format.describe(),
            "schemes": {k: _ranges(v) for k, v in by_scheme.items()},
            "size_bytes": self.size_bytes,
            "expert_bytes_per_layer": self.expert_bytes(self.moe_layers[0]),
            "tensors": len(self.index),
            "shards": len(self.index.files),
        }

    # --- building blocks -----------------------------------------------------------------------------------
    def moe_block(self, layer: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                  tp_rank: int = 0, tp_size: int = 1, ep_rank: int = 0, ep_size: int = 1, *, backend: str = "auto",
                  quant_config: QuantConfig | str | None = None):
        """The MoE block of `layer`: router (fp32, unquantized) + FusedMoE with loaded, processed weights + shared
        experts. Only this rank's experts (ep) and slices (tp) are read; the ranks' outputs sum to the full output.
        Quantized experts load in their checkpoint format (compressed-tensors, ModelOpt, GPTQ, native fp8, gpt-oss
        MXFP4: see loaders/tensor_sources.py); quantized shared experts are dequantized to `dtype` (a dense MLP).
        `quant_config` quantizes an unquantized checkpoint's experts at load time (online)."""
        from moequant.layer import FusedMoE
        from moequant.moe_block import MoEBlock

        ls = self.layer_scheme(layer)
        qc = ls.config
        if quant_config is not None:
            if ls.scheme != "unquantized":
                raise ValueError(f"quant_config={quant_config!r} given, but layer {layer} is already {ls.scheme}; "
                                 f"online quantization needs an unquantized checkpoint")
            qc = QuantConfig.parse(quant_config)
            if qc.scheme != "unquantized":
                qc = dataclasses.replace(qc, online=True)
        s, block = self.settings, self.block_prefix(layer)
        if self.shared_intermediate_size % tp_size:
            raise ValueError(f"shared expert intermediate size {self.shared_intermediate_size} is not divisible by "
                             f"tp_size={tp_size}")
        bias = self._read_float(f"{block}.{self.spec.correction_bias}", (s.num_experts,)) \
            if self.has_correction_bias else None
        with torch.device(device):
            experts = FusedMoE(
                s.num_experts, s.top_k, s.hidden_size, s.intermediate_size, params_dtype=dtype,
                renormalize=s.renormalize, use_grouped_topk=s.use_grouped_topk, num_expert_group=s.num_expert_group,
                topk_group=s.topk_group, quant_config=qc, tp_size=tp_size, ep_size=ep_size,
                prefix=f"{block}.experts", scoring_func=s.scoring_func,
                routed_scaling_factor=s.routed_scaling_factor, activation=s.activation, has_bias=s.has_bias,
                tp_rank=tp_rank, ep_rank=ep_rank, backend=backend,
            )
        self._load_experts(experts, block, ls)
        try:
            experts.process_weights_after_loading()
        except ValueError as e:
            raise CheckpointError(f"{self.folder}: layer {layer}: {e}") from None
        router = nn.Linear(s.hidden_size, s.num_experts, bias=s.router_bias, dtype=torch.float32)
        with torch.no_grad():
            router.weight.copy_(self._read_float(f"{block}.{self.spec.router}.weight", (s.num_experts, s.hidden_size)))
            if s.router_bias:
                router.bias.copy_(self._read_float(f"{block}.{self.spec.router}.bias", (s.num_experts,)))
        shared, shared_gate = self._shared(block, dtype, tp_rank, tp_size) if ep_rank == 0 else (None, None)
        out = MoEBlock(router, experts, shared, shared_gate, bias)
        return out.to(device).requires_grad_(False)

    def _load_experts(self, experts, block: str, ls: LayerScheme) -> None:
        from moequant.loaders.expert_loader import load_fused_gpt_oss, load_per_expert

        if self.spec.fused is not None:
            load_fused_gpt_oss(experts, self.index, self.spec, block, ls)
        else:
            load_per_expert(experts, self.index, self.spec, block, ls)

    def _read_float(self, key: str, shape: tuple[int, ...], region: tuple = ()) -> torch.Tensor:
        info = self.index.info(key)
        if info.shape != shape:
            raise CheckpointError(f"{info.file}: tensor {key} has shape {list(info.shape)}, expected {list(shape)}")
        if not info.torch_dtype.is_floating_point:
            raise CheckpointError(f"{info.file}: tensor {key} has dtype {info.dtype}, expected a floating-point type")
        return self.index.read(key, region).float()

    def _dense(self, module: str, shape: tuple[int, int], region: tuple = ()) -> torch.Tensor:
        """fp32 weight of a plain Linear (shared experts, their gate), dequantized when the checkpoint quantizes it."""
        from moequant.loaders.dense_linear import dense_weight

        return dense_weight(self.index, module, self.format.module_scheme(module), shape, region)

    def _shared(self, block: str, dtype: torch.dtype, tp_rank: int, tp_size: int):
        """Shared expert MLP (this rank's I_s / tp rows of gate/up, columns of down) and its gate; quantized shared
        experts are dequantized to `dtype` (they run as a dense MLP). Only the rank's slice of each tensor is read
        (its covering words / groups / blocks; see loaders/dense_linear.py for what is read whole)."""
        from moequant.moe_block import GatedMLP

        I_s, H = self.shared_intermediate_size, self.settings.hidden_size
        if not I_s:
            return None, None
        part = I_s // tp_size
        rows = slice(tp_rank * part, (tp_rank + 1) * part)
        p = f"{block}.{self.spec.shared}"
        mlp = GatedMLP(H, part, self.settings.activation, dtype=dtype)
        with torch.no_grad():
            mlp.gate_proj.weight.copy_(self._dense(f"{p}.gate_proj", (I_s, H), (rows,)))
            mlp.up_proj.weight.copy_(self._dense(f"{p}.up_proj", (I_s, H), (rows,)))
            mlp.down_proj.weight.copy_(self._dense(f"{p}.down_proj", (H, I_s), (slice(None), rows)))
        gate = None
        if self.spec.shared_gate:
            gate = nn.Linear(H, 1, bias=False, dtype=dtype)
            with torch.no_grad():
                gate.weight.copy_(self._dense(f"{block}.{self.spec.shared_gate}", (1, H)))
        return mlp, gate

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.settings
        return (f"Checkpoint({self.name!r}, {self.architecture}, layers={self.num_layers}, "
                f"moe_layers={_ranges(self.moe_layers)}, E={s.num_experts}, K={s.top_k}, H={s.hidden_size}, "
                f"I={s.intermediate_size}, format={self.format.describe()})")


def _ranges(xs) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    xs = sorted(xs)
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(out)


def open_checkpoint(path_or_repo_id: str | os.PathLike, revision: str | None = None, *,
                    local_files_only: bool = False, cache_dir: str | os.PathLike | None = None) -> Checkpoint:
    """A Checkpoint for a local folder or a Hugging Face repo id (config, index and safetensors shards only;
    offline from the cache with HF_HUB_OFFLINE=1 or local_files_only=True). Reads only headers."""
    from moequant.loaders.hub import resolve_checkpoint

    folder = resolve_checkpoint(path_or_repo_id, revision, local_files_only=local_files_only, cache_dir=cache_dir)
    return Checkpoint(folder, name=os.fspath(path_or_repo_id))
