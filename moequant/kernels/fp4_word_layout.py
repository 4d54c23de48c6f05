"""The fp4 kernel word layout: where the eight e2m1 codes of a 32-bit weight word sit, so that a GPU turns them into
four bf16x2 operands in nine integer instructions (the byte layout took about sixteen).

# q row quad (rows 4q..4q+3), j byte column (element columns 2j, 2j + 1), r row in the quad, h column parity
A word holds byte column j of rows 4q..4q+3 (methods.base.rows_contiguous: int32 [E, N/4, C/2], stride 1 along q).
Byte layout (the checkpoint's): row r in byte r, column 2j + h in nibble h; code bits b0 = mantissa, b1-b2 =
exponent, b3 = sign.
Decode layout (after process_weights_after_loading): the same 32 bits, permuted. Slot k = 2 * (r % 2) + h holds
rows r (low half) and r + 2 (high half) of column 2j + h. A bf16 whose bits 6-8 are b0-b2 and bit 15 is b3 is the
e2m1 value times 2^-126 (code 1, 0.5, a subnormal), so slot k's bf16x2 is OP_k(word) & 0x81C081C0 where
  slot 0: rotate left 4, slot 1: rotate left 10, slot 2: rotate left 14 (shf.l.wrap: one instruction, one AND),
  slot 3: magnitude from PRMT bytes (0, 0, 2, 2) & 0x01C001C0, sign from the word itself (bits 15, 31), OR'd.
No set of four rotations places four disjoint 3-bit magnitudes with their signs 9 bits above (checked by search),
hence the byte permute for the fourth slot.
"""

from __future__ import annotations

import functools

import torch

SLOT_MASK = 0x81C081C0  # a bf16x2's sign bits 15, 31 and magnitude bits 6-8, 22-24
_ROTATIONS = (4, 10, 14)  # slots 0..2
_PRMT_SELECT = 0x2200  # slot 3's magnitude: bytes (0, 0, 2, 2)
_TARGET = (6, 7, 8, 15)  # bf16 bit of code bit b0..b3 (low half; the high half 16 above)


def _source_bit(slot: int, half: int, b: int) -> int:
    """Decode-layout bit that lands on code bit b of slot `slot`'s bf16 half `half`."""
    t = _TARGET[b] + 16 * half
    if slot < 3:
        return (t - _ROTATIONS[slot]) % 32
    if b == 3:  # the sign stays in place
        return t
    return (_PRMT_SELECT >> (4 * (t // 8)) & 7) * 8 + t % 8


def _byte_bit(slot: int, half: int, b: int) -> int:
    """Byte-layout bit of the same code bit: row r = slot // 2 + 2 * half, column parity slot % 2."""
    return 8 * (slot // 2 + 2 * half) + 4 * (slot % 2) + b


@functools.cache
def _permutation() -> tuple[int, ...]:
    """perm[i]: the decode-layout bit of byte-layout bit i."""
    perm = [-1] * 32
    for slot in range(4):
        for half in range(2):
            for b in range(4):
                perm[_byte_bit(slot, half, b)] = _source_bit(slot, half, b)
    if sorted(perm) != list(range(32)):
        raise AssertionError(f"fp4 decode layout is not a permutation of the word's bits: {perm}")
    return tuple(perm)


@functools.cache
def _byte_tables(inverse: bool) -> torch.Tensor:
    """[4, 256] int64: entry (i, v) is byte i of a word holding v, with its bits moved (to the decode layout, or
    back with `inverse`); a word's image is the OR (sum: the bits are disjoint) of its four bytes' entries."""
    perm = _permutation()
    if inverse:
        perm = tuple(perm.index(i) for i in range(32))
    v = torch.arange(256, dtype=torch.int64)
    tables = torch.zeros(4, 256, dtype=torch.int64)
    for i in range(4):
        for bit in range(8):
            tables[i] |= ((v >> bit) & 1) << perm[8 * i + bit]
    return tables


def _move_bits(words: torch.Tensor, inverse: bool) -> torch.Tensor:
    tables = _byte_tables(inverse).to(words.device)
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros_like(w)
    for i in range(4):
        out |= tables[i][(w >> (8 * i)) & 0xFF]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def to_decode_words(words: torch.Tensor) -> torch.Tensor:
    """int32 words in the byte layout -> the decode layout (same shape)."""
    return _move_bits(words, inverse=False)


def to_byte_words(words: torch.Tensor) -> torch.Tensor:
    """int32 words in the decode layout -> the byte layout (same shape)."""
    return _move_bits(words, inverse=True)


def check_word_rows(packed: torch.Tensor, what: str, decoded: bool = True) -> None:
    """ValueError naming `what` unless packed is uint8 [..., N, K/2] stored as words of four rows: N stride 1, N a
    multiple of 4, 4-byte aligned (decoded: the kernels' input, already in the decode layout)."""
    if (packed.dtype != torch.uint8 or packed.dim() < 2 or packed.stride(-2) != 1 or packed.shape[-2] % 4
            or packed.data_ptr() % 4):
        raise ValueError(f"{what} must be rows-contiguous{' in the decode layout' if decoded else ''} (N stride 1, "
                         f"N a multiple of 4, 4-byte aligned uint8 [..., N, K/2]; methods.base.rows_contiguous"
                         f"{', then decode_layout' if decoded else ''}): got {packed.dtype}, shape "
                         f"{tuple(packed.shape)}, strides {packed.stride()}")


def _words_of(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., N, J] with the N dimension contiguous -> its int32 words [..., J, N/4] (a view)."""
    check_word_rows(packed, "fp4 packed weights", decoded=False)
    t = packed.transpose(-1, -2)
    if not t.is_contiguous():
        raise ValueError(f"fp4 packed weights: expected strides of a rows-contiguous tensor, got {packed.stride()}")
    return t.view(torch.int32)


def _convert(packed: torch.Tensor, words_fn, inplace: bool = False) -> torch.Tensor:
    out = packed if inplace else torch.empty_like(packed)  # same strides (empty_like keeps a dense tensor's layout)
    src, dst = _words_of(packed), _words_of(out)
    if src.dim() == 2:
        dst.copy_(words_fn(src))
    for i in range(src.shape[0] if src.dim() == 3 else 0):  # one expert at a time: bounded int64 temporaries
        dst[i].copy_(words_fn(src[i]))
    return out


def decode_layout(packed: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Rows-contiguous fp4 bytes [..., N, K/2] (byte layout) -> a tensor of the same shape and strides in the decode
    layout, what the kernels read (a new one, or `packed` itself rewritten one expert at a time)."""
    return _convert(packed, to_decode_words, inplace)


def byte_layout(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of decode_layout: the checkpoint's bytes (row n's byte j holds its elements 2j, 2j + 1)."""
    return _convert(packed, to_byte_words)


def decode_word_ptx(src: str, dst: tuple[str, str, str, str], tmp: tuple[str, str] = ("t", "s")) -> str:
    """PTX turning decode-layout word `src` into the bf16x2 operands of slots 0..3 (`dst`): e2m1 * 2^-126 with the
    sign, rows r / r + 2 of column 2j + h in the low / high half (slot 2 * (r % 2) + h). Nine instructions."""
    t, s = tmp
    lines = []
    for slot, n in enumerate(_ROTATIONS):
        lines += [f"shf.l.wrap.b32 {t}, {src}, {src}, {n};", f"and.b32 {dst[slot]}, {t}, {SLOT_MASK:#010x};"]
    lines += [f"prmt.b32 {t}, {src}, {src}, {_PRMT_SELECT:#06x};", f"and.b32 {t}, {t}, 0x01C001C0;",
              f"and.b32 {s}, {src}, 0x80008000;", f"or.b32 {dst[3]}, {t}, {s};"]
    return "\n".join(lines)
