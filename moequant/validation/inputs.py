"""What the validator is given, checked: two compatible checkpoints, the MoE layers to compare, an evaluation text.

Every error is a ValidationError naming the checkpoint, file or flag at fault.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

# geometry and routing fields of MoESettings that REF and QUANT must share for a comparison to mean anything
_SAME_FIELDS = ("num_experts", "top_k", "hidden_size", "intermediate_size", "num_layers", "scoring_func",
                "renormalize", "use_grouped_topk", "num_expert_group", "topk_group", "routed_scaling_factor",
                "activation", "has_bias")


class ValidationError(ValueError):
    """The validator's inputs do not fit together (checkpoints, layers, text)."""


def check_compatible(ref, quant) -> None:
    """REF and QUANT (Checkpoints) must have one architecture, one MoE geometry and the same MoE layers."""
    if ref.spec.name != quant.spec.name:
        raise ValidationError(f"REF {ref.name} is a {ref.architecture} ({ref.spec.name}) model but QUANT {quant.name} "
                              f"is a {quant.architecture} ({quant.spec.name}) model; they must share an architecture")
    a, b = dataclasses.asdict(ref.settings), dataclasses.asdict(quant.settings)
    diff = [f"{k}: REF {a[k]!r} vs QUANT {b[k]!r}" for k in _SAME_FIELDS if a[k] != b[k]]
    if diff:
        raise ValidationError(f"REF {ref.name} and QUANT {quant.name} differ in MoE geometry ({'; '.join(diff)}); "
                              f"QUANT must be a quantization of REF")
    if tuple(ref.moe_layers) != tuple(quant.moe_layers):
        raise ValidationError(f"REF {ref.name} has MoE layers {list(ref.moe_layers)} but QUANT {quant.name} has "
                              f"{list(quant.moe_layers)}")
    if ref.shared_intermediate_size != quant.shared_intermediate_size:
        raise ValidationError(f"REF {ref.name} has shared-expert size {ref.shared_intermediate_size} but QUANT "
                              f"{quant.name} has {quant.shared_intermediate_size}")


def parse_layers(spec: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7] (the --layers syntax)."""
    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise ValidationError(f"--layers: cannot read {part!r}; expected layer numbers and ranges such as '0-3,7'")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValidationError(f"--layers: range {part!r} is empty (end before start)")
        out.extend(range(lo, hi + 1))
    if not out:
        raise ValidationError(f"--layers: {spec!r} names no layer")
    return out


def select_layers(ckpt, layers, flag: str = "layers") -> list[int]:
    """The MoE layers to compare: all of REF's when `layers` is None, else the named ones, each an MoE layer."""
    if layers is None:
        return list(ckpt.moe_layers)
    if isinstance(layers, str):
        layers = parse_layers(layers)
    layers = [int(x) for x in layers]
    bad = [x for x in layers if x not in ckpt.moe_layers]
    if bad:
        dense = [x for x in bad if 0 <= x < ckpt.num_layers]
        why = f"layer(s) {dense} are dense (not MoE) layers" if dense else ""
        out = [x for x in bad if x not in dense]
        why += ("; " if why and out else "") + (f"layer(s) {out} are outside 0..{ckpt.num_layers - 1}" if out else "")
        raise ValidationError(f"{flag}: {why} of {ckpt.name}; its MoE layers are {list(ckpt.moe_layers)}")
    if not layers:
        raise ValidationError(f"{flag}: no layer selected")
    return sorted(set(layers))


def read_text(path: str | Path, flag: str = "--calib") -> str:
    """The UTF-8 text of an evaluation file; empty, binary (NUL bytes, mostly control bytes) or non-UTF-8 files fail."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ValidationError(f"{flag} {p}: no such file") from None
    except OSError as e:
        raise ValidationError(f"{flag} {p}: cannot read it ({e})") from None
    if not data.strip():
        raise ValidationError(f"{flag} {p}: the file is empty; give a text file to evaluate on")
    if b"\x00" in data[:65536]:
        raise ValidationError(f"{flag} {p}: the file holds NUL bytes, so it is binary, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValidationError(f"{flag} {p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    ctrl = sum(1 for ch in text[:65536] if ord(ch) < 32 and ch not in "\n\r\t\f\v")
    if ctrl > 0.05 * min(len(text), 65536):
        raise ValidationError(f"{flag} {p}: {ctrl} control characters in the first {min(len(text), 65536)}; "
                              f"the file does not look like text")
    return text


def default_text() -> tuple[str, str]:
    """(text, source): the demo corpus's held-out standard-library files, joined by blank lines."""
    from moequant.data.stdlib_corpus import read_files, split_files

    files = read_files(split_files()[1], allow_missing=True)
    if not files:
        raise ValidationError("no held-out standard-library file found for the default evaluation text; pass --calib")
    text = "\n\n".join(b.decode("utf-8", errors="replace") for b in files.values())
    return text, f"stdlib held-out files ({len(files)})"
