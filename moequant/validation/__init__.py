"""Validate a quantized MoE checkpoint (QUANT) against its original (REF), layer by layer and end to end.

    from moequant.validation import validate
    report = validate("path/to/original", "path/to/quantized", json_path="report.json")

Light to import: the submodules (torch, transformers, rich, matplotlib) load on first use.
"""

from __future__ import annotations

__all__ = ["Report", "ValidationError", "validate"]


def __getattr__(name: str):
    if name == "validate":
        from moequant.validation.api import validate

        return validate
    if name == "Report":
        from moequant.validation.report import Report

        return Report
    if name == "ValidationError":
        from moequant.validation.inputs import ValidationError

        return ValidationError
    raise AttributeError(f"module 'moequant.validation' has no attribute {name!r}")
