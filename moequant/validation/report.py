"""The validator's result: per-layer and per-expert figures, end-to-end figures; JSON and a rich table.

JSON has no inf/NaN, so non-finite figures are written as the strings "inf", "-inf", "nan" (load_json turns them
back into floats). A NaN figure means QUANT produced NaN/inf there; `nonfinite` says how many values.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

NAN = float("nan")


@dataclass
class ExpertReport:
    """One expert of one layer. tokens: tokens REF's router sent to it. sqnr_db, rel_err, max_abs_err: its weighted
    output contribution w[t] * expert(x[t]) on those tokens (None when it got no token), both blocks routed by REF.
    probe_*: the same expert on a fixed probe of tokens with weight 1, so that unrouted experts are checked too.
    nonfinite: NaN/inf values in QUANT's contribution and probe together."""

    expert: int
    tokens: int
    sqnr_db: float | None
    rel_err: float | None
    max_abs_err: float | None
    probe_sqnr_db: float
    nonfinite: int


@dataclass
class LayerReport:
    """One MoE layer: the block outputs of REF and QUANT on the same inputs x [T, H].

    sqnr_db = 10 log10(sum y_ref^2 / sum (y_ref - y_quant)^2); rel_err = ||dy|| / ||y_ref||; cosine; max |dy|;
    routing_changed = fraction of tokens whose top-k expert set differs between the two routers."""

    layer: int
    sqnr_db: float
    rel_err: float
    cosine: float
    max_abs_err: float
    routing_changed: float
    nonfinite: int
    tokens: int
    inputs: str  # "real" (hidden states captured from REF's forward) or "random" (RMS-scaled Gaussian)
    scheme: str  # QUANT's scheme of this layer
    experts: list[ExpertReport] = field(default_factory=list)

    @property
    def nonfinite_experts(self) -> list[int]:
        return [e.expert for e in self.experts if e.nonfinite]


@dataclass
class EndToEndReport:
    """Next-token figures over `tokens` positions of `text_source`.

    ppl = exp(mean -log p(next token)); kl = mean_t KL(p_ref || p_quant) in nats; top1_agreement = mean_t
    [argmax ref == argmax quant]. ref is transformers' model; quant is the same model with each MoE block replaced
    by moequant's block loaded from QUANT; ref_moequant the same with blocks from REF (a sanity check: it must
    match ref up to float noise). routing_changed[i]: per compared layer, fraction of tokens whose top-k set on the
    quant path differs from the ref_moequant path (the hidden states drift, so the routers may choose differently)."""

    tokens: int
    windows: int
    seq_len: int
    text_source: str
    ppl_ref: float
    ppl_quant: float
    ppl_ref_moequant: float
    kl: float
    top1_agreement: float
    kl_ref_moequant: float
    top1_ref_moequant: float
    max_abs_logit_diff_ref_moequant: float
    routing_changed: dict[int, float] = field(default_factory=dict)
    bits_per_byte_ref: float | None = None
    bits_per_byte_quant: float | None = None

    @property
    def ppl_ratio(self) -> float:
        """ppl_quant / ppl_ref (1.0 = no loss)."""
        return self.ppl_quant / self.ppl_ref


@dataclass
class Report:
    ref: str
    quant: str
    device: str
    dtype: str
    layers: list[LayerReport]
    end_to_end: EndToEndReport | None
    end_to_end_skipped: str | None = None  # why there is no end-to-end part
    notes: list[str] = field(default_factory=list)

    @property
    def mean_sqnr_db(self) -> float:
        """Mean of the layers' SQNR in dB (NaN if any layer is NaN; inf only if every layer is exact)."""
        xs = [L.sqnr_db for L in self.layers]
        if any(math.isnan(x) for x in xs):
            return NAN
        return sum(xs) / len(xs) if xs else NAN

    @property
    def min_sqnr_db(self) -> float:
        xs = [L.sqnr_db for L in self.layers]
        return NAN if not xs or any(math.isnan(x) for x in xs) else min(xs)

    @property
    def nonfinite_experts(self) -> dict[int, list[int]]:
        """{layer: [experts whose QUANT output held NaN/inf]}, only layers with some."""
        return {L.layer: L.nonfinite_experts for L in self.layers if L.nonfinite_experts}

    # --- JSON ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = {"mean_sqnr_db": self.mean_sqnr_db, "min_sqnr_db": self.min_sqnr_db,
                        "nonfinite_experts": {str(k): v for k, v in self.nonfinite_experts.items()},
                        "layers": len(self.layers)}
        if self.end_to_end is not None:
            d["end_to_end"]["ppl_ratio"] = self.end_to_end.ppl_ratio
            d["end_to_end"]["routing_changed"] = {str(k): v for k, v in self.end_to_end.routing_changed.items()}
        return _encode(d)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    # --- terminal ------------------------------------------------------------------------------------------
    def print(self, console=None, experts: bool = False) -> None:
        """Rich tables: one row per layer (and per expert with experts=True), then the end-to-end figures."""
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        schemes = sorted({L.scheme for L in self.layers})
        inputs = sorted({f"{L.inputs} ({L.tokens} tokens)" for L in self.layers})
        t = Table(title=f"moequant validate  QUANT {self.quant}  vs  REF {self.ref}\n"
                        f"{', '.join(schemes)}; {', '.join(inputs)} inputs; {self.device} {self.dtype}")
        for col in ("layer", "SQNR dB", "rel err", "cosine", "max err", "route chg", "worst expert", "NaN/inf"):
            t.add_column(col, justify="right")
        for L in self.layers:
            bad = ",".join(str(e) for e in L.nonfinite_experts)
            t.add_row(str(L.layer), _fmt(L.sqnr_db, ".2f"), _fmt(L.rel_err, ".1e"), _fmt(L.cosine, ".5f"),
                      _fmt(L.max_abs_err, ".1e"), f"{100 * L.routing_changed:.1f}%", _worst_expert(L),
                      f"[bold red]{bad}[/]" if bad else "-")
        console.print(t)
        if experts:
            for L in self.layers:
                te = Table(title=f"layer {L.layer}: experts (probe: {L.tokens and min(L.tokens, 64)} tokens, weight 1)")
                for col in ("expert", "tokens", "SQNR dB", "rel err", "max err", "probe SQNR dB", "NaN/inf"):
                    te.add_column(col, justify="right")
                for e in L.experts:
                    te.add_row(str(e.expert), str(e.tokens), _fmt(e.sqnr_db, ".2f"), _fmt(e.rel_err, ".2e"),
                               _fmt(e.max_abs_err, ".2e"), _fmt(e.probe_sqnr_db, ".2f"),
                               f"[bold red]{e.nonfinite}[/]" if e.nonfinite else "0")
                console.print(te)
        console.print(f"mean layer SQNR {_fmt(self.mean_sqnr_db, '.2f')} dB, min {_fmt(self.min_sqnr_db, '.2f')} dB")
        if self.nonfinite_experts:
            console.print(f"[bold red]NaN/inf in QUANT's output: {self.nonfinite_experts} (layer: experts)[/]")
        e2e = self.end_to_end
        if e2e is None:
            console.print(f"end to end: skipped ({self.end_to_end_skipped})")
        else:
            te = Table(title=f"end to end: {e2e.tokens} tokens ({e2e.windows} windows <= {e2e.seq_len}) of "
                             f"{e2e.text_source}")
            for col in ("model", "perplexity", "bits/byte", "KL nats", "top-1 agree"):
                te.add_column(col, justify="right" if col != "model" else "left")
            te.add_row("REF transformers", _fmt(e2e.ppl_ref, ".4f"), _fmt(e2e.bits_per_byte_ref, ".4f"), "0", "100%")
            te.add_row("REF moequant", _fmt(e2e.ppl_ref_moequant, ".4f"), "", _fmt(e2e.kl_ref_moequant, ".2e"),
                       _pct(e2e.top1_ref_moequant))
            te.add_row("QUANT moequant", _fmt(e2e.ppl_quant, ".4f"), _fmt(e2e.bits_per_byte_quant, ".4f"),
                       _fmt(e2e.kl, ".2e"), _pct(e2e.top1_agreement))
            console.print(te)
            console.print(f"perplexity ratio QUANT / REF: {_fmt(e2e.ppl_ratio, '.4f')}")
        for note in self.notes:
            console.print(f"note: {note}")


def _worst_expert(L: LayerReport) -> str:
    xs = [(e.sqnr_db, e.expert) for e in L.experts if e.sqnr_db is not None]
    if not xs:
        return "-"
    nan = [e for s, e in xs if math.isnan(s)]
    if nan:
        return f"{nan[0]} (nan)"
    s, e = min(xs)
    return f"{e} ({_fmt(s, '.2f')})"


def _fmt(x, spec: str) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec)


def _pct(x) -> str:
    return "nan" if x is None or math.isnan(x) else f"{100 * x:.2f}%"


def _encode(x):
    """Non-finite floats -> "inf" / "-inf" / "nan" strings, recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _encode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_encode(v) for v in x]
    return x


def _decode(x):
    if isinstance(x, str) and x in ("inf", "-inf", "nan"):
        return float(x)
    if isinstance(x, dict):
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v) for v in x]
    return x


def load_json(path: str | Path) -> dict:
    """A report's JSON as a dict, with "inf"/"-inf"/"nan" strings back as floats."""
    return _decode(json.loads(Path(path).read_text()))
