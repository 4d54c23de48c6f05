"""Data shipped with moequant: the built-in demo model (a small byte-level Qwen3-MoE trained on the Python stdlib).

Light to import: no torch or transformers here (see byte_tokenizer.py and stdlib_corpus.py for those helpers)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["demo_model_path"]


def demo_model_path() -> Path:
    """Folder of the built-in demo model (config.json, model.safetensors, byte_tokenizer.json, training_report.json).

    Made by tools/train_demo_model.py. Raises FileNotFoundError naming the folder if the install lacks its weights."""
    from importlib import resources

    path = Path(str(resources.files(__name__) / "demo_model"))
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the demo model's config.json / model.safetensors are missing; the package was "
                                f"installed without its data files (package-data moequant/data/demo_model/*)")
    return path
