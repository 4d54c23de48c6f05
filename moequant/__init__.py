"""moequant: quantized Mixture-of-Experts layers (quantize, load, validate) on torch + Triton."""

from moequant.checkpoint import Checkpoint, open_checkpoint
from moequant.config import QuantConfig
from moequant.layer import FusedMoE
from moequant.methods.base import FusedMoEMethodBase, LoadSpec, MoEGeometry
from moequant.moe_block import MoEBlock
from moequant.parallel import determine_expert_map
from moequant.registry import get_method, list_methods, register_method

__version__ = "0.1.0"


def __getattr__(name: str):
    """quantize_checkpoint and validate load on first use (they pull in compressed-tensors and transformers)."""
    if name == "quantize_checkpoint":
        from moequant.quantize.api import quantize_checkpoint

        return quantize_checkpoint
    if name == "validate":
        from moequant.validation.api import validate

        return validate
    raise AttributeError(f"module 'moequant' has no attribute {name!r}")

__all__ = [
    "Checkpoint", "FusedMoE", "FusedMoEMethodBase", "LoadSpec", "MoEBlock", "MoEGeometry", "QuantConfig",
    "determine_expert_map", "get_method", "list_methods", "open_checkpoint", "quantize_checkpoint", "register_method", "validate",
]
