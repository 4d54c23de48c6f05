"""A byte-level tokenizer for the demo model: token id = byte value (0..255), then a few specials.

No vocabulary file and no downloads: the whole description is the dict `ByteTokenizer.to_dict()` (saved next to the model
as `byte_tokenizer.json`). One token is one byte, so bits per byte = mean next-token cross-entropy (nats) / ln 2.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

FILE_NAME = "byte_tokenizer.json"
_SPECIALS = {"<pad>": 256, "<bos>": 257, "<eos>": 258, "<sep>": 259}


@dataclass(frozen=True)
class ByteTokenizer:
    """Bytes 0..255 map to ids 0..255; specials follow (pad 256, bos 257, eos 258, sep 259)."""

    specials: dict = field(default_factory=lambda: dict(_SPECIALS))
    version: int = 1

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.specials)

    @property
    def pad_id(self) -> int:
        return self.specials["<pad>"]

    @property
    def bos_id(self) -> int:
        return self.specials["<bos>"]

    @property
    def eos_id(self) -> int:
        return self.specials["<eos>"]

    def encode(self, text: str | bytes, bos: bool = False, eos: bool = False) -> list[int]:
        """UTF-8 bytes of `text` as ids, optionally wrapped in <bos> ... <eos>."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return ([self.bos_id] if bos else []) + list(data) + ([self.eos_id] if eos else [])

    def encode_tensor(self, text: str | bytes, bos: bool = False, eos: bool = False) -> torch.Tensor:
        """`encode` as a 1-D int64 tensor."""
        return torch.tensor(self.encode(text, bos=bos, eos=eos), dtype=torch.long)

    def decode(self, ids, errors: str = "replace") -> str:
        """Ids back to text; special ids are dropped, invalid UTF-8 is replaced (or raises with errors='strict')."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        for i in ids:
            if not 0 <= int(i) < self.vocab_size:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary [0, {self.vocab_size})")
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors=errors)

    def to_dict(self) -> dict:
        return {"type": "byte", **asdict(self)}

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / FILE_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "ByteTokenizer":
        """Read `byte_tokenizer.json` from a model folder."""
        path = Path(folder) / FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no byte tokenizer description (expected {FILE_NAME} next to config.json)")
        d = json.loads(path.read_text())
        if d.get("type") != "byte":
            raise ValueError(f"{path}: type is {d.get('type')!r}, expected 'byte'")
        specials = {str(k): int(v) for k, v in d["specials"].items()}
        if sorted(specials.values()) != list(range(256, 256 + len(specials))):
            raise ValueError(f"{path}: special ids {sorted(specials.values())} must be 256, 257, ... without gaps")
        return cls(specials=specials, version=int(d.get("version", 1)))
