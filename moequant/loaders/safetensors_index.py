"""Lazy, validated reading of safetensors checkpoints (one file or a sharded folder with an index).

A safetensors file is: 8 bytes little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data region.
Opening reads only the headers and checks them against the file size (truncated files, overlapping or
out-of-range offsets, sizes that disagree with dtype x shape). Tensor data is memory-mapped and copied out
on demand, so a caller that reads one expert, or one tensor-parallel slice of it, touches only those pages.
`bytes_read` counts header bytes plus the bytes of every tensor (or slice) handed out.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype -> (torch dtype attribute name, bits per element)
_DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 8), "U8": ("uint8", 8), "I8": ("int8", 8), "I16": ("int16", 16), "U16": ("uint16", 16),
    "I32": ("int32", 32), "U32": ("uint32", 32), "I64": ("int64", 64), "U64": ("uint64", 64),
    "F16": ("float16", 16), "BF16": ("bfloat16", 16), "F32": ("float32", 32), "F64": ("float64", 64),
    "F8_E4M3": ("float8_e4m3fn", 8), "F8_E5M2": ("float8_e5m2", 8), "F8_E4M3FNUZ": ("float8_e4m3fnuz", 8),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 8), "F8_E8M0": ("float8_e8m0fnu", 8), "C64": ("complex64", 64),
    "F4": ("float4_e2m1fn_x2", 4),
}


class CheckpointError(ValueError):
    """A checkpoint file, index or tensor is missing, malformed or disagrees with what was expected."""


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives: file, dtype (safetensors name), shape, absolute byte range [start, end)."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        attr, _ = _DTYPES[self.dtype]
        dt = getattr(torch, attr, None)
        if dt is None:
            raise CheckpointError(f"{self.file}: tensor {self.name} has dtype {self.dtype}, "
                                  f"which this torch ({torch.__version__}) cannot represent")
        return dt


def _parse_entry(path: Path, name: str, entry, data_start: int, data_len: int) -> TensorInfo:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} {what}")

    if not isinstance(entry, dict):
        raise bad(f"is described by {type(entry).__name__}, expected an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPES:
        raise bad(f"has unknown dtype {dtype!r}; known: {', '.join(_DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise bad(f"has invalid shape {shape!r} (expected a list of non-negative ints)")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has invalid data_offsets {offsets!r} (expected [begin, end] with 0 <= begin <= end)")
    bits = _DTYPES[dtype][1]
    expected = math.ceil(math.prod(shape) * bits / 8)
    if offsets[1] - offsets[0] != expected:
        raise bad(f"spans {offsets[1] - offsets[0]} bytes but dtype {dtype} x shape {shape} needs {expected}")
    if offsets[1] > data_len:
        raise CheckpointError(
            f"{path}: truncated safetensors file: tensor {name!r} needs data bytes up to {offsets[1]} "
            f"but the file holds only {data_len} bytes of data"
        )
    return TensorInfo(name, path, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


class SafetensorsFile:
    """One .safetensors file: header parsed and validated on open; data memory-mapped on first read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.bytes_read = 0
        self._mmap: mmap.mmap | None = None
        self._fd: int | None = None
        try:
            size = os.stat(self.path).st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file: {size} bytes, "
                                          "too short for the 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise CheckpointError(
                        f"{self.path}: corrupt or truncated safetensors file: header length {n} bytes does not fit "
                        f"the file ({size} bytes; the format allows at most {MAX_HEADER_BYTES})"
                    )
                raw = f.read(n)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: safetensors file does not exist") from None
        self.bytes_read += 8 + len(raw)
        self.header_bytes = 8 + n
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not valid JSON: {e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (expected a JSON object)")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (__metadata__ must be an object)")
        self.metadata: dict = meta
        data_start, data_len = 8 + n, size - 8 - n
        self.tensors: dict[str, TensorInfo] = {
            name: _parse_entry(self.path, name, entry, data_start, data_len) for name, entry in header.items()
        }
        spans = sorted((t.start, t.end, t.name) for t in self.tensors.values() if t.end > t.start)
        for (_, e0, a), (s1, _, b) in zip(spans, spans[1:]):
            if s1 < e0:
                raise CheckpointError(f"{self.path}: corrupt safetensors header: tensors {a!r} and {b!r} overlap")

    # --- data ----------------------------------------------------------------------------------------------
    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            # copy-on-write mapping: writable for torch.frombuffer, never writes the file
            self._mmap = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
        return self._mmap

    def view(self, name: str) -> torch.Tensor:
        """A zero-copy tensor over the mapped bytes of `name` (valid while the file is open; do not keep it)."""
        info = self.info(name)
        dt = info.torch_dtype
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dt)
        mm = self._map()
        if info.end > len(mm):
            raise CheckpointError(f"{self.path}: file shrank after opening: tensor {name!r} is now truncated")
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=info.nbytes, offset=info.start)
        if dt == getattr(torch, "float4_e2m1fn_x2", None):
            return raw.view(dt).view(*info.shape[:-1], info.shape[-1] // 2)
        return raw.view(dt).view(info.shape)

    def read(self, name: str, region: tuple = ()) -> torch.Tensor:
        """Copy of tensor `name`, or of `view[region]` for a tuple of ints/slices (e.g. `(e, slice(a, b))`);
        only the selected bytes are copied (and so only their pages read from disk)."""
        v = self.view(name)
        try:
            part = v[region] if region else v
        except IndexError as e:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} of shape {tuple(v.shape)} has no region {region}: {e}") from None
        out = part.clone(memory_format=torch.contiguous_format)
        self.bytes_read += out.numel() * out.element_size()
        return out

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a view is still alive; the mapping goes when it does
                pass
            self._mmap = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _inside(folder: Path, rel: str, index_path: Path) -> Path:
    """folder/rel, refusing absolute paths and '..' that leave the folder (checked lexically, since hub caches
    use symlinks into a blobs folder)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise CheckpointError(f"{index_path}: invalid shard file name {rel!r}")
    p = Path(rel)
    norm = os.path.normpath(rel)
    if p.is_absolute() or norm == ".." or norm.startswith(".." + os.sep) or os.path.isabs(norm):
        raise CheckpointError(f"{index_path}: shard {rel!r} points outside the checkpoint folder {folder}")
    return folder / norm


class TensorIndex:
    """All tensors of a checkpoint folder: `model.safetensors.index.json` (or the folder's single
    `*.safetensors.index.json`) when present, otherwise every `*.safetensors` file in the folder.

    Opening reads every shard's header (never tensor data) and checks the index against them: shards that are
    missing or outside the folder, tensors the index places in a shard that lacks them, duplicates across files.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a checkpoint folder")
        self.files: dict[Path, SafetensorsFile] = {}
        self._where: dict[str, Path] = {}
        self.index_path = self._find_index()
        try:
            if self.index_path is not None:
                self._open_indexed(self.index_path)
            else:
                self._open_unindexed()
        except BaseException:
            self.close()
            raise

    def _find_index(self) -> Path | None:
        if (self.folder / INDEX_NAME).is_file():
            return self.folder / INDEX_NAME
        found = sorted(self.folder.glob("*.safetensors.index.json"))
        if len(found) > 1:
            raise CheckpointError(f"{self.folder}: several safetensors indexes ({', '.join(p.name for p in found)}) "
                                  f"and no {INDEX_NAME}; cannot tell which one describes the model")
        return found[0] if found else None

    def _open_indexed(self, index_path: Path) -> None:
        try:
            index = json.loads(index_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index_path}: unreadable index ({e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: the index has no 'weight_map' object (tensor name -> shard file)")
        by_file: dict[Path, list[str]] = {}
        for name, rel in weight_map.items():
            by_file.setdefault(_inside(self.folder, rel, index_path), []).append(name)
        for path, names in by_file.items():
            if not path.is_file():
                raise CheckpointError(f"{index_path}: shard {path.name} (holding e.g. tensor {names[0]!r}, "
                                      f"{len(names)} tensors) is missing from {self.folder}")
            f = self.files[path] = SafetensorsFile(path)
            for name in names:
                if name not in f.tensors:
                    raise CheckpointError(f"{index_path}: the index places tensor {name!r} in {path.name}, "
                                          f"but that file has no such tensor")
                self._where[name] = path

    def _open_unindexed(self) -> None:
        paths = sorted(self.folder.glob("*.safetensors"))
        if not paths:
            raise CheckpointError(f"{self.folder}: no *.safetensors files and no {INDEX_NAME}")
        for path in paths:
            f = self.files[path] = SafetensorsFile(path)
            for name in f.tensors:
                if name in self._where:
                    raise CheckpointError(f"{self.folder}: tensor {name!r} is in both {self._where[name].name} and "
                                          f"{path.name}, and there is no {INDEX_NAME} saying which to use")
                self._where[name] = path

    # --- lookup --------------------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def names(self) -> Iterator[str]:
        return iter(self._where)

    def with_prefix(self, prefix: str) -> list[str]:
        return [n for n in self._where if n.startswith(prefix)]

    def info(self, name: str) -> TensorInfo:
        path = self._where.get(name)
        if path is None:
            raise CheckpointError(f"{self.folder}: the checkpoint has no tensor {name!r}")
        return self.files[path].tensors[name]

    def read(self, name: str, region: tuple = ()) -> torch.Tensor:
        """Tensor `name` (or `tensor[region]`), read from its shard; see SafetensorsFile.read."""
        self.info(name)
        return self.files[self._where[name]].read(name, region)

    def read_many(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {n: self.read(n) for n in names}

    # --- accounting ----------------------------------------------------------------------------------------
    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read for f in self.files.values())

    @property
    def header_bytes(self) -> int:
        return sum(f.header_bytes for f in self.files.values())

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data listed by the index (the checkpoint's size)."""
        return sum(self.info(n).nbytes for n in self._where)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def __enter__(self) -> "TensorIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
