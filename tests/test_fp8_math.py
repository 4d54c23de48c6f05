"""fp8 format math (pure torch): RTN round trips, the w1/w3 shared-scale requantization, activation quantizers."""

import pytest
import torch

from moequant.quantize import fp8_math as fm


@pytest.fixture(autouse=True)
def _seed():
    # fixed inputs: a flip of one fp8 rounding (fp32 sums in another order landing on the other side of a
    # midpoint) moves a small output by ~1e-3, so runs must not draw new data each time
    torch.manual_seed(0)



def fp8_step(v: torch.Tensor) -> torch.Tensor:
    """Spacing of the e4m3 grid at |v| (3 mantissa bits; subnormal spacing 2^-9 below 2^-6)."""
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0**-6)))
    return 2.0 ** (e - 3)


def test_requantized_halves_within_one_fp8_step():
    # w3's scale 4x w1's: w1 moves to a coarser grid, w3 keeps its values exactly
    g = torch.Generator().manual_seed(0)
    w1, w3 = torch.randn(64, 96, generator=g), 4 * torch.randn(64, 96, generator=g)
    q1, s1 = fm.quantize_tensor(w1)
    q3, s3 = fm.quantize_tensor(w3)
    r1, r3, s = fm.requantize_shared(q1, s1, q3, s3)
    assert torch.equal(s, torch.maximum(s1, s3))
    for q, sc, r in ((q1, s1, r1), (q3, s3, r3)):
        orig = fm.dequantize_fp8(q, sc)
        new = fm.dequantize_fp8(r, s)
        assert ((new - orig).abs() <= fp8_step(orig / s) * s * 0.5 + 1e-12).all()  # half a step = RTN bound
    assert torch.equal(r3.view(torch.uint8), q3.view(torch.uint8))


@pytest.mark.parametrize("rows,cols", [(128, 256), (200, 128), (1, 128)])  # ceil(R/G) rows of blocks; one row
def test_block_round_trip_and_scale_shape(rows, cols):
    w = torch.randn(rows, cols)
    q, s = fm.quantize_block(w)
    assert s.shape == (-(-rows // 128), cols // 128)
    full = fm.expand_block_scale(s, rows, cols)
    deq = fm.dequantize_fp8(q, full)
    assert ((deq - w).abs() <= fp8_step(w / full) * full * 0.5 * (1 + 1e-6)).all()  # RTN: half a step
    amax_block = w.abs().amax()
    assert deq.abs().max() <= amax_block * (1 + 1e-6)


def test_block_needs_multiple_of_128_columns():
    with pytest.raises(ValueError, match="multiple of 128"):
        fm.quantize_block(torch.randn(128, 100))


def test_zero_weight_gets_positive_scale():
    # an expert calibration never touched (all zeros): scale eps, never 0
    q, s = fm.quantize_tensor(torch.zeros(4, 8))
    assert s.item() > 0 and torch.all(q.float() == 0)
    _, sc = fm.quantize_channel(torch.zeros(3, 8))
    assert torch.all(sc > 0)


@pytest.mark.parametrize("granularity", ["tensor", "token", "group"])
def test_act_quant_scales_hit_448(granularity):
    x = torch.randn(5, 256)
    x[2] = 0  # an all-zero token: scale ACT_EPS / 448, values 0
    q, s = fm.act_quant_ref(x, granularity)
    assert q.dtype == fm.FP8_DTYPE and torch.isfinite(s).all() and (s > 0).all()
    assert q.float().abs().max() == 448
    assert torch.all(q[2].float() == 0)
    fq = fm.act_fake_quant(x, granularity)
    assert (fq - x).norm() / x.norm() < 0.05


def test_static_act_scale_clamps():
    x = torch.tensor([[1.0, -1000.0, 0.5]])
    q, s = fm.act_quant_ref(x, "tensor", torch.tensor([0.5]))
    assert q.float().tolist() == [[2.0, -448.0, 1.0]] and s.item() == 0.5
