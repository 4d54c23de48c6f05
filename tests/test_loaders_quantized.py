"""Quantized checkpoints of every producer format, built in the test, opened with open_checkpoint and compared with
a float64 per-expert loop on the producer's own dequantized weights (compressed-tensors' decompression for CT,
ModelOpt and GPTQ twins of the same tensors; transformers' MXFP4 conversion for gpt-oss).

E experts, K top-k, H hidden, I intermediate, T tokens. fp32, backend "reference". Weight-only schemes: <= 1e-3
relative error; activation-quantized schemes (fp8, nvfp4) against the fake-quant reference: <= 1e-2.
"""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import _fp4_ckpt
import _fp8_ckpt
import _int_ckpt
from _quant_ckpt import BLOCK, ct_quant_config, ct_to_gptq, qwen3_config, reference, router, softmax_topk, stack, write
from conftest import rel_err
from moequant.checkpoint import open_checkpoint
from moequant.loaders.safetensors_index import CheckpointError
from moequant.quantize import fp4_math as f4
from moequant.quantize import fp8_math as fm

E, K, H, I, T = 4, 2, 128, 128, 8  # multiples of 128 for fp8 blocks; groups of 32 leave 4 per row
MODELOPT = {"producer": {"name": "modelopt"}, "quantization": {"exclude_modules": ["lm_head"]}}


def _gptq_qc(fmt, sym=True, desc_act=True):
    return {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": desc_act, "sym": sym,
            "checkpoint_format": fmt}


def _strip(sd):
    return {k.removeprefix(f"{BLOCK}."): v for k, v in sd.items()}


def _shared_w13_scale(sd, w13):
    """fp8 per-tensor: vLLM-style layers keep one scale for w1 and w3, max(s1, s3); the other half's dequantized
    weights re-rounded to fp8 on that scale (torch's own e4m3 cast)."""
    out = w13.clone()
    for e in range(E):
        s1, s3 = (sd[f"experts.{e}.{p}.weight_scale"].float() for p in ("gate_proj", "up_proj"))
        s = torch.maximum(s1, s3)
        out[e] = (w13[e] / s).to(torch.float8_e4m3fn).float() * s
    return out


def _build(name, folder, tmp):
    """-> (folder, w13, w2, activation-quantized?) for one case."""
    if name.startswith(("ct-w4a16", "ct-w8a16", "gptq")):
        preset, G, act = {"ct-w4a16-actorder": ("W4A16", 32, True), "ct-w4a16-asym": ("W4A16_ASYM", 32, True),
                          "ct-w4a16": ("W4A16", 32, False), "gptq-v2-noact": ("W4A16", 32, False),
                          "ct-w8a16": ("W8A16", None, False), "gptq-v1": ("W4A16", 32, True),
                          "gptq-v2": ("W4A16", 32, True), "gptq-v2-asym": ("W4A16_ASYM", 32, True)}[name]
        experts = _int_ckpt.build_experts(E, H, I, _int_ckpt.preset(preset, G), act_order=act, seed=1)
        w13, w2 = _int_ckpt.dense(experts)
        sd = _int_ckpt.state_dict(experts)
        if name.startswith("gptq"):
            fmt = "gptq" if name == "gptq-v1" else "gptq_v2"
            sd = {f"experts.{e}.{lin}.{k}": v for e, ex in enumerate(experts) for lin, t in ex.items()
                  for k, v in ct_to_gptq(t, 4, fmt).items()}
            cfg = qwen3_config(E, K, H, I, quantization_config=_gptq_qc(fmt, sym=not name.endswith("asym"),
                                                                        desc_act=act))
        else:
            cfg = qwen3_config(E, K, H, I, quantization_config=ct_quant_config(preset, G, "group" if act else None))
        return write(folder, sd, cfg, shards=2), w13, w2, False
    if name in ("ct-fp8", "ct-fp8-dynamic", "ct-fp8-block", "modelopt-fp8", "modelopt-fp8-channel",
                "native-fp8-block"):
        preset = {"ct-fp8": "FP8", "modelopt-fp8": "FP8", "ct-fp8-dynamic": "FP8_DYNAMIC",
                  "modelopt-fp8-channel": "FP8_DYNAMIC"}.get(name, "FP8_BLOCK")
        sd, w13, w2 = _fp8_ckpt.build_checkpoint(preset, E, H, I, tmp / f"{name}.safetensors", seed=2)
        sd = _strip(sd)
        if preset == "FP8":
            w13 = _shared_w13_scale(sd, w13)
        cfg = qwen3_config(E, K, H, I, quantization_config=ct_quant_config(preset))
        hq = None
        if name.startswith("modelopt"):
            sd = {k: (v.float().reshape(-1) if name.endswith("channel") else v.float().reshape(()))
                  if k.endswith(("weight_scale", "input_scale")) else v for k, v in sd.items()}
            cfg = qwen3_config(E, K, H, I)
            algo = "FP8" if name == "modelopt-fp8" else "FP8_PER_CHANNEL_PER_TOKEN"
            hq = {**MODELOPT, "quantization": {**MODELOPT["quantization"], "quant_algo": algo}}
        elif name == "native-fp8-block":
            sd = {k.replace("weight_scale", "weight_scale_inv"): v for k, v in sd.items()}
            cfg = qwen3_config(E, K, H, I, quantization_config={
                "quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]})
        return write(folder, sd, cfg, hf_quant=hq), w13, w2, True
    preset = {"ct-nvfp4": "nvfp4", "ct-nvfp4a16": "nvfp4a16", "ct-mxfp4": "mxfp4", "modelopt-nvfp4": "nvfp4"}[name]
    sd, deq = _fp4_ckpt.build_checkpoint(preset, E, H, I, seed=3)
    w13, w2 = stack(deq, E)
    cfg = qwen3_config(E, K, H, I, quantization_config=ct_quant_config(
        {"nvfp4": "NVFP4", "nvfp4a16": "NVFP4A16", "mxfp4": "MXFP4A16"}[preset]))
    hq = None
    if name == "modelopt-nvfp4":
        sd = {k.replace("weight_packed", "weight"): v for k, v in _fp4_ckpt.to_modelopt(sd).items()}
        cfg, hq = qwen3_config(E, K, H, I), {**MODELOPT, "quantization": {**MODELOPT["quantization"],
                                                                         "quant_algo": "NVFP4", "group_size": 16}}
    return write(folder, sd, cfg, hf_quant=hq), w13, w2, preset == "nvfp4"


CASES = {  # case: (scheme, source)
    "ct-w4a16-actorder": ("w4a16", "compressed-tensors"), "ct-w4a16-asym": ("w4a16-asym", "compressed-tensors"),
    "ct-w4a16": ("w4a16", "compressed-tensors"), "gptq-v2-noact": ("w4a16", "gptq"),
    "ct-w8a16": ("w8a16", "compressed-tensors"), "gptq-v1": ("w4a16", "gptq"), "gptq-v2": ("w4a16", "gptq"),
    "gptq-v2-asym": ("w4a16-asym", "gptq"),
    "ct-fp8": ("fp8-tensor", "compressed-tensors"), "ct-fp8-dynamic": ("fp8-channel", "compressed-tensors"),
    "ct-fp8-block": ("fp8-block", "compressed-tensors"), "modelopt-fp8": ("fp8-tensor", "modelopt"),
    "modelopt-fp8-channel": ("fp8-channel", "modelopt"), "native-fp8-block": ("fp8-block", "fp8"),
    "ct-nvfp4": ("nvfp4", "compressed-tensors"), "ct-nvfp4a16": ("nvfp4a16", "compressed-tensors"),
    "ct-mxfp4": ("mxfp4", "compressed-tensors"), "modelopt-nvfp4": ("nvfp4", "modelopt"),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _build(name, tmp_path_factory.mktemp(name), tmp_path_factory.mktemp("raw"))
        return cache[name]

    return get


def _x(seed=5):
    return torch.randn(T, H, generator=torch.Generator().manual_seed(seed))


def _block(ck, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp8 static: per-expert input scales differ (collapsed to their max)
        return ck.moe_block(0, dtype=torch.float32, backend="reference", **kw)


@pytest.mark.parametrize("name", list(CASES))
def test_quantized_checkpoint_matches_reference(ckpts, name):
    folder, w13, w2, act_quant = ckpts(name)
    x = _x()
    with open_checkpoint(folder) as ck:
        assert ck.index.bytes_read == ck.index.header_bytes
        ls = ck.layer_scheme(0)
        assert (ls.scheme, ls.source) == CASES[name]
        block = _block(ck)
        out = block(x)
        ref = reference(x, router(E, H), w13, w2, K, layer=block.experts if act_quant else None)
        assert rel_err(out, ref) <= (1e-2 if act_quant else 1e-3), name
        if act_quant:  # the activation quantization is on: plain dequantized weights give another answer
            assert rel_err(out, reference(x, router(E, H), w13, w2, K)) > 1e-4


@pytest.mark.parametrize("gptq, ct", [("gptq-v1", "ct-w4a16-actorder"), ("gptq-v2", "ct-w4a16-actorder"),
                                      ("gptq-v2-asym", "ct-w4a16-asym"), ("gptq-v2-noact", "ct-w4a16")])
def test_gptq_loads_bit_exactly_as_its_compressed_tensors_twin(ckpts, gptq, ct):
    x = _x(6)
    with open_checkpoint(ckpts(gptq)[0]) as a, open_checkpoint(ckpts(ct)[0]) as b:
        for kw in ({}, {"tp_rank": 1, "tp_size": 2}):
            ea, eb = _block(a, **kw).experts, _block(b, **kw).experts
            for p, q in zip(ea.parameters(), eb.parameters()):
                assert torch.equal(p.float(), q.float())
            assert torch.equal(_block(a, **kw)(x), _block(b, **kw)(x))


def _expected_bytes(ck, experts, tp, act_order):
    """Bytes a rank reads: the router, and of each of its experts' tensors its 1/tp share, except the tensors
    tensor parallelism does not split (weight_shape, w1/w3's g_idx, w2's act-order scales)."""
    total = ck.index.info(f"{BLOCK}.gate.weight").nbytes
    for key in ck.index.with_prefix(f"{BLOCK}.experts."):
        e, proj, suffix = key.split(".")[-3:]
        if int(e) not in experts:
            continue
        whole = suffix == "weight_shape" or (suffix == "weight_g_idx" and proj != "down_proj") or \
            (act_order and proj == "down_proj" and suffix in ("weight_scale", "weight_zero_point"))
        total += ck.index.info(key).nbytes // (1 if whole else tp)
    return total


@pytest.mark.parametrize("name", ["ct-w4a16-actorder", "ct-w4a16-asym", "ct-w4a16", "ct-fp8", "gptq-v1",
                                  "gptq-v2-noact", "modelopt-fp8-channel", "ct-nvfp4", "modelopt-nvfp4", "ct-mxfp4"])
@pytest.mark.parametrize("tp_size, ep_size", [(2, 1), (1, 2), (2, 2)])
def test_parallel_ranks_sum_to_the_full_block_and_read_only_their_bytes(ckpts, name, tp_size, ep_size):
    folder = ckpts(name)[0]
    x = _x(7)
    with open_checkpoint(folder) as ck:
        full = _block(ck)(x)
        total = torch.zeros_like(full)
        for ep in range(ep_size):
            for tp in range(tp_size):
                before = ck.index.bytes_read
                block = _block(ck, tp_rank=tp, tp_size=tp_size, ep_rank=ep, ep_size=ep_size)
                local = {block.experts.global_expert_id(i) for i in range(block.experts.local_num_experts)}
                if name.startswith("ct-w4a16"):  # exactly this rank's share of its experts' tensors
                    act_order = name != "ct-w4a16"
                    assert ck.index.bytes_read - before == _expected_bytes(ck, local, tp_size, act_order)
                total += block(x)
        # fp8-channel quantizes activations per token, dynamically: a tensor-parallel rank scales the intermediate by
        # the max over its own I / tp columns, so the ranks' sum differs from the full layer by quantization noise
        per_token = name == "modelopt-fp8-channel" and tp_size > 1
        assert rel_err(total, full) < (3e-2 if per_token else 1e-5)


# --- shared experts stored quantized: dequantized on load ----------------------------------------------------------
def test_qwen2_moe_int4_shared_expert_and_gate_are_dequantized(tmp_path):
    scheme = _int_ckpt.preset("W4A16", 32)
    experts = _int_ckpt.build_experts(E, H, I, scheme, seed=4)
    w13, w2 = _int_ckpt.dense(experts)
    g = torch.Generator().manual_seed(9)
    Is = 64
    shared = {n: _int_ckpt.compress_linear(torch.randn(*s, generator=g) * 0.1, scheme)
              for n, s in (("shared_expert.gate_proj", (Is, H)), ("shared_expert.up_proj", (Is, H)),
                           ("shared_expert.down_proj", (H, Is)), ("shared_expert_gate", (1, H)))}
    extra = {f"{BLOCK}.{n}.{k}": v for n, t in shared.items() for k, v in t.items() if k != "dequant"}
    cfg = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": H,
           "moe_intermediate_size": I, "shared_expert_intermediate_size": Is, "num_experts": E,
           "num_experts_per_tok": K, "num_hidden_layers": 1, "norm_topk_prob": False,
           "quantization_config": ct_quant_config("W4A16", 32)}
    folder = write(tmp_path, _int_ckpt.state_dict(experts), cfg, extra=extra)
    x = _x(8)
    w, ids = softmax_topk(x, router(E, H), K, renormalize=False)
    from _moe_loop import moe_loop_f64

    d = {n: t["dequant"].double() for n, t in shared.items()}
    xs = x.double()
    s = (torch.nn.functional.silu(xs @ d["shared_expert.gate_proj"].T) * (xs @ d["shared_expert.up_proj"].T)) \
        @ d["shared_expert.down_proj"].T
    ref = moe_loop_f64(x, w13, w2, w, ids) + torch.sigmoid(xs @ d["shared_expert_gate"].T) * s
    with open_checkpoint(folder) as ck:
        assert ck.shared_intermediate_size == Is and ck.scheme_of(0).scheme == "w4a16"
        assert rel_err(_block(ck)(x), ref) <= 1e-3
        total = sum(_block(ck, tp_rank=r, tp_size=2)(x) for r in range(2))
        assert rel_err(total, ref) <= 1e-3


def test_deepseek_v3_native_fp8_block_with_fp8_shared_experts(ckpts, tmp_path):
    _, w13, w2, _ = ckpts("native-fp8-block")
    sd = load_file(ckpts("native-fp8-block")[0] / "model.safetensors")
    g = torch.Generator().manual_seed(11)
    extra, dense = {}, {}
    for n, shape in (("gate_proj", (H, H)), ("up_proj", (H, H)), ("down_proj", (H, H))):
        q, s = fm.quantize_block(torch.randn(*shape, generator=g) * 0.1)
        extra[f"{BLOCK}.shared_experts.{n}.weight"] = q
        extra[f"{BLOCK}.shared_experts.{n}.weight_scale_inv"] = s
        dense[n] = fm.dequantize_fp8(q, fm.expand_block_scale(s, *shape)).double()
    extra[f"{BLOCK}.gate.e_score_correction_bias"] = torch.randn(E, generator=g) * 0.3
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": H,
           "moe_intermediate_size": I, "n_routed_experts": E, "num_experts_per_tok": K, "num_hidden_layers": 1,
           "first_k_dense_replace": 0, "n_group": 2, "topk_group": 1, "topk_method": "noaux_tc",
           "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5, "hidden_act": "silu",
           "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128]}}
    experts = {k.removeprefix(f"{BLOCK}."): v for k, v in sd.items() if ".experts." in k}
    folder = write(tmp_path, experts, cfg, extra=extra)
    x = _x(9)
    with open_checkpoint(folder) as ck:
        assert ck.shared_intermediate_size == H and ck.has_correction_bias
        block = _block(ck)
        out = block(x)
        block.experts.e_score_correction_bias = block.e_score_correction_bias
        w, ids = block.experts.route(x, block.router_logits(x))  # routing itself: test_loaders_models
        from test_fp8_methods import fake_quant_loop

        xs = x.double()
        act = torch.nn.functional.silu(xs @ dense["gate_proj"].T) * (xs @ dense["up_proj"].T)
        shared = act @ dense["down_proj"].T
        ref = fake_quant_loop(block.experts, x, w13, w2, w, ids) + shared
        assert rel_err(out, ref) <= 1e-2
        del extra[f"{BLOCK}.shared_experts.up_proj.weight_scale_inv"]
    folder = write(tmp_path / "bad", experts, cfg, extra=extra)
    with open_checkpoint(folder) as ck, pytest.raises(
            CheckpointError, match="model.safetensors: missing tensor model.layers.0.mlp.shared_experts.up_proj."
                                   "weight_scale or .*up_proj.weight_scale_inv"):
        _block(ck)


# --- gpt-oss MXFP4 blocks/scales -----------------------------------------------------------------------------------
def _gpt_oss(folder, tensors, mxfp4):
    Hg, Ig = 64, 64
    cfg = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": Hg,
           "intermediate_size": Ig, "num_local_experts": E, "num_experts_per_tok": K, "num_hidden_layers": 1}
    if mxfp4:
        cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_gpt_oss_mxfp4_matches_transformers_dequantization(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    Hg, Ig = 64, 64
    g = torch.Generator().manual_seed(12)
    gu_packed, gu_scale = f4.quantize_mxfp4(torch.randn(E, 2 * Ig, Hg, generator=g) * 0.5)
    dn_packed, dn_scale = f4.quantize_mxfp4(torch.randn(E, Hg, Ig, generator=g) * 0.5)
    p = "model.layers.0.mlp"
    common = {f"{p}.router.weight": torch.randn(E, Hg, generator=g), f"{p}.router.bias": torch.randn(E, generator=g),
              f"{p}.experts.gate_up_proj_bias": torch.randn(E, 2 * Ig, generator=g) * 0.3,
              f"{p}.experts.down_proj_bias": torch.randn(E, Hg, generator=g) * 0.3}
    blocks = {f"{p}.experts.gate_up_proj_blocks": gu_packed.reshape(E, 2 * Ig, Hg // 32, 16),
              f"{p}.experts.gate_up_proj_scales": gu_scale,
              f"{p}.experts.down_proj_blocks": dn_packed.reshape(E, Hg, Ig // 32, 16),
              f"{p}.experts.down_proj_scales": dn_scale}
    q = _gpt_oss(tmp_path / "mxfp4", {**common, **blocks}, mxfp4=True)
    # transformers' own dequantization, already in the bf16 release's layout [E, in, out]
    gu = convert_moe_packed_tensors(blocks[f"{p}.experts.gate_up_proj_blocks"],
                                    blocks[f"{p}.experts.gate_up_proj_scales"], dtype=torch.float32)
    dn = convert_moe_packed_tensors(blocks[f"{p}.experts.down_proj_blocks"],
                                    blocks[f"{p}.experts.down_proj_scales"], dtype=torch.float32)
    dense = _gpt_oss(tmp_path / "dense", {**common, f"{p}.experts.gate_up_proj": gu.contiguous(),
                                          f"{p}.experts.down_proj": dn.contiguous()}, mxfp4=False)
    x = torch.randn(T, Hg, generator=g)
    with open_checkpoint(q) as cq, open_checkpoint(dense) as cd:
        assert cq.scheme_of(0).scheme == "mxfp4"
        ref = _block(cd)(x)  # the unquantized gpt-oss path matches transformers (test_loaders_models)
        assert rel_err(_block(cq)(x), ref) <= 1e-5
        for tp_size, ep_size in ((2, 1), (1, 2)):
            total = sum(_block(cq, tp_rank=t, tp_size=tp_size, ep_rank=r, ep_size=ep_size)(x)
                        for t in range(tp_size) for r in range(ep_size))
            assert rel_err(total, ref) <= 1e-5
    bad = dict(blocks, **{f"{p}.experts.down_proj_scales": dn_scale[:, :, :1].contiguous()})
    with open_checkpoint(_gpt_oss(tmp_path / "bad", {**common, **bad}, mxfp4=True)) as ck, pytest.raises(
            CheckpointError, match="model.safetensors: tensor model.layers.0.mlp.experts.down_proj_scales has shape "
                                   "\\[4, 64, 1\\], expected \\[4, 64, 2\\]"):
        _block(ck)


# --- bad input: the file and the tensor are named ------------------------------------------------------------------
def _rewrite(ckpts, name, tmp_path, edit):
    folder = ckpts(name)[0]
    t = {}
    for f in folder.glob("*.safetensors"):
        t |= load_file(f)
    edit(t)
    out = tmp_path / "edited"
    out.mkdir(parents=True)
    (out / "config.json").write_text((folder / "config.json").read_text())
    if (folder / "hf_quant_config.json").exists():
        (out / "hf_quant_config.json").write_text((folder / "hf_quant_config.json").read_text())
    save_file(t, out / "model.safetensors")
    return out


@pytest.mark.parametrize("name, key, match", [
    ("ct-fp8", "experts.2.up_proj.input_scale", "missing tensor model.layers.0.mlp.experts.2.up_proj.input_scale"),
    ("modelopt-fp8", "experts.0.down_proj.input_scale", "missing tensor .*experts.0.down_proj.input_scale"),
    ("ct-nvfp4", "experts.3.gate_proj.input_global_scale",
     "missing tensor .*experts.3.gate_proj.input_scale or .*experts.3.gate_proj.input_global_scale"),
    ("ct-w4a16-actorder", "experts.1.down_proj.weight_scale", "missing tensor .*experts.1.down_proj.weight_scale"),
    ("ct-w4a16-actorder", "experts.1.up_proj.weight_g_idx", "missing tensor .*experts.1.up_proj.weight_g_idx"),
    ("ct-nvfp4a16", "experts.0.up_proj.weight_global_scale", "missing tensor .*experts.0.up_proj.weight_scale_2 or "
                                                            ".*up_proj.weight_global_scale"),
    ("gptq-v1", "experts.2.gate_proj.qzeros", "missing tensor model.layers.0.mlp.experts.2.gate_proj.qzeros"),
])
def test_missing_tensor_is_named(ckpts, tmp_path, name, key, match):
    folder = _rewrite(ckpts, name, tmp_path, lambda t: t.pop(f"{BLOCK}.{key}"))
    with open_checkpoint(folder) as ck, pytest.raises(CheckpointError, match="model.safetensors: " + match):
        _block(ck)


@pytest.mark.parametrize("name, key, value, match", [
    ("ct-w4a16-actorder", "experts.0.gate_proj.weight_scale", torch.ones(I, 3),
     "tensor model.layers.0.mlp.experts.0.gate_proj.weight_scale: .*shape \\(128, 3\\), expected \\(128, 4\\)"),
    ("ct-w4a16-actorder", "experts.3.down_proj.weight_packed", torch.zeros(H, I // 8, dtype=torch.int64),
     "tensor model.layers.0.mlp.experts.3.down_proj.weight_packed: .*expected int32 packed words, got torch.int64"),
    ("ct-fp8-block", "experts.1.up_proj.weight", torch.zeros(I, H, dtype=torch.bfloat16),
     "tensor model.layers.0.mlp.experts.1.up_proj.weight: .*dtype torch.bfloat16, expected torch.float8_e4m3fn"),
    ("ct-nvfp4", "experts.2.down_proj.weight_scale", torch.ones(H, I // 16),
     "tensor model.layers.0.mlp.experts.2.down_proj.weight_scale: .*dtype torch.float32, expected "
     "torch.float8_e4m3fn"),
    ("gptq-v2", "experts.0.up_proj.qweight", torch.zeros(H // 8, I, dtype=torch.float16),
     "tensor model.layers.0.mlp.experts.0.up_proj.qweight must be a 2-D int32"),
])
def test_wrong_shape_or_dtype_is_named(ckpts, tmp_path, name, key, value, match):
    folder = _rewrite(ckpts, name, tmp_path, lambda t: t.__setitem__(f"{BLOCK}.{key}", value))
    with open_checkpoint(folder) as ck, pytest.raises(CheckpointError, match="model.safetensors: " + match):
        _block(ck)


def test_gptq_zero_point_convention_mismatch_is_named(ckpts, tmp_path):
    folder = ckpts("gptq-v2")[0]
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "gptq"  # v2 tensors read as v1: zeros off by one
    out = tmp_path / "v1"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg))
    for f in folder.iterdir():
        if f.name != "config.json":
            (out / f.name).write_bytes(f.read_bytes())
    with open_checkpoint(out) as ck, pytest.raises(CheckpointError, match="safetensors: .*experts.0.*qzeros: sym=True "
                                                                          "needs every zero point = 8"):
        _block(ck)


def test_all_zero_symmetric_zero_points_of_older_writers_are_skipped(ckpts, tmp_path):
    def add(value):
        def edit(t):
            for e in range(E):
                for p in ("gate_proj", "up_proj", "down_proj"):
                    t[f"{BLOCK}.experts.{e}.{p}.weight_zero_point"] = torch.full((1,), value, dtype=torch.int8)
        return edit

    x = _x(10)
    with open_checkpoint(ckpts("ct-fp8-dynamic")[0]) as ck:
        want = _block(ck)(x)
    with open_checkpoint(_rewrite(ckpts, "ct-fp8-dynamic", tmp_path / "zero", add(0))) as ck:
        assert torch.equal(_block(ck)(x), want)
    with open_checkpoint(_rewrite(ckpts, "ct-fp8-dynamic", tmp_path / "one", add(1))) as ck, pytest.raises(
            CheckpointError, match="tensor model.layers.0.mlp.experts.0.gate_proj.weight_zero_point has no place in "
                                   "the fp8-channel layer"):
        _block(ck)
