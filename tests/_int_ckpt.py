"""Test-side builder of tiny compressed-tensors pack-quantized expert tensors, written by compressed-tensors itself.

# E experts, H hidden, I intermediate, G group size
Each expert Linear (gate_proj/up_proj [I, H], down_proj [H, I]) is quantized with the preset's args through
compressed-tensors' calculate_qparams + PackedQuantizationCompressor.compress, and its dequantized twin comes from the
compressor's decompress. With act-order, the input channels are grouped by a random permutation (g_idx) built here.
"""

from __future__ import annotations

import torch


def preset(name: str, group_size: int | None = "preset"):
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(name, ["Linear"])
    if group_size != "preset":
        w = scheme.weights
        args = w.model_copy(update={"group_size": group_size, "strategy": "group" if group_size else "channel"})
        scheme = scheme.model_copy(update={"weights": args})
    return scheme


def compress_linear(w: torch.Tensor, scheme, perm: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """w [N, K] fp32 -> {weight_packed, weight_scale, weight_shape, [weight_zero_point], [weight_g_idx], dequant}.
    perm (act-order): sorted position j holds input channel perm[j]; g_idx[perm[j]] = j // G."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor as C
    from compressed_tensors.compressors import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = scheme.weights
    N, K = w.shape
    src = w if perm is None else w[:, perm]
    G = K if args.group_size is None or args.strategy == "channel" else args.group_size
    wg = src.reshape(N, K // G, G)
    scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
    sd = {"weight": src.clone(), "weight_scale": scale, "weight_zero_point": zp.to(args.zp_dtype or torch.int8)}
    out = C.compress(sd, scheme)
    deq = C.decompress(dict(out), scheme)["weight"].float()
    if perm is not None:
        q = unpack_from_int32(out["weight_packed"], args.num_bits, torch.Size([N, K]))
        q_orig = torch.empty_like(q)
        q_orig[:, perm] = q
        out["weight_packed"] = pack_to_int32(q_orig, args.num_bits)
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[perm] = torch.arange(K, dtype=torch.int32) // G
        out["weight_g_idx"] = g_idx
        d = torch.empty_like(deq)
        d[:, perm] = deq
        deq = d
    out["dequant"] = deq
    return {k: v for k, v in out.items() if v is not None}


def build_experts(E: int, H: int, I: int, scheme, act_order: bool = False, seed: int = 0):
    """Per expert: {"gate_proj": tensors, "up_proj": ..., "down_proj": ...}; gate and up share one permutation."""
    gen = torch.Generator().manual_seed(seed)
    experts = []
    for _ in range(E):
        p1 = torch.randperm(H, generator=gen) if act_order else None
        p2 = torch.randperm(I, generator=gen) if act_order else None
        experts.append({
            "gate_proj": compress_linear(torch.randn(I, H, generator=gen) * 0.1, scheme, p1),
            "up_proj": compress_linear(torch.randn(I, H, generator=gen) * 0.1, scheme, p1),
            "down_proj": compress_linear(torch.randn(H, I, generator=gen) * 0.1, scheme, p2),
        })
    return experts


def state_dict(experts) -> dict[str, torch.Tensor]:
    return {f"experts.{e}.{lin}.{k}": v for e, ex in enumerate(experts) for lin, t in ex.items()
            for k, v in t.items() if k != "dequant"}


def load_into(layer, sd: dict[str, torch.Tensor]) -> None:
    """The loaders' path: make_expert_params_mapping + weight_loader, then process_weights_after_loading."""
    params = dict(layer.named_parameters())
    mapping = type(layer).make_expert_params_mapping("gate_proj", "down_proj", "up_proj", layer.global_num_experts)
    for key, t in sd.items():
        for prefix, ckpt, e, shard in mapping:
            if key.startswith(ckpt):
                pname = prefix.removeprefix("experts.") + key[len(ckpt):]
                layer.weight_loader(params[pname], t, key, shard, e)
                break
    layer.process_weights_after_loading()


def dense(experts):
    """Dequantized weights from compressed-tensors: w13 [E, 2I, H], w2 [E, H, I]."""
    w13 = torch.stack([torch.cat([x["gate_proj"]["dequant"], x["up_proj"]["dequant"]]) for x in experts])
    w2 = torch.stack([x["down_proj"]["dequant"] for x in experts])
    return w13, w2
