"""Our scheme names -> compressed-tensors presets, formats and config.json `quantization_config`.

Each scheme is a compressed-tensors preset (`preset_name_to_scheme`) with its compression format, so the output layout
is the one llm-compressor writes for the same preset. Integer schemes take a group size (None: the preset's 128, or the
largest of 128/64/32 that divides every targeted input dim, see `pick_group_size`; -1: per output channel).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchemeSpec:
    preset: str  # compressed-tensors preset name
    format: str  # compressed-tensors CompressionFormat value
    integer: bool = False  # int group/channel weights: --group-size and GPTQ apply
    static_input: bool = False  # input scales come from calibration activations (input_scale / input_global_scale)


SCHEMES: dict[str, SchemeSpec] = {
    "fp8-tensor": SchemeSpec("FP8", "float-quantized", static_input=True),
    "fp8-channel": SchemeSpec("FP8_DYNAMIC", "float-quantized"),
    "fp8-block": SchemeSpec("FP8_BLOCK", "float-quantized"),
    "w4a16": SchemeSpec("W4A16", "pack-quantized", integer=True),
    "w4a16-asym": SchemeSpec("W4A16_ASYM", "pack-quantized", integer=True),
    "w8a16": SchemeSpec("W8A16", "pack-quantized", integer=True),
    "nvfp4a16": SchemeSpec("NVFP4A16", "nvfp4-pack-quantized"),
    "nvfp4": SchemeSpec("NVFP4", "nvfp4-pack-quantized", static_input=True),
    "mxfp4": SchemeSpec("MXFP4A16", "mxfp4-pack-quantized"),
}
GROUP_CHOICES = (128, 64, 32)


def spec(name: str) -> SchemeSpec:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"--scheme {name!r} is not supported; expected one of {', '.join(SCHEMES)}") from None


def pick_group_size(name: str, group_size: int | None, in_dims: set[int]) -> int | None:
    """The integer group size to use: the given one (checked to divide every targeted input dim), -1 -> None (per
    channel), or for None the preset's 128, else the largest of 64/32 dividing every input dim (a warning names it)."""
    if not spec(name).integer:
        if group_size is not None:
            raise ValueError(f"--group-size applies to the integer schemes (w4a16, w4a16-asym, w8a16), not {name!r}")
        return None
    if group_size == -1:
        return None
    if group_size is not None:
        if group_size <= 0 or any(d % group_size for d in in_dims):
            fits = [g for g in GROUP_CHOICES if not any(d % g for d in in_dims)]
            raise ValueError(f"--group-size {group_size} must be positive and divide every targeted input dim "
                             f"{sorted(in_dims)}; try one of {fits} or -1 (per channel)")
        return group_size
    for g in GROUP_CHOICES:
        if not any(d % g for d in in_dims):
            if g != GROUP_CHOICES[0]:
                import warnings
                warnings.warn(f"{name}: group size 128 does not divide the input dims {sorted(in_dims)}; using {g}")
            return g
    raise ValueError(f"{name}: no group size of {GROUP_CHOICES} divides the targeted input dims {sorted(in_dims)}; "
                     f"pass --group-size -1 (per channel)")


def ct_scheme(name: str, targets: list[str], group_size: int | None = None, actorder: str | None = None):
    """compressed-tensors QuantizationScheme for our scheme `name` (preset + group size + GPTQ act-order + format)."""
    from compressed_tensors.quantization import QuantizationStrategy, preset_name_to_scheme

    s = spec(name)
    scheme = preset_name_to_scheme(s.preset, targets)
    w = scheme.weights
    w.observer = w.observer or "memoryless_minmax"  # what llm-compressor records for RTN/GPTQ weights
    if s.integer:
        if group_size is None:
            w.strategy, w.group_size = QuantizationStrategy.CHANNEL, None
        else:
            w.group_size = group_size
        w.actorder = actorder
    scheme.format = s.format
    return scheme


def quantization_config(scheme, ignore: list[str]) -> dict:
    """config.json `quantization_config` as compressed-tensors writes it (status compressed, version, format)."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig(config_groups={"group_0": scheme}, format=scheme.format, ignore=ignore,
                            quantization_status="compressed")
    d = qc.model_dump(mode="json")
    d.update(quant_method="compressed-tensors", version=compressed_tensors.__version__, sparsity_config={},
             transform_config={})
    return dict(sorted(d.items()))
