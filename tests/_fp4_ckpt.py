"""Test helper: tiny fp4 MoE checkpoints written by compressed-tensors' own qparams + compressors, and a loader that
feeds a state dict through FusedMoE.make_expert_params_mapping + weight_loader (as a model loader would).

E experts, H hidden, I intermediate. Keys: experts.{e}.{gate_proj|up_proj|down_proj}.{tensor}.
compressed-tensors is imported lazily (it imports transformers: slow).
"""

from __future__ import annotations

import torch

PRESETS = {"nvfp4": "NVFP4", "nvfp4a16": "NVFP4A16", "mxfp4": "MXFP4A16"}
PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _scheme(preset: str):
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme(PRESETS[preset], ["Linear"])


def compress_linear(w: torch.Tensor, preset: str, input_amax: float | None = None,
                    amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One Linear weight [out, in] -> compressed-tensors tensors (weight_packed, weight_scale[, weight_global_scale,
    input_global_scale]) using compressed-tensors' generate_gparam / calculate_qparams and its compressor.
    amax: the value the global scale is computed from (default: this weight's; llm-compressor fuses gate/up's)."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    scheme = _scheme(preset)
    args = scheme.weights
    g = args.group_size
    groups = w.reshape(w.shape[0], w.shape[1] // g, g)
    sd = {"weight": w}
    gs = None
    if preset != "mxfp4":
        a = w.abs().max() if amax is None else amax
        gs = generate_gparam(-a, a)
        sd["weight_global_scale"] = gs
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=gs)
    sd["weight_scale"] = scale
    fmt = "mxfp4-pack-quantized" if preset == "mxfp4" else "nvfp4-pack-quantized"
    out = dict(BaseCompressor.load_from_registry(fmt).compress(sd, scheme))
    if preset == "nvfp4":
        amax = torch.tensor(input_amax)
        out["input_global_scale"] = generate_gparam(-amax, amax)
    return out


def ct_dequantize(t: dict[str, torch.Tensor], preset: str) -> torch.Tensor:
    """compressed-tensors' own fp32 dequantization of one compressed Linear."""
    from compressed_tensors.compressors.mx_utils import decompress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import dequantize

    packed = t["weight_packed"]
    m, n = packed.shape
    q = unpack_fp4_from_uint8(packed, m, n * 2, dtype=torch.float32)
    if preset == "mxfp4":
        scale = decompress_mx_scale(t["weight_scale"]).float()
        return dequantize(x_q=q, scale=scale, args=_scheme(preset).weights, global_scale=None, dtype=torch.float32)
    return dequantize(x_q=q, scale=t["weight_scale"].float(), args=_scheme(preset).weights,
                      global_scale=t["weight_global_scale"].float(), dtype=torch.float32)


def build_checkpoint(preset: str, E: int, H: int, I: int, seed: int = 0, w1_w3_gap: float = 1.0,
                     share_gate_up: bool = True):
    """-> (state dict of compressed tensors, {(e, shard): CT-dequantized fp32 weight}). share_gate_up: w1 and w3 get one
    global scale (as llm-compressor fuses them); otherwise each its own, and w1_w3_gap scales w3 up so they differ."""
    gen = torch.Generator().manual_seed(seed)
    sd, deq = {}, {}
    for e in range(E):
        ws = {s: torch.randn(*shape, generator=gen) * (0.1 * (1 + e % 3))
              for s, shape in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I)))}
        ws["w3"] = ws["w3"] * w1_w3_gap
        gate_up_amax = torch.maximum(ws["w1"].abs().max(), ws["w3"].abs().max()) if share_gate_up else None
        for shard, w in ws.items():
            t = compress_linear(w, preset, input_amax=3.0 + e, amax=gate_up_amax if shard != "w2" else None)
            for k, v in t.items():
                sd[f"experts.{e}.{PROJ[shard]}.{k}"] = v.contiguous()
            deq[(e, shard)] = ct_dequantize(t, preset)
    return sd, deq


def to_modelopt(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights in ModelOpt's spelling: weight_scale_2 = 1 / weight_global_scale, input_scale = 1 / input_global_scale
    (the packed tensor keeps the name weight_packed: the loaders rename ModelOpt's `weight`)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("weight_global_scale"):
            out[k.replace("weight_global_scale", "weight_scale_2")] = (1.0 / v.float()).reshape(())
        elif k.endswith("input_global_scale"):
            out[k.replace("input_global_scale", "input_scale")] = (1.0 / v.float()).reshape(())
        else:
            out[k] = v
    return out


def load_into(layer, sd: dict[str, torch.Tensor]) -> None:
    """Route every key through make_expert_params_mapping + weight_loader, then process_weights_after_loading."""
    mapping = layer.make_expert_params_mapping("gate_proj", "down_proj", "up_proj", layer.global_num_experts)
    params = dict(layer.named_parameters(recurse=False))
    for key, tensor in sd.items():
        for prefix, ckpt, e, shard in mapping:
            if key.startswith(ckpt):
                name = (prefix + key[len(ckpt):]).removeprefix("experts.")
                if name not in params:
                    raise KeyError(f"{key}: no parameter {name}")
                layer.weight_loader(params[name], tensor, key, shard, e)
                break
        else:
            raise KeyError(f"{key}: matches no expert mapping")
    layer.process_weights_after_loading()
