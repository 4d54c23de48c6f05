"""The one-launch NVFP4 activation fake-quant (kernels/nvfp4_act.py) against its torch twin fp4_math.nvfp4_act_codes:
bit for bit, ties on e2m1 boundaries, zero blocks, saturating scales, static and dynamic scales (in the launch and
through torch for large tensors). Interpreter here; compiled on a GPU."""

import pytest
import torch

from moequant.kernels import nvfp4_act
from moequant.quantize import fp4_math as f4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def torch_twin(a: torch.Tensor, input_scale: torch.Tensor, out_dtype: torch.dtype):
    """On the CPU, whose division by a Python scalar is IEEE (CUDA torch multiplies by the reciprocal: 1 ulp off)."""
    a, input_scale = a.cpu(), input_scale.cpu()
    s = f4.nvfp4_act_scale(a, input_scale)
    q, scale, _ = f4.nvfp4_act_codes(a, s)
    return (q * scale).reshape(a.shape).to(out_dtype), s


def tricky_rows(cols: int, gen: torch.Generator) -> torch.Tensor:
    """Rows whose blocks hit every e2m1 rounding boundary exactly (with s = 1 and amax 6 a block's eff is 1), a zero
    block, a block that saturates the e4m3 scale, tiny values (subnormal e4m3 scales) and random ones."""
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0,
                         -6.0])
    rows = torch.randn(4, cols, generator=gen) * torch.tensor([[1.0], [30.0], [1e-3], [1e5]])
    rows[0, :16] = ties
    rows[1, 16:32] = 0.0
    rows[2, 32:48] = torch.linspace(-1e-6, 1e-6, 16)
    rows[3, :16] = ties * 1e6
    return rows


@pytest.mark.parametrize("shape", [(1, 2048), (8, 768), (3, 48), (2, 1040), (5, 3072)])
@pytest.mark.parametrize("scale", [1.0, 0.004, float("nan")])
@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                                (torch.float32, torch.float32), (torch.float16, torch.float16)])
def test_fake_quant_matches_torch_twin_bit_for_bit(shape, scale, in_dtype, out_dtype):
    gen = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    R, C = shape
    a = torch.randn(R, C, generator=gen) * torch.rand(R, 1, generator=gen) * 5
    tricky = tricky_rows(C, gen)
    a[: min(R, 4)] = tricky[: min(R, 4)]
    if in_dtype == torch.float16:
        a = a.clamp(-6e4, 6e4)
    a = a.to(in_dtype).to(DEVICE)
    s_in = torch.tensor([scale], device=DEVICE)
    out, s = nvfp4_act.fake_quant_act(a, s_in, out_dtype)
    ref, s_ref = torch_twin(a, s_in, out_dtype)
    assert out.dtype == out_dtype and s.dtype == torch.float32
    out, s = out.cpu(), s.cpu()
    assert torch.equal(s, s_ref), (s, s_ref)
    assert torch.equal(out, ref), (out - ref).abs().max()
    assert (out != 0).any()


def test_dynamic_scale_of_a_large_tensor_goes_through_torch_first(monkeypatch):
    """Above SCAN_MAX_LOADS the launch gets the dynamic scale from torch (one reduction) instead of every program
    scanning the tensor: the same bits."""
    monkeypatch.setattr(nvfp4_act, "SCAN_MAX_LOADS", 100)
    gen = torch.Generator().manual_seed(3)
    a = (torch.randn(6, 64, generator=gen) * 3).to(DEVICE)
    s_in = torch.tensor([float("nan")], device=DEVICE)
    out, s = nvfp4_act.fake_quant_act(a, s_in, torch.bfloat16)
    ref, s_ref = torch_twin(a, s_in, torch.bfloat16)
    assert torch.equal(s.cpu(), s_ref) and torch.equal(out.cpu(), ref)


def test_bad_shape_names_the_shape():
    with pytest.raises(ValueError, match=r"multiple of 16, got shape \(2, 40\)"):
        nvfp4_act.fake_quant_act(torch.zeros(2, 40, device=DEVICE), torch.tensor([1.0], device=DEVICE),
                                 torch.bfloat16)
