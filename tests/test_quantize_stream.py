"""Streaming, resume and staging: a multi-shard source is quantized holding about one output shard plus one layer's
experts; a run killed midway leaves nothing that looks complete, and its rerun skips finished shards and ends
byte-identical to an uninterrupted run; bad arguments are refused with the flag named.
"""

import json

import pytest

from moequant.data import demo_model_path
from moequant.quantize import api, writer
from moequant.quantize.api import quantize_checkpoint


@pytest.fixture(scope="module")
def multi_shard(tmp_path_factory):
    """The demo model re-saved as one shard per decoder layer (+ one for the rest), with an index."""
    from safetensors.torch import save_file

    from moequant import open_checkpoint
    from moequant.quantize.plan import layer_of

    folder = tmp_path_factory.mktemp("src")
    with open_checkpoint(demo_model_path()) as ck:
        groups = {}
        for n in ck.index.names():
            groups.setdefault(layer_of(n), {})[n] = ck.index.read(n)
    weight_map = {}
    for i, (L, ts) in enumerate(sorted(groups.items(), key=lambda kv: -1 if kv[0] is None else kv[0])):
        f = f"model-{i:05d}.safetensors"
        save_file(ts, str(folder / f), metadata={"format": "pt"})
        weight_map.update({n: f for n in ts})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("config.json", "byte_tokenizer.json"):
        (folder / name).write_bytes((demo_model_path() / name).read_bytes())
    return folder


def _largest_shard(folder):
    return max(p.stat().st_size for p in folder.glob("*.safetensors"))


def test_peak_tensor_bytes_below_two_shards(multi_shard, tmp_path, monkeypatch):
    """Counts the tensor bytes the run holds (the shard being written + quantized tensors waiting in the layer
    cache) at every shard write: the peak stays below 2x the largest source shard."""
    held = []
    real_write, real_layer = writer.ShardWriter.write, api.LayerQuantizer._quantize_layer
    state = {}

    def cache_bytes():
        lq = state.get("lq")
        return 0 if lq is None else sum(t.nbytes for d in lq.cache.values() for t in d.values())

    def write(self, shard, tensors, specs):
        held.append(sum(t.nbytes for t in tensors.values()) + cache_bytes())
        return real_write(self, shard, tensors, specs)

    def quantize_layer(self, L):
        state["lq"] = self
        real_layer(self, L)
        held.append(cache_bytes())

    monkeypatch.setattr(writer.ShardWriter, "write", write)
    monkeypatch.setattr(api.LayerQuantizer, "_quantize_layer", quantize_layer)
    largest = _largest_shard(multi_shard)
    out = quantize_checkpoint(multi_shard, tmp_path / "o", scheme="w8a16", group_size=64, progress=False,
                              max_shard_bytes=largest // 2)
    total_src = sum(p.stat().st_size for p in multi_shard.glob("*.safetensors"))
    assert len(list(out.glob("*.safetensors"))) > 4  # really streamed into several shards
    assert max(held) < 2 * largest, (max(held), largest)
    assert max(held) < total_src / 2


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != api.REPORT}


def test_killed_run_resumes_byte_identical(multi_shard, tmp_path, monkeypatch):
    kw = dict(scheme="nvfp4", progress=False, num_samples=4, seq_len=64, max_shard_bytes=400_000)
    whole = quantize_checkpoint(multi_shard, tmp_path / "whole", **kw)
    n_shards = len(list(whole.glob("*.safetensors")))
    assert n_shards >= 5

    real_write, calls = writer.ShardWriter.write, []

    def failing_write(self, shard, tensors, specs):
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        calls.append(shard.file)
        return real_write(self, shard, tensors, specs)

    monkeypatch.setattr(writer.ShardWriter, "write", failing_write)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="injected"):
        quantize_checkpoint(multi_shard, out, **kw)
    stage = out.with_name(out.name + ".partial")
    assert not out.exists() and not (stage / "config.json").exists()  # nothing that looks complete
    assert len(list(stage.glob("*.safetensors"))) == 3

    calls.clear()
    monkeypatch.setattr(writer.ShardWriter, "write", lambda self, *a: (calls.append(a[0].file), real_write(self, *a)))
    quantize_checkpoint(multi_shard, out, **kw)
    assert len(calls) == n_shards - 3  # finished shards were skipped
    assert not stage.exists()
    assert _files(out) == _files(whole)
    assert json.loads((out / api.REPORT).read_text())["resumed"] is True


def test_changed_arguments_start_over(multi_shard, tmp_path, monkeypatch):
    real_write, calls = writer.ShardWriter.write, []

    def failing_write(self, shard, tensors, specs):
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        calls.append(1)
        return real_write(self, shard, tensors, specs)

    monkeypatch.setattr(writer.ShardWriter, "write", failing_write)
    out = tmp_path / "o"
    with pytest.raises(RuntimeError):
        quantize_checkpoint(multi_shard, out, scheme="w4a16", group_size=64, progress=False, max_shard_bytes=400_000)
    monkeypatch.setattr(writer.ShardWriter, "write", real_write)
    out2 = quantize_checkpoint(multi_shard, out, scheme="w8a16", group_size=64, progress=False,
                               max_shard_bytes=400_000)
    ref = quantize_checkpoint(multi_shard, tmp_path / "ref", scheme="w8a16", group_size=64, progress=False,
                              max_shard_bytes=400_000)
    assert _files(out2) == _files(ref)


def test_existing_output_refused(tmp_path):
    (tmp_path / "o").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        quantize_checkpoint(None, tmp_path / "o", progress=False)


@pytest.mark.parametrize("kw,match", [
    (dict(scheme="int3"), "--scheme"),
    (dict(scheme="fp8-channel", algo="gptq"), "--algo gptq"),
    (dict(scheme="w4a16", group_size=48), "--group-size 48"),
    (dict(scheme="fp8-block", group_size=64), "--group-size"),
    (dict(targets="attention"), "--targets"),
])
def test_bad_arguments_named(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        quantize_checkpoint(None, tmp_path / "o", progress=False, **kw)
    assert not (tmp_path / "o").exists()


def test_cli_defaults_to_demo_model_w4a16(tmp_path, monkeypatch, capsys):
    import argparse

    from moequant.quantize.quantize_cli import build_parser, run

    monkeypatch.chdir(tmp_path)
    args = build_parser(argparse.ArgumentParser()).parse_args(["--quiet"])
    assert (args.src, args.out, args.scheme, args.algo) == (None, "moequant-out", "w4a16", "rtn")
    assert run(args) == 0
    qc = json.loads((tmp_path / "moequant-out" / "config.json").read_text())["quantization_config"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["symmetric"]) == (4, 64, True)  # 128 does not divide I = 192
    assert run(build_parser(argparse.ArgumentParser()).parse_args(["--quiet", "--scheme", "fp8-block",
                                                                   "--group-size", "64"])) == 2


def test_missing_calibration_text_named(multi_shard, tmp_path):
    """A model without the demo's byte tokenizer has no default calibration text: --calib is asked for, and nothing
    is left behind."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(multi_shard, src)
    (src / "byte_tokenizer.json").unlink()
    with pytest.raises(ValueError, match="--calib"):
        quantize_checkpoint(src, tmp_path / "o", scheme="w4a16", group_size=64, algo="gptq", progress=False)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    with pytest.raises(FileNotFoundError, match="--calib"):
        quantize_checkpoint(src, tmp_path / "o", scheme="fp8-tensor", calib=tmp_path / "nope.txt", progress=False)
