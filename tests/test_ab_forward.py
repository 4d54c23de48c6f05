"""benchmarks/ab_forward.py on the CPU: variants from a git revision and from environment settings, alternating
worker processes, the summary that drops each process's first timing, and bad --variant specs."""

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import ab_forward

REPO = Path(__file__).resolve().parent.parent


def _git_ok() -> bool:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.parametrize("text, expected", [
    ("new", ab_forward.Variant("new")),
    ("old:rev=HEAD~1", ab_forward.Variant("old", rev="HEAD~1")),
    ("tma:env=MOEQUANT_FP8_TMA=off;X=1", ab_forward.Variant("tma", env={"MOEQUANT_FP8_TMA": "off", "X": "1"})),
])
def test_parse_variant(text, expected):
    assert ab_forward.parse_variant(text) == expected


def test_parse_variant_tree(tmp_path):
    (tmp_path / "moequant").mkdir()
    (tmp_path / "moequant" / "__init__.py").write_text("")
    (tmp_path / "benchmarks").mkdir()
    assert ab_forward.parse_variant(f"t:tree={tmp_path}") == ab_forward.Variant("t", tree=tmp_path.resolve())
    with pytest.raises(Exception, match="holds no moequant"):
        ab_forward.parse_variant(f"t:tree={tmp_path / 'benchmarks'}")


@pytest.mark.parametrize("text", ["", ":rev=HEAD", "a:rev=", "a:tree=", "a:env=K", "a:foo=1", "a b"])
def test_parse_variant_rejects(text):
    with pytest.raises(Exception, match="variant"):
        ab_forward.parse_variant(text)


def test_needs_two_variants():
    with pytest.raises(SystemExit):
        ab_forward.parse_args(["--device", "cpu", "--shape", "tiny", "--variant", "a"])


def test_summary_drops_first_timing_per_process():
    recs = [{"variant": "a", "scheme": "s", "us": [10.0, 12.0, 13.0]},
            {"variant": "a", "scheme": "s", "us": [9.0, 11.0]},
            {"variant": "b", "scheme": "s", "us": [7.0]}]
    out = {r["variant"]: r for r in ab_forward.summarize(recs)}
    assert out["a"]["settled_min_us"] == 11.0 and out["a"]["settled_median_us"] == 12.0
    assert out["b"]["settled_min_us"] == 7.0  # one timing: kept


@pytest.mark.skipif(not _git_ok(), reason="needs the git repository (variant from a revision)")
def test_cpu_run_alternates_variants(tmp_path):
    out = tmp_path / "ab.jsonl"
    rc = ab_forward.main(["--device", "cpu", "--shape", "tiny", "--m", "2", "--schemes", "unquantized",
                          "--variant", "head:rev=HEAD", "--variant", "env:env=MOEQUANT_AB_TEST=1",
                          "--rounds", "2", "--repeats", "2", "--out", str(out)])
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    runs, summary = lines[:-1], lines[-1]["summary"]
    assert [(r["variant"], r["round"]) for r in runs] == [("head", 0), ("env", 0), ("head", 1), ("env", 1)]
    for r in runs:
        assert len(r["us"]) == 2 and all(t > 0 for t in r["us"]) and r["rel_err"] < 1e-2
    # the revision's tree is imported, not this checkout
    assert "ab_forward-" in runs[0]["moequant"] and runs[1]["moequant"] == str(REPO)
    assert {s["variant"] for s in summary} == {"head", "env"}
    assert not out.with_name(out.name + ".tmp").exists()


def test_cpu_run_from_tree(tmp_path):
    """A tree variant imports the given folder's moequant, not this checkout's."""
    import shutil

    tree = tmp_path / "tree"
    for name in ("moequant", "benchmarks"):
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    out = tmp_path / "ab.jsonl"
    rc = ab_forward.main(["--device", "cpu", "--shape", "tiny", "--m", "2", "--schemes", "unquantized",
                          "--variant", f"copy:tree={tree}", "--variant", "here", "--rounds", "1", "--repeats", "1",
                          "--out", str(out)])
    assert rc == 0
    runs = [json.loads(x) for x in out.read_text().splitlines()][:-1]
    assert runs[0]["moequant"] == str(tree) and runs[1]["moequant"] == str(REPO)
