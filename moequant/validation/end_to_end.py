"""End to end: next-token figures of REF (transformers) and of REF with its MoE blocks replaced by moequant blocks
loaded from QUANT (and, as a sanity check, from REF itself), over windows of an evaluation text.

T tokens, S window length, V vocabulary.

    ppl  = exp( sum_t -log p(x_{t+1} | x_<=t) / T )
    kl   = (1/T) sum_t KL(p_ref,t || p_quant,t)          (nats; each window's mean weighted by its length)
    top1 = (1/T) sum_t [argmax p_ref,t = argmax p_quant,t]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moequant.validate_metrics import kl_divergence, routing_changed, token_nll, top1_agreement
from moequant.validation.inputs import ValidationError


def encode_text(ckpt, text: str) -> tuple[torch.Tensor, bool]:
    """(ids [N] int64, byte_level): with the checkpoint's byte_tokenizer.json (the demo model) or its transformers
    tokenizer; the tokenizer's BOS token goes first when it has one."""
    from moequant.data.byte_tokenizer import FILE_NAME, ByteTokenizer

    if (ckpt.folder / FILE_NAME).is_file():
        return ByteTokenizer.load(ckpt.folder).encode_tensor(text, bos=True), True
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ckpt.folder, local_files_only=True)
    except Exception as e:  # no tokenizer files, or transformers cannot read them
        raise ValidationError(f"REF {ckpt.name}: no tokenizer to encode the evaluation text ({type(e).__name__}: {e}); "
                              f"REF's folder needs tokenizer files or {FILE_NAME}") from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < min(2, len(text)):
        raise ValidationError(f"REF {ckpt.name}: no tokenizer that works: transformers' {type(tok).__name__} turned "
                              f"{len(text)} characters into {len(ids)} tokens (REF's folder lacks tokenizer files?)")
    if tok.bos_token_id is not None:
        ids = [tok.bos_token_id, *ids]
    return torch.tensor(ids, dtype=torch.long), False


def make_windows(ids: torch.Tensor, seq_len: int, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (inputs [1, s], targets [1, s]) windows, s <= seq_len, covering the first `tokens` predicted
    positions (targets[i] = inputs[i + 1] in the token stream). Fewer when the text is shorter."""
    if seq_len < 1 or tokens < 1:
        raise ValidationError(f"--tokens and --seq-len must be positive, got tokens={tokens}, seq_len={seq_len}")
    n = min(tokens, ids.numel() - 1)
    if n < 1:
        raise ValidationError(f"the evaluation text has {ids.numel()} token(s); at least 2 are needed")
    out = []
    for a in range(0, n, seq_len):
        b = min(a + seq_len, n)
        out.append((ids[a:b].unsqueeze(0), ids[a + 1:b + 1].unsqueeze(0)))
    return out


def batch_windows(windows, max_tokens: int = 2048) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Windows of one length stacked into batches [B, s] of at most max(max_tokens, s) tokens (fewer forwards, so
    fewer expert dequantizations); the token order is kept."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for x, y in windows:
        if out and out[-1][0].shape[1] == x.shape[1] and out[-1][0].numel() + x.numel() <= max_tokens:
            out[-1] = (torch.cat([out[-1][0], x]), torch.cat([out[-1][1], y]))
        else:
            out.append((x, y))
    return out


@dataclass
class _Acc:
    """Running sums over windows for one compared model."""

    nll: float = 0.0
    kl: float = 0.0
    top1: float = 0.0
    max_diff: float = 0.0

    def add(self, ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        n = targets.numel()
        self.nll += token_nll(logits, targets)[0]
        self.kl += kl_divergence(ref_logits, logits) * n
        self.top1 += top1_agreement(ref_logits, logits) * n
        d = (ref_logits.double() - logits.double()).abs().max().item()
        self.max_diff = d if math.isnan(d) or math.isnan(self.max_diff) else max(self.max_diff, d)


@torch.no_grad()
def logits_of(model, inputs: torch.Tensor, device) -> torch.Tensor:
    """Logits [B * s, V] (float32, CPU) for input ids [B, s]."""
    logits = model(input_ids=inputs.to(device)).logits
    return logits.reshape(-1, logits.shape[-1]).float().cpu()


def run_windows(model, windows, ref_logits: list[torch.Tensor], device, ref_blocks: dict, quant_blocks: dict,
                dtype) -> dict:
    """Given transformers REF's logits per window, the forward passes of REF with moequant REF blocks and with
    moequant QUANT blocks swapped in. Returns the figures as a dict (see EndToEndReport)."""
    from moequant.validation.hf_model import swapped

    out = {}
    ids = {}
    for name, blocks in (("ref_moequant", ref_blocks), ("quant", quant_blocks)):
        acc = _Acc()
        with swapped(model, blocks, device, dtype) as wrappers:
            for (x, y), lr in zip(windows, ref_logits):
                acc.add(lr, logits_of(model, x, device), y.reshape(-1))
            ids[name] = {L: torch.cat(w.topk_ids) for L, w in wrappers.items()}
        out[name] = acc
    T = sum(y.numel() for _, y in windows)
    nll_ref = sum(token_nll(lr, y.reshape(-1))[0] for (_, y), lr in zip(windows, ref_logits))

    def ppl(nll: float) -> float:
        return math.exp(nll / T) if math.isfinite(nll) else float("nan")

    q, r = out["quant"], out["ref_moequant"]
    return dict(
        tokens=T, nll_ref=nll_ref, nll_quant=q.nll,
        ppl_ref=ppl(nll_ref), ppl_quant=ppl(q.nll), ppl_ref_moequant=ppl(r.nll),
        kl=q.kl / T, top1_agreement=q.top1 / T, kl_ref_moequant=r.kl / T, top1_ref_moequant=r.top1 / T,
        max_abs_logit_diff_ref_moequant=r.max_diff,
        routing_changed={L: routing_changed(ids["ref_moequant"][L], ids["quant"][L]) for L in ref_blocks},
    )


def to_report(f: dict, windows, seq_len: int, source: str, byte_level: bool):
    """EndToEndReport from run_windows' figures; bits per byte = nll / ln 2 / tokens when one token is one byte."""
    from moequant.validation.report import EndToEndReport

    bpb = {}
    if byte_level:
        bpb = dict(bits_per_byte_ref=f["nll_ref"] / math.log(2) / f["tokens"],
                   bits_per_byte_quant=f["nll_quant"] / math.log(2) / f["tokens"])
    keys = ("ppl_ref", "ppl_quant", "ppl_ref_moequant", "kl", "top1_agreement", "kl_ref_moequant",
            "top1_ref_moequant", "max_abs_logit_diff_ref_moequant", "routing_changed")
    return EndToEndReport(tokens=f["tokens"], windows=sum(x.shape[0] for x, _ in windows), seq_len=seq_len,
                          text_source=source, **{k: f[k] for k in keys}, **bpb)
