"""int weights in the GEMV kernels: elements of packed int32 words to fp32 without conversions, and int4 words'
eight products in bf16x2 (used by _gemv_rows_kernel.py, whose GEMM1 can fuse GEMM2 through _gemv_fused_down.py).

A word j holds elements j*PW + i (PW = 32 / BITS), lowest bits first, as u = q + 2^(BITS-1).
"""

import triton
import triton.language as tl


@triton.jit
def int_elem(words, hi_words, off, i: tl.constexpr, BITS: tl.constexpr, two23=0x4B000000):
    """(u_i - off) * 2^(BITS*p) in fp32 for element i of every word, exact and without an int->float conversion:
    the element's bits, where they lie (p = i), or for the top elements where they lie in hi_words = words >> 12
    (int4) / >> 16 (int8), are OR-ed into the mantissa of 2^23 (two23: its bits; passed as a kernel argument, the
    constant sits in a register and the mask-and-or is one LOP3); subtracting 2^23 + off * 2^(BITS*p) leaves the
    integer. The caller divides the activation by 2^(BITS*p)."""
    LO: tl.constexpr = 5 if BITS == 4 else 2
    SHIFT_P: tl.constexpr = 3 if BITS == 4 else 2
    P: tl.constexpr = i if i < LO else i - SHIFT_P
    MASK: tl.constexpr = ((1 << BITS) - 1) << (P * BITS)
    src = words if i < LO else hi_words
    f = ((src & MASK) | two23).to(tl.float32, bitcast=True)
    return f - (8388608.0 + off * (1 << (P * BITS)))


@triton.jit
def prmt(a, b, SEL: tl.constexpr):
    """prmt.b32: bytes of (b:a) picked by the selector's nibbles (0x5410: the low halves of a and b; 0x7632: the high
    halves)."""
    return tl.inline_asm_elementwise(f"prmt.b32 $0, $1, $2, {SEL};", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def bf16_halves_sum(w):
    """fp32 sum of the two bf16 values in each int32."""
    return (w << 16).to(tl.float32, bitcast=True) + (w & -65536).to(tl.float32, bitcast=True)


@triton.jit
def int4_word_dot_bf16(u, x04, x15, x26, x37):
    """sum_i (u_i - 8) * x_i over the eight int4 elements of each word, in fp32 from two bf16x2 chains (PACKED).
    Elements i and i + 4 sit at bits 4i and 4i + 16: one mask-and-or with 0x43004300 (bf16 128.0 twice) puts both
    into bf16 mantissas (128 + u_i), one bf16x2 fma subtracts 136, exactly; x04 .. x37 hold (x_i, x_i+4) as bf16x2.
    Each half of the chain sums four products in bf16 (round to nearest at every fma: relative error about 2^-9 of
    the partial, below the bf16 output's own rounding after the fp32 sums); both halves then add in fp32."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 m, c, one, neg, zero, t0, t1, t2, t3, s, acc;
        .reg .f32 lo, hi;
        mov.b32 m, 0x000F000F;
        mov.b32 c, 0x43004300;
        mov.b32 one, 0x3F803F80;
        mov.b32 neg, 0xC308C308;
        mov.b32 zero, 0;
        lop3.b32 t0, $1, m, c, 0xEA;
        shr.u32 s, $1, 4;
        lop3.b32 t1, s, m, c, 0xEA;
        shr.u32 s, $1, 8;
        lop3.b32 t2, s, m, c, 0xEA;
        shr.u32 s, $1, 12;
        lop3.b32 t3, s, m, c, 0xEA;
        fma.rn.bf16x2 t0, t0, one, neg;
        fma.rn.bf16x2 t1, t1, one, neg;
        fma.rn.bf16x2 t2, t2, one, neg;
        fma.rn.bf16x2 t3, t3, one, neg;
        fma.rn.bf16x2 acc, t0, $2, zero;
        fma.rn.bf16x2 acc, t1, $3, acc;
        fma.rn.bf16x2 acc, t2, $4, acc;
        fma.rn.bf16x2 acc, t3, $5, acc;
        shl.b32 lo, acc, 16;
        and.b32 hi, acc, 0xFFFF0000;
        add.f32 $0, lo, hi;
        }""",
        "=f,r,r,r,r,r", [u, x04, x15, x26, x37], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def int_act_factor(i: tl.constexpr, BITS: tl.constexpr):
    """2^-(BITS*p) for element i (see int_elem)."""
    LO: tl.constexpr = 5 if BITS == 4 else 2
    SHIFT_P: tl.constexpr = 3 if BITS == 4 else 2
    P: tl.constexpr = i if i < LO else i - SHIFT_P
    return 1.0 / (1 << (P * BITS))
