"""Quantize the built-in demo model in every scheme (RTN, and GPTQ for w4a16) and validate each against the original;
print the README's table (perplexity, KL, top-1 agreement, mean layer SQNR) as Markdown and write the figures as JSON.

    python tools/demo_scheme_table.py [--out DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

RUNS = [("fp8-tensor", "rtn"), ("fp8-channel", "rtn"), ("w8a16", "rtn"), ("w4a16", "rtn"), ("w4a16", "gptq"),
        ("w4a16-asym", "rtn"), ("nvfp4a16", "rtn"), ("nvfp4", "rtn"), ("mxfp4", "rtn")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="folder for the quantized checkpoints (default: a temporary one)")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    import moequant
    from moequant.data import demo_model_path

    warnings.simplefilter("ignore")
    ref = demo_model_path()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        for scheme, algo in RUNS:
            out = root / f"{scheme}-{algo}"
            moequant.quantize_checkpoint(ref, out, scheme=scheme, algo=algo, overwrite=True, progress=False)
            rep = moequant.validate(ref, out)
            e2e = rep.end_to_end
            rows.append({"scheme": scheme, "algo": algo, "ppl_ref": e2e.ppl_ref, "ppl_quant": e2e.ppl_quant,
                         "ppl_ratio": e2e.ppl_ratio, "kl": e2e.kl, "top1_agreement": e2e.top1_agreement,
                         "mean_sqnr_db": rep.mean_sqnr_db, "tokens": e2e.tokens})
            print(f"{scheme} {algo}: ppl {e2e.ppl_quant:.4f} (ref {e2e.ppl_ref:.4f}), SQNR {rep.mean_sqnr_db:.2f} dB",
                  file=sys.stderr, flush=True)
    print("| scheme | algo | perplexity (ref {:.4f}) | ratio | KL (nats) | top-1 agree | mean layer SQNR (dB) |"
          .format(rows[0]["ppl_ref"]))
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {r['algo']} | {r['ppl_quant']:.4f} | {r['ppl_ratio']:.4f} | {r['kl']:.5f} | "
              f"{100 * r['top1_agreement']:.1f}% | {r['mean_sqnr_db']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
