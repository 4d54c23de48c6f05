"""Triton body of the fp4 grouped expert GEMM (launcher: fp4_gemm.py). Weights stay packed in memory.

# S token slots, P padded slots, E experts, N output columns, K reduction dim, G scale group (16 nvfp4, 32 mxfp4)
B packed uint8 [E, N, K/2], N stride 1, in the decode layout (kernels.fp4_word_layout): columns 4q..4q+3 of byte
row j form one int32 word whose bits are permuted; moved back, byte j of a column holds element 2j (low nibble) and
2j+1 (high nibble). The A tile [BM, BK] is read contiguously and split into its even and odd columns in registers,
so each byte tile [BK/2, BN] is dequantized in registers into two tiles (low, high):
  C[slot, n] = epilogue( s2[e] * a_scale * sum_j (A[slot, 2j] * lo[j, n] + A[slot, 2j+1] * hi[j, n]) ),
  lo/hi = e2m1(nibble) * block_scale[e, n, 2j // G] (exact in bf16/fp16: <= 6 significant bits); the scales are
  loaded through pointers of the bytes' shape (each byte's own, repeated over a group's G/2 bytes), so they share
  the bytes' register layout (a [BK/G, BN] scale tile broadcast over a reshape cost shared-memory conversions and
  barriers every K step). BLOCK_K must be a multiple of G (the launcher ensures it).
Block scales: SCALE_KIND 0 = fp8 e4m3 bits (read as uint8, decoded here), 1 = E8M0 (2^(s-127)).
BF16X2 (bf16 activations on a GPU): each thread's four bytes (columns n..n+3, one word: n a multiple of 4) and their
  four scales become lo and hi in bf16 directly, two columns per bf16x2 (_dequant_tile_bf16: bit placement and
  bf16x2 multiplies, inline PTX; sm_90 K step at BLOCK_M 16, gated, with the byte layout's decoder: 795 SASS
  instructions for 128 elements per thread against 1632 through fp32 with two stride-2 A loads); lo/hi then
  hold e2m1 * scale * 2^-8 (e4m3 scales) or e2m1 * scale (E8M0), and the epilogue multiplies by BF16X2_FACTOR_E4M3.
s2: nvfp4's second-level scale per expert (HAS_S2); a_scale: nvfp4's activation scale (1 / input global scale, HAS_ASCALE).
GEMM1 (GATED): gate rows n and up rows N + n, epilogue act(gate, up). GEMM2: bias and routing weight.
"""

import triton
import triton.language as tl

from moequant.kernels._moe_gemm_kernel import moe_epilogue, store_rows, tile_coords, tile_slots
from moequant.kernels.fp4_word_layout import decode_word_ptx


@triton.jit
def e2m1_value(nib):
    """fp32 value / 2^14 of a 4-bit e2m1 code (sign bit 3, exponent bits 2-1, mantissa bit 0), by placing the code in
    an fp16's sign/exponent/mantissa bits: fp16 (s, e, m) = (1 + m/2) 2^(e-15) (e > 0) or (m/2) 2^-14 (e = 0) is the
    e2m1 value times 2^-14 in both cases. Callers fold 2^14 into the block scale."""
    bits = ((nib & 8) << 12) | ((nib & 7) << 9)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def fp4_byte_word(u):
    """int32 fp4 words in the decode layout (kernels.fp4_word_layout) -> the byte layout: row r in byte r, even
    column in the low nibble. For the rows GEMV's fp32 path (fp16 activations, the interpreter), which decodes
    whole words; the bf16x2 decoders read the decode layout directly. Each term moves the bits that share one
    shift (the layout's inverse permutation; tests/test_fp4_word_layout.py checks it against to_byte_words)."""
    return ((u >> 24) & 0x70) | ((u >> 16) & 0x700) | ((u >> 8) & 0x80008) | ((u >> 2) & 0x70007) \
        | (u & -2147450880) | ((u << 2) & 0x800080) | ((u << 6) & 0x30003000) | ((u << 8) & 0x700000) \
        | ((u << 10) & 0x8000800) | ((u << 14) & 0x40004000) | ((u << 16) & 0x7000000)


@triton.jit
def fp4_row_codes(u, r):
    """The two e2m1 codes (columns 2j, 2j + 1) of row r (0..3, a tensor) of decode-layout words u, read where the
    layout put their bits (fp4_word_layout._source_bit): column 2j in slot 2 * (r % 2), column 2j + 1 in slot
    2 * (r % 2) + 1, half r // 2. For decoders that need one row of a word (gemv_moe_kernel, the grouped GEMM's fp32
    path): about ten instructions per code against the whole word's fp4_byte_word."""
    odd = (r % 2) == 1
    h16 = (r // 2) * 16
    m0 = tl.where(odd, 24 - h16, 2 + h16)  # column 2j: slot 2 (rotated 14) or slot 0 (rotated 4)
    c0 = ((u >> m0) & 7) | (((u >> (tl.where(odd, 1, 11) + h16)) & 1) << 3)
    lo1 = tl.where(odd, 6 + h16, 28 - h16)  # column 2j + 1: slot 3 (byte permute: b2 apart) or slot 1 (rotated 10)
    hi1 = tl.where(odd, h16, 30 - h16)
    c1 = ((u >> lo1) & 3) | (((u >> hi1) & 1) << 2) | (((u >> (tl.where(odd, 15, 5) + h16)) & 1) << 3)
    return c0, c1


@triton.jit
def pow2(ex):
    """2.0 ** ex (fp32) for int32 ex in [-126, 127], built from the exponent bits (exact; no exp2 approximation)."""
    return ((ex + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def block_scale_value(s, SCALE_KIND: tl.constexpr):
    """fp32 value of a block scale byte: fp8 e4m3fn ((1 + m/8) 2^(e-7), subnormal m 2^-9 at e = 0) or E8M0
    (2^(s-127); s = 0, i.e. 2^-127, reads as 0)."""
    if SCALE_KIND == 0:  # the hardware conversion (0x7f / 0xff, e4m3fn's NaN, never load: dead experts are zeroed)
        return s.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    s = s.to(tl.int32)
    return tl.where(s == 0, 0.0, pow2(s - 127))


@triton.jit
def _dequant_tile(b_ptrs, s_ptrs, b_mask, s_mask, quad_row, SCALE_KIND: tl.constexpr):
    """Bytes [BK/2, BN] + their block scales [BK/2, BN] (each byte's own scale: the pointers repeat over a group's
    G/2 bytes, so scales and bytes share one register layout) -> fp32 (lo, hi) [BK/2, BN]. Each byte's two codes
    are read from its column quad's decode-layout word (quad_row [1, BN]: the column's place in it)."""
    wp = (b_ptrs - quad_row).to(tl.pointer_type(tl.int32), bitcast=True)
    lo, hi = fp4_row_codes(tl.load(wp, mask=b_mask, other=0), quad_row)
    sc = block_scale_value(tl.load(s_ptrs, mask=s_mask, other=0), SCALE_KIND) * 16384.0  # 2^14: see e2m1_value
    return e2m1_value(lo) * sc, e2m1_value(hi) * sc


def _dequant_bf16_ptx(scale_kind: int) -> str:
    """_dequant_tile_bf16's PTX: $4 one decode-layout word (columns 0..3 of a byte row: rows 4q..4q+3 of the weights),
    $5 their four scale bytes; $0, $1 the low nibbles (columns 0, 1 and 2, 3) and $2, $3 the high nibbles, as
    bf16x2. The word's four slots (fp4_word_layout.decode_word_ptx: columns r / r + 2 of one nibble) are regrouped
    into column pairs by PRMT; per column pair the scale pair as bf16x2 (e4m3: bits placed as scale * 2^-120, times
    2^119 twice = scale * 2^118; E8M0: the byte is the bf16 exponent), then each nibble pair times it (E8M0: after
    times 2^126)."""
    lines = ["{", ".reg .b32 z, t, u, v, m, sp, c, k0, k1, k2, k3;", "mov.b32 z, 0;",
             f"mov.b32 c, {'0x7B007B00' if scale_kind == 0 else '0x7E807E80'};",  # bf16 2^119 | 2^126, twice
             decode_word_ptx("$4", ("k0", "k1", "k2", "k3"), ("u", "v"))]
    for pair, sel, halves in ((0, "0x4140", "0x5410"), (1, "0x4342", "0x7632")):
        lines.append(f"prmt.b32 t, $5, z, {sel};")
        if scale_kind == 0:  # e4m3 -> bf16 bits (magnitude to bits 4-10, sign to 15) = scale * 2^-120
            lines += ["shl.b32 u, t, 4;", "and.b32 u, u, 0x07F007F0;", "shl.b32 v, t, 8;", "and.b32 v, v, 0x80008000;",
                      "or.b32 sp, u, v;", "mul.rn.bf16x2 sp, sp, c;", "mul.rn.bf16x2 sp, sp, c;"]
        else:  # E8M0: the byte is the exponent field
            lines.append("shl.b32 sp, t, 7;")
        for nib, out in ((0, f"${pair}"), (1, f"${2 + pair}")):  # slots nib (columns 0, 2) and 2 + nib (1, 3)
            lines.append(f"prmt.b32 m, k{nib}, k{2 + nib}, {halves};")
            if scale_kind == 1:
                lines.append("mul.rn.bf16x2 m, m, c;")
            lines.append(f"mul.rn.bf16x2 {out}, m, sp;")
    return "\n".join(lines + ["}"])


_DEQUANT_BF16_PTX_E4M3 = tl.constexpr(_dequant_bf16_ptx(0))
_DEQUANT_BF16_PTX_E8M0 = tl.constexpr(_dequant_bf16_ptx(1))
BF16X2_FACTOR_E4M3 = tl.constexpr(256.0)  # _dequant_tile_bf16 with e4m3 scales returns e2m1 * scale * 2^-8


@triton.jit
def _dequant_tile_bf16(b_ptrs, s_ptrs, b_mask, s_mask, SCALE_KIND: tl.constexpr):
    """Bytes [BK/2, BN] + their block scale bytes (as _dequant_tile) -> bf16 (lo, hi) [BK/2, BN] in bf16x2 (BF16X2:
    inline PTX, four bytes of consecutive columns per instance): e2m1 * scale * 2^-8 (e4m3) or e2m1 * scale
    (E8M0), exact (at most 6 significant bits, all normal). Declared impure on purpose: a pure elementwise op lets
    Triton move the dot operand's layout conversion above it, onto the bytes, which it then reads from shared memory
    one at a time (sm_90 K step 1632 -> 882 SASS instructions for 128 elements per thread when it stays below)."""
    b = tl.load(b_ptrs, mask=b_mask, other=0)
    sc = tl.load(s_ptrs, mask=s_mask, other=0)
    if SCALE_KIND == 0:
        return tl.inline_asm_elementwise(_DEQUANT_BF16_PTX_E4M3, "=r,=r,=r,=r,r,r", [b, sc],
                                         dtype=(tl.bfloat16, tl.bfloat16), is_pure=False, pack=4)
    return tl.inline_asm_elementwise(_DEQUANT_BF16_PTX_E8M0, "=r,=r,=r,=r,r,r", [b, sc],
                                     dtype=(tl.bfloat16, tl.bfloat16), is_pure=False, pack=4)


@triton.jit
def fp4_moe_gemm_kernel(
    a_ptr, b_ptr, bs_ptr, s2_ptr, ascale_ptr, c_ptr, bias_ptr, topk_w_ptr,
    sorted_ids_ptr, expert_ids_ptr, total_ptr,
    N, K, S, P_total,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_se, stride_sn, stride_sk,
    stride_s2e, stride_s2j, stride_cm, stride_cn, stride_bias_e, stride_bias_n,
    A_ROW_DIV: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr, SCALE_KIND: tl.constexpr,
    GROUP: tl.constexpr, HAS_S2: tl.constexpr, HAS_ASCALE: tl.constexpr,
    MUL_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16X2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_coords(P_total, N, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    slots, row_ok, e, offs_n, col_ok = tile_slots(pid_m, pid_n, sorted_ids_ptr, expert_ids_ptr, S, N,
                                                  BLOCK_M, BLOCK_N)
    HALF_K: tl.constexpr = BLOCK_K // 2
    offs_j = tl.arange(0, HALF_K)  # byte index within the K block
    quad_row = (offs_n % 4)[None, :]  # the column's place in its decode-layout word (N a multiple of 4)
    K2 = K // 2

    a_rows = a_ptr + (slots // A_ROW_DIV).to(tl.int64)[:, None] * stride_am
    b_base = b_ptr + e * stride_be + offs_n[None, :].to(tl.int64) * stride_bn
    s_base = bs_ptr + e * stride_se + offs_n[None, :].to(tl.int64) * stride_sn
    dtype = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # GEMM1's up half (unused by GEMM2)
    if GATED:
        b_up = N * stride_bn
        s_up = N * stride_sn
    for k0 in range(0, tl.cdiv(K2, HALF_K)):
        j = k0 * HALF_K + offs_j
        j_ok = j < K2
        k = k0 * BLOCK_K + tl.arange(0, BLOCK_K)  # A read contiguously, then split into even and odd columns
        a = tl.load(a_rows + k[None, :] * stride_ak, mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
        a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, HALF_K, 2)))
        b_ptrs = b_base + j[:, None] * stride_bk
        s_ptrs = s_base + (j // (GROUP // 2))[:, None] * stride_sk  # the scale of every byte
        w_mask = j_ok[:, None] & col_ok[None, :]
        if BF16X2:
            lo, hi = _dequant_tile_bf16(b_ptrs, s_ptrs, w_mask, w_mask, SCALE_KIND)
        else:
            lo, hi = _dequant_tile(b_ptrs, s_ptrs, w_mask, w_mask, quad_row, SCALE_KIND)
        acc = tl.dot(a_even, lo.to(dtype), acc, input_precision=DOT_PRECISION)
        acc = tl.dot(a_odd, hi.to(dtype), acc, input_precision=DOT_PRECISION)
        if GATED:
            if BF16X2:
                lo, hi = _dequant_tile_bf16(b_ptrs + b_up, s_ptrs + s_up, w_mask, w_mask, SCALE_KIND)
            else:
                lo, hi = _dequant_tile(b_ptrs + b_up, s_ptrs + s_up, w_mask, w_mask, quad_row, SCALE_KIND)
            acc_up = tl.dot(a_even, lo.to(dtype), acc_up, input_precision=DOT_PRECISION)
            acc_up = tl.dot(a_odd, hi.to(dtype), acc_up, input_precision=DOT_PRECISION)

    # per-expert second-level scale and the activation scale come first: they belong to the dot product
    if BF16X2 and SCALE_KIND == 0:
        acc = acc * BF16X2_FACTOR_E4M3
        acc_up = acc_up * BF16X2_FACTOR_E4M3
    if HAS_S2:
        acc = acc * tl.load(s2_ptr + e * stride_s2e)
        if GATED:
            acc_up = acc_up * tl.load(s2_ptr + e * stride_s2e + stride_s2j)
    if HAS_ASCALE:
        a_s = tl.load(ascale_ptr)
        acc = acc * a_s
        if GATED:
            acc_up = acc_up * a_s
    acc = moe_epilogue(acc, acc_up, slots, row_ok, offs_n, col_ok, col_ok, e, N, bias_ptr, topk_w_ptr,
                       stride_bias_e, stride_bias_n, GATED, ACTIVATION, MUL_WEIGHT, HAS_BIAS)
    store_rows(acc, slots, row_ok, offs_n, col_ok, c_ptr, stride_cm, stride_cn, False)
