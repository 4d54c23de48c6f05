"""Compile a GEMV kernel for sm_90 on a machine without a GPU and count the SASS instructions of its loops.

Triton's wheel carries ptxas and cuobjdump, so the instruction mix of a config can be read off here before spending
device time (to match the GPU's Triton, put that version first on PYTHONPATH: pip install --target DIR triton==X).

    python benchmarks/sass_count.py '{"DOWN": false, "BLOCK_N": 8, "NG": 4, "num_warps": 4}'
    python benchmarks/sass_count.py '{"FMT": 1, "G": 16, "W_SCALE": 1, "BLOCK_N": 64, "NG": 4}'    # nvfp4a16
    python benchmarks/sass_count.py '{"BLOCK_N": 8, "NG": 4, "PACKED": true, "PREFETCH": true, "X_QUAD": true,
        "ROUTE": true, "TOP_K": 8, "K_PAD": 8, "E_PAD": 128, "A_ROW_DIV": 8}'    # Qwen3-30B w4a16 GEMM1 at M=1
    python benchmarks/sass_count.py '{"FMT": 2, "BITS": 8, "GROUP_SCALES": false, "W_SCALE": 1, "A_SCALE": 1,
        "A_SRC": 2, "F16X2": true, "OUT_AMAX": 2, "BLOCK_N": 8, "NG": 4}'    # fp8-tensor GEMM1 on the rows kernel
    python benchmarks/sass_count.py '{"FMT": 2, "BITS": 8, "GROUP_SCALES": false, "W_SCALE": 1, "A_SCALE": 1,
        "A_SRC": 2, "F16X2": true, "OUT_AMAX": 2, "BLOCK_N": 16, "MMA": 8, "num_warps": 8}'    # its tensor-core body
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moequant.kernels._gemv_kernel import gemv_moe_kernel  # noqa: E402
from moequant.kernels._gemv_rows_kernel import gemv_rows_kernel  # noqa: E402

DEFAULTS = dict(DOWN=False, TOP_K=2, P=2, ACTIVATION=0, FMT=0, BITS=4, G=128, GROUP_SCALES=True, HAS_ZP=False,
                SCALE_KIND=0, W_SCALE=0, A_SCALE=0, SORTED=False, MUL_WEIGHT=False, HAS_BIAS=False, OUT_AMAX=False,
                OUT_PERM=False, EVEN=True, SPLIT_K=1, PART_SPLIT=False, STAGES=1, ZERO_SPLIT=False, ZB=16,
                PACKED=False, PREFETCH=False, A_ROW_DIV=2, UNIT=2, BLOCK_N=32, NG=2,
                ROUTE=False, K_PAD=2, E_PAD=16, SIGMOID=False, RENORMALIZE=False, X_QUAD=False, PDL=False,
                TRIGGER=False, XB=0)
# gemv_rows_kernel's own constexprs
ROWS_ONLY = ("EVEN", "SPLIT_K", "PART_SPLIT", "STAGES", "ZERO_SPLIT", "ZB", "PACKED", "PREFETCH",
             "A_ROW_DIV", "UNIT", "ROUTE", "K_PAD", "E_PAD", "SIGMOID", "RENORMALIZE", "X_QUAD", "PDL", "TRIGGER",
             "A_SRC", "F16X2", "EPS", "EMULATE_CAST", "MMA", "XB")
POINTERS = {"a_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*i8", "sidx_ptr": "*i32",
            "ids_ptr": "*i32", "c_ptr": "*fp32", "count_ptr": "*i32", "perm_ptr": "*i32", "bias_ptr": "*bf16"}
# Triton specializes integer arguments equal to 1: rows kernel (weights, scales and zero points rows-contiguous)
ONES_ROWS = ("stride_ak", "stride_wn", "stride_sn", "stride_zn", "stride_cn")
ONES_FP8_ROWS = ("stride_ak", "stride_wk", "stride_cn")  # the rows kernel's fp8 branch: K-contiguous words
ONES = ("stride_ak", "stride_wn", "stride_sg", "stride_cn")  # gemv_moe_kernel (K-contiguous scales)
FLOATS = ("route_scale",)
DIV16 = ("N", "C", "two23", "stride_am", "stride_we", "stride_wn", "stride_wk", "stride_se", "stride_sn", "stride_sg",
         "stride_cm")


def compile_sm90(consts: dict, num_warps: int):
    """gemv_rows_kernel for int and A16 fp4, else gemv_moe_kernel (as gemv.uses_rows_kernel), with the launcher's
    specializations."""
    rows = consts["FMT"] == 0 or consts["FMT"] == 1 and consts["A_SCALE"] == 0 or consts.get("F16X2", False)
    kernel = gemv_rows_kernel if rows else gemv_moe_kernel
    if not rows:
        consts = {k: v for k, v in consts.items() if k not in ROWS_ONLY}
    ones = (ONES_FP8_ROWS if consts.get("F16X2") else ONES_ROWS) if rows else ONES
    names = kernel.arg_names
    sig, cst = {}, dict(consts)
    for n in names:
        sig[n] = ("constexpr" if n in cst or n in ones else POINTERS.get(n, "*fp32") if n.endswith("_ptr")
                  else "fp32" if n in FLOATS else "i32")
    cst.update({n: 1 for n in ones})
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or n in DIV16}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in cst.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


def loops(sass: str):
    """(start, end, Counter of opcodes) of every backward branch's body."""
    ins = [(int(m.group(1), 16), m.group(2).strip())
           for m in re.finditer(r"/\*([0-9a-f]{4})\*/\s+(.*?);", sass)]
    for addr, text in ins:
        m = re.match(r"(@!?P\w+ )?BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(2), 16) < addr:
            lo = int(m.group(2), 16)
            body = [t for a, t in ins if lo <= a <= addr]
            yield lo, addr, collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = {**DEFAULTS, **(json.loads(argv[0]) if argv else {})}
    if cfg["FMT"] == 1:  # fp4 (rows kernel: int32 words of four rows' bytes and scales; else bytes)
        unit = "*i32" if cfg["A_SCALE"] == 0 else "*u8"
        POINTERS.update(w_ptr=unit, s_ptr=unit)
    elif cfg.get("F16X2"):  # fp8 on the rows kernel: int32 words, activations in high precision
        POINTERS.update(w_ptr="*i32", s_ptr="*fp32", a_ptr="*fp32" if cfg["DOWN"] else "*bf16")
    elif cfg["FMT"] == 2:  # fp8 weights (and fp8 activations when they have scales) as bytes
        POINTERS.update(w_ptr="*u8", s_ptr="*fp32", a_ptr="*u8" if cfg["A_SCALE"] else "*bf16")
    num_warps = cfg.pop("num_warps", 4)
    kernel = compile_sm90(cfg, num_warps)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    print(" ".join(re.findall(r"REG:\d+|SHARED:\d+", usage)))  # per thread / per program
    for lo, hi, ops in loops(sass):
        print(f"loop {lo:#x}-{hi:#x}: {sum(ops.values())} instructions:",
              " ".join(f"{k}:{v}" for k, v in ops.most_common(40)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
