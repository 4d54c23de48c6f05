"""Quantization options of a FusedMoE layer.

`QuantConfig` names a registered scheme (see `moequant.list_methods()`) and the few knobs that change the
layout of its tensors. It is a frozen dataclass with a version and a JSON round trip.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

CONFIG_VERSION = 1
_ACTIVATION_SCHEMES = ("dynamic", "static")


@dataclass(frozen=True)
class QuantConfig:
    """scheme: registry name; group_size: input channels per scale (None = the scheme's default / per channel);
    symmetric: no zero points; act_order: the checkpoint carries g_idx (input channels permuted into groups);
    activation_scheme: "dynamic" (scales computed per call) or "static" (input scales from the checkpoint);
    block_shape: (rows, cols) of a weight scale block; online: the checkpoint holds full-precision weights
    that the method quantizes after loading."""

    scheme: str = "unquantized"
    group_size: int | None = None
    symmetric: bool = True
    act_order: bool = False
    activation_scheme: str = "dynamic"
    block_shape: tuple[int, int] | None = None
    online: bool = False
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.activation_scheme not in _ACTIVATION_SCHEMES:
            raise ValueError(
                f"QuantConfig.activation_scheme must be one of {_ACTIVATION_SCHEMES}, got {self.activation_scheme!r}"
            )
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"QuantConfig.group_size must be positive or None, got {self.group_size}")
        if self.block_shape is not None:
            object.__setattr__(self, "block_shape", tuple(int(b) for b in self.block_shape))
            if len(self.block_shape) != 2 or min(self.block_shape) <= 0:
                raise ValueError(f"QuantConfig.block_shape must be two positive ints, got {self.block_shape}")

    @classmethod
    def parse(cls, value: "QuantConfig | str | dict | None") -> "QuantConfig":
        """None -> unquantized; a scheme name; a dict as written by `to_dict`; or a QuantConfig."""
        if value is None:
            return cls()
        if isinstance(value, QuantConfig):
            return value
        if isinstance(value, str):
            return cls(scheme=value)
        if isinstance(value, dict):
            return cls.from_dict(value)
        raise TypeError(f"quant_config must be None, a scheme name, a dict or a QuantConfig, got {type(value).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {sorted(unknown)}; expected a subset of {sorted(known)}")
        if data.get("version", CONFIG_VERSION) > CONFIG_VERSION:
            raise ValueError(f"QuantConfig version {data['version']} is newer than this moequant ({CONFIG_VERSION})")
        return cls(**data)
