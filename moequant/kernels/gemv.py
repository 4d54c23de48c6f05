"""Decode path of the quantized fused MoE: two GEMV launches after routing (bodies: _gemv_rows_kernel.py for int,
A16 fp4 and fp8 weights whose activations it quantizes itself (_gemv_fp8_rows.py on the CUDA cores, _gemv_fp8_mma.py
on the tensor cores: GemvConfig.MMA), _gemv_kernel.py for fp8 with
pre-quantized activations and nvfp4 with fp4 activations; uses_rows_kernel picks). On the rows kernel GEMM1 can route
itself (gemv_routes), and the forward is then two launches in all. nvfp4a16 at one token, on shapes tuned for it,
is one launch instead (gemv_fused.py, which fp4_gemm calls first).

For few token slots per expert the grouped GEMMs waste most of their work: one token is padded to 16 rows for the
tensor cores, the align step costs a launch, the unpacked weights go through the tensor cores' operand layout, and the
top-k sum is another launch. Here GEMM1 (gate/up + activation) and GEMM2 (down + routing weight + top-k sum) each
stream every routed expert's weights once per slot on the CUDA cores (fp8 on a GPU: through warp-level mma.sync, one
activation column of eight).

T tokens, K top-k, S = T*K slots, E experts (local), H hidden, I intermediate (per rank), G group size.
GemvWeights holds one GEMM's weights in the kernel's layout; the methods build them (int: IntWeights, fp4, fp8).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton

from moequant.kernels._gemv_kernel import gemv_moe_kernel
from moequant.kernels._gemv_rows_kernel import gemv_rows_kernel
from moequant.kernels.fp4_word_layout import check_word_rows
from moequant.kernels.gather import gather_slot_columns
from moequant.kernels.moe_gemm import _ACT_CODE
from moequant.kernels.tuning import cached_entry
from moequant.quantize.fp8_math import ACT_EPS

_FMT = {"int": 0, "fp4": 1, "fp8": 2}
_A_CODE = {None: 0, "tensor": 1, "row": 2, "group": 3}
_W_CODE = {None: 0, "expert": 1, "row": 2}
MODE = os.environ.get("MOEQUANT_GEMV", "auto")  # auto | always | never (see use_gemv)
ROUTE_MODE = os.environ.get("MOEQUANT_GEMV_ROUTE", "auto")  # auto | always | never (see gemv_routes)
PDL_MODE = os.environ.get("MOEQUANT_GEMV_PDL", "auto")  # auto | rows | never (see rows_launch_pdl, chain_pdl)
# A16 fp4 without act-order: GEMM2 launched as the routing GEMM1's programmatic dependent where chain_pdl allows it
# (fused_experts_gemv); MOEQUANT_GEMV_CHAIN_PLAIN=0 turns only this chain off (benchmarks)
PLAIN_CHAIN = os.environ.get("MOEQUANT_GEMV_CHAIN_PLAIN", "1") == "1"
# fp8 GEMM1 scaling its input by the input's own max: that row loaded before the routing, up to X_EARLY_MAX
# columns (gemv_rows_kernel's XB). H200, Qwen3-30B M=1, us per forward late / early: fp8-tensor 18.28 / 18.18,
# fp8-channel 18.38 / 18.24 (3 rounds x 3). MOEQUANT_GEMV_X_EARLY=0 turns it off (benchmarks)
X_EARLY = os.environ.get("MOEQUANT_GEMV_X_EARLY", "1") == "1"
X_EARLY_MAX = 8192
PDL_MAX_TOKENS = 4  # rows_launch_pdl
CHAIN_MAX_TOKENS = 1  # chain_pdl
CHAIN_MAX_EXPERT_BYTES = 8 << 20  # chain_pdl: w13 bytes of one expert
ROUTE_MAX_TOKENS = 8  # gemv_routes: GEMM1 routes its tokens itself up to this many tokens
# int4 / A16 fp4 weights with bf16 activations on a GPU: products in bf16x2 (gemv_rows_kernel's PACKED); 0: fp32
PACKED = os.environ.get("MOEQUANT_GEMV_PACKED", "1") == "1"
# fp4 on the rows kernel's fp32 path on a GPU (nvfp4's GEMM1: fp4 activations): the decode layout's own decode
# (_gemv_fp4_bf16x2.fp4_word_dot_f32) instead of moving each word back to bytes; 0: the byte decode (benchmarks)
F32_PTX = os.environ.get("MOEQUANT_GEMV_F32_PTX", "1") == "1"
FP8_GROUP = 128  # fp8: block scales and per-group activation scales cover 128 columns; also the chunking unit
STEP_UNITS = 1024  # rows kernel heuristic: int32 words per program and step
ELEMS_PER_THREAD = 256  # fp4 on gemv_moe_kernel: weight elements per thread and chunk (4 warps)
FP8_ELEMS_PER_THREAD = 64  # fp8: each element costs two conversions (weight and activation)


@dataclass(frozen=True)
class GemvWeights:
    """One GEMM's weights for the GEMV kernel.

    fmt "int": data int32 words [E, N, C/PW], bits 4|8, group scale [E, N, C/G] (G None: per channel, scale [E, N, 1]
        read as a row scale), zero_point int32 [E, N, C/G] or None, sort_idx int32 [E, C] (act-order, equal groups).
    fmt "fp4": data uint8 [E, N, C/2], scale [E, N, C/G] fp8 e4m3 (G 16) or uint8 E8M0
        (G 32), expert_scale fp32 [E] or [E, 2] (nvfp4's second-level scale) or None.
    fmt "fp8": data fp8 [E, N, C], expert_scale [E] (per tensor) or row_scale [E, N] (per channel) or block scale
        [E, N/128, C/128] (group 128).
    out_perm int32 [E, N] (GEMM1 only): store output column n at out_perm[e, n] (the inverse of GEMM2's act-order
        sort_idx, so GEMM2 reads its input in sorted order without a gather).
    """

    fmt: str
    data: torch.Tensor
    bits: int = 4
    group: int | None = None
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    scale_kind: str = "fp8"
    sort_idx: torch.Tensor | None = None
    expert_scale: torch.Tensor | None = None
    row_scale: torch.Tensor | None = None
    out_perm: torch.Tensor | None = None

    @property
    def per_unit(self) -> int:
        """Elements per packed unit: an int32 word (int), a byte (fp4: two codes; fp8: one)."""
        return 32 // self.bits if self.fmt == "int" else 2 if self.fmt == "fp4" else 1

    @property
    def columns(self) -> int:
        return self.data.shape[2] * self.per_unit


@dataclass(frozen=True)
class Fp8ActIn:
    """How the fp8 rows GEMV quantizes its high-precision input (_gemv_fp8_rows.py): kind "tensor" | "row" (one
    scale per row: token for GEMM1, slot for GEMM2); src "static" (scale [1]), "amax" (scale: GEMM1's amax partials,
    amax_n of them in all per tensor, or per slot per row) or "input" (from the input rows themselves)."""

    kind: str
    src: str
    scale: torch.Tensor | None = None
    amax_n: int = 0


_A_SRC = {"static": 0, "amax": 1, "input": 2}


@dataclass(frozen=True)
class GemvConfig:
    BLOCK_N: int  # output rows per program (per part)
    NG: int  # scale groups per chunk
    num_warps: int = 4
    SPLIT_K: int = 1  # GEMM2 of the rows kernel: programs per output block, each over a share of the reduction
    PART_SPLIT: bool = False  # GEMM2 of the rows kernel: one program per top-k expert (x SPLIT_K), atomic sums
    STAGES: int = 1  # rows kernel: steps in flight (> 1: the next steps' words stream into shared memory; MMA: 1-3
    # steps of loads held in registers)
    PREFETCH: bool = False  # rows kernel, bf16x2 paths: the next step's loads issued before this step's products
    UNIT: int = 2  # A16 fp4 bf16x2 path: byte columns per tile element (2, 4 or 8; at most G / 2)
    MMA: bool = False  # fp8 rows GEMV on a GPU: the tensor-core body (_gemv_fp8_mma.py; BLOCK_N 16 or 32 dividing N,
    # num_warps warps splitting the reduction, SPLIT_K 1)


def use_gemv(T: int, K: int, E: int, slots_per_expert: float = 1.0) -> bool:
    """The GEMV path while there are at most `slots_per_expert` token slots per expert on average (each slot streams
    its own expert's weights, which the grouped GEMM reads once per expert block), or T <= 2. Per format, from the
    H200: int 1 (its grouped GEMM wins beyond); fp4 2 (Mixtral M=8: GEMV 2.8x faster; Qwen3-30B M=64: 1.4x
    slower); fp8 0 = never (the GEMV tied the tensor-core path on Qwen3-30B and was 11% slower on Mixtral at M=1).
    MOEQUANT_GEMV=always|never overrides (tests, benchmarks)."""
    if MODE in ("always", "never"):
        return MODE == "always"
    return slots_per_expert > 0 and (T * K <= slots_per_expert * E or T <= 2)


def gemv_routes(T: int) -> bool:
    """Whether the decode GEMV's GEMM1 routes its tokens itself (gemv(route=...): every program chooses its token's
    top k with the routing launch's _topk_kernel._topk_choice and takes its slot's expert; the programs of block 0
    write the weights and ids GEMM2 reads), so the forward has no routing launch. H200, against a routing launch
    first: Qwen3-30B w4a16 M=1 16.9 -> 15.7 us, M=8 64.2 -> 62.9, nvfp4a16 20.3 -> 19.2 and 73.1 -> 72.4; Mixtral
    w4a16 and nvfp4a16 within the run-to-run spread (likely because its GEMM1 spans more than one wave of programs,
    each routing first); mxfp4 does not route (methods.fp4). Up to ROUTE_MAX_TOKENS tokens (1 and 8 measured);
    MOEQUANT_GEMV_ROUTE=always (any number of tokens) or never overrides (benchmarks)."""
    if ROUTE_MODE in ("always", "never"):
        return ROUTE_MODE == "always" and T > 0
    return 0 < T <= ROUTE_MAX_TOKENS


def rows_launch_pdl(x: torch.Tensor) -> bool:
    """Whether act-order's routed_rows launch and the GEMM1 that routes and reads its rows run with programmatic
    dependent launch: GEMM1 starts and routes while the rows are written (Hopper and later, not the interpreter),
    up to PDL_MAX_TOKENS tokens. H200, w4a16 g128 act-order, us per forward with / without PDL (fused_topk_gather
    and a GEMM1 that reads ids instead): Qwen3-30B M=1 17.8 / 18.6 (18.3), M=2 27.8 / 28.9 (28.5), M=4 45.7 / 46.8
    (44.7), M=8 66.8 / 63.2 (65.6) (at M=8 slower: plausibly its 6144 early GEMM1 programs take SM slots the rows
    launch still needs; not profiled). MOEQUANT_GEMV_PDL=never turns it off (benchmarks)."""
    return (PDL_MODE != "never" and 0 < x.shape[0] <= PDL_MAX_TOKENS and x.is_cuda
            and os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.get_device_capability(x.device)[0] >= 9)


def chain_pdl(x: torch.Tensor, w13: GemvWeights) -> bool:
    """Whether act-order's GEMM2 (after routed_rows and a GEMM1 launched as its dependent) is launched as GEMM1's
    programmatic dependent too: it starts while GEMM1 runs, routes again and waits for GEMM1's output. One token and
    experts of at most CHAIN_MAX_EXPERT_BYTES of w13, from what was measured (H200, us per forward, with / without):
    Qwen3-30B w4a16 g128 act-order (1.5 MB per expert) M=1 16.8-17.3 / 17.8-18.0, M=2 30.6-31.0 / 27.9, M=4 51.2 /
    45.7; Mixtral (58.7 MB) M=1 69.5 / 66.1; the plain pair (GEMM1 not a dependent) M=1 16.2 / 15.6, Mixtral 68.4 /
    63.7, nvfp4a16 also slower. The losses were not profiled (only two shapes: the bound is a guess between them).
    The same bound gates the plain A16 fp4 chain (PLAIN_CHAIN): GEMM1 routes but is not a dependent, GEMM2 issues
    its first step's weights and scales before it waits (PREFETCH forced on): Qwen3-30B nvfp4a16 M=1 19.2 -> 18.1 us
    (each alone was slower: the chain with GEMM2 waiting first 20.8, the prefetch unchained 19.8); mxfp4 does not
    route in GEMM1, so it is never chained. MOEQUANT_GEMV_PDL=rows turns both off."""
    expert_bytes = w13.data[0].numel() * w13.data.element_size()
    return (PDL_MODE == "auto" and x.shape[0] <= CHAIN_MAX_TOKENS and expert_bytes <= CHAIN_MAX_EXPERT_BYTES
            and rows_launch_pdl(x))


def _pdl_kwargs(pdl: bool, trigger: bool) -> dict:
    """The rows kernel's launch options for programmatic dependent launch (none in the interpreter, which cannot run
    griddepcontrol: the kernels then wait for the previous launch as plain launches do)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {}
    return {**(dict(PDL=True, launch_pdl=True) if pdl else {}), **(dict(TRIGGER=True) if trigger else {})}


def _group(w: GemvWeights) -> int:
    """Columns per group as the kernel sees them: the scale group, or FP8_GROUP for formats without group scales
    (then only the unit of chunking)."""
    if w.fmt == "fp8":
        return FP8_GROUP
    return w.group if w.group is not None else 128


OVERRIDE: dict[bool, GemvConfig] = {}  # down -> config, set by benchmarks/tune_gemv.py while it sweeps


def fp8_rows(w: GemvWeights) -> bool:
    """Whether fp8 weights suit the rows kernel's fp8 branch: per-tensor or per-channel scales, K-contiguous rows of
    a multiple of 16 bytes, 16-byte aligned (each 16 columns one 16-byte load)."""
    d = w.data
    return (w.fmt == "fp8" and w.scale is None and d.dim() == 3 and d.stride(2) == 1 and d.shape[2] % 16 == 0
            and d.stride(1) % 16 == 0 and d.stride(0) % 16 == 0 and d.data_ptr() % 16 == 0)


def uses_rows_kernel(w: GemvWeights, a_scale_kind=None, a_quant: Fp8ActIn | None = None) -> bool:
    """Int weights, fp4 weights stored rows-contiguous (A16, or nvfp4's fp4 activations with a scale per tensor) and
    fp8 weights with an input the kernel quantizes (a_quant; fp8_rows layout) go through gemv_rows_kernel (fp4 bytes
    and block scales read as int32 words of four rows: N a multiple of 4 per half, scales rows-contiguous too); the
    rest (fp8 with pre-quantized activations, fp4 of odd shapes) through gemv_moe_kernel. H200 M=1 nvfp4: Qwen3-30B
    182.8 us and Mixtral 341.8 on gemv_moe_kernel before the decode layout, 201.4 / 484.4 on it after, 189.5 / 337.1
    on the rows kernel."""
    if a_quant is not None:
        if not fp8_rows(w):
            raise ValueError(f"the fp8 rows GEMV needs per-tensor or per-channel fp8 weights, K-contiguous, rows of "
                             f"a multiple of 16 bytes, 16-byte aligned (gemv.fp8_rows): shape {tuple(w.data.shape)}, "
                             f"strides {w.data.stride()}, block scales {w.scale is not None}")
        return True
    if w.fmt == "int":
        if w.data.dim() != 3 or w.data.stride(1) != 1:
            raise ValueError(f"int GEMV weights must be stored rows-contiguous (methods.base.rows_contiguous): "
                             f"shape {tuple(w.data.shape)}, strides {w.data.stride()}")
        return True
    if w.fmt == "fp4":
        check_word_rows(w.data, "fp4 GEMV weights")
    if w.data.dim() != 3 or w.data.stride(1) != 1:
        return False
    return (w.fmt == "fp4" and a_scale_kind in (None, "tensor") and w.data.shape[1] % 8 == 0
            and w.data.data_ptr() % 16 == 0 and w.scale is not None and w.scale.stride(1) == 1
            and w.scale.data_ptr() % 4 == 0)


def uses_packed(w: GemvWeights, a: torch.Tensor) -> bool:
    """int4 or A16 fp4 weights on the rows kernel and bf16 activations read in order (rows contiguous, 4-byte
    aligned; act-order's GEMM1 input is pre-gathered by fused_experts_gemv) on a GPU: the rows kernel forms the
    products in bf16x2 (inline PTX, which the interpreter cannot run), int4 eight per word, fp4 four per row of two
    words, and sums them in fp32; otherwise fp32 products."""
    pairs = a.stride(1) == 1 and a.stride(0) % 2 == 0 and a.data_ptr() % 4 == 0  # rows read as int32 pairs
    weights = w.fmt == "int" and w.bits == 4 or w.fmt == "fp4" and uses_rows_kernel(w)
    return (PACKED and weights and w.sort_idx is None and a.dtype == torch.bfloat16 and a.is_cuda and pairs
            and os.environ.get("TRITON_INTERPRET") != "1")


def kernel_name(w: GemvWeights, down: bool, rows: bool = False, f32: bool = False) -> str:
    """The tuning cache's name of one GEMV, e.g. gemv-up-int4-g128, gemv-down-fp8-block, gemv-up-fp4-g16-rows
    (rows: fp4 on gemv_rows_kernel, whose blocks mean other tiles than gemv_moe_kernel's; f32: its fp32 path, e.g.
    nvfp4's GEMM1 or fp16 activations: gemv-up-fp4-g16-rows-f32, whose tiles fit other sizes than the bf16x2 one's)."""
    if w.fmt == "fp8":
        kind = "block" if w.scale is not None else "row" if w.row_scale is not None else "tensor"
        fmt = f"fp8-{kind}"
    else:
        fmt = (f"int{w.bits}" if w.fmt == "int" else "fp4") + (f"-g{w.group}" if w.group is not None else "")
    rows_tag = ("-rows" + ("-f32" if f32 and w.fmt == "fp4" else "")) if rows and w.fmt != "int" else ""
    return f"gemv-{'down' if down else 'up'}-{fmt}" + rows_tag


def gemv_config(parts: int, N: int, w: GemvWeights, T: int, down: bool, grid_rows: int = 1,
                rows: bool = False, f32: bool = False) -> GemvConfig:
    """The tuned cache's entry for this GEMV near T tokens, else a heuristic: rows_heuristic for the rows kernel (int,
    A16 fp4); for gemv_moe_kernel (fp8, nvfp4 with fp4 activations) BLOCK_N 4 (fp8, K-contiguous) or 16 (fp4,
    rows-contiguous bytes) and NG groups to fill the register budget of elements per thread."""
    if down in OVERRIDE:
        return OVERRIDE[down]
    entry = cached_entry(kernel_name(w, down, rows, f32), T, w.data.shape[0], N, w.columns, w.data.device)
    if entry is not None:
        return GemvConfig(**entry)
    G = _group(w)
    num_g = triton.cdiv(w.columns, G)
    if rows:
        sms = torch.cuda.get_device_properties(w.data.device).multi_processor_count if w.data.is_cuda else 0
        if w.fmt == "fp8":
            return fp8_rows_heuristic(N, num_g, grid_rows, down, sms)
        return rows_heuristic(w.fmt, w.per_unit, G, N, num_g, parts, grid_rows, down, sms, packed=not f32)
    bn = min(triton.next_power_of_2(N), 4 if w.fmt == "fp8" else 16)
    budget = (FP8_ELEMS_PER_THREAD if w.fmt == "fp8" else ELEMS_PER_THREAD) * 128
    ng = max(1, min(triton.next_power_of_2(num_g), budget // (parts * bn * G)))
    return GemvConfig(bn, ng, 4)


def rows_heuristic(fmt: str, per_unit: int, G: int, N: int, num_g: int, parts: int, grid_rows: int, down: bool,
                   sms: int, packed: bool = True) -> GemvConfig:
    """The rows kernel's config without a tuned entry (sms: the GPU's multiprocessors, 0 on the CPU). Every step
    reads about STEP_UNITS words (8 per thread of 4 warps; fp4 on a GPU and fp4 GEMM1: 4x, 32 words, which the
    bf16x2 path keeps in flight with PREFETCH in tile elements of 8 byte columns, UNIT). GEMM1: the widest BLOCK_N
    up to 64 (at least 4 rows for int, 16 for fp4) that still gives 4 programs per multiprocessor over grid_rows x
    N / BLOCK_N. GEMM2 on a GPU: one program per top-k expert (PART_SPLIT; it also keeps the activation tile small,
    which a [P, NG, GW, 1] tile of as many elements as the program has threads is not: Triton then moves the words
    through shared memory every step), BLOCK_N 64 (fp4) or 32 (int), and the reduction split in SPLIT_K shares (a
    power of two up to 8) until there are about 3 (fp4) or 6 (int) programs per multiprocessor: the structure of
    every tuned H200 config (Mixtral and Qwen3-30B at M=1: 512 fp4 and 1024 int4 GEMM2 programs). On the CPU
    (interpreter) few wide programs, no split: each program is interpreted on its own. fp4 on the GPU's fp32 path (not
    packed: nvfp4's GEMM1, fp16 activations): a quarter of the bf16x2 step (offline sm_90, Qwen3-30B GEMM1 at 32
    rows: NG 8, 80 registers; NG 16 takes 127 and moves the words through shared memory every step)."""
    fp4_gpu = fmt == "fp4" and sms > 0 and packed
    unit = min(8, G // 2) if fp4_gpu else 2
    units = STEP_UNITS * (4 if fmt == "fp4" and (fp4_gpu or not down) else 1)
    if fmt == "fp4" and sms > 0 and not packed:
        units = STEP_UNITS
    bn_min = 4 if fmt == "int" else 16  # fp4: 16 rows = one 16-byte load of four words

    def step_groups(bn: int, row_parts: int) -> int:
        words_per_row = (G // per_unit) * (bn if fmt == "int" else bn // 4)
        return max(1, min(triton.next_power_of_2(num_g), units // (row_parts * words_per_row)))

    if down and sms > 0 and parts >= 2:
        bn = max(bn_min, min(64 if fmt == "fp4" else 32, triton.next_power_of_2(N)))
        ng = step_groups(bn, 1)
        chunks, split = triton.cdiv(num_g, ng), 1
        while split < min(8, chunks) and grid_rows * triton.cdiv(N, bn) * parts * split < (3 if fp4_gpu else 6) * sms:
            split *= 2
        return GemvConfig(bn, ng, 4, SPLIT_K=split, PART_SPLIT=True, PREFETCH=fp4_gpu, UNIT=unit)
    bn = 64
    while bn > bn_min and grid_rows * triton.cdiv(N, bn) < 4 * sms:
        bn //= 2
    bn = max(bn_min, min(bn, triton.next_power_of_2(N)))
    return GemvConfig(bn, step_groups(bn, parts), 4, PREFETCH=fp4_gpu, UNIT=unit)


FP8_WORDS_PER_THREAD = 16  # fp8 rows heuristic: weight words (16-byte quads / 4) per thread and step, both halves


def fp8_rows_heuristic(N: int, num_g: int, grid_rows: int, down: bool, sms: int) -> GemvConfig:
    """The fp8 rows GEMV's config without a tuned entry. On a GPU, with N a multiple of 16: the tensor-core body
    (MMA, _gemv_fp8_mma.py) with GEMM1 programs of 16 rows per half over 8 warps and GEMM2 programs of 32 rows (16
    when N is not a multiple of 32) over 4, one per top-k expert (H200, Qwen3-30B M=1 fp8-tensor: 19.0-19.3 us per
    forward against 21.7-23.4 for the other splits measured; benchmarks/results/*-s13-*), GEMM2 with two steps of
    loads in flight, both issued before it waits for GEMM1 when chained (fp8-tensor 18.5-19.0 -> 18.2-18.3 us,
    fp8-channel 19.5 -> 18.4; three steps 22.5, at 158 registers; GEMM1 with two 19.0, three 22.8: *-s14-*).
    Long GEMM1 reductions (more than 64 chunks of 64 columns) split over 16 warps, short GEMM2 ones (at most 4
    chunks) over 2 with one step in flight, as tuned for the DeepSeek-V3 shard (K 7168 / 256; fp8-tensor M=1
    36.1 -> 26.2 us: *-s18-*). Otherwise the CUDA-core body: GEMM1 the widest BLOCK_N up to 64 (at least 4) that
    still gives 4 programs per multiprocessor; GEMM2 one program per top-k expert (PART_SPLIT, which the fp8 branch
    needs), BLOCK_N 16 and the reduction split in up to 8 shares until there are about 6 programs per
    multiprocessor; NG 128-column groups per step so that a thread of 4 warps holds FP8_WORDS_PER_THREAD words. On
    the CPU (interpreter) few wide programs."""
    if sms > 0 and N % 16 == 0:
        chunks = 2 * num_g  # 64-column chunks of the reduction (num_g groups of FP8_GROUP columns)
        if down:
            short = chunks <= 4
            return GemvConfig(32 if N % 32 == 0 else 16, 1, 2 if short else 4, PART_SPLIT=True, MMA=True,
                              STAGES=1 if short else 2)
        return GemvConfig(16, 1, 16 if chunks > 64 else 8, MMA=True)
    halves = 1 if down else 2
    if down:
        bn = max(4, min(16, triton.next_power_of_2(N)))
    else:
        bn = 64
        while bn > 4 and grid_rows * triton.cdiv(N, bn) < 4 * sms:
            bn //= 2
        bn = max(4, min(bn, triton.next_power_of_2(N)))
    ng = max(1, min(triton.next_power_of_2(num_g), FP8_WORDS_PER_THREAD * 128 // (halves * bn * 32)))
    split = 1
    if down and sms > 0:
        chunks = triton.cdiv(num_g, ng)
        while split < min(8, chunks) and grid_rows * triton.cdiv(N, bn) * split < 6 * sms:
            split *= 2
    return GemvConfig(bn, ng, 4, SPLIT_K=split, PART_SPLIT=down)


def fp4_unit(cfg: GemvConfig, G: int) -> int:
    """The config's UNIT for A16 fp4 on the bf16x2 path: byte columns per tile element, within one scale group."""
    if cfg.UNIT not in (2, 4, 8) or 2 * cfg.UNIT > G:
        raise ValueError(f"GemvConfig.UNIT must be 2, 4 or 8 byte columns and at most G/2 = {G // 2}, "
                         f"got {cfg.UNIT}")
    return cfg.UNIT


def _row_words(t: torch.Tensor) -> torch.Tensor:
    """Bytes [E, N, J] stored rows-contiguous as int32 [E, N/4, J]: word (q, j) holds rows 4q..4q+3 of column j."""
    E, N, J = t.shape
    if J == 1:  # stride(2) is arbitrary then; the rows are the contiguous dimension either way
        return t.reshape(E, N).view(torch.int32).unsqueeze(2)
    return t.transpose(1, 2).view(torch.int32).transpose(1, 2)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors go to the kernel as their bytes (a masked load of fp8 cannot fill in 0 in the interpreter)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@dataclass(frozen=True)
class GemvPlan:
    """How one GEMV launches: its output rows N, parts P, grid rows, kernel, config and GEMM2's split."""

    N: int
    P: int
    grid_rows: int
    rows_kernel: bool
    cfg: GemvConfig
    split: int
    part_programs: int = 1  # GEMM2 with PART_SPLIT: top-k programs per output block and split, one per expert

    @property
    def programs(self) -> int:
        return self.grid_rows * triton.cdiv(self.N, self.cfg.BLOCK_N)

    @property
    def shares(self) -> int:
        """GEMM2's programs per output block, all adding into the split buffer: splits x part programs."""
        return self.split * self.part_programs


def plan_gemv(w: GemvWeights, out_rows: int, topk_ids, *, down: bool, top_k: int, a_scale_kind=None,
              cfg: GemvConfig | None = None, a_quant: Fp8ActIn | None = None, f32: bool = False) -> GemvPlan:
    """The launch of one GEMV (cfg: given, else the tuned cache's or the heuristic's); fused_experts_gemv plans GEMM2
    before GEMM1 so that GEMM1 can zero GEMM2's split buffers. The fp8 rows GEMV's GEMM2 always takes one expert
    per program (PART_SPLIT)."""
    N = w.data.shape[1] if down else w.data.shape[1] // 2
    P = triton.next_power_of_2(top_k) if down else 2
    grid_rows = out_rows if down else topk_ids.numel()
    rows_kernel = uses_rows_kernel(w, a_scale_kind, a_quant)
    cfg = cfg or gemv_config(P, N, w, topk_ids.shape[0], down, grid_rows, rows_kernel, f32 and rows_kernel)
    split = max(1, min(cfg.SPLIT_K, triton.cdiv(w.columns, cfg.NG * _group(w)))) if down and rows_kernel else 1
    if down and w.fmt == "fp8" and rows_kernel:
        return GemvPlan(N, 1, grid_rows, rows_kernel, cfg, split, top_k)
    if down and rows_kernel and cfg.PART_SPLIT and top_k > 1:
        return GemvPlan(N, 1, grid_rows, rows_kernel, cfg, split, top_k)
    return GemvPlan(N, P, grid_rows, rows_kernel, cfg, split)


def split_buffers(plan: GemvPlan, out_rows: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """GEMM2's split buffers, uninitialised (GEMM1 zeroes them): fp32 partial sums [T, N] and int32 arrival
    counters [T, cdiv(N, BLOCK_N)]; None with one program per output block."""
    if plan.shares == 1:
        return None
    return (torch.empty(out_rows, plan.N, dtype=torch.float32, device=device),
            torch.empty(out_rows, triton.cdiv(plan.N, plan.cfg.BLOCK_N), dtype=torch.int32, device=device))


def gemv(a, w: GemvWeights, c, topk_ids, *, down: bool, top_k: int, activation: str = "silu", a_scale=None,
         a_scale_kind=None, bias=None, topk_weights=None, out_amax=None, cfg: GemvConfig | None = None,
         plan: GemvPlan | None = None, split_bufs=None, zero_bufs=None, a_per_slot: bool = False, route=None,
         pdl: bool = False, trigger: bool = False, a_quant: Fp8ActIn | None = None):
    """GEMM1 (down=False): c[slot] = act(W13[e] a[slot // top_k]) for every slot; GEMM2 (down=True):
    c[t] = sum_k w[t, k] * (W2[e_k] a[t*top_k + k] + b2[e_k]). a_scale_kind: None (A16), "tensor" [1],
    "row" [rows] or "group" [rows, C/128] scales of a (fp8 or pre-quantized nvfp4).
    GEMM2 with several programs per output block (plan.shares > 1) uses split_bufs (zeroed by the GEMM1 that got
    them as zero_bufs; zeroed here when not given). a_per_slot (GEMM1, rows kernel): a holds one row per slot
    instead of one per token. route (GEMM1; topk.DeferredRouting): topk_ids are route.ids, not yet written; the rows
    kernel routes in every program and writes route's outputs, another kernel gets them from route.run() first.
    pdl (rows kernel): launch as a programmatic dependent of the previous launch (which wrote a), waiting for it
    after routing (GEMM1) or after routing again (GEMM2: route= is the routing GEMM1 did, topk_weights its weights
    output). trigger (GEMM1): let a dependent GEMM2 launch at once. a_quant (fp8 weights, fp8_rows layout): a is
    in high precision and the rows kernel quantizes it (Fp8ActIn); GEMM1's out_amax then receives one max |out|
    per program (the partials a GEMM2 with src "amax" reduces)."""
    ids = topk_ids.reshape(-1)
    C = w.columns
    if a_quant is not None:
        a_scale, a_scale_kind = a_quant.scale, a_quant.kind
    # an fp32 output (nvfp4's GEMM1, whose output is requantized to fp4) keeps fp32 products: bf16x2 chains moved
    # enough values across an e2m1 rounding boundary to put the H200's nvfp4 output 2.5e-2 off the reference
    packed = uses_packed(w, a) and c.dtype != torch.float32
    plan = plan or plan_gemv(w, c.shape[0], topk_ids, down=down, top_k=top_k, a_scale_kind=a_scale_kind, cfg=cfg,
                             a_quant=a_quant, f32=w.fmt == "fp4" and not packed)
    N, P, rows_kernel, cfg = plan.N, plan.P, plan.rows_kernel, plan.cfg
    routing = {}
    if route is not None:
        if (route.ids.data_ptr() != topk_ids.data_ptr() or (topk_weights is not None) != down
                or (down and not (rows_kernel and pdl))):
            raise ValueError("gemv: route= is for GEMM1 without routing weights on its input, or for a GEMM2 on the "
                             "rows kernel launched as its dependent (pdl=True), with topk_ids = route.ids")
        if rows_kernel:  # GEMM1: the routing weights go out through topk_w_ptr (GEMM1 does not read them)
            topk_weights = topk_weights if down else route.weights
            routing = dict(logits_ptr=route.logits, E_ROUTE=route.logits.shape[1], stride_lt=route.logits.stride(0),
                           route_scale=route.scale, ROUTE=True, **route.consts())
        else:
            route.run()
    G = _group(w)
    data = _bytes(w.data)
    dummy = c
    s = _bytes(w.scale) if w.scale is not None else dummy
    a = _bytes(a)
    s_strides = w.scale.stride() if w.scale is not None else (0, 0, 0)
    zp = w.zero_point
    si = w.sort_idx
    if w.expert_scale is not None:
        es, w_kind = w.expert_scale, "expert"
        es_strides = (es.stride(0), es.stride(1) if es.dim() > 1 and not down else 0)
    elif w.row_scale is not None:
        es, w_kind = w.row_scale, "row"
        es_strides = (es.stride(0), es.stride(1))
    else:
        es, w_kind, es_strides = dummy, None, (0, 0)
    a_s = a_scale if a_scale is not None else dummy
    as_strides = (0, 0)
    if a_scale_kind == "row" and a_scale is not None:
        as_strides = (a_scale.stride(0), 0)
    elif a_scale_kind == "group":
        as_strides = (a_scale.stride(0), a_scale.stride(1))
    grid = (plan.grid_rows, triton.cdiv(N, cfg.BLOCK_N))
    if rows_kernel and w.fmt == "fp4":  # bytes and scales of rows 4q..4q+3 as one int32 word: [E, N/4, C/2 | C/G]
        data, s = _row_words(w.data), _row_words(w.scale.view(torch.uint8))
        s_strides = s.stride()
    fp8_kw = {}
    if rows_kernel and w.fmt == "fp8":  # f16x2 products on a GPU: the bytes as int32 words [E, N, C/4]
        f16x2 = c.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
        data = w.data.view(torch.int32) if f16x2 else data
        fp8_kw = dict(A_SRC=_A_SRC[a_quant.src], a_amax_n=a_quant.amax_n, a_rows=a.shape[0], F16X2=f16x2,
                      EPS=ACT_EPS, EMULATE_CAST=not f16x2, MMA=cfg.num_warps if f16x2 and cfg.MMA else 0)
        if X_EARLY and not down and not pdl and a_quant.src == "input" and C <= X_EARLY_MAX:
            fp8_kw["XB"] = triton.next_power_of_2(C)
        if fp8_kw["MMA"] and (cfg.BLOCK_N not in (16, 32) or N % cfg.BLOCK_N or plan.split != 1
                              or cfg.STAGES not in (1, 2, 3)):
            raise ValueError(f"gemv: the fp8 mma GEMV takes BLOCK_N 16 or 32 dividing N, no split and 1-3 STAGES, "
                             f"got BLOCK_N {cfg.BLOCK_N}, N {N}, split {plan.split}, STAGES {cfg.STAGES}")
    if down and plan.shares > 1 and split_bufs is None:
        split_bufs = tuple(b.zero_() for b in split_buffers(plan, c.shape[0], c.device))
    bufs = split_bufs if down and plan.shares > 1 else zero_bufs if not down else None
    args = [
        a, data, s, zp if zp is not None else dummy, si if si is not None else dummy, es, a_s, ids,
        topk_weights if topk_weights is not None else dummy, bias if bias is not None else dummy, c,
        out_amax if out_amax is not None else dummy, w.out_perm if w.out_perm is not None else dummy,
        *(bufs if bufs is not None else (dummy, dummy)),
        N, C, triton.cdiv(C, G), *((bufs[0].numel(), bufs[1].numel()) if bufs is not None else (0, 0)),
        a.stride(0), a.stride(1), data.stride(0), data.stride(1), data.stride(2), *s_strides,
        *(zp.stride() if zp is not None else (0, 0, 0)), si.stride(0) if si is not None else 0,
        *es_strides, *(as_strides[:1] if rows_kernel else as_strides),
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        c.stride(0), c.stride(1), w.out_perm.stride(0) if w.out_perm is not None else 0,
    ]
    consts = dict(
        DOWN=down, TOP_K=top_k, P=P, ACTIVATION=_ACT_CODE[activation],
        FMT=_FMT[w.fmt], BITS=8 if w.fmt == "fp8" else w.bits, G=G,
        GROUP_SCALES=w.scale is not None and (w.fmt != "int" or w.group is not None), HAS_ZP=zp is not None,
        SCALE_KIND=1 if w.scale_kind == "e8m0" else 0, W_SCALE=_W_CODE[w_kind], A_SCALE=_A_CODE[a_scale_kind],
        SORTED=si is not None, MUL_WEIGHT=topk_weights is not None and (down or not routing),
        HAS_BIAS=bias is not None,
        OUT_AMAX=0 if out_amax is None else 2 if fp8_kw else 1, OUT_PERM=w.out_perm is not None and not down,
        BLOCK_N=cfg.BLOCK_N, NG=cfg.NG, num_warps=cfg.num_warps,
    )
    if rows_kernel:  # rows-contiguous int words or fp4 bytes (methods.base.rows_contiguous)
        even = C % (cfg.NG * G) == 0 and N % cfg.BLOCK_N == 0
        if fp8_kw.get("MMA"):  # each warp takes whole 64-column chunks
            even = C % (64 * cfg.num_warps) == 0
        zero = not down and zero_bufs is not None  # ZB: elements of each buffer one GEMM1 program zeroes
        zb = triton.next_power_of_2(max(16, triton.cdiv(zero_bufs[0].numel(), plan.programs))) if zero else 16
        args.insert(20, 0x4B000000)  # two23, after n_count
        # PACKED int4: each word's four activation pairs as one 16-byte load when every row starts 16-byte aligned
        # (H200, M=1: Qwen3-30B w4a16 15.7 -> 15.5 us, act-order 18.4 -> 18.3; Mixtral unchanged)
        x_quad = packed and w.fmt == "int" and a.stride(0) % 8 == 0 and a.data_ptr() % 16 == 0
        gemv_rows_kernel[grid + (plan.shares,)](*args, EVEN=even, SPLIT_K=plan.split,
                                                PART_SPLIT=plan.part_programs > 1, STAGES=cfg.STAGES,
                                                ZERO_SPLIT=zero, ZB=zb, PACKED=packed,
                                                PREFETCH=packed and cfg.PREFETCH,
                                                A_ROW_DIV=1 if a_per_slot else top_k,
                                                UNIT=fp4_unit(cfg, G) if packed and w.fmt == "fp4" else 2, **consts,
                                                X_QUAD=x_quad, **routing, **_pdl_kwargs(pdl, trigger and not down),
                                                F32_PTX=F32_PTX and w.fmt == "fp4" and not packed and c.is_cuda
                                                and os.environ.get("TRITON_INTERPRET") != "1", **fp8_kw)
    else:
        if a_per_slot:
            raise ValueError("gemv: one activation row per slot needs the rows kernel (int or A16 fp4 weights)")
        if zero_bufs is not None:
            zero_bufs[0].zero_()
            zero_bufs[1].zero_()
        gemv_moe_kernel[grid](*args, **consts)
    return c


def fused_experts_gemv(x, w13: GemvWeights, w2: GemvWeights, topk_weights, topk_ids, *, activation="silu",
                       w13_bias=None, w2_bias=None, apply_router_weight_on_input=False, quantize=None,
                       inter_dtype=None, out_amax=None, slot_rows=None, route=None) -> torch.Tensor:
    """out[t] = sum_k w[t,k] * (W2[e] q2(act(W13[e] q1(x[t]) + b13[e])) + b2[e]): two GEMV launches.
    quantize(a, stage) -> (a_q, scale, scale kind) quantizes GEMM1's (stage 1) and GEMM2's (stage 2) input (None:
    A16); inter_dtype: GEMM1's output dtype (fp32 when it is quantized next, so it is rounded once); out_amax: fold
    max |inter| into it (a dynamic per-tensor stage-2 scale). slot_rows [T*K, H]: act-order's per-slot rows of x in
    w13's sorted column order, already written (kernels.topk.fused_topk_gather with the routing, or routed_rows for
    a GEMM1 that routes: then launched as its programmatic dependent where rows_launch_pdl says so).
    route (topk.DeferredRouting; topk_weights and topk_ids are its outputs): GEMM1 routes (gemv's route=)."""
    T, H = x.shape
    K = topk_ids.shape[1]
    I = w13.data.shape[1] // 2
    topk_weights = topk_weights.reshape(-1).float().contiguous()
    a, s, kind = quantize(x, 1) if quantize is not None else (x, None, None)
    per_slot = w13.sort_idx is not None and quantize is None and uses_rows_kernel(w13)
    # rows written without routing (kernels.topk.routed_rows) for a GEMM1 that routes: launched as its dependent
    pdl = route is not None and per_slot and slot_rows is not None and rows_launch_pdl(x)
    # act-order's GEMM1 (a dependent of routed_rows) starts a GEMM2 that routes again while it runs
    chain = pdl and uses_rows_kernel(w2) and chain_pdl(x, w13)
    if PLAIN_CHAIN and route is not None and not per_slot and quantize is None and not apply_router_weight_on_input:
        # A16 fp4: GEMM1 routes (not a dependent itself), GEMM2 issues its first weight loads before it waits
        chain = w2.fmt == "fp4" and uses_packed(w2, x) and chain_pdl(x, w13)
    if route is not None and ((per_slot and slot_rows is None) or apply_router_weight_on_input):
        # GEMM1 needs the routing before it runs (to gather act-order's rows, or to weight its input)
        route.run()
        route = None
    if per_slot:  # act-order: each slot's row of x in its expert's sorted column order (one launch), read in order
        a = slot_rows if slot_rows is not None else gather_slot_columns(
            x, w13.sort_idx, topk_ids, K, out=torch.empty(T * K, H, dtype=x.dtype, device=x.device))
        w13 = replace(w13, sort_idx=None)
    inter = torch.empty(T * K, I, dtype=inter_dtype or x.dtype, device=x.device)
    # GEMM2's split buffers are zeroed by GEMM1, also for nvfp4 (fp4 activations, on the rows kernel too; GEMM2's
    # input has the scale kind of GEMM1's): H200 Qwen3-30B nvfp4 M=1 37.21 -> 34.85 us, two memset launches fewer
    plan2 = plan_gemv(w2, T, topk_ids, down=True, top_k=K, a_scale_kind=kind,
                      f32=w2.fmt == "fp4" and not uses_packed(w2, x))
    if chain and w2.fmt == "fp4" and not plan2.cfg.PREFETCH:  # its first weights in flight before it waits
        plan2 = replace(plan2, cfg=replace(plan2.cfg, PREFETCH=True))
    bufs = split_buffers(plan2, T, x.device)
    gemv(a, w13, inter, topk_ids, down=False, top_k=K, activation=activation, a_scale=s, a_scale_kind=kind,
         bias=w13_bias, topk_weights=topk_weights if apply_router_weight_on_input else None, out_amax=out_amax,
         zero_bufs=bufs, a_per_slot=per_slot, route=route, pdl=pdl, trigger=chain)
    a, s, kind = quantize(inter, 2) if quantize is not None else (inter, None, None)
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    return gemv(a, w2, out, topk_ids, down=True, top_k=K, a_scale=s, a_scale_kind=kind, bias=w2_bias,
                topk_weights=None if apply_router_weight_on_input else topk_weights, plan=plan2, split_bufs=bufs,
                route=route if chain else None, pdl=chain)
