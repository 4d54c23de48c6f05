"""The README's first command: `moequant` with no arguments quantizes the built-in demo model (w4a16) into
./moequant-out, validates it against the original and prints the report; a rerun replaces its own output."""

import json

from moequant.cli import main


def test_main_job_quantizes_and_validates_the_demo_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    out = tmp_path / "moequant-out"
    config = json.loads((out / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    assert any(g["weights"]["num_bits"] == 4 for g in groups.values())
    printed = capsys.readouterr().out
    assert "perplexity ratio QUANT / REF" in printed and "mean layer SQNR" in printed
    ratio = float(printed.split("perplexity ratio QUANT / REF:")[1].split()[0])
    assert 0.97 <= ratio <= 1.03, ratio  # w4a16 within a few percent of the original
    assert main(["quantize", "--no-validate"]) == 0  # rerun over our own earlier output


def test_quantize_refuses_a_foreign_existing_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "moequant-out").mkdir()
    (tmp_path / "moequant-out" / "notes.txt").write_text("mine")
    assert main(["quantize", "--no-validate"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "moequant-out" / "notes.txt").read_text() == "mine"
