"""Accuracy figures for comparing a quantized model (test) with its original (ref). Pure torch, float64 throughout.

# N elements, T tokens, V vocabulary, K top-k

Non-finite policy (one rule for every function here): the reference must be finite (ValueError otherwise, since a
broken reference is a bug in the caller); a NaN or +-inf anywhere in `test` makes the figure float('nan'). NaN then
propagates through any mean a caller takes, so a broken expert or layer is never averaged away; `nonfinite_count`
and `ErrorStats.nonfinite` say how many values were bad so that a report can name them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "ErrorStats", "bits_per_byte", "cosine", "error_stats", "kl_divergence", "max_abs_err", "nonfinite_count",
    "perplexity", "rel_err", "routing_changed", "sqnr_db", "token_nll", "top1_agreement",
]

NAN = float("nan")


def nonfinite_count(x: torch.Tensor) -> int:
    """Number of NaN / +-inf values in x."""
    return int((~torch.isfinite(x)).sum().item()) if x.is_floating_point() else 0


def _pair(ref: torch.Tensor, test: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(ref, test) flattened to float64 on the CPU, and whether test is all finite. Checks shapes and ref."""
    if ref.shape != test.shape:
        raise ValueError(f"{what}: ref has shape {tuple(ref.shape)} but test has {tuple(test.shape)}; expected equal")
    if nonfinite_count(ref):
        raise ValueError(f"{what}: ref holds {nonfinite_count(ref)} NaN/inf values; the reference must be finite")
    return ref.detach().reshape(-1).double().cpu(), test.detach().reshape(-1).double().cpu(), nonfinite_count(test) == 0


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10( sum ref^2 / sum (ref - test)^2 ) in dB.

    inf when test == ref (zero noise, including both all-zero); -inf when ref is all zero but test is not;
    NaN when test holds NaN/inf. For test = ref + noise of standard deviation sigma*std(ref): about -20 log10(sigma)."""
    r, t, ok = _pair(ref, test, "sqnr_db")
    if not ok:
        return NAN
    signal, noise = (r * r).sum().item(), ((r - t) ** 2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def rel_err(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Relative error ||ref - test||_2 / ||ref||_2 (Frobenius over all elements); 0 when equal, inf when ref = 0 != test."""
    r, t, ok = _pair(ref, test, "rel_err")
    if not ok:
        return NAN
    num, den = (r - t).norm().item(), r.norm().item()
    if num == 0.0:
        return 0.0
    return math.inf if den == 0.0 else num / den


def cosine(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Cosine similarity <ref, test> / (||ref|| ||test||) over all elements; 1 when both are zero, 0 when only one is."""
    r, t, ok = _pair(ref, test, "cosine")
    if not ok:
        return NAN
    nr, nt = r.norm().item(), t.norm().item()
    if nr == 0.0 or nt == 0.0:
        return 1.0 if nr == nt else 0.0
    return max(-1.0, min(1.0, torch.dot(r, t).item() / (nr * nt)))


def max_abs_err(ref: torch.Tensor, test: torch.Tensor) -> float:
    """max |ref - test| over all elements (0 for empty tensors)."""
    r, t, ok = _pair(ref, test, "max_abs_err")
    if not ok:
        return NAN
    return (r - t).abs().max().item() if r.numel() else 0.0


@dataclass(frozen=True)
class ErrorStats:
    """All tensor-comparison figures at once; `nonfinite` > 0 means test had NaN/inf and the figures are NaN."""

    sqnr_db: float
    rel_err: float
    cosine: float
    max_abs_err: float
    nonfinite: int
    numel: int

    @property
    def finite(self) -> bool:
        return self.nonfinite == 0


def error_stats(ref: torch.Tensor, test: torch.Tensor) -> ErrorStats:
    """sqnr_db, rel_err, cosine and max_abs_err of test against ref, with the count of non-finite test values."""
    return ErrorStats(sqnr_db(ref, test), rel_err(ref, test), cosine(ref, test), max_abs_err(ref, test),
                      nonfinite_count(test), ref.numel())


def routing_changed(ref_ids: torch.Tensor, test_ids: torch.Tensor) -> float:
    """Fraction of tokens whose top-k expert SET differs: mean_t [ set(ref_ids[t]) != set(test_ids[t]) ].

    ref_ids, test_ids: [T, K] integer expert ids; the order within a row does not matter. 0 tokens -> 0.0."""
    if ref_ids.shape != test_ids.shape or ref_ids.dim() != 2:
        raise ValueError(f"routing_changed: expected two [T, K] id tensors of one shape, got ref {tuple(ref_ids.shape)} "
                         f"and test {tuple(test_ids.shape)}")
    if ref_ids.is_floating_point() or test_ids.is_floating_point():
        raise ValueError("routing_changed: expert ids must be integer tensors (topk indices), not floating point")
    if ref_ids.shape[0] == 0:
        return 0.0
    a, b = ref_ids.cpu().sort(dim=1).values, test_ids.cpu().sort(dim=1).values
    return (a != b).any(dim=1).double().mean().item()


def _logits_pair(ref: torch.Tensor, test: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Logits [..., V] as float64 [T, V] pairs; checks shapes and a finite ref."""
    if ref.shape != test.shape or ref.dim() < 2:
        raise ValueError(f"{what}: expected two logits tensors [..., V] of one shape, got ref {tuple(ref.shape)} "
                         f"and test {tuple(test.shape)}")
    if nonfinite_count(ref):
        raise ValueError(f"{what}: ref logits hold {nonfinite_count(ref)} NaN/inf values; the reference must be finite")
    V = ref.shape[-1]
    return ref.detach().reshape(-1, V).double().cpu(), test.detach().reshape(-1, V).double().cpu(), nonfinite_count(test) == 0


def kl_divergence(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    """Mean over tokens of KL(p_ref || p_test) = sum_v p_ref(v) (log p_ref(v) - log p_test(v)), in nats.

    p = softmax(logits) over the last dim, computed with log_softmax in float64. [..., V] logits; leading dims are tokens.
    0 tokens -> 0.0; NaN/inf in test -> NaN."""
    r, t, ok = _logits_pair(ref_logits, test_logits, "kl_divergence")
    if not ok:
        return NAN
    if r.shape[0] == 0:
        return 0.0
    lr, lt = torch.log_softmax(r, dim=-1), torch.log_softmax(t, dim=-1)
    return (lr.exp() * (lr - lt)).sum(dim=-1).mean().clamp_min(0.0).item()


def top1_agreement(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    """Fraction of tokens where argmax(test) == argmax(ref). 0 tokens -> 1.0 (nothing disagrees); NaN/inf in test -> NaN."""
    r, t, ok = _logits_pair(ref_logits, test_logits, "top1_agreement")
    if not ok:
        return NAN
    if r.shape[0] == 0:
        return 1.0
    return (r.argmax(dim=-1) == t.argmax(dim=-1)).double().mean().item()


def token_nll(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> tuple[float, int]:
    """(sum over counted tokens of -log softmax(logits)[target], number of counted tokens), float64, in nats.

    logits [..., V], targets [...] already aligned (targets[i] is the token that logits[i] predicts); positions equal
    to ignore_index are skipped. NaN/inf in logits -> (NaN, count)."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"token_nll: logits {tuple(logits.shape)} need targets of shape {tuple(logits.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    V = logits.shape[-1]
    x, y = logits.detach().reshape(-1, V), targets.detach().reshape(-1).to(logits.device)
    keep = y != ignore_index
    n = int(keep.sum().item())
    if n and (y[keep].min().item() < 0 or y[keep].max().item() >= V):
        raise ValueError(f"token_nll: targets must lie in [0, {V}) or equal ignore_index={ignore_index}")
    if nonfinite_count(x):
        return NAN, n
    lp = torch.log_softmax(x[keep].double(), dim=-1)
    return -lp.gather(1, y[keep].unsqueeze(1)).sum().item(), n


def perplexity(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> float:
    """exp( mean over counted tokens of -log p(target) ). A uniform predictor over V tokens has perplexity V."""
    nll, n = token_nll(logits, targets, ignore_index)
    if n == 0:
        raise ValueError("perplexity: no target token left after ignore_index; cannot average over zero tokens")
    return math.exp(nll / n) if not math.isnan(nll) else NAN


def bits_per_byte(logits: torch.Tensor, targets: torch.Tensor, num_bytes: int | None = None,
                  ignore_index: int = -100) -> float:
    """Total code length in bits per byte of text: sum_t -log2 p(target_t) / num_bytes.

    num_bytes defaults to the number of counted targets (right for a byte-level tokenizer, one token = one byte);
    pass the text's UTF-8 length for any other tokenizer. A uniform predictor over V tokens on byte tokens: log2 V."""
    nll, n = token_nll(logits, targets, ignore_index)
    num_bytes = n if num_bytes is None else int(num_bytes)
    if num_bytes <= 0:
        raise ValueError(f"bits_per_byte: num_bytes must be positive, got {num_bytes}")
    return nll / math.log(2.0) / num_bytes
