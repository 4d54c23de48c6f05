"""Safetensors reading: single and sharded folders, lazy slices, byte accounting, and every malformed input
naming the file and the tensor."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from moequant.loaders.safetensors_index import CheckpointError, SafetensorsFile, TensorIndex


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(4, 6, 10, generator=g).bfloat16(),
        "b": torch.arange(7, dtype=torch.int32),
        "c": torch.randn(3, 5, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),  # zero-size tensor: no data bytes
    }


def _write_raw(path, header: dict, data: bytes = b"", header_len: int | None = None):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len))
        f.write(raw)
        f.write(data)


def _sharded(tmp_path, index_map=None):
    t = _tensors()
    save_file({"a": t["a"], "b": t["b"]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"c": t["c"], "scalar": t["scalar"]}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = index_map or {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                               "c": "model-00002-of-00002.safetensors", "scalar": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return t


def test_single_file_round_trip_and_regions(tmp_path):
    t = _tensors()
    save_file(t, tmp_path / "model.safetensors")
    with TensorIndex(tmp_path) as ix:
        assert ix.bytes_read == ix.header_bytes  # opening reads the header only
        for name, ref in t.items():
            got = ix.read(name)
            assert got.dtype == ref.dtype and got.shape == ref.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8))  # bit-exact
        # an expert's strided column slice (the gpt-oss interleave pattern) copies only those elements
        before = ix.bytes_read
        part = ix.read("a", (2, slice(None), slice(1, 9, 2)))
        assert torch.equal(part, t["a"][2, :, 1:9:2])
        assert ix.bytes_read - before == part.numel() * 2
        assert ix.info("a").shape == (4, 6, 10) and ix.info("a").dtype == "BF16"


def test_sharded_index(tmp_path):
    t = _sharded(tmp_path)
    with TensorIndex(tmp_path) as ix:
        assert len(ix.files) == 2 and len(ix) == 4
        assert ix.bytes_read == ix.header_bytes
        assert torch.equal(ix.read("c").float(), t["c"].float())
        assert ix.info("a").file.name == "model-00001-of-00002.safetensors"


def test_opening_a_large_shard_reads_only_its_header(tmp_path):
    # a fake 1 GiB shard (sparse file): the header describes [4, 8192, 8192] fp32 experts
    shape, nbytes = [4, 8192, 8192], 4 * 8192 * 8192 * 4
    path = tmp_path / "model.safetensors"
    _write_raw(path, {"experts": {"dtype": "F32", "shape": shape, "data_offsets": [0, nbytes]}})
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) + nbytes)

    def rchar():
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar")).split()[1])

    has_io = os.path.exists("/proc/self/io")
    r0 = rchar() if has_io else 0
    ix = TensorIndex(tmp_path)
    if has_io:  # what the OS saw this process read (read syscalls), with slack for anything else running
        assert rchar() - r0 < 1 << 20
    assert ix.bytes_read == ix.header_bytes < 200
    # one tensor-parallel slice of one expert: 16 rows of 8192 fp32
    part = ix.read("experts", (1, slice(32, 48)))
    assert part.shape == (16, 8192) and not part.any()
    assert ix.bytes_read - ix.header_bytes == 16 * 8192 * 4
    ix.close()


# --- bad input --------------------------------------------------------------------------------------------------
def test_truncated_file(tmp_path):
    save_file(_tensors(), tmp_path / "model.safetensors")
    p = tmp_path / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[:-10])  # lose the end of the last tensor
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file: tensor '\w+'"):
        TensorIndex(tmp_path)
    p.write_bytes(data[:5])  # not even the header length
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        SafetensorsFile(p)


@pytest.mark.parametrize("case, header, header_len, match", [
    ("header longer than file", {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 10_000,
     "header length 10000 bytes does not fit"),
    ("unknown dtype", {"x": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}}, None, "tensor 'x' has unknown dtype"),
    ("size != dtype x shape", {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, None,
     "tensor 'x' spans 4 bytes but dtype F32 x shape \\[2\\] needs 8"),
    ("negative shape", {"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, None, "invalid shape"),
    ("reversed offsets", {"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, None, "invalid data_offsets"),
    ("overlap", {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, None, "tensors 'x' and 'y' overlap"),
])
def test_corrupt_headers(tmp_path, case, header, header_len, match):
    p = tmp_path / "model.safetensors"
    _write_raw(p, header, b"\0" * 16, header_len)
    with pytest.raises(CheckpointError, match=match) as e:
        TensorIndex(tmp_path)
    assert str(p) in str(e.value)


def test_header_not_json(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors header \\(not valid JSON"):
        TensorIndex(tmp_path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_pointing_outside_the_folder(tmp_path, shard):
    (tmp_path / "ckpt").mkdir()
    save_file({"a": torch.zeros(2)}, tmp_path / "outside.safetensors")
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(CheckpointError, match="points outside the checkpoint folder"):
        TensorIndex(tmp_path / "ckpt")


def test_missing_shard(tmp_path):
    _sharded(tmp_path)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors \\(holding e.g. tensor 'c'"):
        TensorIndex(tmp_path)


def test_index_names_a_tensor_the_shard_lacks(tmp_path):
    _sharded(tmp_path, {"a": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"})
    with pytest.raises(CheckpointError, match="places tensor 'c' in model-00001-of-00002.safetensors, but"):
        TensorIndex(tmp_path)


def test_duplicate_tensor_without_index(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "one.safetensors")
    save_file({"a": torch.ones(2)}, tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError, match="tensor 'a' is in both one.safetensors and two.safetensors"):
        TensorIndex(tmp_path)


def test_empty_folder_and_unknown_tensor(tmp_path):
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        TensorIndex(tmp_path)
    save_file({"a": torch.zeros(2)}, tmp_path / "model.safetensors")
    with TensorIndex(tmp_path) as ix:
        with pytest.raises(CheckpointError, match="has no tensor 'b'"):
            ix.read("b")
        with pytest.raises(CheckpointError, match="tensor 'a' of shape \\(2,\\) has no region"):
            ix.read("a", (5,))
