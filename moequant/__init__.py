"""moequant: quantized Mixture-of-Experts layers (quantize, load, validate) on torch + Triton."""

from moequant.checkpoint import Checkpoint, open_checkpoint
from moequant.config import QuantConfig
from moequant.layer import FusedMoE
from moequant.methods.base import FusedMoEMethodBase, LoadSpec, MoEGeometry
from moequant.moe_block import MoEBlock
from moequant.parallel import determine_expert_map
from moequant.registry import get_method, list_methods, register_method

__version__ = "0.1.0"

__all__ = [
    "Checkpoint", "FusedMoE", "FusedMoEMethodBase", "LoadSpec", "MoEBlock", "MoEGeometry", "QuantConfig",
    "determine_expert_map", "get_method", "list_methods", "open_checkpoint", "register_method",
]
