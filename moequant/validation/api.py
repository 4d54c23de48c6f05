"""`validate(REF, QUANT)`: layer-wise and end-to-end accuracy of a quantized MoE checkpoint against its original.

    report = validate("original/", "quantized/", json_path="report.json", plot_path="report.png")
    report.mean_sqnr_db, report.layers[0].experts[3].sqnr_db, report.end_to_end.ppl_quant
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moequant.validation.inputs import ValidationError

DEFAULT_TOKENS = 2048
DEFAULT_SEQ_LEN = 256


def _open(x, role: str):
    from moequant.checkpoint import Checkpoint, open_checkpoint

    if isinstance(x, Checkpoint):
        return x
    try:
        return open_checkpoint(x)
    except (ValueError, OSError) as e:
        raise ValidationError(f"{role} {os.fspath(x)}: cannot open it as a checkpoint ({e})") from None


def _block(ckpt, layer: int, device, dtype, role: str):
    try:
        return ckpt.moe_block(layer, device=device, dtype=dtype)
    except NotImplementedError as e:
        raise ValidationError(f"{role} {ckpt.name}: moequant cannot load layer {layer} ({e})") from None


def validate(ref, quant, layers=None, tokens: int = DEFAULT_TOKENS, calib: str | os.PathLike | None = None,
             device: str = "cpu", json_path: str | os.PathLike | None = None,
             plot_path: str | os.PathLike | None = None, *, dtype: torch.dtype | None = None,
             seq_len: int = DEFAULT_SEQ_LEN, inputs: str = "auto", end_to_end: bool = True, seed: int = 0,
             print_report: bool = False):
    """Compare QUANT with REF (paths, hub ids or open Checkpoints) and return a Report.

    layers: MoE layer numbers (list or '0-3,7'), default all. tokens: evaluated token positions (layer-wise inputs
    and end-to-end predictions). calib: a UTF-8 text file, default the demo corpus's held-out stdlib files.
    inputs: 'real' (REF's hidden states, needs transformers to run REF), 'random' (RMS-scaled Gaussian), or 'auto'
    (real when possible). dtype: block and model dtype, default float32 on the CPU and bfloat16 on a GPU."""
    from moequant.validation import end_to_end as e2e
    from moequant.validation import hf_model
    from moequant.validation.inputs import check_compatible, default_text, read_text, select_layers
    from moequant.validation.layerwise import compare_layer, random_inputs
    from moequant.validation.report import Report

    if inputs not in ("auto", "real", "random"):
        raise ValidationError(f"inputs must be 'auto', 'real' or 'random', got {inputs!r}")
    if int(tokens) < 1:
        raise ValidationError(f"--tokens must be positive, got {tokens}")
    ref_ck, quant_ck = _open(ref, "REF"), _open(quant, "QUANT")
    check_compatible(ref_ck, quant_ck)
    chosen = select_layers(ref_ck, layers, "--layers")
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    text, source = (read_text(calib), str(calib)) if calib is not None else default_text()
    notes: list[str] = []

    why_not = hf_model.transformers_has(ref_ck) if (inputs != "random" or end_to_end) else "not asked for"
    model = None
    if why_not is None:
        try:
            ids, byte_level = e2e.encode_text(ref_ck, text)
            model = hf_model.load_model(ref_ck, device, dtype)
        except ValidationError as e:  # no tokenizer, or transformers cannot load REF: fall back unless 'real'
            if inputs == "real":
                raise
            why_not = str(e)
    if model is None and inputs == "real":
        raise ValidationError(f"inputs='real' needs REF {ref_ck.name} to run in transformers, but {why_not}")

    captured, windows, ref_logits = {}, [], []
    if model is not None:
        windows = e2e.batch_windows(e2e.make_windows(ids, seq_len, int(tokens)))
        with hf_model.capture_inputs(model, chosen) as cap:
            ref_logits = [e2e.logits_of(model, x, device) for x, _ in windows]
        captured = {L: torch.cat(cap[L]) for L in chosen}

    # layer by layer: only one layer's REF and QUANT blocks are held, unless the end-to-end run reuses them
    keep = end_to_end and model is not None
    ref_blocks, quant_blocks, layer_reports = {}, {}, []
    for L in chosen:
        rb, qb = _block(ref_ck, L, device, dtype, "REF"), _block(quant_ck, L, device, dtype, "QUANT")
        real = inputs != "random" and L in captured
        x = captured.pop(L) if real else random_inputs(ref_ck, L, int(tokens), seed).to(device)
        layer_reports.append(compare_layer(L, rb, qb, x.to(dtype), "real" if real else "random",
                                           quant_ck.layer_scheme(L).scheme))
        if keep:
            ref_blocks[L], quant_blocks[L] = rb, qb
        del rb, qb, x
    if inputs == "random" or model is None:
        notes.append(f"layer-wise inputs are random (RMS-scaled Gaussian): "
                     f"{'asked for' if inputs == 'random' else why_not}")

    e2e_report, skipped = None, None
    if not end_to_end:
        skipped = "not asked for"
    elif model is None:
        skipped = why_not
    else:
        for L in ref_ck.moe_layers:  # the whole model's MoE blocks are replaced, not only the compared layers
            if L not in ref_blocks:
                ref_blocks[L] = _block(ref_ck, L, device, dtype, "REF")
                quant_blocks[L] = _block(quant_ck, L, device, dtype, "QUANT")
        f = e2e.run_windows(model, windows, ref_logits, device, ref_blocks, quant_blocks, dtype)
        e2e_report = e2e.to_report(f, windows, seq_len, source, byte_level)
    report = Report(ref_ck.name, quant_ck.name, str(device), str(dtype).removeprefix("torch."), layer_reports,
                    e2e_report, skipped, notes)
    if json_path is not None:
        report.to_json(json_path)
    if plot_path is not None:
        from moequant.validation.plot import save_plot

        save_plot(report, Path(plot_path))
    if print_report:
        report.print()
    return report
