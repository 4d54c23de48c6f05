"""GPTQ (w4a16, act-order, static groups): beats RTN on layer-output SQNR of the demo model's experts on held-out text,
writes no g_idx and actorder "weight", falls back to RTN below the token threshold (listed in the report), and the
GPTQ solve itself lowers ||(W - Q) X|| against RTN with the same scales on a synthetic problem.

# R rows, C columns, T tokens
"""

import json
import math

import pytest
import torch

from _quant_helpers import decompress_folder
from moequant.data import demo_model_path
from moequant.quantize.api import quantize_checkpoint

GPTQ_CALIB = dict(num_samples=12, seq_len=128)


def _eval_hessians():
    """Per expert Linear: sum x x^T over tokens routed to it, from stdlib files of the training split (not the
    held-out calibration text)."""
    from moequant import open_checkpoint
    from moequant.data.stdlib_corpus import read_files, split_files
    from moequant.quantize.calibration import LayerCalibrator

    text = b"".join(read_files(split_files()[0][:6]).values())
    ids = torch.tensor(list(text[: 8 * 128]), dtype=torch.long).reshape(8, 128)
    ck = open_checkpoint(demo_model_path())
    cal = LayerCalibrator(ck, ids, hessian=True)
    out = {}
    for L in ck.moe_layers:
        out.update({m: s.hessian for m, s in cal.stats(L).items() if ".experts." in m})
    ck.close()
    return out


def _output_sqnr(src, deq, hessians, layer):
    sig = noise = 0.0
    for m, H in hessians.items():
        if f"layers.{layer}." not in m:
            continue
        W = src[m].double()
        E = W - deq[m].double()
        sig += float(torch.einsum("rc,cd,rd->", W, H.double(), W))
        noise += float(torch.einsum("rc,cd,rd->", E, H.double(), E))
    return 10 * math.log10(sig / noise)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    kw = dict(scheme="w4a16", group_size=64, progress=False, **GPTQ_CALIB)
    return {a: quantize_checkpoint(None, root / a, algo=a, **kw) for a in ("rtn", "gptq")}


def test_gptq_beats_rtn_on_layer_output_sqnr(runs):
    from moequant import open_checkpoint

    hessians = _eval_hessians()
    with open_checkpoint(demo_model_path()) as ck:
        src = {m: ck.index.read(m + ".weight") for m in hessians}
    rtn, gptq = decompress_folder(runs["rtn"]), decompress_folder(runs["gptq"])
    for L in range(4):
        s_rtn, s_gptq = _output_sqnr(src, rtn, hessians, L), _output_sqnr(src, gptq, hessians, L)
        print(f"layer {L}: output SQNR rtn {s_rtn:.2f} dB, gptq {s_gptq:.2f} dB")
        assert s_gptq > s_rtn + 0.5, L


def test_gptq_config_and_report(runs):
    qc = json.loads((runs["gptq"] / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["actorder"] == "weight"
    idx = json.loads((runs["gptq"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(k.endswith("g_idx") for k in idx)
    rep = json.loads((runs["gptq"] / "quantize_report.json").read_text())
    assert rep["algo"] == "gptq" and len(rep["tokens_per_module"]) == 96
    # every module's tokens are the routed ones: an expert sees a share of T*K
    T = GPTQ_CALIB["num_samples"] * GPTQ_CALIB["seq_len"]
    downs = [v for k, v in rep["tokens_per_module"].items() if k.startswith("model.layers.0.") and "down" in k]
    assert sum(downs) == T * 2


def test_rtn_fallback_below_token_threshold(tmp_path):
    out = quantize_checkpoint(None, tmp_path / "fb", scheme="w4a16", group_size=64, algo="gptq", progress=False,
                              num_samples=2, seq_len=64, min_tokens=10**6)
    rep = json.loads((out / "quantize_report.json").read_text())
    assert len(rep["fallbacks"]) == 96 and all("min_tokens" in v for v in rep["fallbacks"].values())
    # all RTN: identical bytes to a plain RTN run
    rtn = quantize_checkpoint(None, tmp_path / "rtn", scheme="w4a16", group_size=64, progress=False)
    assert (out / "model-00001-of-00001.safetensors").read_bytes() == \
        (rtn / "model-00001-of-00001.safetensors").read_bytes()


def test_gptq_solve_lowers_output_error():
    from moequant.quantize import gptq, rtn
    from moequant.quantize.schemes import ct_scheme

    gen = torch.Generator().manual_seed(0)
    R, C, T = 48, 256, 2048  # C = 2 blocks of 128; correlated inputs, where GPTQ helps
    X = torch.randn(T, C, generator=gen) @ torch.randn(C, C, generator=gen) * 0.1
    W = torch.randn(R, C, generator=gen)
    scheme = ct_scheme("w4a16", ["Linear"], 64)
    scale, zp = rtn.weight_qparams(W, scheme.weights)
    grid = scale.repeat_interleave(64, 1)
    H = X.t() @ X
    err = {}
    for act in (False, True):
        Q = gptq.gptq_quantize(W, H, T, scale, zp, 4, 64, act_order=act)
        q = torch.round(Q / grid)  # on the grid of the fixed scales, inside int4
        assert torch.equal(q * grid, Q) and int(q.min()) >= -8 and int(q.max()) <= 7
        err[act] = float(((W - Q) @ X.t()).pow(2).sum())
    Wr = torch.clamp(torch.round(W / grid), -8, 7) * grid  # RTN with the same scales
    e_rtn = float(((W - Wr) @ X.t()).pow(2).sum())
    assert err[False] < 0.7 * e_rtn and err[True] < 0.7 * e_rtn, (err, e_rtn)


def test_layer_by_layer_calibration_matches_transformers_forward():
    """Walking the layers one at a time (meta skeleton, layers read from the checkpoint, moequant routing) ends at the
    transformers model's own hidden states; every token is routed to K experts."""
    from transformers import AutoModelForCausalLM

    from moequant import open_checkpoint
    from moequant.quantize.calibration import LayerCalibrator, calibration_ids

    with open_checkpoint(demo_model_path()) as ck:
        ids = calibration_ids(ck.folder, None, 3, 64)
        cal = LayerCalibrator(ck, ids, hessian=False, batch=2)
        for L in ck.moe_layers:
            st = cal.stats(L)
            downs = [s.tokens for m, s in st.items() if m.endswith("down_proj") and ".experts." in m]
            assert sum(downs) == ids.numel() * ck.settings.top_k
            assert st[f"model.layers.{L}.self_attn.q_proj"].tokens == ids.numel()
        with pytest.raises(RuntimeError, match="already passed"):
            cal.stats(0)
    model = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32)
    with torch.no_grad():
        ref = model.model(ids).last_hidden_state
        got = model.model.norm(torch.cat(cal.hidden))
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
