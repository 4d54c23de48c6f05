"""PNG of a Report: per-layer SQNR bars (left) and a per-expert SQNR heat map, layers x experts (right).

matplotlib is an optional extra (`pip install moequant[plot]`); without it save_plot raises ImportError saying so.
Non-finite cells: NaN/inf output is drawn black and marked 'NaN'; an exact (inf dB) expert is grey, 'exact'.
"""

from __future__ import annotations

import math
from pathlib import Path


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib, an optional extra: pip install 'moequant[plot]' "
                          "(or pip install matplotlib)") from None
    return plt


def save_plot(report, path: Path) -> Path:
    """Write the plot to `path` (PNG) and return it."""
    plt = _matplotlib()
    import numpy as np

    layers = [L.layer for L in report.layers]
    E = max((len(L.experts) for L in report.layers), default=0)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(6 + 0.35 * E, 2.5 + 0.35 * len(layers)),
                                   gridspec_kw={"width_ratios": [1, max(1.5, E / 8)]})
    finite = [L.sqnr_db for L in report.layers if math.isfinite(L.sqnr_db)]
    top = max(finite, default=1.0) * 1.1 or 1.0
    vals = [L.sqnr_db if math.isfinite(L.sqnr_db) else (top if L.sqnr_db > 0 else 0.0) for L in report.layers]
    colors = ["black" if math.isnan(L.sqnr_db) else ("tab:green" if L.sqnr_db == math.inf else "tab:blue")
              for L in report.layers]
    ax1.barh([str(x) for x in layers], vals, color=colors)
    for i, L in enumerate(report.layers):
        if not math.isfinite(L.sqnr_db):
            label = "NaN/inf output" if math.isnan(L.sqnr_db) else "exact"
            ax1.text(top * 0.02, i, label, va="center", color="red" if math.isnan(L.sqnr_db) else "white",
                     fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("SQNR (dB)")
    ax1.set_ylabel("MoE layer")
    ax1.set_title("layer output SQNR")
    grid = np.full((len(layers), E), np.nan)
    marks = {}
    for i, L in enumerate(report.layers):
        for e in L.experts:
            s = e.sqnr_db if e.sqnr_db is not None else e.probe_sqnr_db
            if e.nonfinite or math.isnan(s):
                marks[(i, e.expert)] = "NaN"
            elif s == math.inf:
                marks[(i, e.expert)] = "exact"
            else:
                grid[i, e.expert] = s
    cmap = plt.get_cmap("viridis").with_extremes(bad="black")
    im = ax2.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap)
    from matplotlib.patches import Rectangle

    for (i, e), text in marks.items():
        if text == "exact":
            ax2.add_patch(Rectangle((e - 0.5, i - 0.5), 1, 1, color="lightgrey"))
        ax2.text(e, i, text, ha="center", va="center", color="red" if text == "NaN" else "black", fontsize=7)
    ax2.set_xticks(range(E))
    ax2.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax2.set_xlabel("expert")
    ax2.set_title("expert output SQNR (dB)")
    fig.colorbar(im, ax=ax2)
    fig.suptitle(f"{report.quant} vs {report.ref}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
