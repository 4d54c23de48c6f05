"""A tiny fp8 MoE checkpoint written by compressed-tensors itself (test helper).

For a preset (FP8, FP8_DYNAMIC, FP8_BLOCK) every expert Linear (Qwen3-MoE names: experts.N.gate_proj/up_proj/
down_proj) gets its weight scale from compressed-tensors' `calculate_qparams` (the observer's math), its fp8 weight
from the float-quantized compressor, static input scales (FP8 only) from `calculate_qparams` on calibration
activations; the tensors go through a safetensors file and back. The reference weights are compressed-tensors'
own decompression of what was written. Importing compressed-tensors imports transformers (slow): one call per module.
"""

from __future__ import annotations

import torch

PRESET_SCHEME = {"FP8": "fp8-tensor", "FP8_DYNAMIC": "fp8-channel", "FP8_BLOCK": "fp8-block"}


def _weight_scale(w: torch.Tensor, args) -> torch.Tensor:
    from compressed_tensors.quantization.utils import calculate_qparams

    strategy = str(args.strategy.value if hasattr(args.strategy, "value") else args.strategy)
    if strategy == "tensor":
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    elif strategy == "channel":
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    elif strategy == "block":
        bh, bw = args.block_structure
        R, C = w.shape
        blocks = w.reshape(R // bh, bh, C // bw, bw)
        lo, hi = blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
    else:
        raise ValueError(f"unexpected weight strategy {strategy}")
    scale, _ = calculate_qparams(lo, hi, args)
    return scale


def build_checkpoint(preset: str, E: int, H: int, I: int, path, seed: int = 0):
    """Write the checkpoint to `path` (safetensors). Returns (state dict read back, w13 [E, 2I, H], w2 [E, H, I]
    dequantized by compressed-tensors, fp32)."""
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import load_file, save_file

    scheme = preset_name_to_scheme(preset, ["Linear"])
    g = torch.Generator().manual_seed(seed)
    sd, deq = {}, {}
    for e in range(E):
        for name, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            scale_up = 2.5 if name == "up_proj" else 1.0  # w1 and w3 on different scales: the merge requantizes
            w = (torch.randn(*shape, generator=g) / shape[1] ** 0.5 * scale_up).to(torch.bfloat16)
            module = {"weight": w, "weight_scale": _weight_scale(w, scheme.weights)}
            comp = FloatQuantizationCompressor.compress(module, scheme)
            key = f"model.layers.0.mlp.experts.{e}.{name}."
            for k, v in comp.items():
                sd[key + k] = v.contiguous()
            if scheme.input_activations is not None and not scheme.input_activations.dynamic:
                x = torch.randn(16, shape[1], generator=g) * (1 + 0.1 * e)  # calibration activations per expert
                s, _ = calculate_qparams(x.amin().reshape(1), x.amax().reshape(1), scheme.input_activations)
                sd[key + "input_scale"] = s.float()
    save_file(sd, str(path))
    back = load_file(str(path))
    for key in back:
        if key.endswith(".weight"):
            base = key[: -len("weight")]
            # fp32 scale: the product q * s is then exact (compressed-tensors would round it to the bf16 scale dtype)
            out = FloatQuantizationCompressor.decompress(
                {"weight": back[key], "weight_scale": back[base + "weight_scale"].float()}, scheme)
            deq[base] = out["weight"].float()
    pre = "model.layers.0.mlp.experts."
    w13 = torch.stack([torch.cat([deq[f"{pre}{e}.gate_proj."], deq[f"{pre}{e}.up_proj."]]) for e in range(E)])
    w2 = torch.stack([deq[f"{pre}{e}.down_proj."] for e in range(E)])
    return back, w13, w2
