"""Synthetic QUANT checkpoints with a known error, for testing the validator: a copy of a checkpoint folder with
chosen tensors replaced by edited float32 versions (float32, so that the edit is not rounded away).

    perturbed_copy(demo_model_path(), tmp / "q", {"model.layers.1.mlp.experts.3.down_proj.weight": lambda w: w * 1.1})

Scaling expert e's down_proj by (1 + d) scales its output contribution by (1 + d): that expert's SQNR is exactly
-20 log10 |d| dB, which is what the tests check the validator against.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch


def perturbed_copy(src: str | Path, out: str | Path, edits: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                   config_edits: dict | None = None) -> Path:
    """Copy folder `src` (one model.safetensors, config.json, other small files) to `out`, with each tensor named
    in `edits` replaced by fn(tensor as float32) stored as float32, and config.json updated with `config_edits`."""
    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    sd = load_file(str(src / "model.safetensors"))
    missing = sorted(set(edits) - set(sd))
    if missing:
        raise KeyError(f"{src / 'model.safetensors'} has no tensor(s) {missing[:5]}")
    for key, fn in edits.items():
        sd[key] = fn(sd[key].float()).float().contiguous()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    if config_edits:
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(config_edits)
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def expert_key(layer: int, expert: int, proj: str = "down_proj", block: str = "model.layers.{layer}.mlp") -> str:
    """Qwen3-MoE / Mixtral-style per-expert tensor name."""
    return f"{block.format(layer=layer)}.experts.{expert}.{proj}.weight"
