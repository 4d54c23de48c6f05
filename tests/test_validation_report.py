"""The validator's report: JSON with every figure (round trip through "inf"/"nan" strings), the terminal table,
the PNG plot, and the CLI entry point."""

import argparse
import importlib.util
import json
import math

import pytest

from moequant.data import demo_model_path
from moequant.validation import validate
from moequant.validation.report import load_json
from moequant.validation.synthetic import expert_key, perturbed_copy
from moequant.validation.validate_cli import build_parser, run

REF = demo_model_path()
LAYER_KEYS = {"layer", "sqnr_db", "rel_err", "cosine", "max_abs_err", "routing_changed", "nonfinite", "tokens",
              "inputs", "scheme", "experts"}
EXPERT_KEYS = {"expert", "tokens", "sqnr_db", "rel_err", "max_abs_err", "probe_sqnr_db", "nonfinite"}
E2E_KEYS = {"tokens", "windows", "seq_len", "text_source", "ppl_ref", "ppl_quant", "ppl_ref_moequant", "ppl_ratio",
            "kl", "top1_agreement", "kl_ref_moequant", "top1_ref_moequant", "max_abs_logit_diff_ref_moequant",
            "routing_changed", "bits_per_byte_ref", "bits_per_byte_quant"}


@pytest.fixture(scope="module")
def quant(tmp_path_factory):
    return perturbed_copy(REF, tmp_path_factory.mktemp("q"), {expert_key(0, 1): lambda w: w * 1.2})


@pytest.fixture(scope="module")
def cli_run(quant, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    p = build_parser(argparse.ArgumentParser())
    # the plot is an optional extra (moequant[plot], in the test extras too): the JSON and table tests run without it
    plot = ["--plot", str(out / "r.png")] if importlib.util.find_spec("matplotlib") is not None else []
    args = p.parse_args([str(REF), str(quant), "--tokens", "256", "--layers", "0,2", "--json", str(out / "r.json"),
                         *plot, "--experts"])
    return run(args), out


def test_json_has_every_field(cli_run):
    rc, out = cli_run
    assert rc == 0
    raw = json.loads((out / "r.json").read_text())  # strict JSON: inf/nan are strings
    d = load_json(out / "r.json")
    assert [L["layer"] for L in d["layers"]] == [0, 2]
    for L in d["layers"]:
        assert set(L) == LAYER_KEYS
        assert len(L["experts"]) == 8 and all(set(x) == EXPERT_KEYS for x in L["experts"])
        for k in ("sqnr_db", "rel_err", "cosine", "max_abs_err", "routing_changed"):
            assert isinstance(L[k], float), (k, L[k])
    assert set(d["end_to_end"]) == E2E_KEYS
    assert set(d["end_to_end"]["routing_changed"]) == {"0", "1", "2", "3"}  # every MoE layer is swapped end to end
    assert {"ref", "quant", "device", "dtype", "summary", "notes", "end_to_end_skipped"} <= set(d)
    assert raw["layers"][1]["sqnr_db"] == "inf" and d["layers"][1]["sqnr_db"] == math.inf
    # expert 1 of layer 0 scaled by 1.2: 20 log10(1/0.2) = 13.98 dB; the rest exact
    ex = d["layers"][0]["experts"]
    assert ex[1]["sqnr_db"] == pytest.approx(-20 * math.log10(0.2), abs=1e-3)
    assert all(x["sqnr_db"] == math.inf for i, x in enumerate(ex) if i != 1 and x["tokens"])
    assert d["summary"]["mean_sqnr_db"] == math.inf or d["summary"]["mean_sqnr_db"] > 13


def test_plot_is_a_png(cli_run):
    pytest.importorskip("matplotlib")
    _, out = cli_run
    data = (out / "r.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    import builtins

    from moequant.validation.plot import save_plot

    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(ImportError, match=r"moequant\[plot\]"):
        save_plot(None, tmp_path / "x.png")


def test_table_prints_every_layer_and_nan_experts(tmp_path):
    from rich.console import Console

    q = perturbed_copy(REF, tmp_path / "q", {expert_key(3, 6): lambda w: w * math.nan})
    rep = validate(REF, q, tokens=128, layers=[1, 3], end_to_end=False)
    console = Console(record=True, width=140)
    rep.print(console, experts=True)
    text = console.export_text()
    assert "end to end: skipped (not asked for)" in text
    assert "NaN/inf in QUANT's output: {3: [6]}" in text
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert any(r.split("│")[1].strip() == "3" and "nan" in r for r in rows)
    assert any(r.split("│")[1].strip() == "1" and "inf" in r for r in rows)


def test_cli_exit_status_nan_and_bad_input(tmp_path, capsys):
    q = perturbed_copy(REF, tmp_path / "q", {expert_key(2, 0): lambda w: w * math.inf})
    p = build_parser(argparse.ArgumentParser())
    assert run(p.parse_args([str(REF), str(q), "--tokens", "64", "--no-end-to-end", "--layers", "2"])) == 1
    assert run(p.parse_args([str(REF), str(q), "--layers", "9"])) == 2
    err = capsys.readouterr().err
    assert "--layers" in err and "outside 0..3" in err
