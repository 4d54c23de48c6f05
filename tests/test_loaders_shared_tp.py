"""Quantized shared experts under tensor parallelism: each rank reads only its slice of every tensor from disk.

Qwen2-MoE (shared_expert + shared_expert_gate) and DeepSeek-V3 (shared_experts) checkpoints whose routed experts are
left unquantized and whose shared expert is stored in one format each. I_s shared intermediate, H hidden, P values
per int32 word, G group size. For every format, TP=2 ranks: (a) the ranks' weights are bit-identical to the TP=1
weights' rows (gate/up) and columns (down), and their block outputs sum to the TP=1 output; (b) each rank reads
exactly its half of every tensor that tensor parallelism splits (a whole copy of the ones it cannot split); (c) row and
column ranges that are not aligned to the words / groups read the covering words / groups, and act-order's down_proj
scales and zero points are read whole; both still bit-identical. Also: a wrong shape is an error naming the file and
tensor; GPTQ shared experts (converted whole, then cut) stay correct.
"""

import math
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from _quant_ckpt import BLOCK, ct_quant_config, router, write
from conftest import rel_err
from moequant.checkpoint import open_checkpoint
from moequant.loaders.safetensors_index import CheckpointError
from moequant.quantize import fp4_math as f4
from moequant.quantize import fp8_math as fm
from moequant.quantize import int_math as im

E, K, T = 4, 2, 8
IGNORE = ("lm_head", "re:.*mlp\\.gate$", "re:.*mlp\\.experts\\..*", "re:.*shared_expert_gate$")
NOT_READ = ("weight_shape", "input_scale", "input_global_scale", "input_zero_point")


def _int_linear(w, bits, G, sym, act_order, gen):
    """compressed-tensors pack-quantized tensors of w [N, K] (moequant's RTN; act-order: a random g_idx)."""
    N, Kin = w.shape
    perm = torch.randperm(Kin, generator=gen) if act_order else None
    q, s, zp = im.quantize_rtn(w if perm is None else w[:, perm], bits, G, symmetric=sym)
    out = {"weight_scale": s.to(torch.bfloat16), "weight_shape": torch.tensor([N, Kin])}
    if perm is not None:
        q_orig = torch.empty_like(q)
        q_orig[:, perm] = q
        q = q_orig
        g_idx = torch.empty(Kin, dtype=torch.int32)
        g_idx[perm] = torch.arange(Kin, dtype=torch.int32) // G
        out["weight_g_idx"] = g_idx
    out["weight_packed"] = im.pack_int32(q, bits)
    if zp is not None:
        out["weight_zero_point"] = im.pack_int32(zp, bits, dim=0)
    return out


def _linear(case, w, gen):
    fmt = case.removeprefix("unaligned-")
    if fmt.startswith("int"):
        bits = 8 if fmt == "int8" else 4
        G = {"int8": None, "unaligned-int4-asym": 24}.get(case, 32)
        return _int_linear(w, bits, G, sym="asym" not in fmt, act_order="actorder" in fmt, gen=gen)
    if "fp8" in fmt:
        kind = fmt.rsplit("-", 1)[-1]
        q, s = {"tensor": fm.quantize_tensor, "channel": fm.quantize_channel, "block": fm.quantize_block}[kind](w)
        if fmt.startswith("modelopt"):
            s = s.reshape(-1) if kind == "channel" else s.reshape(())
            return {"weight": q, "weight_scale": s, "input_scale": torch.tensor(0.02)}
        return {"weight": q, ("weight_scale_inv" if fmt.startswith("native") else "weight_scale"): s}
    if fmt.endswith("mxfp4"):
        p, s = f4.quantize_mxfp4(w)
        return {"weight_packed": p, "weight_scale": s}
    p, s, gs = f4.quantize_nvfp4(w)
    if fmt == "modelopt-nvfp4":
        return {"weight": p, "weight_scale": s, "weight_scale_2": (1.0 / gs.float()).reshape(()),
                "input_scale": torch.tensor(0.01)}
    out = {"weight_packed": p, "weight_scale": s, "weight_global_scale": gs.reshape(1)}
    if fmt == "ct-nvfp4":
        out["input_global_scale"] = torch.tensor([400.0])
    return out


CT_PRESET = {"int4": ("W4A16", 32, None), "int4-asym": ("W4A16_ASYM", 32, None),
             "int4-actorder": ("W4A16", 32, "group"), "int4-asym-actorder": ("W4A16_ASYM", 32, "group"),
             "int8": ("W8A16", None, None), "ct-fp8-tensor": ("FP8", "preset", None),
             "ct-fp8-channel": ("FP8_DYNAMIC", "preset", None), "ct-fp8-block": ("FP8_BLOCK", "preset", None),
             "ct-nvfp4": ("NVFP4", "preset", None), "ct-nvfp4a16": ("NVFP4A16", "preset", None),
             "ct-mxfp4": ("MXFP4A16", "preset", None), "unaligned-int4-asym": ("W4A16_ASYM", 24, None),
             "unaligned-ct-nvfp4a16": ("NVFP4A16", "preset", None),
             "unaligned-ct-fp8-block": ("FP8_BLOCK", "preset", None)}
# shape (H, I_s) per case: aligned ones give every rank whole words / groups / 128-blocks
SHAPES = {"unaligned-int4-asym": (96, 72), "unaligned-ct-nvfp4a16": (128, 80), "unaligned-ct-fp8-block": (128, 128)}


def _build(fmt, folder):
    H, Is = SHAPES.get(fmt, (128, 256))
    gen = torch.Generator().manual_seed(hash(fmt) % 1000)
    deepseek = fmt.startswith("native")
    shared = "shared_experts" if deepseek else "shared_expert"
    experts = {f"experts.{e}.{p}.weight": torch.randn(*s, generator=gen) * 0.1 for e in range(E)
               for p, s in (("gate_proj", (32, H)), ("up_proj", (32, H)), ("down_proj", (H, 32)))}
    extra = {}
    for p, s in (("gate_proj", (Is, H)), ("up_proj", (Is, H)), ("down_proj", (H, Is))):
        for k, v in _linear(fmt, torch.randn(*s, generator=gen) * 0.1, gen).items():
            extra[f"{BLOCK}.{shared}.{p}.{k}"] = v
    hq = None
    if deepseek:
        cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": H,
               "moe_intermediate_size": 32, "n_routed_experts": E, "num_experts_per_tok": K,
               "num_hidden_layers": 1, "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1,
               "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5, "hidden_act": "silu",
               "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                       "weight_block_size": [128, 128], "modules_to_not_convert": list(IGNORE[1:])}}
    else:
        extra[f"{BLOCK}.shared_expert_gate.weight"] = torch.randn(1, H, generator=gen) * 0.1
        cfg = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": H,
               "moe_intermediate_size": 32, "shared_expert_intermediate_size": Is, "num_experts": E,
               "num_experts_per_tok": K, "num_hidden_layers": 1, "norm_topk_prob": False}
        if fmt.startswith("modelopt"):
            algo = {"modelopt-nvfp4": "NVFP4", "modelopt-fp8-tensor": "FP8",
                    "modelopt-fp8-channel": "FP8_PER_CHANNEL_PER_TOKEN"}[fmt]
            hq = {"producer": {"name": "modelopt"},
                  "quantization": {"quant_algo": algo, "group_size": 16,
                                   "exclude_modules": ["lm_head", "*mlp.gate", "*mlp.experts*", "*shared_expert_gate"]}}
        else:
            preset, G, act = CT_PRESET[fmt]
            cfg["quantization_config"] = ct_quant_config(preset, G, act, ignore=IGNORE)
    return write(folder, experts, cfg, extra=extra, hf_quant=hq, router_w=router(E, H)), shared, H, Is


ALIGNED = ["int4", "int4-asym", "int4-actorder", "int4-asym-actorder", "int8", "ct-fp8-tensor", "ct-fp8-channel",
           "ct-fp8-block", "native-fp8-block", "modelopt-fp8-tensor", "modelopt-fp8-channel", "ct-nvfp4",
           "ct-nvfp4a16", "modelopt-nvfp4", "ct-mxfp4"]


def _block(ck, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ck.moe_block(0, dtype=torch.float32, backend="reference", **kw)


def _shared_read(ck, rank, tp):
    """(the rank's shared MLP, bytes it read)."""
    before = ck.index.bytes_read
    mlp, _ = ck._shared(BLOCK, torch.float32, rank, tp)
    return mlp, ck.index.bytes_read - before


def _check_ranks(ck, shared):
    """(a): bit-identical slices, outputs summing to TP=1; returns the bytes each rank read and TP=1's."""
    assert ck.format.module_scheme(f"{BLOCK}.{shared}.down_proj").scheme != "unquantized"
    assert ck.layer_scheme(0).scheme == "unquantized"
    full, whole_bytes = _shared_read(ck, 0, 1)
    Is = full.gate_proj.weight.shape[0]
    x = torch.randn(T, full.gate_proj.weight.shape[1], generator=torch.Generator().manual_seed(3))
    got = []
    for r in range(2):
        mlp, n = _shared_read(ck, r, 2)
        rows = slice(r * Is // 2, (r + 1) * Is // 2)
        assert torch.equal(mlp.gate_proj.weight, full.gate_proj.weight[rows])
        assert torch.equal(mlp.up_proj.weight, full.up_proj.weight[rows])
        assert torch.equal(mlp.down_proj.weight, full.down_proj.weight[:, rows])
        got.append(n)
    ref = _block(ck)(x)
    total = sum(_block(ck, tp_rank=r, tp_size=2)(x) for r in range(2))
    assert rel_err(total, ref) <= 1e-5
    return got, whole_bytes


def _tensors(ck, shared):
    for key in ck.index.with_prefix(f"{BLOCK}.{shared}."):
        proj, suffix = key.split(".")[-2:]
        if suffix not in NOT_READ:
            yield proj, suffix, ck.index.info(key)


@pytest.mark.parametrize("fmt", ALIGNED)
def test_shared_expert_rank_reads_its_half(tmp_path, fmt):
    folder, shared, H, Is = _build(fmt, tmp_path)
    act_order = "actorder" in fmt
    with open_checkpoint(folder) as ck:
        got, whole_bytes = _check_ranks(ck, shared)
        gate = 0 if fmt.startswith("native") else H * 4  # Qwen2-MoE's shared_expert_gate (fp32 [1, H]), whole
        expected, full = gate, gate
        for proj, suffix, info in _tensors(ck, shared):
            n = math.prod(info.shape)
            whole = n == 1 or (suffix == "weight_g_idx" and proj != "down_proj") or \
                (act_order and proj == "down_proj" and suffix in ("weight_scale", "weight_zero_point")) or \
                (proj == "down_proj" and suffix == "weight_scale" and n == info.shape[0])  # per-row scales
            expected += info.nbytes // (1 if whole else 2)
            full += info.nbytes
        assert whole_bytes == full
        assert got == [expected, expected], (got, expected, full)
        assert expected <= 0.56 * full  # (b) about half


def test_unaligned_int4_reads_covering_words_and_groups(tmp_path):
    """H = 96, I_s = 72, G = 24, P = 8: rank rows/columns [0, 36) and [36, 72) end mid-word and mid-group, so each
    rank reads the covering int32 words (zero points along the rows, packed weight along down_proj's columns) and
    groups (down_proj's scales / zero points); results stay bit-identical."""
    folder, shared, H, Is = _build("unaligned-int4-asym", tmp_path)
    with open_checkpoint(folder) as ck:
        got, full = _check_ranks(ck, shared)
        half, P = Is // 2, 8
        word = {0: (0, 5), 1: (4, 9)}  # covering words of rows / columns [36 r, 36 (r + 1))
        group = {0: (0, 2), 1: (1, 3)}  # covering groups of 24 of down_proj's columns
        for r in range(2):
            w0, w1 = word[r]
            g0, g1 = group[r]
            gate_up = 2 * (half * (H // P) * 4 + half * (H // 24) * 2 + (w1 - w0) * (H // 24) * 4)
            down = H * (w1 - w0) * 4 + H * (g1 - g0) * 2 + (H // P) * (g1 - g0) * 4
            assert got[r] == gate_up + down + H * 4
            assert got[r] < full
        assert sum(got) > full - H * 4  # the overlap is read twice


def test_unaligned_fp4_and_fp8_block_read_covering_groups_and_blocks(tmp_path):
    """nvfp4 I_s = 80: down_proj columns [0, 40) / [40, 80) read the covering 16-groups ([0, 48) / [32, 80));
    fp8-block I_s = 128: a rank's 64 rows / columns lie in one 128-block, whose scale it reads whole."""
    folder, shared, H, Is = _build("unaligned-ct-nvfp4a16", tmp_path / "nv")
    with open_checkpoint(folder) as ck:
        got, full = _check_ranks(ck, shared)
        half = Is // 2
        gate_up = 2 * (half * H // 2 + half * H // 16 + 4)  # + weight_global_scale, fp32 [1]
        down = H * 48 // 2 + H * 3 + 4
        assert got == [gate_up + down + H * 4] * 2
    folder, shared, H, Is = _build("unaligned-ct-fp8-block", tmp_path / "fp8")
    with open_checkpoint(folder) as ck:
        got, full = _check_ranks(ck, shared)
        assert got == [3 * (64 * 128 + 4) + H * 4] * 2  # half of each fp8 weight + its one block scale


def test_act_order_down_proj_reads_scales_and_zero_points_whole(tmp_path):
    folder, shared, H, Is = _build("int4-asym-actorder", tmp_path)
    with open_checkpoint(folder) as ck:
        before = ck.index.bytes_read
        ck._dense(f"{BLOCK}.{shared}.down_proj", (H, Is), (slice(None), slice(Is // 2, Is)))
        read = ck.index.bytes_read - before
        info = {s: ck.index.info(f"{BLOCK}.{shared}.down_proj.{s}").nbytes
                for s in ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx")}
        assert read == info["weight_packed"] // 2 + info["weight_g_idx"] // 2 + info["weight_scale"] + \
            info["weight_zero_point"]


def test_wrong_shared_tensor_shape_is_named_before_any_region_read(tmp_path):
    folder, shared, H, Is = _build("int4-asym", tmp_path)
    t = load_file(folder / "model.safetensors")
    t[f"{BLOCK}.{shared}.down_proj.weight_scale"] = torch.ones(H, 3, dtype=torch.bfloat16)
    save_file(t, folder / "model.safetensors")
    with open_checkpoint(folder) as ck, pytest.raises(
            CheckpointError, match="model.safetensors: tensor model.layers.0.mlp.shared_expert.down_proj.weight_scale "
                                   "has shape \\[128, 3\\], expected \\[128, 8\\]"):
        ck._shared(BLOCK, torch.float32, 1, 2)


def test_gptq_shared_expert_is_converted_whole_then_cut(tmp_path):
    """GPTQ's qweight [K/P, N] is converted to the compressed-tensors layout whole: still correct per rank."""
    import json

    from _quant_ckpt import ct_to_gptq

    folder, shared, H, Is = _build("int4-asym", tmp_path)
    t = load_file(folder / "model.safetensors")
    for p in ("gate_proj", "up_proj", "down_proj"):
        pre = f"{BLOCK}.{shared}.{p}."
        ct = {k[len(pre):]: t.pop(k) for k in list(t) if k.startswith(pre)}
        t |= {pre + k: v for k, v in ct_to_gptq(ct, 4, "gptq_v2").items()}
    save_file(t, folder / "model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                                  "sym": False, "checkpoint_format": "gptq_v2",
                                  "dynamic": {"-:.*mlp\\.experts\\..*": {}, "-:.*shared_expert_gate": {}}}
    (folder / "config.json").write_text(json.dumps(cfg))
    with open_checkpoint(folder) as ck:
        got, full = _check_ranks(ck, shared)
        assert got == [full, full]
