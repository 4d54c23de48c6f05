"""fp8 body of the decode GEMV: gemv_rows_kernel's FMT 2 branch (fp8 e4m3 weights, per-tensor or per-channel
scales), with the activation quantized to e4m3 inside the kernel, so the decode forward has no quantizer launch.

# S slots, T tokens, N output rows (GEMM1: per half), C reduction length, BN rows per program, NG groups of 128
# columns per step, KQ = 8 NG 16-byte quads of a row per step
weights  fp8 [E, N(*2), C], K-contiguous (the tensor-core GEMMs' layout); F16X2 reads them as int32 words
         [E, N(*2), C/4] (C a multiple of 16, 16-byte aligned: the launcher's fp8_rows); the step's tile is
         [BN, KQ, 2, 2] words, a thread's quad of four words one 16-byte load of 16 columns of one row
act      a row of x (GEMM1, x's dtype) or of GEMM1's fp32 output (GEMM2), quantized as the twin
         (quantize.fp8_math.act_quant_ref): q(a) = e4m3(clamp(a / s, -448, 448)), a / s correctly rounded; its
         values come by vector loads of the words' shape (_act_word2; fp32: _gemv_fp4_bf16x2.act_quad)
scale    s by A_SCALE (1 per tensor, 2 per row) and A_SRC: 0 static (as_ptr[0]); 1 from GEMM1's amax partials
         (gemv_epilogue's OUT_AMAX 2: max |out| per GEMM1 program), s = max(max of the a_amax_n entries at as_ptr
         (+ slot * a_amax_n per row), EPS) / 448; 2 from the input itself: max |a| over its a_rows rows (per
         tensor) or over the program's row
math     out[n] = s * sum_k w_code[n, k] * q(a)[k] (the weight scales are the epilogue's W_SCALE)
F16X2    (GPU): codes become f16x2 by cvt.rn.f16x2.e4m3x2 (exact). GEMM1 sums the exact code products in fp32
         (its output is quantized again, by GEMM2: f16 partial sums moved codes across e4m3 rounding boundaries,
         5e-3 against 1.7e-3 measured); GEMM2 forms each quad's 16 products as one chain of eight f16x2 fmas with
         the activation codes times 2^-8 (|product| <= 784, a lane's 8 products <= 6272: no overflow), the lanes
         added in fp32. a / s is a * RN(1/s) corrected once by an fma residual (Markstein), the correctly rounded
         quotient, so the codes equal the twin's. Each step's loads are issued before the previous step's products.
         Otherwise (the interpreter, which cannot run inline PTX) fp32 products of the bytes' values, div_rn codes.
"""

import triton
import triton.language as tl

from moequant.kernels._fp8_act_quant_kernel import _quant, _scale
from moequant.kernels._gemv_fp4_bf16x2 import act_quad

F16X2_FACTOR = tl.constexpr(256.0)  # 2^8: the activation codes enter the f16x2 chains times 2^-8


@triton.jit
def _quant_pair(x0, x1, r, ns):
    """The e4m3 codes of (x0, x1) in the low two bytes of an int32 (x0's lowest); r = RN(1/s), ns = -s. Quotient
    x * r, then corrected by (x - q s) * r, which rounds to the IEEE quotient x / s; satfinite clamps to +-448 (NaN
    stays NaN), as the twin's clamp and cast."""
    return tl.inline_asm_elementwise(
        """{
        .reg .f32 q0, q1, e0, e1;
        .reg .b16 h, z;
        mul.rn.f32 q0, $1, $3;
        mul.rn.f32 q1, $2, $3;
        fma.rn.f32 e0, q0, $4, $1;
        fma.rn.f32 e1, q1, $4, $2;
        fma.rn.f32 q0, e0, $3, q0;
        fma.rn.f32 q1, e1, $3, q1;
        cvt.rn.satfinite.e4m3x2.f32 h, q1, q0;
        mov.b16 z, 0;
        mov.b32 $0, {h, z};
        }""",
        "=r,f,f,f,f", [x0, x1, r, ns], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _pair_f16x2(p):
    """The two e4m3 codes in the low bytes of each int32 times 2^-8 as one f16x2 word (exact)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b16 l, h;
        .reg .b32 k;
        mov.b32 {l, h}, $1;
        cvt.rn.f16x2.e4m3x2 $0, l;
        mov.b32 k, 0x1C001C00;
        mul.rn.f16x2 $0, $0, k;
        }""",
        "=r,r", [p], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _word_f32(w):
    """The four e4m3 codes of each int32 word (lowest byte first) as fp32 (exact: through f16x2)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b16 l, h, c0, c1, c2, c3;
        .reg .b32 a, b;
        mov.b32 {l, h}, $4;
        cvt.rn.f16x2.e4m3x2 a, l;
        cvt.rn.f16x2.e4m3x2 b, h;
        mov.b32 {c0, c1}, a;
        mov.b32 {c2, c3}, b;
        cvt.f32.f16 $0, c0;
        cvt.f32.f16 $1, c1;
        cvt.f32.f16 $2, c2;
        cvt.f32.f16 $3, c3;
        }""",
        "=f,=f,=f,=f,r", [w], dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)


def _quad_dot_ptx() -> str:
    """_quad_dot_f16x2's PTX: per word $1..$4, its two code pairs into f16x2 and two fmas against the activation
    pairs $5 + 2i, $6 + 2i (the first a multiply), then the chain's lanes added in fp32."""
    body = []
    for i in range(4):
        body += [f"mov.b32 {{l, h}}, ${i + 1};", "cvt.rn.f16x2.e4m3x2 a, l;", "cvt.rn.f16x2.e4m3x2 b, h;",
                 f"mul.rn.f16x2 acc, a, ${5 + 2 * i};" if i == 0 else f"fma.rn.f16x2 acc, a, ${5 + 2 * i}, acc;",
                 f"fma.rn.f16x2 acc, b, ${6 + 2 * i}, acc;"]
    return ("{ .reg .b16 l, h, f0, f1; .reg .b32 a, b, acc; .reg .f32 g0, g1; " + " ".join(body)
            + " mov.b32 {f0, f1}, acc; cvt.f32.f16 g0, f0; cvt.f32.f16 g1, f1; add.f32 $0, g0, g1; }")


QUAD_DOT_PTX = tl.constexpr(_quad_dot_ptx())


@triton.jit
def _quad_dot_f16x2(w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7):
    """sum of the 16 products of four words of e4m3 codes (w0 .. w3: columns 0-3 .. 12-15) with the activation
    pairs x0 .. x7 (f16x2 of columns 0-1, 2-3, ..): one chain of eight f16x2 fmas, its lanes added in fp32."""
    return tl.inline_asm_elementwise(QUAD_DOT_PTX, "=f,r,r,r,r,r,r,r,r,r,r,r,r",
                                     [w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _act_word2(ptr, ok, MASKED: tl.constexpr):
    """The four 16-bit activation values of each word's columns (ptr: the first, 8-byte aligned) as two int32 pairs,
    one vector load per word, so they take the words' register layout (a tl.load of the row gets its own, and Triton
    then moves the values through shared memory every step). MASKED: zeros where ok is false."""
    if MASKED:
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $3, 0; mov.b32 $0, 0; mov.b32 $1, 0; "
            "@p ld.global.v2.b32 {$0, $1}, [$2]; }",
            "=r,=r,l,r", [ptr, ok.to(tl.int32)], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    return tl.inline_asm_elementwise("ld.global.v2.b32 {$0, $1}, [$2];", "=r,=r,l", [ptr],
                                     dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _halves_f32(p, IS_BF16: tl.constexpr):
    """(low, high) 16-bit halves of int32 words as fp32: bf16 by placement, fp16 by conversion."""
    if IS_BF16:
        return (p << 16).to(tl.float32, bitcast=True), (p & -65536).to(tl.float32, bitcast=True)
    lo = (p & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = ((p >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _act_raw(a_row, col, ok, A_BYTES: tl.constexpr, MASKED: tl.constexpr):
    """The four activation values of each word's columns (col: the first), as loaded: two int32 pairs (16-bit
    values), or four fp32 bit patterns by the fp4 GEMV's 16-byte act_quad (the pairs' tuple repeats them)."""
    if A_BYTES == 2:
        p01, p23 = _act_word2(a_row + col, ok, MASKED)
        return p01, p23, p01, p23
    return act_quad(a_row, col, ok, MASKED)


@triton.jit
def _raw_f32(raw, A_BYTES: tl.constexpr, IS_BF16: tl.constexpr):
    """_act_raw's values as fp32."""
    v0, v1, v2, v3 = raw
    if A_BYTES == 2:
        x0, x1 = _halves_f32(v0, IS_BF16)
        x2, x3 = _halves_f32(v1, IS_BF16)
        return x0, x1, x2, x3
    return (v0.to(tl.float32, bitcast=True), v1.to(tl.float32, bitcast=True), v2.to(tl.float32, bitcast=True),
            v3.to(tl.float32, bitcast=True))


@triton.jit
def _act_values(a_row, col, ok, A_BYTES: tl.constexpr, IS_BF16: tl.constexpr, MASKED: tl.constexpr):
    """The four activation values of each word's columns (col: the first) as fp32."""
    return _raw_f32(_act_raw(a_row, col, ok, A_BYTES, MASKED), A_BYTES, IS_BF16)


@triton.jit
def _word_dot_f32(acc, u, c0, c1, c2, c3):
    """acc plus each word's four code products with the activation codes c0 .. c3, one fp32 fma each."""
    w0, w1, w2, w3 = _word_f32(u)
    return acc + w0 * c0 + w1 * c1 + w2 * c2 + w3 * c3


@triton.jit
def _split4(t):
    """[.., 2, 2] -> its four [..] slices in order (0, 0), (0, 1), (1, 0), (1, 1)."""
    t_0, t_1 = tl.split(t)
    t00, t10 = tl.split(t_0)
    t01, t11 = tl.split(t_1)
    return t00, t01, t10, t11


@triton.jit
def _tile_dot(u, lo, hi):
    """[BN, KQ] fp32 dot products of a word tile u [BN, KQ, 2, 2] (word 2i + j of each quad at [.., i, j]) with
    the activation pairs lo / hi [1, KQ, 2, 2] (each word's columns 0-1 / 2-3)."""
    u0, u1, u2, u3 = _split4(u)
    l0, l1, l2, l3 = _split4(lo)
    h0, h1, h2, h3 = _split4(hi)
    return _quad_dot_f16x2(u0, u1, u2, u3, l0, h0, l1, h1, l2, h2, l3, h3)


@triton.jit
def act_row_early(a_ptr, a_row, C, stride_am, stride_ak, A_SCALE: tl.constexpr, XB: tl.constexpr):
    """The raw values [XB >= C] of the first input row fp8_act_scale reduces with A_SRC 2 (the program's row per
    row, row 0 per tensor), loaded in one go and not yet used: a GEMM1 issues them before it routes, so their
    latency overlaps the routing's (fp8_act_scale(early=..) then reduces them)."""
    r = a_row
    if A_SCALE != 2:
        r = a_row * 0
    offs = tl.arange(0, XB)
    return tl.load(a_ptr + r.to(tl.int64) * stride_am + offs * stride_ak, mask=offs < C, other=0.0)


@triton.jit
def _rows_abs_max(m, a_ptr, r0, r1, C, stride_am, stride_ak, BLOCK: tl.constexpr):
    """m [BLOCK] folded with max |a| over rows [r0, r1) of the input, BLOCK columns at a time."""
    offs = tl.arange(0, BLOCK)
    for r in range(r0, r1):
        row = a_ptr + (stride_am * 0 + r).to(tl.int64) * stride_am  # (r is a Python int in the interpreter)
        for i in range(0, C, BLOCK):
            v = tl.load(row + (i + offs) * stride_ak, mask=i + offs < C, other=0.0).to(tl.float32)
            m = tl.maximum(m, tl.abs(v))
    return m


@triton.jit
def fp8_act_scale(a_ptr, as_ptr, a_row, slot, a_amax_n, a_rows, C, stride_am, stride_ak, A_SCALE: tl.constexpr,
                  A_SRC: tl.constexpr, EPS: tl.constexpr, BLOCK: tl.constexpr, early=None, XB: tl.constexpr = 0):
    """The activation scale s (fp32 scalar) of this program's row a_row (see the module docstring's scale). XB > 0
    (A_SRC 2): early holds act_row_early's values of the first row, so only the rows after it are read here."""
    if A_SRC == 0:
        return tl.load(as_ptr)
    offs = tl.arange(0, BLOCK)
    m = tl.zeros((BLOCK,), dtype=tl.float32)
    if XB > 0:  # the first row came early (act_row_early); per tensor the other rows are read here
        mx = tl.max(tl.abs(early.to(tl.float32)), axis=0)
        if A_SCALE != 2:
            if a_rows > 1:  # (one reduction more only when there are other rows)
                mx = tl.maximum(mx, tl.max(_rows_abs_max(m, a_ptr, a_row * 0 + 1, a_rows, C, stride_am, stride_ak,
                                                         BLOCK), axis=0))
        return _scale(mx, EPS)
    if A_SRC == 1:
        base = as_ptr
        if A_SCALE == 2:
            base += slot.to(tl.int64) * a_amax_n
        for i in range(0, a_amax_n, BLOCK):
            m = tl.maximum(m, tl.load(base + i + offs, mask=i + offs < a_amax_n, other=0.0))
    else:
        r0 = a_row * 0
        r1 = a_rows + r0
        if A_SCALE == 2:
            r0 = a_row
            r1 = a_row + 1
        m = _rows_abs_max(m, a_ptr, r0, r1, C, stride_am, stride_ak, BLOCK)
    return _scale(tl.max(m, axis=0), EPS)


@triton.jit
def _step_loads(c, c1, w_a4, w_b4, a_row, word, ok4, C, stride_wk, DOWN: tl.constexpr, EVEN: tl.constexpr,
                KQ: tl.constexpr, A_BYTES: tl.constexpr, IS_BF16: tl.constexpr):
    """Step c's weight words (first rows; GEMM1's up rows) and activation values (fp32, raw): all off when c >= c1
    (the prefetch after the last step)."""
    wd = c * (KQ * 4) + word
    live = c < c1
    w_ok = ok4 & live
    if not EVEN:
        w_ok = w_ok & (wd * 4 < C)
    ua = tl.load(w_a4 + wd * stride_wk, mask=w_ok, other=0)
    ub = ua
    if not DOWN:
        ub = tl.load(w_b4 + wd * stride_wk, mask=w_ok, other=0)
    x0, x1, x2, x3 = _act_values(a_row, wd * 4, (wd * 4 < C) & live, A_BYTES, IS_BF16, True)
    return ua, ub, x0, x1, x2, x3


@triton.jit
def fp8_rows_sums(w_ptr, a_ptr, as_ptr, a_row_idx, slot, e, ok, offs_n, N, C, c0, c1, a_amax_n, a_rows, stride_am,
                  stride_we, stride_wn, stride_wk, stride_ak, A_SCALE: tl.constexpr, A_SRC: tl.constexpr,
                  EPS: tl.constexpr, DOWN: tl.constexpr, EVEN: tl.constexpr, F16X2: tl.constexpr,
                  EMULATE_CAST: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr, early=None,
                  XB: tl.constexpr = 0):
    """(first, second, s): [BN] fp32 dot products of rows offs_n over steps [c0, c1) of NG * 128 columns, divided by
    the activation scale s (fp8_act_scale, for row a_row_idx and slot; early, XB: its early row), and s: GEMM1's
    gate rows offs_n and up rows N + offs_n of expert e, or GEMM2's rows (second = first). ok: the expert is routed
    here (else nothing is read).
    F16X2: each step's loads are issued before the previous step's products (register double buffering), the first
    step's before the scale is known, so the scale's reduction overlaps the first weights' latency."""
    r_ok = (offs_n[:, None] < N) & (ok + offs_n[:, None] * 0 > 0)  # [BN, 1]
    rows = offs_n[:, None].to(tl.int64)
    w_a = w_ptr + e.to(tl.int64) * stride_we + rows * stride_wn  # [BN, 1]
    w_b = w_a + N * stride_wn
    a_row = a_ptr + a_row_idx.to(tl.int64) * stride_am
    if F16X2:
        KQ: tl.constexpr = NG * 8
        # word w of quad q at [.., q, w // 2, w % 2] (its columns 16q + 4w .. 16q + 4w + 3)
        word = (tl.arange(0, KQ)[:, None, None] * 4 + tl.arange(0, 2)[None, :, None] * 2
                + tl.arange(0, 2)[None, None, :])[None, :, :, :]  # [1, KQ, 2, 2]
        A_BYTES: tl.constexpr = a_ptr.dtype.element_ty.primitive_bitwidth // 8
        IS_BF16: tl.constexpr = a_ptr.dtype.element_ty == tl.bfloat16
        w_a4 = w_a[:, :, None, None]
        w_b4 = w_b[:, :, None, None]
        ok4 = r_ok[:, :, None, None]
        nxt = _step_loads(c0, c1, w_a4, w_b4, a_row, word, ok4, C, stride_wk, DOWN, EVEN, KQ, A_BYTES, IS_BF16)
        s = fp8_act_scale(a_ptr, as_ptr, a_row_idx, slot, a_amax_n, a_rows, C, stride_am, stride_ak, A_SCALE, A_SRC,
                          EPS, 1024, early, XB)
        r = tl.math.div_rn(1.0, s)
        ns = -s
        acc_a = tl.zeros((BLOCK_N, KQ), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_N, KQ), dtype=tl.float32)
        if not DOWN:
            acc_a = tl.zeros((BLOCK_N, KQ, 2, 2), dtype=tl.float32)
            acc_b = tl.zeros((BLOCK_N, KQ, 2, 2), dtype=tl.float32)
        for c in range(c0, c1):
            ua, ub, x0, x1, x2, x3 = nxt
            nxt = _step_loads(c + 1, c1, w_a4, w_b4, a_row, word, ok4, C, stride_wk, DOWN, EVEN, KQ, A_BYTES,
                              IS_BF16)
            if DOWN:  # f16x2 chains: GEMM2's output is not quantized again
                lo = _pair_f16x2(_quant_pair(x0, x1, r, ns))
                hi = _pair_f16x2(_quant_pair(x2, x3, r, ns))
                acc_a += _tile_dot(ua, lo, hi)
            else:  # exact products summed in fp32: GEMM1's output is quantized again (GEMM2's input), where the
                # f16 chains' rounding moved codes across e4m3 rounding boundaries (5e-3 against 2.4e-3 measured)
                q0, q1, q2, q3 = _word_f32(_quant_pair(x0, x1, r, ns) | (_quant_pair(x2, x3, r, ns) << 16))
                acc_a = _word_dot_f32(acc_a, ua, q0, q1, q2, q3)
                acc_b = _word_dot_f32(acc_b, ub, q0, q1, q2, q3)
        if DOWN:
            first = tl.sum(acc_a, axis=1) * F16X2_FACTOR
            second = first
        else:
            first = tl.sum(tl.sum(tl.sum(acc_a, axis=3), axis=2), axis=1)
            second = tl.sum(tl.sum(tl.sum(acc_b, axis=3), axis=2), axis=1)
    else:  # fp32 products of the bytes' values (interpreter)
        s = fp8_act_scale(a_ptr, as_ptr, a_row_idx, slot, a_amax_n, a_rows, C, stride_am, stride_ak, A_SCALE, A_SRC,
                          EPS, 1024, early, XB)
        KB: tl.constexpr = NG * 128
        kk = tl.arange(0, KB)[None, :]
        acc_a = tl.zeros((BLOCK_N, KB), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_N, KB), dtype=tl.float32)
        for c in range(c0, c1):
            k = c * KB + kk
            k_ok = k < C
            x = _quant(tl.load(a_row + k * stride_ak, mask=k_ok, other=0.0).to(tl.float32), s,
                       EMULATE_CAST).to(tl.float32)
            wa = tl.load(w_a + k * stride_wk, mask=r_ok & k_ok, other=0).to(tl.float8e4nv, bitcast=True)
            acc_a += wa.to(tl.float32) * x
            if not DOWN:
                wb = tl.load(w_b + k * stride_wk, mask=r_ok & k_ok, other=0).to(tl.float8e4nv, bitcast=True)
                acc_b += wb.to(tl.float32) * x
        first = tl.sum(acc_a, axis=1)
        second = tl.sum(acc_b, axis=1) if not DOWN else first
    return first, second, s
