"""Triton body of the fp8 activation quantizer (launcher: fp8_gemm.act_quant; twin: quantize.fp8_math.act_quant_ref).

# T tokens (rows), C columns, G group size (128)
q[t, c] = clamp(x[t, c] / s, -448, 448) -> e4m3fn with, by MODE:
  0 tensor: s = the scale in s_ptr[0] (static), or with DYNAMIC s = max(amax_ptr[0], EPS) / 448 (written to s_ptr[0]);
            grid (T, cdiv(C, BLOCK)).
  1 token:  s[t] = max(amax_c |x[t, c]|, EPS) / 448; grid (T,), one tile per row when C <= BLOCK, else two
            passes over the row in BLOCK chunks.
  2 group:  s[t, g] = max(amax over the G columns of group g, EPS) / 448; grid (T, C / G), BLOCK == G.
  3 amax:   no output but amax_ptr[0] = max(amax_ptr[0], amax |x|) (atomic), the first launch of a dynamic
            per-tensor quantization of a large x; grid (T, cdiv(C, BLOCK)).
  4 tensor, dynamic, one program holding all of x in one [BLOCK_T, BLOCK] tile: amax then quantize (a small x, as
            when decoding: one launch, one load); grid (1,).
  5 token, from amax: s[t] = max(amax_ptr[t], EPS) / 448 with the row amax already there (folded by GEMM1's
            epilogue), so one pass over x, spread over columns; grid (T, cdiv(C, BLOCK)).
ALIGN: the first program also runs moe_align's one-program body (align.one_program_align: the al_* arguments and
AL_* constants) before its own tile, so the grouped GEMMs' routing costs no launch of its own.
ZERO: row r's first program also stores 0 to zero_ptr[r*ZERO_PER_ROW : (r+1)*ZERO_PER_ROW] (below ZERO_N): the amax
buffer GEMM1's epilogue folds into ([1] per tensor, [T*K] per token slot), which saves a memset launch.
The division is IEEE round-to-nearest (div_rn) so the kernel matches its torch twin bit for bit. EMULATE_CAST (set
under TRITON_INTERPRET=1) rounds to the e4m3 grid in fp32 before the cast: the interpreter's fp32 -> e4m3 cast
drops the carry when rounding up to the next power of two (124.3 -> 64); the GPU's cvt instruction is right.
"""

import triton
import triton.language as tl

from moequant.kernels._align_kernel import moe_align_kernel

FP8_MAX = tl.constexpr(448.0)  # a global read inside @jit must be a constexpr instance


@triton.jit
def _round_to_e4m3_grid(y):
    """y (|y| <= 448) rounded to the nearest e4m3 value, ties to even, still in fp32: normals keep 3 mantissa
    bits (integer rounding of the fp32 pattern), subnormals (|y| < 2^-6) become multiples of 2^-9."""
    raw = y.to(tl.int32, bitcast=True)
    bits = (raw + 0x7FFFF + ((raw >> 20) & 1)) & ~0xFFFFF
    normal = bits.to(tl.float32, bitcast=True)
    a = tl.abs(y)
    sub = (a + 24576.0) - 24576.0  # fp32 addition rounds |y| to a multiple of 2^-9, ties to even
    sub = tl.where(raw < 0, -sub, sub)  # sign bit: keeps -0, as the cast does
    return tl.where(a < 0.015625, sub, normal)


@triton.jit
def _quant(x, s, EMULATE_CAST: tl.constexpr):
    y = tl.math.div_rn(x, s)
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    if EMULATE_CAST:
        y = _round_to_e4m3_grid(y)
    return y.to(tl.float8e4nv)


@triton.jit
def _scale(amax, EPS: tl.constexpr):
    return tl.math.div_rn(tl.maximum(amax, EPS), FP8_MAX)


@triton.jit
def fp8_act_quant_kernel(
    x_ptr, q_ptr, s_ptr, amax_ptr, zero_ptr,
    T, C, stride_x, stride_q, stride_s,
    MODE: tl.constexpr, DYNAMIC: tl.constexpr, ZERO: tl.constexpr, EPS: tl.constexpr, BLOCK: tl.constexpr,
    EMULATE_CAST: tl.constexpr, BLOCK_T: tl.constexpr = 1, ZERO_N: tl.constexpr = 1, ZERO_PER_ROW: tl.constexpr = 1,
    ZERO_BLOCK: tl.constexpr = 1,
    al_ids_ptr=None, al_sorted_ptr=None, al_expert_ptr=None, al_total_ptr=None, al_scratch_ptr=None, al_S=0, al_E=0,
    al_P=0, al_NB=0, ALIGN: tl.constexpr = False, AL_BLOCK_M: tl.constexpr = 16, AL_SLOTS: tl.constexpr = 16,
    AL_E_BINS: tl.constexpr = 2, AL_FILL: tl.constexpr = 16, AL_CHUNK: tl.constexpr = 16,
):
    first = (tl.program_id(0) == 0) & (tl.program_id(1) == 0)
    if ALIGN:
        if first:
            moe_align_kernel(al_ids_ptr, al_sorted_ptr, al_expert_ptr, al_total_ptr, al_scratch_ptr, al_S, al_E, al_P,
                             al_NB, AL_BLOCK_M, AL_SLOTS, AL_E_BINS, AL_FILL, AL_CHUNK)
    row = tl.program_id(0).to(tl.int64)
    if ZERO:  # resets the amax buffer a later kernel folds into (no memset launch): row r clears its entries
        if tl.program_id(1) == 0:
            z = tl.arange(0, ZERO_BLOCK)
            idx = row * ZERO_PER_ROW + z
            ok = (z < ZERO_PER_ROW) & (idx < ZERO_N)
            tl.store(zero_ptr + idx, tl.zeros((ZERO_BLOCK,), dtype=tl.float32), mask=ok)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    offs = tl.arange(0, BLOCK)
    if MODE == 1:
        if C <= BLOCK:  # the whole row in one tile: one load
            m = offs < C
            x = tl.load(x_row + offs, mask=m, other=0.0).to(tl.float32)
            s = _scale(tl.max(tl.abs(x), axis=0), EPS)
            tl.store(s_ptr + row * stride_s, s)
            tl.store(q_row + offs, _quant(x, s, EMULATE_CAST), mask=m)
        else:
            amax = tl.zeros((BLOCK,), dtype=tl.float32)
            for c0 in range(0, C, BLOCK):
                m = c0 + offs < C
                x = tl.load(x_row + c0 + offs, mask=m, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            s = _scale(tl.max(amax, axis=0), EPS)
            tl.store(s_ptr + row * stride_s, s)
            for c0 in range(0, C, BLOCK):
                m = c0 + offs < C
                x = tl.load(x_row + c0 + offs, mask=m, other=0.0).to(tl.float32)
                tl.store(q_row + c0 + offs, _quant(x, s, EMULATE_CAST), mask=m)
    elif MODE == 4:
        rows = tl.arange(0, BLOCK_T)
        m2 = (rows[:, None] < T) & (offs[None, :] < C)
        x = tl.load(x_ptr + rows[:, None] * stride_x + offs[None, :], mask=m2, other=0.0).to(tl.float32)
        s = _scale(tl.max(tl.max(tl.abs(x), axis=1), axis=0), EPS)
        tl.store(s_ptr, s)
        tl.store(q_ptr + rows[:, None] * stride_q + offs[None, :], _quant(x, s, EMULATE_CAST), mask=m2)
    else:
        col = tl.program_id(1) * BLOCK + offs
        m = col < C
        x = tl.load(x_row + col, mask=m, other=0.0).to(tl.float32)
        if MODE == 3:
            tl.atomic_max(amax_ptr, tl.max(tl.abs(x), axis=0), sem="relaxed")
        elif MODE == 5:
            s = _scale(tl.load(amax_ptr + row), EPS)
            if tl.program_id(1) == 0:
                tl.store(s_ptr + row * stride_s, s)
            tl.store(q_row + col, _quant(x, s, EMULATE_CAST), mask=m)
        elif MODE == 2:
            s = _scale(tl.max(tl.abs(x), axis=0), EPS)
            tl.store(s_ptr + row * stride_s + tl.program_id(1), s)
            tl.store(q_row + col, _quant(x, s, EMULATE_CAST), mask=m)
        else:
            if DYNAMIC:
                s = _scale(tl.load(amax_ptr), EPS)
                if first:
                    tl.store(s_ptr, s)
            else:
                s = tl.load(s_ptr)
            tl.store(q_row + col, _quant(x, s, EMULATE_CAST), mask=m)
