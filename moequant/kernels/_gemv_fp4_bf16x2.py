"""bf16x2 body of the A16 fp4 decode GEMV: gemv_rows_kernel's PACKED fp4 path (bf16 activations, GPU only: inline
PTX, which the interpreter cannot run).

# E experts, N output rows (per part), Q = N/4 row quads, C reduction length, J = C/2 byte columns, G columns per
# block scale (nvfp4 16, mxfp4 32), U byte columns per tile element (UNIT: 2, 4 or 8, at most G/2), UG = G/(2U)
# tile elements per scale group, NG groups per step, NU = NG*UG tile elements per step along the reduction,
# PA parts in the tile (GEMM1: 1, gate; the up rows get a second tile of the same shape; GEMM2: the top-k experts,
# or 1 with PART_SPLIT), BQ = BLOCK_N/4 row quads per program
words  int32 [E, Q, J]: word (q, j) holds byte column j of rows 4q..4q+3 (element columns 2j, 2j + 1) in the decode
       layout (kernels.fp4_word_layout); stride 1 along q, so a thread's 16-byte load is one column of four quads
scales int32 [E, Q, C/G]: the same four rows' block scale bytes (e4m3 or E8M0), loaded through pointers of the
       words' tile shape so that they take the words' register layout
tile   [PA, NU, BQ]: element (p, u, q) is words (q, uU .. uU + U - 1) of its part's expert: 2U columns of four rows
math   acc[p, 4q + r] = sum_u scale[q, r, g(u)] * sum_{k in u} e2m1[4q + r, k] * x[p, k]
       Two words (four columns) of a row pair (r, r + 2) form one chain of four bf16x2 fmas (_fp4_words_dot_bf16);
       a tile element's U/2 chains add in fp32 and meet the row's block scale once, so a larger U spends fewer
       instructions per element on scales and fp32 sums (and fewer accumulator registers) for the same bytes.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from moequant.kernels._fp4_gemm_kernel import block_scale_value
from moequant.kernels.fp4_word_layout import decode_word_ptx

FP4_PACKED_FACTOR = tl.constexpr(4611686018427387904.0)  # 2^62: _fp4_words_dot_bf16 returns the sums times 2^-62


@triton.jit
def act_pair(a_base, m, ok, MASKED: tl.constexpr):
    """int32 word m of a bf16 activation row (contiguous, 4-byte aligned): the pair (x_2m, x_2m+1)."""
    ap = a_base.to(tl.pointer_type(tl.int32), bitcast=True)
    if MASKED:
        return tl.load(ap + m, mask=ok, other=0)
    return tl.load(ap + m)


@triton.jit
def act_quad(a_base, m, ok, MASKED: tl.constexpr):
    """int32 words m .. m + 3 of a bf16 activation row, (x_2m, x_2m+1) .. (x_2m+6, x_2m+7), as one 16-byte load
    (m a multiple of 4, the row 16-byte aligned: the launcher's X_QUAD); act_pair's four loads are four L1 requests
    for the bytes of one."""
    ap = a_base.to(tl.pointer_type(tl.int32), bitcast=True) + m
    if MASKED:
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $5, 0; mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0; "
            "@p ld.global.v4.b32 {$0, $1, $2, $3}, [$4]; }",
            "=r,=r,=r,=r,l,r", [ap, ok.to(tl.int32)], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True,
            pack=1)
    return tl.inline_asm_elementwise("ld.global.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [ap],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def block_scale(sw, SHIFT: tl.constexpr, SCALE_KIND: tl.constexpr):
    """fp32 block scale from byte SHIFT/8 of each word: e4m3 through the hardware conversion, E8M0 as 2^(s-127)."""
    s = (sw >> SHIFT).to(tl.uint8)
    if SCALE_KIND == 0:
        return s.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return block_scale_value(s, SCALE_KIND)


@triton.jit
def join_rows(r0, r1, r2, r3):
    """Tensors of rows 4q + r (one shape S) as one [S, 2 (k), 2 (i)] of row 4q + 2k + i: rows_in_order of their
    sums, or one reduction for all four (each tl.sum across warps is its own shared-memory exchange: offline sm_90,
    Qwen3-30B nvfp4a16 GEMM1 32 -> 11 barriers)."""
    return tl.join(tl.join(r0, r2), tl.join(r1, r3))


@triton.jit
def rows_in_order(s):
    """[PA, BQ, 2, 2] sums of join_rows -> [PA, 4 BQ] in row order."""
    return tl.reshape(s, (s.shape[0], 4 * s.shape[1]))


@triton.jit
def interleave_rows(r0, r1, r2, r3):
    """[PA, BQ] sums of rows 4q + r -> [PA, 4 BQ] in row order."""
    return rows_in_order(join_rows(r0, r1, r2, r3))


@triton.jit
def _bf16_splat_scaled(p, SEL: tl.constexpr):
    """One bf16 of each int32 pair p twice (SEL 0x1010: the low one, 0x3232: the high one) as bf16x2, times 2^64
    (exact; see _fp4_words_dot_bf16)."""
    return tl.inline_asm_elementwise(
        f"""{{
        .reg .b32 t, c, z;
        mov.b32 c, 0x5F805F80;
        mov.b32 z, 0;
        prmt.b32 t, $1, $1, {SEL};
        fma.rn.bf16x2 $0, t, c, z;
        }}""", "=r,r", [p], dtype=tl.int32, is_pure=True, pack=1)


def _fp4_dot_ptx() -> str:
    """_fp4_words_dot_bf16's PTX: $4, $5 the two words, $6..$9 the splat activations of columns 2j, 2j + 1,
    2j + 2, 2j + 3; $0..$3 rows 0..3 as fp32 bits."""
    decode = [decode_word_ptx(w, tuple(f"{p}{k}" for k in range(4))) for w, p in (("$4", "p"), ("$5", "q"))]
    chains = [f"fma.rn.bf16x2 {acc}, {p}{k + i}, ${6 + 2 * j + i}, {'z' if (i, j) == (0, 0) else acc};"
              for acc, k in (("a02", 0), ("a13", 2)) for j, p in enumerate("pq") for i in range(2)]
    return "\n".join(["{", ".reg .b32 t, s, p0, p1, p2, p3, q0, q1, q2, q3, z, a02, a13;", "mov.b32 z, 0;",
                      *decode, *chains,
                      "shl.b32 $0, a02, 16;", "and.b32 $2, a02, 0xFFFF0000;",
                      "shl.b32 $1, a13, 16;", "and.b32 $3, a13, 0xFFFF0000;", "}"])


_FP4_DOT_PTX = tl.constexpr(_fp4_dot_ptx())


def _fp4_dot_f32_ptx() -> str:
    """fp4_word_dot_f32's PTX: $4 the word, $5 / $6 the fp32 activations of columns 2j / 2j + 1 (times 2^64); $0..$3
    rows 0..3. Each slot's halves become fp32 by a shift (low) or a mask (high): bf16 is fp32's upper half."""
    slots = ("p0", "p1", "p2", "p3")
    lines = ["{", ".reg .b32 t, s, p0, p1, p2, p3;", ".reg .f32 lo, hi;", decode_word_ptx("$4", slots)]
    for r, (c0, c1) in enumerate(((0, 1), (2, 3))):  # slots 2r + h: rows r (low half) and r + 2 (high half)
        lines += [f"shl.b32 lo, p{c0}, 16;", f"and.b32 hi, p{c0}, 0xFFFF0000;",
                  f"mul.rn.f32 ${r}, lo, $5;", f"mul.rn.f32 ${r + 2}, hi, $5;",
                  f"shl.b32 lo, p{c1}, 16;", f"and.b32 hi, p{c1}, 0xFFFF0000;",
                  f"fma.rn.f32 ${r}, lo, $6, ${r};", f"fma.rn.f32 ${r + 2}, hi, $6, ${r + 2};"]
    return "\n".join(lines + ["}"])


_FP4_DOT_F32_PTX = tl.constexpr(_fp4_dot_f32_ptx())


@triton.jit
def fp4_word_dot_f32(u, a_lo, a_hi):
    """Rows r = 0..3 of each decode-layout word u (byte column j): e2m1[r, 2j] * a_lo + e2m1[r, 2j + 1] * a_hi in
    fp32, times 2^-62 when a_lo / a_hi come times 2^64 (FP4_PACKED_FACTOR undoes it; |a| < 2^64, as on the bf16x2
    path). The nine-instruction decode
    (fp4_word_layout.decode_word_ptx), then each bf16 value (e2m1 * 2^-126, code 1 an fp32 subnormal, which fma
    keeps: no .ftz) read as fp32 and multiplied in fp32: exact products, fp32 sums, as the byte decode
    (fp4_byte_word + _e2m1_pair) gives them, in 25 instructions per word instead of about 45. GPU only (PTX)."""
    d0, d1, d2, d3 = tl.inline_asm_elementwise(
        _FP4_DOT_F32_PTX, "=f,=f,=f,=f,r,f,f", [u, a_lo, a_hi],
        dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
    return d0, d1, d2, d3


@triton.jit
def _fp4_words_dot_bf16(ue, uo, elo, ehi, olo, ohi):
    """Rows r = 0..3 of two fp4 words (decode layout) of byte columns j (ue) and j + 1 (uo): sum over the four
    element columns of e2m1 * x * 2^-62, in fp32.
    Each word gives four bf16x2 in nine instructions (fp4_word_layout.decode_word_ptx): slot 2 * (r % 2) + h holds
    rows r and r + 2 of column 2j + h, sign at bit 15, magnitude at bits 6-8 of each half, which reads as the e2m1
    value times 2^-126 (code 1, 0.5, is a bf16 subnormal, which bf16 arithmetic keeps). elo .. ohi: the activations
    of the four columns, each as a bf16x2 pair of itself times 2^64 (_bf16_splat_scaled), so every product is a
    normal bf16. Per row pair (0, 2) and (1, 3) one chain of four bf16x2 fmas (round to nearest at each: about 2^-9
    of the partial), whose halves are the two rows' sums.
    H200 (one A/B, 3 rounds): M=1 nvfp4a16 Mixtral 73.0 -> 66.4 us, Qwen3-30B 17.15 -> 16.5 against the byte
    layout's shift-and-mask decode (about 16 instructions per word; GEMM1 loop 908 -> 716 SASS instructions)."""
    d0, d1, d2, d3 = tl.inline_asm_elementwise(
        _FP4_DOT_PTX, "=r,=r,=r,=r,r,r,r,r,r,r", [ue, uo, elo, ehi, olo, ohi],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    return (d0.to(tl.float32, bitcast=True), d1.to(tl.float32, bitcast=True), d2.to(tl.float32, bitcast=True),
            d3.to(tl.float32, bitcast=True))


@triton.jit
def _words(base, j3, ok, stride_wk, U: tl.constexpr):
    """The U words (byte columns j3 .. j3 + U - 1) of every tile element; w_i for i >= U repeat w0 (not loaded)."""
    w0 = tl.load(base + j3 * stride_wk, mask=ok, other=0)
    w1 = tl.load(base + (j3 + 1) * stride_wk, mask=ok, other=0)
    w2 = w0
    w3 = w0
    w4 = w0
    w5 = w0
    w6 = w0
    w7 = w0
    if U >= 4:
        w2 = tl.load(base + (j3 + 2) * stride_wk, mask=ok, other=0)
        w3 = tl.load(base + (j3 + 3) * stride_wk, mask=ok, other=0)
    if U >= 8:
        w4 = tl.load(base + (j3 + 4) * stride_wk, mask=ok, other=0)
        w5 = tl.load(base + (j3 + 5) * stride_wk, mask=ok, other=0)
        w6 = tl.load(base + (j3 + 6) * stride_wk, mask=ok, other=0)
        w7 = tl.load(base + (j3 + 7) * stride_wk, mask=ok, other=0)
    return w0, w1, w2, w3, w4, w5, w6, w7


@triton.jit
def _pairs(a_base, j3, ok, MASKED: tl.constexpr, U: tl.constexpr):
    """The activation pairs (x_2j, x_2j+1) of byte columns j3 .. j3 + U - 1 ([PA, NU, 1]); p_i for i >= U repeat
    p0."""
    p0 = act_pair(a_base, j3, ok, MASKED)
    p1 = act_pair(a_base, j3 + 1, ok, MASKED)
    p2 = p0
    p3 = p0
    p4 = p0
    p5 = p0
    p6 = p0
    p7 = p0
    if U >= 4:
        p2 = act_pair(a_base, j3 + 2, ok, MASKED)
        p3 = act_pair(a_base, j3 + 3, ok, MASKED)
    if U >= 8:
        p4 = act_pair(a_base, j3 + 4, ok, MASKED)
        p5 = act_pair(a_base, j3 + 5, ok, MASKED)
        p6 = act_pair(a_base, j3 + 6, ok, MASKED)
        p7 = act_pair(a_base, j3 + 7, ok, MASKED)
    return p0, p1, p2, p3, p4, p5, p6, p7


@triton.jit
def splat_pairs(p0, p1, p2, p3, p4, p5, p6, p7, U: tl.constexpr):
    """The sixteen splat activations (_bf16_splat_scaled: low and high bf16 of each pair) of a tile element's U
    activation pairs p_i; those past U repeat the first four."""
    x0 = _bf16_splat_scaled(p0, 0x1010)
    x1 = _bf16_splat_scaled(p0, 0x3232)
    x2 = _bf16_splat_scaled(p1, 0x1010)
    x3 = _bf16_splat_scaled(p1, 0x3232)
    x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = x0, x1, x2, x3, x0, x1, x2, x3, x0, x1, x2, x3
    if U >= 4:
        x4 = _bf16_splat_scaled(p2, 0x1010)
        x5 = _bf16_splat_scaled(p2, 0x3232)
        x6 = _bf16_splat_scaled(p3, 0x1010)
        x7 = _bf16_splat_scaled(p3, 0x3232)
    if U >= 8:
        x8 = _bf16_splat_scaled(p4, 0x1010)
        x9 = _bf16_splat_scaled(p4, 0x3232)
        x10 = _bf16_splat_scaled(p5, 0x1010)
        x11 = _bf16_splat_scaled(p5, 0x3232)
        x12 = _bf16_splat_scaled(p6, 0x1010)
        x13 = _bf16_splat_scaled(p6, 0x3232)
        x14 = _bf16_splat_scaled(p7, 0x1010)
        x15 = _bf16_splat_scaled(p7, 0x3232)
    return x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15


@triton.jit
def _step_cols(c, NU: tl.constexpr, U: tl.constexpr, UG: tl.constexpr):
    """Step c's first byte column j3 and scale group g3 of every tile element ([1, NU, 1])."""
    u3 = (c * NU + tl.arange(0, NU))[None, :, None]
    return u3 * U, u3 // UG


@triton.jit
def _read(ok, c, c1, j3, g3, NUM_G, EVEN: tl.constexpr, LIVE: tl.constexpr):
    """ok, and not when c >= c1 with LIVE (the prefetch of the step after the last), nor past NUM_G groups unless
    EVEN."""
    if LIVE:  # per element (j3 >= 0 is always true): H200, Qwen3-30B nvfp4a16 M=1 with GEMM2 chained, 18.4-18.8 ->
        ok = ok & (c < c1) & (j3 >= 0)  # 17.6-18.1 us against the scalar test (ptxas: 168 registers in GEMM2, not 128)
    if not EVEN:
        ok = ok & (g3 < NUM_G)
    return ok


@triton.jit
def _step_pairs(c, c1, a_base, pa_ok, NUM_G, EVEN: tl.constexpr, LIVE: tl.constexpr, U: tl.constexpr,
                NU: tl.constexpr, UG: tl.constexpr):
    """Step c's activation pairs of the U byte columns of every tile element (_pairs)."""
    j3, g3 = _step_cols(c, NU, U, UG)
    return _pairs(a_base, j3, _read(pa_ok, c, c1, j3, g3, NUM_G, EVEN, LIVE), LIVE or not EVEN, U)


@triton.jit
def _step_loads(c, c1, wa, wb, sa, sb, a_base, ld_ok, pa_ok, NUM_G, stride_wk, stride_sg, DOWN: tl.constexpr,
                EVEN: tl.constexpr, LIVE: tl.constexpr, U: tl.constexpr, NU: tl.constexpr, UG: tl.constexpr,
                ACT: tl.constexpr = True):
    """Everything step c reads: U words of every tile element (gate / all parts: wa; up: wb), the four rows' block
    scale words, and the activation pairs of the U byte columns (without ACT not read: dummies). LIVE: masked off
    when c >= c1 (the prefetch of the step after the last)."""
    j3, g3 = _step_cols(c, NU, U, UG)
    ok = _read(ld_ok, c, c1, j3, g3, NUM_G, EVEN, LIVE)
    a0, a1, a2, a3, a4, a5, a6, a7 = _words(wa, j3, ok, stride_wk, U)
    swa = tl.load(sa + g3 * stride_sg, mask=ok, other=0)
    b0, b1, b2, b3, b4, b5, b6, b7 = a0, a1, a2, a3, a4, a5, a6, a7
    swb = swa
    if not DOWN:
        b0, b1, b2, b3, b4, b5, b6, b7 = _words(wb, j3, ok, stride_wk, U)
        swb = tl.load(sb + g3 * stride_sg, mask=ok, other=0)
    p0, p1, p2, p3, p4, p5, p6, p7 = a0, a0, a0, a0, a0, a0, a0, a0
    if ACT:
        p0, p1, p2, p3, p4, p5, p6, p7 = _step_pairs(c, c1, a_base, pa_ok, NUM_G, EVEN, LIVE, U, NU, UG)
    return (a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7, swa, swb,
            p0, p1, p2, p3, p4, p5, p6, p7)


@triton.jit
def _element_rows(w0, w1, w2, w3, w4, w5, w6, w7, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13,
                  x14, x15, U: tl.constexpr):
    """Rows 0..3's fp32 sums (x 2^-62) of a tile element's U words; x_2i, x_2i+1: the splat activations of the low
    and high nibbles of word i."""
    s0, s1, s2, s3 = _fp4_words_dot_bf16(w0, w1, x0, x1, x2, x3)
    if U >= 4:
        d0, d1, d2, d3 = _fp4_words_dot_bf16(w2, w3, x4, x5, x6, x7)
        s0, s1, s2, s3 = s0 + d0, s1 + d1, s2 + d2, s3 + d3
    if U >= 8:
        d0, d1, d2, d3 = _fp4_words_dot_bf16(w4, w5, x8, x9, x10, x11)
        e0, e1, e2, e3 = _fp4_words_dot_bf16(w6, w7, x12, x13, x14, x15)
        s0, s1, s2, s3 = s0 + (d0 + e0), s1 + (d1 + e1), s2 + (d2 + e2), s3 + (d3 + e3)
    return s0, s1, s2, s3


@triton.jit
def _scaled_add(r0, r1, r2, r3, s0, s1, s2, s3, sw, SCALE_KIND: tl.constexpr):
    """r_i += s_i * the block scale of row i (byte i of sw)."""
    r0 += s0 * block_scale(sw, 0, SCALE_KIND)
    r1 += s1 * block_scale(sw, 8, SCALE_KIND)
    r2 += s2 * block_scale(sw, 16, SCALE_KIND)
    r3 += s3 * block_scale(sw, 24, SCALE_KIND)
    return r0, r1, r2, r3


@triton.jit
def fp4_bf16x2_sums(w_ptr, s_ptr, a_ptr, a_rows, e, p_ok, c0, c1, N, NUM_G, stride_we, stride_wn, stride_wk,
                    stride_se, stride_sn, stride_sg, DOWN: tl.constexpr, EVEN: tl.constexpr,
                    PREFETCH: tl.constexpr, SCALE_KIND: tl.constexpr, G: tl.constexpr, U: tl.constexpr,
                    PA: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr, PDL_WAIT: tl.constexpr = False,
                    STAGES: tl.constexpr = 1):
    """Steps c0 .. c1 of this program's BLOCK_N rows: ([PA, BLOCK_N] sums of the gate / every part, [1, BLOCK_N]
    sums of the up rows (GEMM1; GEMM2: the first again)), block scales applied, times 2^-62 (FP4_PACKED_FACTOR
    undoes it). a_rows, e, p_ok: GEMM2 [PA] activation row offsets, experts and live parts; GEMM1 scalars (p_ok
    unused). PREFETCH: step c + 1's loads are issued before step c's products (register double buffering).
    PDL_WAIT (with PREFETCH): launched as a programmatic dependent of the GEMM1 that writes a; the first step's
    weights and scales are issued, then the program waits for GEMM1 before loading activations."""
    tl.static_assert(U == 2 or U == 4 or U == 8, "UNIT: 2, 4 or 8 byte columns per tile element")
    tl.static_assert(2 * U <= G, "a tile element lies in one scale group")
    UG: tl.constexpr = G // (2 * U)
    NU: tl.constexpr = NG * UG
    BQ: tl.constexpr = BLOCK_N // 4
    NQ = N // 4
    q3 = (tl.program_id(1) * BQ + tl.arange(0, BQ))[None, None, :].to(tl.int64)
    if DOWN:
        e3 = e[:, None, None]
        a_base = a_ptr + a_rows[:, None, None]
        pa_ok = p_ok[:, None, None]
    else:
        e3 = e
        a_base = a_ptr + a_rows
        pa_ok = (tl.arange(0, 1) < 1)[:, None, None]
    ld_ok = pa_ok if EVEN else pa_ok & (q3 < NQ)
    wa = w_ptr + e3 * stride_we + q3 * stride_wn
    sa = s_ptr + e3 * stride_se + q3 * stride_sn
    wb = wa + NQ * stride_wn
    sb = sa + NQ * stride_sn
    acc0 = tl.zeros((PA, NU, BQ), dtype=tl.float32)
    acc1 = tl.zeros((PA, NU, BQ), dtype=tl.float32)
    acc2 = tl.zeros((PA, NU, BQ), dtype=tl.float32)
    acc3 = tl.zeros((PA, NU, BQ), dtype=tl.float32)
    up0 = tl.zeros((1, NU, BQ), dtype=tl.float32)
    up1 = tl.zeros((1, NU, BQ), dtype=tl.float32)
    up2 = tl.zeros((1, NU, BQ), dtype=tl.float32)
    up3 = tl.zeros((1, NU, BQ), dtype=tl.float32)
    if PREFETCH:
        nxt = _step_loads(c0, c1, wa, wb, sa, sb, a_base, ld_ok, pa_ok, NUM_G, stride_wk, stride_sg, DOWN, EVEN,
                          True, U, NU, UG, not PDL_WAIT)
        if PDL_WAIT:  # GEMM2 launched while GEMM1 runs: its first weights are in flight, now wait for GEMM1's output
            gdc_wait()
            a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7, swa, swb, _, _, _, _, _, _, _, _ = nxt
            p0, p1, p2, p3, p4, p5, p6, p7 = _step_pairs(c0, c1, a_base, pa_ok, NUM_G, EVEN, True, U, NU, UG)
            nxt = (a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7, swa, swb,
                   p0, p1, p2, p3, p4, p5, p6, p7)
    for c in tl.range(c0, c1, num_stages=1 if PREFETCH else STAGES):  # STAGES > 1 (without PREFETCH): Triton
        # streams the next STAGES - 1 steps' words, scales and activation pairs into shared memory (cp.async)
        if PREFETCH:
            cur = nxt
            nxt = _step_loads(c + 1, c1, wa, wb, sa, sb, a_base, ld_ok, pa_ok, NUM_G, stride_wk, stride_sg, DOWN,
                              EVEN, True, U, NU, UG)
        else:
            cur = _step_loads(c, c1, wa, wb, sa, sb, a_base, ld_ok, pa_ok, NUM_G, stride_wk, stride_sg, DOWN, EVEN,
                              False, U, NU, UG)
        a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7, swa, swb, p0, p1, p2, p3, p4, p5, p6, p7 = cur
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = splat_pairs(p0, p1, p2, p3, p4, p5, p6,
                                                                                          p7, U)
        s0, s1, s2, s3 = _element_rows(a0, a1, a2, a3, a4, a5, a6, a7, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10,
                                       x11, x12, x13, x14, x15, U)
        acc0, acc1, acc2, acc3 = _scaled_add(acc0, acc1, acc2, acc3, s0, s1, s2, s3, swa, SCALE_KIND)
        if not DOWN:
            s0, s1, s2, s3 = _element_rows(b0, b1, b2, b3, b4, b5, b6, b7, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9,
                                           x10, x11, x12, x13, x14, x15, U)
            up0, up1, up2, up3 = _scaled_add(up0, up1, up2, up3, s0, s1, s2, s3, swb, SCALE_KIND)
    if DOWN:  # four reductions: as one (below) GEMM2 measured slower (H200, Qwen3-30B nvfp4a16 M=1 +0.4 us)
        acc = interleave_rows(tl.sum(acc0, axis=1), tl.sum(acc1, axis=1), tl.sum(acc2, axis=1), tl.sum(acc3, axis=1))
        return acc, acc
    # GEMM1: gate and up, all eight row sums, in one reduction (H200, Qwen3-30B M=1: nvfp4a16 16.54 -> 16.20 us,
    # mxfp4 19.45 -> 19.1)
    sums = tl.join(join_rows(acc0, acc1, acc2, acc3), join_rows(up0, up1, up2, up3))  # [1, NU, BQ, 2, 2, 2]
    gate, up = tl.split(tl.sum(sums, axis=1))
    return rows_in_order(gate), rows_in_order(up)
