"""Shared pieces of the quantize tests: quantize the demo model once per (scheme, algo) into a session folder,
decompress its Linears with compressed-tensors, SQNR."""

from __future__ import annotations

import atexit
import functools
import math
import shutil
import tempfile
from pathlib import Path

import torch

from moequant.quantize.schemes import SCHEMES

PRESETS = {name: s.preset for name, s in SCHEMES.items()}
CALIB = dict(num_samples=4, seq_len=128)  # static input scales / GPTQ on the demo model, seconds on 2 cores


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.double(), x.double()
    return 10 * math.log10(float(ref.pow(2).sum()) / max(float((ref - x).pow(2).sum()), 1e-300))


def group_for(scheme: str) -> int | None:
    return 64 if SCHEMES[scheme].integer else None  # 64 divides the demo model's H = 128 and I = 192


@functools.lru_cache(maxsize=None)
def quantized(scheme: str, algo: str = "rtn") -> Path:
    """The demo model quantized with `scheme` (RTN unless algo), once per test process."""
    from moequant.quantize.api import quantize_checkpoint

    root = Path(tempfile.mkdtemp(prefix="moequant-test-"))
    atexit.register(shutil.rmtree, root, True)
    return quantize_checkpoint(None, root / f"{scheme}-{algo}", scheme=scheme, group_size=group_for(scheme),
                               algo=algo, progress=False, **CALIB)


def decompress_folder(folder: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """{module: dequantized fp32 weight} for every quantized Linear of a compressed-tensors folder, through the
    format's compressed-tensors compressor and the scheme parsed from config.json."""
    import json

    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    cfg = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k in QuantizationConfig.model_fields})
    scheme = cfg.config_groups["group_0"]
    comp = BaseCompressor.get_value_from_registry(cfg.format)
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                tensors[k] = sf.get_tensor(k)
    mods = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith("_scale") and "input" not in k.rsplit(".", 1)[1]})
    out = {}
    for m in mods:
        if names is not None and m not in names:
            continue
        sd = {k[len(m) + 1:]: v for k, v in tensors.items() if k.startswith(m + ".")}
        out[m] = comp.decompress(sd, scheme)["weight"].float()
    return out
