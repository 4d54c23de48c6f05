"""Test helpers: tiny quantized checkpoint folders (config.json + safetensors) in each producer's spelling, and
the per-expert float64 reference of an MoE block.

E experts, K top-k, H hidden, I intermediate, G group size. Expert tensors come in as {"experts.{e}.{proj}.{suffix}"}
(Qwen3-MoE names) and are written under model.layers.0.mlp with a router model.layers.0.mlp.gate.weight.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from _moe_loop import moe_loop_f64
from moequant.quantize import int_math as im

BLOCK = "model.layers.0.mlp"


def qwen3_config(E, K, H, I, **extra) -> dict:
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": H,
            "moe_intermediate_size": I, "num_experts": E, "num_experts_per_tok": K, "num_hidden_layers": 1,
            "norm_topk_prob": True, "hidden_act": "silu", **extra}


def router(E, H, seed=7) -> torch.Tensor:
    return torch.randn(E, H, generator=torch.Generator().manual_seed(seed)) * 0.5


def write(folder, experts: dict, config: dict, extra: dict | None = None, hf_quant: dict | None = None,
          shards: int = 1, router_w: torch.Tensor | None = None):
    """Write config.json (+ hf_quant_config.json) and the tensors (`shards` files with an index when > 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    E, H = config.get("num_experts") or config.get("n_routed_experts"), config["hidden_size"]
    t = {f"{BLOCK}.{k}": v.contiguous() for k, v in experts.items()}
    t[f"{BLOCK}.gate.weight"] = router(E, H) if router_w is None else router_w
    t |= {k: v.contiguous() for k, v in (extra or {}).items()}
    (folder / "config.json").write_text(json.dumps(config))
    if hf_quant is not None:
        (folder / "hf_quant_config.json").write_text(json.dumps(hf_quant))
    if shards == 1:
        save_file(t, folder / "model.safetensors")
        return folder
    names, weight_map = sorted(t), {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: t[n] for n in names[s::shards]}
        save_file(part, folder / fname)
        weight_map |= {n: fname for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def ct_quant_config(preset: str, group_size="preset", actorder=None, ignore=("lm_head", "re:.*mlp.gate$")) -> dict:
    """config.json's quantization_config as llm-compressor writes it for one preset targeting Linear layers.
    actorder "group" is written as compressed-tensors <= 0.18 did (0.19 refuses to build it)."""
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    scheme = preset_name_to_scheme(preset, ["Linear"])
    if group_size != "preset":
        scheme.weights = scheme.weights.model_copy(
            update={"group_size": group_size, "strategy": "group" if group_size else "channel"})
    fmt = {"FP8": "float-quantized", "FP8_DYNAMIC": "float-quantized", "FP8_BLOCK": "float-quantized",
           "NVFP4": "nvfp4-pack-quantized", "NVFP4A16": "nvfp4-pack-quantized",
           "MXFP4A16": "mxfp4-pack-quantized"}.get(preset, "pack-quantized")
    scheme.format = fmt
    qc = QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(ignore), format=fmt)
    d = qc.model_dump(mode="json")
    d["quantization_status"] = "compressed"
    if actorder:
        d["config_groups"]["group_0"]["weights"]["actorder"] = actorder
    return d


def ct_to_gptq(t: dict, bits: int, fmt: str) -> dict:
    """compressed-tensors pack-quantized tensors of one Linear -> GPTQ's qweight / qzeros / scales / g_idx
    (v1 "gptq" stores zero - 1)."""
    N, K = (int(v) for v in t["weight_shape"])
    half = 1 << (bits - 1)
    q = im.unpack_int32(t["weight_packed"], bits, K)  # signed [N, K]
    groups = t["weight_scale"].shape[1]
    if "weight_zero_point" in t:
        z = im.unpack_int32(t["weight_zero_point"], bits, N, dim=0).to(torch.int32) + half  # unsigned [N, groups]
    else:
        z = torch.full((N, groups), half, dtype=torch.int32)
    if fmt == "gptq":
        z = z - 1
    g_idx = t.get("weight_g_idx", im.default_g_idx(K, K // groups))
    return {
        "qweight": im.pack_int32(q.t().contiguous(), bits, dim=0),  # [K/P, N], u = q + 2^(b-1)
        "qzeros": im.pack_int32((z.t() - half).to(torch.int8).contiguous(), bits, dim=1),  # [groups, N/P]
        "scales": t["weight_scale"].t().contiguous(),  # the producer's scale dtype, so the twins are bit-equal
        "g_idx": g_idx.to(torch.int32),
    }


def softmax_topk(x, router_w, K, renormalize=True):
    p = (x.double() @ router_w.double().T).softmax(-1)
    w, ids = p.topk(K, dim=-1)
    return (w / w.sum(-1, keepdim=True) if renormalize else w), ids


def reference(x, router_w, w13, w2, K, layer=None):
    """float64 loop on dequantized weights (w13 [E, 2I, H], w2 [E, H, I]); with `layer`, its activations are
    fake-quantized as the layer's scheme does (fp8 / nvfp4 activation schemes)."""
    w, ids = softmax_topk(x, router_w, K)
    if layer is None:
        return moe_loop_f64(x, w13, w2, w, ids)
    from test_fp8_methods import fake_quant_loop

    return fake_quant_loop(layer, x, w13, w2, w, ids)


def stack(deq: dict, E: int):
    """{(e, "w1"|"w2"|"w3"): [N, K]} -> w13 [E, 2I, H], w2 [E, H, I]."""
    return (torch.stack([torch.cat([deq[(e, "w1")], deq[(e, "w3")]]) for e in range(E)]),
            torch.stack([deq[(e, "w2")] for e in range(E)]))
