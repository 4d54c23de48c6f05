"""Triton body of the NVFP4 activation fake-quant (launcher: nvfp4_act.py), the twin of fp4_math.nvfp4_act_codes.

# R rows, C columns (a multiple of 16), BC columns per chunk (a power of two, a multiple of 16), BG = BC / 16 blocks
math  gs = 1 / s (s: the input scale; NaN = dynamic: s = max(amax(|a|) / (6 * 448), fp32 tiny) over the whole tensor)
      per block of 16 columns: scale = e4m3(min(amax_16 / 6 * gs, 448)), eff = scale / gs,
      q = e2m1(a / eff) (nearest, ties to the even mantissa, saturating at 6; 0 where eff is 0)
      out = q * scale in out's dtype (exact: a 2-bit e2m1 significand times a 4-bit e4m3 one), so a ~= out * s
Every division is IEEE round-to-nearest (div_rn) and the e4m3 conversion rounds to nearest even, as torch does, so the
kernel's codes equal the reference's bit for bit (ties on an e2m1 boundary are common with bf16 inputs). EMULATE_CAST
(the interpreter, whose fp32 -> e4m3 cast drops the carry when rounding up to the next power of two) rounds the block
scale to the e4m3 grid in fp32 instead (_fp8_act_quant_kernel._round_to_e4m3_grid).
One program per row; SCAN (few rows of few columns: nvfp4_act.SCAN_MAX_LOADS): with a NaN input scale every program
first takes the amax of all R rows itself (no second launch, no cross-program reduction), and program 0 writes the
scale it used to s_out.
"""

import triton
import triton.language as tl

from moequant.kernels._fp8_act_quant_kernel import _round_to_e4m3_grid
from moequant.kernels._gemv_fp8_rows import _rows_abs_max

FP32_TINY = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def _e2m1_magnitude(m):
    """Nearest e2m1 magnitude of m >= 0 (ties to the even mantissa: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2,
    2.5 -> 2, 3.5 -> 4, 5 -> 4), saturating at 6 (fp4_math.round_to_e2m1's thresholds)."""
    r = tl.where(m > 0.25, 0.5, 0.0)
    r = tl.where(m >= 0.75, 1.0, r)
    r = tl.where(m > 1.25, 1.5, r)
    r = tl.where(m >= 1.75, 2.0, r)
    r = tl.where(m > 2.5, 3.0, r)
    r = tl.where(m >= 3.5, 4.0, r)
    return tl.where(m > 5.0, 6.0, r)


@triton.jit
def nvfp4_fake_quant_kernel(a_ptr, out_ptr, s_ptr, s_out_ptr, R, C, stride_ar, stride_or, SCAN: tl.constexpr,
                            EMULATE_CAST: tl.constexpr, BC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = tl.load(s_ptr).to(tl.float32)
    if SCAN:
        if s != s:  # NaN: dynamic per-tensor scale
            amax = tl.max(_rows_abs_max(tl.zeros((BC,), dtype=tl.float32), a_ptr, 0, R, C, stride_ar, 1, BC), axis=0)
            s = tl.maximum(tl.math.div_rn(amax, 2688.0), FP32_TINY)
    if tl.program_id(0) == 0:
        tl.store(s_out_ptr, s)
    gs = tl.math.div_rn(1.0, s)
    BG: tl.constexpr = BC // 16
    blk = tl.arange(0, BG)[:, None] * 16 + tl.arange(0, 16)[None, :]  # [BG, 16] column offsets in a chunk
    for c0 in range(0, C, BC):
        ok = c0 + blk < C
        x = tl.load(a_ptr + row * stride_ar + c0 + blk, mask=ok, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)  # [BG]
        scale = tl.minimum(tl.math.div_rn(amax, 6.0) * gs, 448.0)
        if EMULATE_CAST:
            scale = _round_to_e4m3_grid(scale)
        else:
            scale = scale.to(tl.float8e4nv).to(tl.float32)
        eff = tl.math.div_rn(scale, gs)
        live = eff > 0
        v = tl.math.div_rn(x, tl.where(live, eff, 1.0)[:, None])
        mag = _e2m1_magnitude(tl.abs(v))
        q = tl.where(live[:, None], tl.where(v < 0, -mag, mag), 0.0)
        tl.store(out_ptr + row * stride_or + c0 + blk, (q * scale[:, None]).to(out_ptr.dtype.element_ty), mask=ok)
