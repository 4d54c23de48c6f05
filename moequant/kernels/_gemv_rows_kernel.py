"""Triton body of the decode (GEMV) kernel for int weights and fp4 weights stored rows-contiguous (A16, or nvfp4's
fp4-emulated activations with one scale per tensor), and for fp8 weights (K-contiguous) whose activations it
quantizes itself (launcher: gemv.py; fp8 with pre-quantized activations goes through _gemv_kernel.py).

Each program streams BN output rows of its slot's expert (GEMM1: the gate and the up rows; GEMM2: the rows of each of
the token's TOP_K experts) over its share of the reduction, on the CUDA cores in fp32. The tile puts the rows last: a
thread's 16-byte load holds one column of several rows (int: one word of four rows; fp4: four words of four rows'
bytes), so each activation value it loads and scales serves them all (in GEMM1 the gate and the up rows too), and a
warp's activation loads are broadcasts of a few addresses.

# T tokens, TOP_K experts per token, S = T*TOP_K slots, N output rows, C reduction length, PW elements per unit
# (int: 32 / BITS per word; fp4: 2 per byte), G columns per scale group (int per-channel: 128, only the step unit),
# GW = G / PW units per group, NG groups per step, BN rows per program (BQ = BN / 4 fp4 words), P parts (2: gate and
# up; or TOP_K padded to a power of two), SPLIT_K programs sharing one GEMM2 output block
int: words [E, N(*2), C/PW], N stride 1 (methods.base.rows_contiguous); a step's tile is [P or 1, NG, GW, BN].
  Group scales [E, N, C/G] and zero points are rows-contiguous too and loaded through pointers spanning the tile
  (+ j4 * 0), so they take the words' register layout (a [.., NG, 1, BN] load got its own layout, and Triton then
  moved every step's products through shared memory to match it).
  word j holds elements j*PW + i, lowest bits first, as u = q + 2^(BITS-1); w = (u - 2^(BITS-1) - zp) * scale
  Elements become fp32 without a conversion instruction (_int_elem; two23 = 0x4B000000, the bits of 2^23, is an
  argument so that it sits in a register and mask-and-or is one LOP3: ptxas cannot fuse two immediates); a zero
  point is applied per word as zp * sum(a over the word).
  PACKED (int4, bf16 activations in order, GPU): a word's eight products in bf16x2 instead (_int4_word_dot_bf16:
  mask-and-or into bf16 128 + u, one fma to u - 8, four fmas against activation pairs (x_i, x_i+4) regrouped from
  int32 pairs by byte permutes), each bf16 chain of four products summed in fp32: about 3.1 SASS instructions per
  element against 4.2, at a bf16 rounding per product. X_QUAD (rows 16-byte aligned): the four activation pairs
  of a word's columns come in one 16-byte load (act_quad) instead of four.
fp4: bytes and block scales (rows-contiguous) read as int32 words [E, N/4, C/2] and [E, N/4, C/G]: word (q, j)
  holds byte column j (two e2m1 codes per row) of rows 4q..4q+3 in the decode layout (kernels.fp4_word_layout);
  the fp32 path moves them back to bytes (fp4_byte_word) and _e2m1_pair decodes one nibble of two rows per
  instruction, or on a GPU (F32_PTX) decodes them as the bf16x2 path does and reads each bf16 as fp32
  (_gemv_fp4_bf16x2.fp4_word_dot_f32); w = e2m1 * block_scale (e4m3 or E8M0) * s2[e, part].
  PACKED (bf16 activations in order, GPU): _gemv_fp4_bf16x2.fp4_bf16x2_sums, its own tile [P or 1, NU, BQ] of UNIT
  byte columns per element: bf16x2 chains of four products, one block scale per row and element (PREFETCH keeps
  the next step in flight in registers; else STAGES > 1 has Triton stream the next steps through shared memory).
  out[part, n] = sum_g scale[part, n, g] * sum_{k in g} wq[part, n, k] * a[part, k]   (a: x's dtype or fp32)
fp8 (FMT 2): _gemv_fp8_rows.fp8_rows_sums, its own tile [BN, 8 NG, 2, 2] of int32 words (K-contiguous rows);
  the activation arrives in high precision (x, or GEMM1's fp32 output) and is quantized to e4m3 in the program
  with the scale A_SCALE (1 per tensor, 2 per row) and A_SRC (0 static as_ptr[0], 1 from the a_amax_n amax
  partials at as_ptr that GEMM1 stored with OUT_AMAX 2, 2 from the input's a_rows rows) say; F16X2 on a GPU (the
  interpreter takes fp32 products and EMULATE_CAST). GEMM2 takes one expert per program (PART_SPLIT, P = 1).
  MMA = W > 0 (GPU): _gemv_fp8_mma.fp8_mma_sums instead, products on the tensor cores, BN 16 or 32 rows, the
  reduction split over the W = num_warps warps, STAGES (1-3) steps of loads in flight; with PDL GEMM2 waits (after
  routing again) once its first STAGES steps' weight loads are in flight. XB > 0 (GEMM1, A_SRC 2, not PDL): the input
  row its scale reduces (XB >= C columns) is loaded first, before the routing (_gemv_fp8_rows.act_row_early).
EVEN (C a multiple of a step, N of BN) drops the column and row masks from the loop. STAGES > 1 software-pipelines
the steps: the weight words and scales of the next STAGES - 1 steps are copied to shared memory asynchronously
(cp.async) while the current step computes, keeping more bytes in flight than the registers would hold. PREFETCH
(PACKED only) double-buffers in registers instead: step c + 1's words, scales, zero points and activation pairs
(_int_step_loads, _gemv_fp4_bf16x2._step_loads) are loaded before step c's products.
GEMM1 (not DOWN): grid (S, cdiv(N, BN), 1); activation row slot // A_ROW_DIV (TOP_K; 1 when the launcher
  pre-gathered each slot's row in its expert's act-order); inter[slot, n] = act(gate, up) (+ biases, routing weight
  when applied on the input), stored at column perm[e, n] with OUT_PERM (GEMM2's act-order), so GEMM2 reads its
  input unpermuted. ROUTE: no routing launch came first; every program chooses its token's top k from the logits
  (_topk_kernel._topk_choice, E_ROUTE experts padded to E_PAD) and takes the expert of its slot (slot % TOP_K-th);
  the programs of row block 0 and k = 0 write the token's weights (_topk_weights) and ids for GEMM2. PDL: launched
  as a programmatic dependent of the launch that writes a (act-order's kernels.topk.routed_rows): the launch and the
  routing overlap it, and the program waits for it (griddepcontrol.wait) before reading anything else or writing
  anything but the routing outputs (buffers the previous launch may still read, such as a copy of its input freed
  after its launch, can be reused by this launch's outputs). TRIGGER: GEMM2 is launched as a programmatic
  dependent and may start right away (griddepcontrol.launch_dependents).
GEMM2 (DOWN): grid (T, cdiv(N, BN), SPLIT_K, or SPLIT_K * TOP_K with PART_SPLIT: one expert per program, P = 1);
  out[t, n] = sum_k w[t, k] * (part_k + b2[e_k]): the top-k sum in fp32, no separate launch; with several programs
  per output block (SHARES) each adds its share atomically to an fp32 split buffer [T, N] and the last of a block's
  programs (int32 counters [T, cdiv(N, BN)]) casts the block into out; GEMM1 zeroes both (ZERO_SPLIT: ZB elements
  of each per program, n_split / n_count in all), so the split costs no extra launch. PART_SPLIT keeps the
  activation tile [1, NG, GW, 1] (a [TOP_K, NG, GW, 1] one of as many elements as threads gets its own layout).
  Parts whose expert id is negative (another rank's) or beyond TOP_K read nothing. PDL (with ROUTE, after a GEMM1
  that routes and TRIGGERs): launched while GEMM1 runs, each program routes its token again (GEMM1's ids and
  weights may not be written yet: it computes its routing weights from the logits too), then waits for GEMM1
  (griddepcontrol.wait) before reading its input and the split buffers; the fp8 mma body and the A16 fp4 bf16x2
  body with PREFETCH issue their first steps' weight loads before that wait.
The epilogue's operands (weight scales, biases, routing weights: _gemv_kernel.epilogue_operands) are loaded before
the reduction, so their latency is not paid after it.
Act-order (SORTED, not with PACKED): column k of expert e reads a[sort_idx[e, k]].
stride_asm is unused here (gemv.py passes one argument list to both kernels; as_ptr serves fp8 only); the epilogue is
_gemv_kernel.gemv_epilogue.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from moequant.kernels._fp4_gemm_kernel import fp4_byte_word
from moequant.kernels._gemv_fp4_bf16x2 import (FP4_PACKED_FACTOR, act_pair, act_quad, block_scale, fp4_bf16x2_sums,
                                                fp4_word_dot_f32, interleave_rows)
from moequant.kernels._gemv_fp8_mma import fp8_mma_sums
from moequant.kernels._gemv_fp8_rows import act_row_early, fp8_rows_sums
from moequant.kernels._gemv_kernel import FP4_FACTOR, epilogue_operands, gemv_epilogue
from moequant.kernels._topk_kernel import _topk_choice, _topk_weights


@triton.jit
def _int_elem(words, hi_words, off, i: tl.constexpr, BITS: tl.constexpr, two23=0x4B000000):
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
def _prmt(a, b, SEL: tl.constexpr):
    """prmt.b32: bytes of (b:a) picked by the selector's nibbles (0x5410: the low halves of a and b; 0x7632: the high
    halves)."""
    return tl.inline_asm_elementwise(f"prmt.b32 $0, $1, $2, {SEL};", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def _bf16_halves_sum(w):
    """fp32 sum of the two bf16 values in each int32."""
    return (w << 16).to(tl.float32, bitcast=True) + (w & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _int4_word_dot_bf16(u, x04, x15, x26, x37):
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
def _step_masks(c, c1, ld_ok, pa_ok, CW, NUM_G, DOWN: tl.constexpr, EVEN: tl.constexpr, LIVE: tl.constexpr,
                NG: tl.constexpr, GW: tl.constexpr):
    """Step c's group indices g4 [1, NG, 1, 1], units j4 [1, NG, GW, 1] (int words or fp4 byte columns, CW per row)
    and the masks of its words (w_ok), group parameters (g_ok) and activations (x_ok). LIVE: all off when c >= c1
    (the prefetch of the step after the last)."""
    g4 = (c * NG + tl.arange(0, NG))[None, :, None, None]
    j4 = g4 * GW + tl.arange(0, GW)[None, None, :, None]
    ok = ld_ok
    if LIVE:
        ok = ok & (c < c1)
    if EVEN:
        w_ok = ok
        g_ok = ok
    else:
        w_ok = ok & (j4 < CW)
        g_ok = ok & (g4 < NUM_G)
    x_ok = j4 < CW
    if DOWN:
        x_ok = x_ok & pa_ok
    if LIVE:
        x_ok = x_ok & (c < c1)
    return g4, j4, w_ok, g_ok, x_ok


@triton.jit
def _int_group_params(g4, j4, g_ok, sa_base, sb_base, za_base, zb_base, stride_sg, stride_zg, DOWN: tl.constexpr,
                      HAS_ZP: tl.constexpr, GROUP_SCALES: tl.constexpr):
    """Group scales and zero points of a step (a: gate / all parts, b: up) as fp32 in the words' layout: the pointers
    span the words' tile (+ j4 * 0), so the loads take its register layout. Unused ones are zeros."""
    sa = tl.zeros(j4.shape, dtype=tl.float32)
    sb = sa
    if GROUP_SCALES:
        sa = tl.load(sa_base + g4 * stride_sg + j4 * 0, mask=g_ok, other=0).to(tl.float32)
        if not DOWN:
            sb = tl.load(sb_base + g4 * stride_sg + j4 * 0, mask=g_ok, other=0).to(tl.float32)
    za = sa
    zb = sa
    if HAS_ZP:
        za = tl.load(za_base + g4 * stride_zg + j4 * 0, mask=g_ok, other=0).to(tl.float32)
        if not DOWN:
            zb = tl.load(zb_base + g4 * stride_zg + j4 * 0, mask=g_ok, other=0).to(tl.float32)
    return sa, sb, za, zb


@triton.jit
def _int_step_loads(c, c1, wa_base, wb_base, sa_base, sb_base, za_base, zb_base, a_base, ld_ok, pa_ok, stride_wk,
                    stride_sg, stride_zg, CW, NUM_G, DOWN: tl.constexpr, EVEN: tl.constexpr, MASKED: tl.constexpr,
                    HAS_ZP: tl.constexpr, GROUP_SCALES: tl.constexpr, LIVE: tl.constexpr, NG: tl.constexpr,
                    GW: tl.constexpr, X_QUAD: tl.constexpr):
    """Everything step c of the PACKED int4 path reads: words (gate/all parts; up), group scales and zero points in
    the words' layout, and the activation pairs (x_2m, x_2m+1) of its four words' columns. LIVE: loads are masked
    off when c >= c1 (the prefetch of the step after the last)."""
    g4, j4, w_ok, g_ok, x_ok = _step_masks(c, c1, ld_ok, pa_ok, CW, NUM_G, DOWN, EVEN, LIVE, NG, GW)
    ua = tl.load(wa_base + j4 * stride_wk, mask=w_ok, other=0)
    ub = ua
    if not DOWN:
        ub = tl.load(wb_base + j4 * stride_wk, mask=w_ok, other=0)
    sa, sb, za, zb = _int_group_params(g4, j4, g_ok, sa_base, sb_base, za_base, zb_base, stride_sg, stride_zg, DOWN,
                                       HAS_ZP, GROUP_SCALES)
    live_x = MASKED or LIVE
    if X_QUAD:
        p0, p1, p2, p3 = act_quad(a_base, j4 * 4, x_ok, live_x)
    else:
        p0 = act_pair(a_base, j4 * 4, x_ok, live_x)
        p1 = act_pair(a_base, j4 * 4 + 1, x_ok, live_x)
        p2 = act_pair(a_base, j4 * 4 + 2, x_ok, live_x)
        p3 = act_pair(a_base, j4 * 4 + 3, x_ok, live_x)
    return ua, ub, sa, sb, za, zb, p0, p1, p2, p3


@triton.jit
def _int_act_factor(i: tl.constexpr, BITS: tl.constexpr):
    """2^-(BITS*p) for element i (see _int_elem)."""
    LO: tl.constexpr = 5 if BITS == 4 else 2
    SHIFT_P: tl.constexpr = 3 if BITS == 4 else 2
    P: tl.constexpr = i if i < LO else i - SHIFT_P
    return 1.0 / (1 << (P * BITS))


@triton.jit
def _act_col(a_base, sidx_base, k, ok, stride_ak, SORTED: tl.constexpr, MASKED: tl.constexpr):
    """fp32 activation column k of each part's row ([P or 1, NG, GW, 1]), through sort_idx when SORTED."""
    if SORTED:
        if MASKED:
            k = tl.load(sidx_base + k, mask=ok, other=0)
        else:
            k = tl.load(sidx_base + k)
    if MASKED:
        return tl.load(a_base + k * stride_ak, mask=ok, other=0).to(tl.float32)
    return tl.load(a_base + k * stride_ak).to(tl.float32)


@triton.jit
def _e2m1_pair(w, EM_SHIFT: tl.constexpr, S_SHIFT: tl.constexpr):
    """fp32 values x 2^-14 of the e2m1 codes at bits [b, b+4) and [b+16, b+20) of every word: shifted so the code's
    exponent/mantissa bits land on fp16 bits 9-11 and its sign on bit 15 of each half, both halves at once (e2m1_value's
    placement, two rows per instruction); each half is then one f16 -> f32 conversion."""
    em = w << EM_SHIFT if EM_SHIFT >= 0 else w >> (-EM_SHIFT)
    sg = w << S_SHIFT
    bits = (em & 0x0E000E00) | (sg & -0x7FFF8000)  # masks 0x0e000e00 and 0x80008000
    lo = bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (bits >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _fp4_words(r0, r1, r2, r3, w_base, s_base, j4, g4, w_ok, g_ok, stride_wk, stride_sn, stride_sg, a_lo, a_hi,
               SCALE_KIND: tl.constexpr, F32_PTX: tl.constexpr):
    """r0..r3 plus the scaled dot-product shares of one step's fp4 words [.., NG, GW, BQ] (four rows 4q..4q+3 of one
    byte column each, in the decode layout: fp4_byte_word moves row 4q + r back to byte r): each row's share times
    its block scale. a_lo / a_hi: the activation of each byte's low / high nibble (columns 2j, 2j + 1), times 2^64
    with F32_PTX (GPU: the layout's own decode, _gemv_fp4_bf16x2.fp4_word_dot_f32; shares times 2^-62), else as they
    are (shares times 2^-14); s_base: int32 words of the same four rows' block scales."""
    w = tl.load(w_base + j4 * stride_wk, mask=w_ok, other=0)
    sw = tl.load(s_base + g4 * stride_sg, mask=g_ok, other=0)  # the four rows' block scales, one byte each
    if F32_PTX:
        d0, d1, d2, d3 = fp4_word_dot_f32(w, a_lo, a_hi)
    else:
        u = fp4_byte_word(w)
        l02, l22 = _e2m1_pair(u, 9, 12)  # low nibbles of bytes 0 and 2
        l1, l3 = _e2m1_pair(u, 1, 4)  # low nibbles of bytes 1 and 3
        h0, h2 = _e2m1_pair(u, 5, 8)
        h1, h3 = _e2m1_pair(u, -3, 0)
        d0 = l02 * a_lo + h0 * a_hi
        d1 = l1 * a_lo + h1 * a_hi
        d2 = l22 * a_lo + h2 * a_hi
        d3 = l3 * a_lo + h3 * a_hi
    r0 += d0 * block_scale(sw, 0, SCALE_KIND)
    r1 += d1 * block_scale(sw, 8, SCALE_KIND)
    r2 += d2 * block_scale(sw, 16, SCALE_KIND)
    r3 += d3 * block_scale(sw, 24, SCALE_KIND)
    return r0, r1, r2, r3


@triton.jit
def _zero_split(split_ptr, count_ptr, pid, n_split, n_count, ZB: tl.constexpr):
    """GEMM1's share of zeroing GEMM2's split-K buffer and counters: ZB elements of each per program."""
    z = (pid * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * ZB + tl.arange(0, ZB)
    tl.store(split_ptr + z, tl.zeros((ZB,), dtype=tl.float32), mask=z < n_split)
    tl.store(count_ptr + z, tl.zeros((ZB,), dtype=tl.int32), mask=z < n_count)


@triton.jit
def _sum_steps(t):
    return tl.sum(tl.sum(t, axis=2), axis=1)


@triton.jit
def gemv_rows_kernel(
    a_ptr, w_ptr, s_ptr, z_ptr, sidx_ptr, es_ptr, as_ptr, ids_ptr, topk_w_ptr, bias_ptr, c_ptr, amax_ptr, perm_ptr,
    split_ptr, count_ptr, N, C, NUM_G, n_split, n_count, two23,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sg,
    stride_ze, stride_zn, stride_zg, stride_ie, stride_ese, stride_esj, stride_asm,
    stride_bias_e, stride_bias_n, stride_cm, stride_cn, stride_pe,
    DOWN: tl.constexpr, TOP_K: tl.constexpr, P: tl.constexpr, ACTIVATION: tl.constexpr,
    FMT: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, GROUP_SCALES: tl.constexpr, HAS_ZP: tl.constexpr,
    SCALE_KIND: tl.constexpr, W_SCALE: tl.constexpr, A_SCALE: tl.constexpr, SORTED: tl.constexpr,
    MUL_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_AMAX: tl.constexpr, OUT_PERM: tl.constexpr,
    EVEN: tl.constexpr, SPLIT_K: tl.constexpr, PART_SPLIT: tl.constexpr, STAGES: tl.constexpr,
    ZERO_SPLIT: tl.constexpr, ZB: tl.constexpr, PACKED: tl.constexpr, PREFETCH: tl.constexpr,
    A_ROW_DIV: tl.constexpr, UNIT: tl.constexpr,
    BLOCK_N: tl.constexpr, NG: tl.constexpr,
    logits_ptr=None, E_ROUTE=0, stride_lt=0, route_scale=1.0, ROUTE: tl.constexpr = False,
    K_PAD: tl.constexpr = 2, E_PAD: tl.constexpr = 16, SIGMOID: tl.constexpr = False,
    RENORMALIZE: tl.constexpr = False, X_QUAD: tl.constexpr = False, PDL: tl.constexpr = False,
    TRIGGER: tl.constexpr = False, A_SRC: tl.constexpr = 0, a_amax_n=0, a_rows=0, F16X2: tl.constexpr = False,
    EPS: tl.constexpr = 1e-10, EMULATE_CAST: tl.constexpr = False, MMA: tl.constexpr = 0, XB: tl.constexpr = 0,
    F32_PTX: tl.constexpr = False,
):
    pid = tl.program_id(0)
    x_early = None
    if XB > 0:  # fp8 GEMM1 scaling its input by the input's own max: that row's loads go out before the routing's
        tl.static_assert(FMT == 2 and not DOWN and A_SRC == 2 and not PDL, "XB: an fp8 GEMM1 whose input is ready")
        x_early = act_row_early(a_ptr, pid // A_ROW_DIV, C, stride_am, stride_ak, A_SCALE, XB)
    route_w = None  # GEMM2 that routes: its routing weights, computed from the logits
    if TRIGGER:  # GEMM1: GEMM2, launched as a programmatic dependent, may start now (it waits for our output)
        gdc_launch_dependents()
    if ZERO_SPLIT and not PDL:  # GEMM1 zeroes GEMM2's split-K buffer and counters (as a dependent: after its wait)
        _zero_split(split_ptr, count_ptr, pid, n_split, n_count, ZB)
    parts = tl.arange(0, P)
    split = tl.program_id(2)  # this program's share of the reduction (GEMM2)
    SHARES: tl.constexpr = SPLIT_K * TOP_K if PART_SPLIT else SPLIT_K  # programs adding into one output block
    if DOWN:
        if PART_SPLIT:  # one top-k expert per program (P = 1): program_id(2) = part * SPLIT_K + split
            slot = pid * TOP_K + tl.program_id(2) // SPLIT_K + parts
            split = tl.program_id(2) % SPLIT_K
        else:
            slot = pid * TOP_K + parts
        p_ok = parts < TOP_K
        if ROUTE:  # launched while GEMM1 (which routes and writes the ids) may still run: route again
            r_ids, r_x, x_row, ks = _topk_choice(logits_ptr, pid.to(tl.int64), E_ROUTE, stride_lt, K_PAD, E_PAD)
            k_of = (slot - pid * TOP_K)[:, None]
            e = tl.sum(tl.where(ks[None, :] == k_of, r_ids[None, :], 0), 1)
            if P == 1 and FMT != 0:  # one expert per program: a scalar in the parts' layout, no shared-memory move
                e = tl.max(e, axis=0) + parts * 0  # of the ids (H200, Qwen3-30B M=1: nvfp4a16 18.1 -> 17.85 us,
                # fp8-channel 18.55 -> 18.5; int act-order 16.5 -> 16.65, so not there)
            if MUL_WEIGHT:  # the routing weights too: GEMM1 may still be writing them
                r_w = _topk_weights(r_x, x_row, ks, route_scale, TOP_K, SIGMOID, RENORMALIZE)
                route_w = tl.sum(tl.where(ks[None, :] == k_of, r_w[None, :], 0.0), 1)
        else:
            e = tl.load(ids_ptr + slot, mask=p_ok, other=-1)
        p_ok = p_ok & (e >= 0)
        a_off = tl.where(p_ok, slot, 0).to(tl.int64)[:, None, None, None] * stride_am  # [P, 1, 1, 1]
        row_off = parts * 0
    else:
        if ROUTE:  # this program routes its token (no routing launch): its slot's expert is the k-th of the top k
            tok = (pid // TOP_K).to(tl.int64)
            r_ids, r_x, x_row, ks = _topk_choice(logits_ptr, tok, E_ROUTE, stride_lt, K_PAD, E_PAD)
            e0 = tl.sum(tl.where(ks == pid % TOP_K, r_ids, 0), 0)
            if (tl.program_id(1) == 0) & (pid % TOP_K == 0):  # one program per token writes GEMM2's routing
                r_w = _topk_weights(r_x, x_row, ks, route_scale, TOP_K, SIGMOID, RENORMALIZE)
                tl.store(topk_w_ptr + tok * TOP_K + ks, r_w, mask=ks < TOP_K)
                tl.store(ids_ptr + tok * TOP_K + ks, r_ids, mask=ks < TOP_K)
        else:
            e0 = tl.load(ids_ptr + pid)
            if e0 < 0:  # another rank's expert: GEMM2 skips this slot
                if OUT_AMAX == 2:  # its amax partial still counts (as 0)
                    tl.store(amax_ptr + pid * tl.num_programs(1) + tl.program_id(1), 0.0)
                return
        if PDL:  # launched as a programmatic dependent: the activation rows are the previous launch's output
            gdc_wait()  # (and nothing is written before it but the routing outputs, allocated before that launch)
            if ZERO_SPLIT:
                _zero_split(split_ptr, count_ptr, pid, n_split, n_count, ZB)
        slot = pid + parts * 0
        e = e0 + parts * 0
        p_ok = parts < 2
        a_off = (pid // A_ROW_DIV).to(tl.int64) * stride_am  # one activation row serves both parts
        row_off = parts * N
    e = tl.where(p_ok, e, 0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = row_off[:, None] + offs_n[None, :]  # [P, BN]
    row_ok = p_ok[:, None] & n_ok[None, :]
    # tile A: every part (DOWN) or the gate rows; tile B (GEMM1): the up rows, sharing A's activation values
    PA: tl.constexpr = P if DOWN else 1
    pa = tl.arange(0, PA)
    if DOWN:
        e4 = e[:, None, None, None]
        pa_ok = p_ok[:, None, None, None]
    else:
        e4 = e0.to(tl.int64)
        pa_ok = pa[:, None, None, None] < 1
    tl.static_assert(A_SCALE == 0 or FMT == 2 or FMT == 1 and A_SCALE == 1,
                     "activations in x's dtype (A16), quantized here (fp8), or nvfp4's with one scale per tensor")
    tl.static_assert(PACKED or not PREFETCH, "PREFETCH double-buffers the PACKED (bf16x2) paths' loads")
    MASKED: tl.constexpr = not EVEN  # parts that read nothing point at row 0 of a and of sort_idx: loads stay in bounds
    a_base = a_ptr + a_off
    sidx_base = sidx_ptr + e4 * stride_ie
    # split-K (DOWN only): program_id(2) takes chunks [c0, c1) of the reduction and adds its sums atomically
    n_chunks = tl.cdiv(NUM_G, NG)
    per_split = tl.cdiv(n_chunks, SPLIT_K)
    c0 = split * per_split
    c1 = tl.minimum(c0 + per_split, n_chunks)
    tl.static_assert(ROUTE or not (PDL and DOWN and MUL_WEIGHT), "a GEMM2 launched while GEMM1 runs routes itself")
    # the epilogue's weight scales, biases and routing weights, before the reduction (they do not depend on it)
    ops = epilogue_operands(e, parts, slot, pid, p_ok, row_ok, offs_n, rows, es_ptr, topk_w_ptr, bias_ptr,
                            stride_ese, stride_esj, stride_bias_e, stride_bias_n, split, DOWN, W_SCALE, MUL_WEIGHT,
                            HAS_BIAS, route_w)
    # launched while GEMM1 runs (routed again above): wait for GEMM1's output (the fp8 mma GEMV and the A16 fp4
    # bf16x2 body with PREFETCH wait after issuing their first weight loads)
    WAIT_LATE: tl.constexpr = MMA or (FMT == 1 and PACKED and PREFETCH)
    if PDL and DOWN and not WAIT_LATE:
        gdc_wait()
    if FMT == 0:
        n4 = offs_n[None, None, None, :].to(tl.int64)
        if EVEN:
            ld_ok = pa_ok  # uniform per part: one predicate
        else:
            ld_ok = pa_ok & (n4 < N)
        wa_base = w_ptr + e4 * stride_we + n4 * stride_wn
        sa_base = s_ptr + e4 * stride_se + n4 * stride_sn
        za_base = z_ptr + e4 * stride_ze + n4 * stride_zn
        wb_base = wa_base + N * stride_wn
        sb_base = sa_base + N * stride_sn
        zb_base = za_base + N * stride_zn
        PW: tl.constexpr = 32 // BITS
        GW: tl.constexpr = G // PW
        CW = C // PW
        acc_a = tl.zeros((PA, NG, GW, BLOCK_N), dtype=tl.float32)
        acc_b = tl.zeros((1, NG, GW, BLOCK_N), dtype=tl.float32)
        if PREFETCH:  # PACKED: step c + 1's loads are issued before step c's products (register double buffering)
            nxt = _int_step_loads(c0, c1, wa_base, wb_base, sa_base, sb_base, za_base, zb_base, a_base, ld_ok, pa_ok,
                                  stride_wk, stride_sg, stride_zg, CW, NUM_G, DOWN, EVEN, MASKED, HAS_ZP,
                                  GROUP_SCALES, True, NG, GW, X_QUAD)
        for c in tl.range(c0, c1, num_stages=STAGES):
            g4, j4, w_ok, g_ok, x_ok = _step_masks(c, c1, ld_ok, pa_ok, CW, NUM_G, DOWN, EVEN, False, NG, GW)
            a_sum = tl.zeros(j4.shape, dtype=tl.float32)
            if PACKED:  # int4, bf16 activations read as int32 pairs (x_2m, x_2m+1), regrouped by byte permutes
                if PREFETCH:
                    ua, ub, sa, sb, za, zb, p0, p1, p2, p3 = nxt
                    nxt = _int_step_loads(c + 1, c1, wa_base, wb_base, sa_base, sb_base, za_base, zb_base, a_base,
                                          ld_ok, pa_ok, stride_wk, stride_sg, stride_zg, CW, NUM_G, DOWN, EVEN,
                                          MASKED, HAS_ZP, GROUP_SCALES, True, NG, GW, X_QUAD)
                else:
                    ua, ub, sa, sb, za, zb, p0, p1, p2, p3 = _int_step_loads(
                        c, c1, wa_base, wb_base, sa_base, sb_base, za_base, zb_base, a_base, ld_ok, pa_ok, stride_wk,
                        stride_sg, stride_zg, CW, NUM_G, DOWN, EVEN, MASKED, HAS_ZP, GROUP_SCALES, False, NG, GW,
                        X_QUAD)
                if HAS_ZP:
                    a_sum = (_bf16_halves_sum(p0) + _bf16_halves_sum(p1)) + (_bf16_halves_sum(p2)
                                                                             + _bf16_halves_sum(p3))
                x04 = _prmt(p0, p2, 0x5410)
                x15 = _prmt(p0, p2, 0x7632)
                x26 = _prmt(p1, p3, 0x5410)
                x37 = _prmt(p1, p3, 0x7632)
                ta = _int4_word_dot_bf16(ua, x04, x15, x26, x37)
                if not DOWN:
                    tb = _int4_word_dot_bf16(ub, x04, x15, x26, x37)
            else:
                ua = tl.load(wa_base + j4 * stride_wk, mask=w_ok, other=0)
                if not DOWN:
                    ub = tl.load(wb_base + j4 * stride_wk, mask=w_ok, other=0)
                ha = ua >> (12 if BITS == 4 else 16)
                ta = tl.zeros(ua.shape, dtype=tl.float32)
                if not DOWN:
                    hb = ub >> (12 if BITS == 4 else 16)
                    tb = tl.zeros(ub.shape, dtype=tl.float32)
                for i in tl.static_range(PW):
                    a = _act_col(a_base, sidx_base, j4 * PW + i, x_ok, stride_ak, SORTED, MASKED)
                    if HAS_ZP:
                        a_sum += a
                    a = a * _int_act_factor(i, BITS)
                    ta += _int_elem(ua, ha, 1 << (BITS - 1), i, BITS, two23) * a
                    if not DOWN:
                        tb += _int_elem(ub, hb, 1 << (BITS - 1), i, BITS, two23) * a
                sa, sb, za, zb = _int_group_params(g4, j4, g_ok, sa_base, sb_base, za_base, zb_base, stride_sg,
                                                   stride_zg, DOWN, HAS_ZP, GROUP_SCALES)
            if HAS_ZP:
                ta -= za * a_sum
                if not DOWN:
                    tb -= zb * a_sum
            if GROUP_SCALES:
                acc_a += ta * sa
                if not DOWN:
                    acc_b += tb * sb
            else:
                acc_a += ta
                if not DOWN:
                    acc_b += tb
        if DOWN:
            acc = tl.sum(tl.sum(acc_a, axis=2), axis=1)  # [P, BN]
        else:
            gate = tl.sum(tl.sum(tl.sum(acc_a, axis=2), axis=1), axis=0)
            up = tl.sum(tl.sum(tl.sum(acc_b, axis=2), axis=1), axis=0)
            acc = tl.where(parts[:, None] == 0, gate[None, :], up[None, :])  # [P = 2, BN]
    elif FMT == 2:  # fp8, activations quantized here: _gemv_fp8_rows.py (GEMM2: one expert per program)
        tl.static_assert(PA == 1, "the fp8 GEMV's GEMM2 takes one expert per program (PART_SPLIT)")
        e1 = tl.max(e, axis=0)  # GEMM1: both parts hold the slot's expert; GEMM2: the one part's
        ok1 = tl.sum(p_ok.to(tl.int32), axis=0) > 0
        slot1 = tl.max(slot, axis=0)
        a_row = pid // A_ROW_DIV
        if DOWN:
            a_row = tl.where(ok1, slot1, 0)
        if MMA:  # on the tensor cores: BN 16 or 32, the reduction split over the MMA = num_warps warps
            tl.static_assert((BLOCK_N == 16 or BLOCK_N == 32) and SPLIT_K == 1,
                             "the fp8 mma GEMV takes 16 or 32 rows and the whole reduction")
            first, second, s_a = fp8_mma_sums(w_ptr, a_ptr, as_ptr, a_row, slot1, e1, ok1,
                                              tl.program_id(1) * BLOCK_N, N, C, a_amax_n, a_rows, stride_am,
                                              stride_we, stride_wn, stride_ak, A_SCALE, A_SRC, EPS, DOWN, EVEN, MMA,
                                              BLOCK_N, PDL and DOWN, STAGES, A_SRC == 0, x_early, XB)
        else:
            first, second, s_a = fp8_rows_sums(w_ptr, a_ptr, as_ptr, a_row, slot1, e1, ok1, offs_n, N, C, c0, c1,
                                               a_amax_n, a_rows, stride_am, stride_we, stride_wn, stride_wk,
                                               stride_ak, A_SCALE, A_SRC, EPS, DOWN, EVEN, F16X2, EMULATE_CAST,
                                               BLOCK_N, NG, x_early, XB)
        if DOWN:
            acc = first[None, :] * s_a
        else:
            acc = tl.where(parts[:, None] == 0, first[None, :], second[None, :]) * s_a  # [P = 2, BN]
    elif PACKED:  # A16 fp4, bf16 activations: _gemv_fp4_bf16x2.py (tile [PA, NG * G / (2 UNIT), BLOCK_N / 4])
        if DOWN:
            acc, up = fp4_bf16x2_sums(w_ptr, s_ptr, a_ptr, tl.where(p_ok, slot, 0).to(tl.int64) * stride_am, e, p_ok,
                                      c0, c1, N, NUM_G, stride_we, stride_wn, stride_wk, stride_se, stride_sn,
                                      stride_sg, DOWN, EVEN, PREFETCH, SCALE_KIND, G, UNIT, PA, BLOCK_N, NG,
                                      PDL and WAIT_LATE, STAGES)
        else:
            acc, up = fp4_bf16x2_sums(w_ptr, s_ptr, a_ptr, (pid // A_ROW_DIV).to(tl.int64) * stride_am,
                                      e0.to(tl.int64), p_ok, c0, c1, N, NUM_G, stride_we, stride_wn, stride_wk,
                                      stride_se, stride_sn, stride_sg, DOWN, EVEN, PREFETCH, SCALE_KIND, G, UNIT, PA,
                                      BLOCK_N, NG, False, STAGES)
            acc = tl.where(parts[:, None] == 0, acc, up)  # [P = 2, BN]
        acc *= FP4_PACKED_FACTOR
    else:  # fp4 in fp32: int32 words of four rows' bytes [E, N/4, C/2] (rows 4q..4q+3 of byte column j in word
        # (q, j)), and of their block scales [E, N/4, C/G]
        BQ: tl.constexpr = BLOCK_N // 4
        GW4: tl.constexpr = G // 2  # bytes (words) per scale group
        NQ = N // 4
        q4 = (tl.program_id(1) * BQ + tl.arange(0, BQ))[None, None, None, :].to(tl.int64)
        if EVEN:
            ld_ok = pa_ok
        else:
            ld_ok = pa_ok & (q4 < NQ)
        wa_base = w_ptr + e4 * stride_we + q4 * stride_wn
        sa_base = s_ptr + e4 * stride_se + q4 * stride_sn
        wb_base = wa_base + NQ * stride_wn
        sb_base = sa_base + NQ * stride_sn
        acc0 = tl.zeros((PA, NG, GW4, BQ), dtype=tl.float32)
        acc1 = tl.zeros((PA, NG, GW4, BQ), dtype=tl.float32)
        acc2 = tl.zeros((PA, NG, GW4, BQ), dtype=tl.float32)
        acc3 = tl.zeros((PA, NG, GW4, BQ), dtype=tl.float32)
        up0 = tl.zeros((1, NG, GW4, BQ), dtype=tl.float32)
        up1 = tl.zeros((1, NG, GW4, BQ), dtype=tl.float32)
        up2 = tl.zeros((1, NG, GW4, BQ), dtype=tl.float32)
        up3 = tl.zeros((1, NG, GW4, BQ), dtype=tl.float32)
        for c in tl.range(c0, c1, num_stages=STAGES):
            g4, j4, w_ok, g_ok, x_ok = _step_masks(c, c1, ld_ok, pa_ok, C // 2, NUM_G, DOWN, EVEN, False, NG, GW4)
            a_lo = _act_col(a_base, sidx_base, j4 * 2, x_ok, stride_ak, SORTED, MASKED)
            a_hi = _act_col(a_base, sidx_base, j4 * 2 + 1, x_ok, stride_ak, SORTED, MASKED)
            if F32_PTX:  # exact: the products then sit well inside fp32's normal range
                a_lo *= 18446744073709551616.0  # 2^64
                a_hi *= 18446744073709551616.0
            acc0, acc1, acc2, acc3 = _fp4_words(acc0, acc1, acc2, acc3, wa_base, sa_base, j4, g4, w_ok, g_ok,
                                                stride_wk, stride_sn, stride_sg, a_lo, a_hi, SCALE_KIND, F32_PTX)
            if not DOWN:
                up0, up1, up2, up3 = _fp4_words(up0, up1, up2, up3, wb_base, sb_base, j4, g4, w_ok, g_ok,
                                                stride_wk, stride_sn, stride_sg, a_lo, a_hi, SCALE_KIND, F32_PTX)
        # summed one by one: as one reduction (join_rows first, as the bf16x2 GEMM1 does) H200 Qwen3-30B nvfp4 M=1
        # measured 35.2 -> 38.0 us
        acc = interleave_rows(_sum_steps(acc0), _sum_steps(acc1), _sum_steps(acc2), _sum_steps(acc3))
        if not DOWN:
            up = interleave_rows(_sum_steps(up0), _sum_steps(up1), _sum_steps(up2), _sum_steps(up3))
            acc = tl.where(parts[:, None] == 0, tl.sum(acc, axis=0)[None, :], tl.sum(up, axis=0)[None, :])
        acc *= FP4_PACKED_FACTOR if F32_PTX else FP4_FACTOR
    if FMT == 1 and A_SCALE == 1:  # nvfp4: activations given as fp4 values times block scales, times this scale
        acc *= tl.load(as_ptr)

    gemv_epilogue(acc, ops, pid, e, parts, p_ok, row_ok, n_ok, offs_n, N, c_ptr, amax_ptr, perm_ptr, split_ptr,
                  count_ptr, stride_cm, stride_cn, stride_pe, DOWN, W_SCALE, MUL_WEIGHT, HAS_BIAS, ACTIVATION,
                  OUT_AMAX, OUT_PERM, SHARES)
