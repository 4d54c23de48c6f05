"""Sharded, resumable safetensors output: shards planned up front from tensor specs, each written to `NAME.tmp` and
renamed when complete, under a staging folder `OUT.partial/` that becomes OUT only when everything is written.

A progress file in the staging folder records the run's fingerprint (source, scheme, options) and each finished
shard's size and sha256; a rerun with the same fingerprint skips those shards, so its output is byte-identical to an
uninterrupted run. A different fingerprint starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

PROGRESS = ".moequant-progress.json"
INDEX = "model.safetensors.index.json"
_HEADER_ALLOWANCE = 200  # bytes of safetensors header per tensor, for shard sizing only


@dataclass
class Shard:
    file: str
    names: list[str] = field(default_factory=list)
    nbytes: int = 0


def plan_shards(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int) -> list[Shard]:
    """Greedy split of (name, dtype, shape) in order into shards of at most `max_shard_bytes` (one oversize tensor
    gets a shard of its own); files named model-0000k-of-0000n.safetensors."""
    shards: list[Shard] = [Shard("")]
    for name, dtype, shape in specs:
        n = _nbytes(dtype, shape) + _HEADER_ALLOWANCE
        cur = shards[-1]
        if cur.names and cur.nbytes + n > max_shard_bytes:
            cur = Shard("")
            shards.append(cur)
        cur.names.append(name)
        cur.nbytes += n
    total = len(shards)
    for i, s in enumerate(shards):
        s.file = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
    return shards


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Writes the planned shards into OUT.partial/ and publishes OUT at `finish`."""

    def __init__(self, out: str | os.PathLike, shards: list[Shard], fingerprint: dict, overwrite: bool = False):
        self.out = Path(out)
        self.stage = self.out.with_name(self.out.name + ".partial")
        self.shards = shards
        self.fingerprint = fingerprint
        if self.out.exists():
            if not overwrite:
                raise FileExistsError(f"{self.out}: output folder already exists; remove it or pass overwrite=True "
                                      f"(--overwrite)")
        self.stage.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, dict] = {}
        prog = self.stage / PROGRESS
        if prog.is_file():
            try:
                state = json.loads(prog.read_text())
            except (OSError, json.JSONDecodeError):
                state = {}
            if state.get("fingerprint") == fingerprint:
                self.done = {f: d for f, d in state.get("done", {}).items() if self._intact(f, d)}
        if not self.done:  # fresh start: drop leftovers of another run
            for p in self.stage.iterdir():
                if p.is_file():
                    p.unlink()
        self._save_progress()

    def _intact(self, file: str, d: dict) -> bool:
        p = self.stage / file
        return p.is_file() and p.stat().st_size == d.get("size") and _sha256(p) == d.get("sha256")

    def _save_progress(self) -> None:
        tmp = self.stage / (PROGRESS + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": self.done}, indent=1, sort_keys=True))
        os.replace(tmp, self.stage / PROGRESS)

    def is_done(self, shard: Shard) -> bool:
        return shard.file in self.done

    def write(self, shard: Shard, tensors: dict[str, torch.Tensor], specs: dict) -> None:
        """Write one shard; `tensors` must hold exactly the planned names with the planned dtype and shape."""
        from safetensors.torch import save_file

        if set(tensors) != set(shard.names):
            missing, extra = set(shard.names) - set(tensors), set(tensors) - set(shard.names)
            raise RuntimeError(f"{shard.file}: tensors differ from the plan (missing {sorted(missing)[:3]}, "
                               f"unplanned {sorted(extra)[:3]})")
        for n, t in tensors.items():
            dtype, shape = specs[n]
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"{shard.file}: tensor {n} is {t.dtype} {list(t.shape)}, planned {dtype} "
                                   f"{list(shape)}")
        final = self.stage / shard.file
        tmp = self.stage / (shard.file + ".tmp")
        ordered = {n: tensors[n].contiguous() for n in shard.names}
        save_file(ordered, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, final)
        self.done[shard.file] = {"size": final.stat().st_size, "sha256": _sha256(final)}
        self._save_progress()

    def finish(self, config: dict, copy_from: Path, extra_json: dict[str, dict] | None = None,
               skip_copy: tuple[str, ...] = ()) -> Path:
        """Index, config.json, the source's other files (tokenizer, generation config ...) and extra JSON files,
        then rename OUT.partial -> OUT."""
        weight_map, total = {}, 0
        for s in self.shards:
            if s.file not in self.done:
                raise RuntimeError(f"{self.stage / s.file}: shard was never written")
            for n in s.names:
                weight_map[n] = s.file
            total += self.done[s.file]["size"]
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.stage / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for p in sorted(Path(copy_from).iterdir()):
            if p.is_file() and not p.name.endswith(".safetensors") and p.name not in (
                    "config.json", INDEX, *skip_copy) and not p.name.endswith(".safetensors.index.json"):
                shutil.copy2(p, self.stage / p.name)
        for name, data in (extra_json or {}).items():
            (self.stage / name).write_text(json.dumps(data, indent=2) + "\n")
        (self.stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")  # last: marks completeness
        (self.stage / PROGRESS).unlink()
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.stage, self.out)
        return self.out
