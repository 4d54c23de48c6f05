"""NVFP4 activation fake-quant in one launch (_nvfp4_act_kernel.py), for nvfp4's fp4 activations (fp4_gemm).

The torch twin (fp4_math.nvfp4_act_codes) is about twenty elementwise launches; at decode (one token) they cost far
more than the two GEMVs they feed. a [R, C] (C a multiple of 16) -> (a_q [R, C] in out_dtype, s [1] fp32) with
a ~= a_q * s; input_scale [1] fp32, NaN meaning dynamic (s from the tensor's own amax).
"""

from __future__ import annotations

import os

import torch
import triton

from moequant.kernels._nvfp4_act_kernel import nvfp4_fake_quant_kernel
from moequant.quantize import fp4_math as f4

# a dynamic scale taken inside the launch while the programs' scans of the whole tensor (R programs x R * C elements)
# stay below this many loads (decode: Qwen3-30B's GEMM2 input 8 x 8 x 768); else torch takes it first
SCAN_MAX_LOADS = 1 << 22
MAX_CHUNK = 1024  # columns per program and step


def fake_quant_act(a: torch.Tensor, input_scale: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """(a_q, s) as fp4_gemm.quantize_act_nvfp4 returns them, bit-exact with it. A dynamic scale (NaN) of a tensor
    whose in-launch scans would exceed SCAN_MAX_LOADS is taken by torch first (one reduction; no host sync)."""
    if a.dim() != 2 or a.shape[1] % f4.NVFP4_GROUP:
        raise ValueError(f"nvfp4 activation quantization: expected a [rows, columns] tensor with columns a multiple "
                         f"of {f4.NVFP4_GROUP}, got shape {tuple(a.shape)}")
    a = a if a.stride(1) == 1 else a.contiguous()
    R, C = a.shape
    scan = R * R * C <= SCAN_MAX_LOADS
    s_in = input_scale.float().reshape(1) if scan else f4.nvfp4_act_scale(a, input_scale)
    out = torch.empty(R, C, dtype=out_dtype, device=a.device)
    s_out = torch.empty(1, dtype=torch.float32, device=a.device)
    if R == 0:
        return out, s_in.clone()
    nvfp4_fake_quant_kernel[(R,)](a, out, s_in, s_out, R, C, a.stride(0), out.stride(0), SCAN=scan,
                                  EMULATE_CAST=os.environ.get("TRITON_INTERPRET") == "1",
                                  BC=min(MAX_CHUNK, triton.next_power_of_2(C)), num_warps=4)
    return out, s_out
