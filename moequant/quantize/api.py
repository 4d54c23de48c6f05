"""`quantize_checkpoint`: an unquantized MoE checkpoint -> a compressed-tensors checkpoint (RTN or GPTQ), streamed.

    out = quantize_checkpoint("Qwen/Qwen3-30B-A3B", "q3-w4a16", scheme="w4a16", algo="gptq")

Flow: plan every output tensor (plan.py) -> lay out shards (writer.py) -> for each unfinished shard, produce its
tensors: copies of the source's unquantized tensors (mmap reads) and the quantized Linears of the layer being worked
on (LayerQuantizer: calibration stats for that layer, GPTQ or RTN per module, packed by compressed-tensors) -> write
the shard -> index, config.json with `quantization_config`, other source files, quantize_report.json -> rename.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

REPORT = "quantize_report.json"
DEFAULT_SHARD_BYTES = 4 << 30


@dataclass(frozen=True)
class Options:
    scheme: str = "w4a16"
    group_size: int | None = None
    algo: str = "rtn"
    calib: str | None = None
    num_samples: int = 128
    seq_len: int = 512
    targets: str = "experts"
    device: str = "cpu"
    min_tokens: int = 64  # GPTQ: experts with fewer routed calibration tokens fall back to RTN
    act_order: bool = True
    damp: float = 0.01
    max_shard_bytes: int = DEFAULT_SHARD_BYTES


def _check(o: Options, scheme_spec) -> None:
    if o.algo not in ("rtn", "gptq"):
        raise ValueError(f"--algo {o.algo!r}: expected 'rtn' or 'gptq'")
    if o.targets not in ("experts", "all"):
        raise ValueError(f"--targets {o.targets!r}: expected 'experts' or 'all'")
    if o.algo == "gptq" and not scheme_spec.integer:
        raise ValueError(f"--algo gptq supports the integer schemes (w4a16, w4a16-asym, w8a16), not {o.scheme!r}")
    if o.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {o.device}: CUDA is not available")
    if o.calib is not None and not Path(o.calib).is_file():
        raise FileNotFoundError(f"--calib {o.calib}: no such text file")
    if o.num_samples < 1 or o.seq_len < 1:
        raise ValueError(f"--num-samples and --seq-len must be positive, got {o.num_samples}, {o.seq_len}")


class LayerQuantizer:
    """Quantizes the target Linears one decoder layer at a time (in increasing layer order) and hands out their
    compressed tensors; records tokens, fallbacks and weight SQNR per layer for the report."""

    def __init__(self, ckpt, plan, scheme, opts: Options, calibrator=None):
        from moequant.quantize.plan import layer_of

        self.ckpt, self.plan, self.scheme, self.o, self.cal = ckpt, plan, scheme, opts, calibrator
        self.by_layer: dict[int | None, list[str]] = {}
        for m in plan.targets:
            self.by_layer.setdefault(layer_of(m), []).append(m)
        self.cache: dict[str, dict[str, torch.Tensor]] = {}
        self.modules: dict[str, dict] = {}  # report entries
        self.sqnr: dict[int, list[float]] = {}  # layer -> [signal, noise]

    def tensor(self, module: str, suffix: str) -> torch.Tensor:
        from moequant.quantize.plan import layer_of

        if module not in self.cache:
            self._quantize_layer(layer_of(module))
        out = self.cache[module].pop(suffix)
        if not self.cache[module]:
            del self.cache[module]
        return out

    def _partners(self, module: str) -> list[str]:
        """Modules sharing an NVFP4 global scale with `module` (gate/up of one expert, q/k/v of one attention)."""
        head, last = module.rsplit(".", 1)
        spec = self.ckpt.spec
        groups = ((spec.proj_names[0], spec.proj_names[2]), ("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj"))
        for group in groups:
            if last in group:
                return [f"{head}.{p}" for p in group if f"{head}.{p}.weight" in self.ckpt.index]
        return [module]

    def _quantize_layer(self, L: int | None) -> None:
        from moequant.quantize import gptq, rtn

        mods = self.by_layer.get(L, [])
        stats = self.cal.stats(L) if self.cal is not None and L is not None else {}
        args = self.scheme.weights
        tensor_group = getattr(args.strategy, "value", args.strategy) == "tensor_group"
        for m in mods:
            w = self.ckpt.index.read(m + ".weight")
            st = stats.get(m)
            entry = {"tokens": st.tokens if st else 0, "algo": "rtn"}
            gs = rtn.global_scale([self.ckpt.index.read(p + ".weight") for p in self._partners(m)]) \
                if tensor_group else None
            extra = {}
            if self.scheme.input_activations is not None and self.scheme.input_activations.dynamic is not True:
                amax = st.amax if st is not None and st.tokens else None
                if amax is None:
                    amax = self._fallback_amax(m, stats)
                    entry["input_scale"] = "no routed calibration tokens: the layer's largest input amax"
                extra = rtn.input_qparams(amax, self.scheme, w.dtype)
            if self.o.algo == "gptq":
                if st is None or st.hessian is None:
                    entry["fallback"] = "no calibration inputs captured"
                elif st.tokens < self.o.min_tokens:
                    entry["fallback"] = f"{st.tokens} routed calibration tokens < min_tokens {self.o.min_tokens}"
            if self.o.algo == "gptq" and "fallback" not in entry:
                scale, zp = rtn.weight_qparams(w, args)
                dq = gptq.gptq_quantize(w, st.hessian, st.tokens, scale, zp, args.num_bits, args.group_size,
                                        act_order=self.o.act_order, damp=self.o.damp)
                out = rtn.compress(dq.cpu(), self.scheme, scale, zp, gs, extra)
                entry["algo"] = "gptq"
            else:
                out = rtn.quantize_weight(w, self.scheme, m, gs, extra)
            self._measure(L, m, w, out)
            self.cache[m] = out
            self.modules[m] = entry
        stats.clear()

    def _fallback_amax(self, m: str, stats: dict) -> torch.Tensor:
        proj = m.rsplit(".", 1)[-1]
        seen = [s.amax for n, s in stats.items() if n.endswith("." + proj) and s.tokens]
        if not seen:
            warnings.warn(f"{m}: no calibration tokens reached this Linear or its siblings; input scale from amax 1.0")
            return torch.ones(())
        warnings.warn(f"{m}: no routed calibration tokens; static input scale from the layer's largest {proj} amax")
        return torch.stack(seen).amax()

    def _measure(self, L, m: str, w: torch.Tensor, out: dict) -> None:
        from compressed_tensors.compressors import BaseCompressor

        comp = BaseCompressor.get_value_from_registry(getattr(self.scheme.format, "value", self.scheme.format))
        dq = comp.decompress(dict(out), self.scheme)["weight"].float()
        ref = w.float()
        sig, noise = float(ref.pow(2).sum()), float((ref - dq).pow(2).sum())
        acc = self.sqnr.setdefault(-1 if L is None else L, [0.0, 0.0])
        acc[0] += sig
        acc[1] += noise


def sqnr_db(signal: float, noise: float) -> float:
    import math

    return float("inf") if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def quantize_checkpoint(src: str | os.PathLike | None = None, out: str | os.PathLike = "moequant-out",
                        scheme: str = "w4a16", group_size: int | None = None, algo: str = "rtn",
                        calib: str | os.PathLike | None = None, num_samples: int = 128, seq_len: int = 512,
                        targets: str = "experts", device: str = "cpu", *, overwrite: bool = False,
                        progress: bool = True, **options) -> Path:
    """Quantize checkpoint `src` (folder or hub id; None = the built-in demo model) into `out`. Extra options
    (min_tokens, act_order, damp, max_shard_bytes) are Options fields. Returns the output folder."""
    from moequant.checkpoint import Checkpoint
    from moequant.loaders.hub import resolve_checkpoint
    from moequant.quantize import schemes
    from moequant.quantize.plan import make_plan
    from moequant.quantize.writer import ShardWriter, plan_shards

    t0 = time.time()
    o = Options(scheme=scheme, group_size=group_size, algo=algo, calib=None if calib is None else str(calib),
                num_samples=num_samples, seq_len=seq_len, targets=targets, device=device, **options)
    sspec = schemes.spec(o.scheme)
    _check(o, sspec)
    if src is None:
        from moequant.data import demo_model_path

        src = demo_model_path()
    folder = Path(resolve_checkpoint(src))
    ckpt = Checkpoint(folder, name=os.fspath(src))
    try:
        if ckpt.format.source != "unquantized":
            raise ValueError(f"{folder}: the checkpoint is already quantized ({ckpt.format.describe()}); quantize "
                             f"needs an unquantized (bf16/fp16/fp32) checkpoint")
        if ckpt.spec.fused is not None:
            raise NotImplementedError(f"{folder}: fused-expert checkpoints ({ckpt.spec.name}) are not supported by "
                                      f"quantize yet; supported: per-expert layouts (Mixtral, Qwen, OLMoE, DeepSeek)")
        in_dims = _target_in_dims(ckpt, o.targets)
        g = schemes.pick_group_size(o.scheme, o.group_size, in_dims)
        actorder = "weight" if o.algo == "gptq" and o.act_order else None
        ct = schemes.ct_scheme(o.scheme, ["Linear"], g, actorder)
        plan = make_plan(ckpt, ct, o.targets)
        ct.targets = plan.config_targets
        specs = [(n, d, s) for n, (d, s) in plan.specs.items()]
        shards = plan_shards(specs, o.max_shard_bytes)
        fingerprint = {"source": str(folder.resolve()), "source_bytes": ckpt.index.total_bytes,
                       "options": dataclasses.asdict(o), "group_size": g,
                       "calib": _file_id(o.calib), "format_version": 1}
        cal = None
        if o.algo == "gptq" or sspec.static_input:  # calibration: GPTQ Hessians, static input scales
            from moequant.quantize.calibration import LayerCalibrator, calibration_ids

            ids = calibration_ids(folder, o.calib, o.num_samples, o.seq_len)
            cal = LayerCalibrator(ckpt, ids, device=o.device, hessian=o.algo == "gptq")
        writer = ShardWriter(out, shards, fingerprint, overwrite=overwrite)
        lq = LayerQuantizer(ckpt, plan, ct, o, cal)
        _write_shards(ckpt, plan, shards, writer, lq, progress)
        report = _report(ckpt, o, g, lq, cal, time.time() - t0, resumed=len(lq.modules) < len(plan.targets))
        config = dict(ckpt.config)
        config["quantization_config"] = schemes.quantization_config(ct, plan.ignore)
        path = writer.finish(config, folder, {REPORT: report})
    finally:
        ckpt.close()
    if progress:
        print_summary(report)
    return path


def _target_in_dims(ckpt, targets: str) -> set[int]:
    from moequant.quantize.plan import _is_linear_weight, expert_modules, ignored_modules

    experts, ig = expert_modules(ckpt), set(ignored_modules(ckpt))
    dims = set()
    for n in ckpt.index.names():
        mod = n[: -len(".weight")] if n.endswith(".weight") else None
        if mod in experts or (targets == "all" and mod not in ig and _is_linear_weight(n, ckpt.index.info(n))):
            dims.add(ckpt.index.info(n).shape[1])
    return dims


def _file_id(path: str | None):
    if path is None:
        return None
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_shards(ckpt, plan, shards, writer, lq: LayerQuantizer, progress: bool) -> None:
    from tqdm.auto import tqdm

    total = sum(len(s.names) for s in shards)
    with tqdm(total=total, unit="tensor", desc="quantize", disable=not progress) as bar:
        for shard in shards:
            if writer.is_done(shard):
                bar.update(len(shard.names))
                continue
            tensors = {}
            for n in shard.names:
                src, suffix = plan.sources[n]
                tensors[n] = ckpt.index.read(src) if suffix is None else lq.tensor(src, suffix)
                bar.update(1)
            writer.write(shard, tensors, plan.specs)
            del tensors


def _report(ckpt, o: Options, g, lq: LayerQuantizer, cal, seconds: float, resumed: bool) -> dict:
    layers = {str(L): {"weight_sqnr_db": round(sqnr_db(*v), 3)} for L, v in sorted(lq.sqnr.items())}
    fallbacks = {m: e["fallback"] for m, e in lq.modules.items() if "fallback" in e}
    input_fallbacks = {m: e["input_scale"] for m, e in lq.modules.items() if "input_scale" in e}
    return {
        "scheme": o.scheme, "algo": o.algo, "group_size": g, "targets": o.targets, "device": o.device,
        "calibration": None if cal is None else {"samples": int(cal.ids.shape[0]), "seq_len": int(cal.ids.shape[1]),
                                                 "text": o.calib or "moequant demo training stdlib files",
                                                 "min_tokens": o.min_tokens},
        "resumed": resumed,
        "layers": layers,
        "tokens_per_module": {m: e["tokens"] for m, e in lq.modules.items()} if cal is not None else {},
        "fallbacks": fallbacks,
        "input_scale_fallbacks": input_fallbacks,
        "seconds": round(seconds, 2),
    }


def print_summary(report: dict) -> None:
    """Per-layer weight SQNR table (rich)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"moequant quantize: {report['scheme']} ({report['algo']}), weight SQNR per layer")
    t.add_column("layer", justify="right")
    t.add_column("weight SQNR (dB)", justify="right")
    for L, v in report["layers"].items():
        t.add_row("other" if L == "-1" else L, f"{v['weight_sqnr_db']:.2f}")
    if report["fallbacks"]:
        t.caption = f"{len(report['fallbacks'])} modules fell back to RTN (see {REPORT})"
    Console(stderr=True).print(t)
