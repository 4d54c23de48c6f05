"""llm-compressor interop: a tiny Qwen3-MoE quantized by llm-compressor's own `oneshot` + QuantizationModifier on the
CPU and saved compressed, opened with moequant; every MoE layer's block matches the reference on compressed-tensors'
own decompression of the saved tensors.

E experts, K top-k, H hidden, I expert intermediate, T tokens. fp32, backend "reference". Weight-only schemes:
<= 1e-3 relative error; activation-quantized schemes (FP8, FP8_DYNAMIC, FP8_BLOCK, NVFP4) against the fake-quant
reference (the layer's activation quantization on compressed-tensors' weights): <= 1e-2.
The static schemes (FP8, NVFP4) calibrate on a tiny in-memory datasets.Dataset of token ids (no network).
"""

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("llmcompressor")

from _quant_ckpt import reference  # noqa: E402
from conftest import rel_err  # noqa: E402
from moequant.checkpoint import open_checkpoint  # noqa: E402
from moequant.loaders.safetensors_index import TensorIndex  # noqa: E402

E, K, H, I, T = 4, 2, 128, 128, 8  # H, I multiples of 128: llm-compressor's group / block size
SCHEMES = {  # llm-compressor preset: (moequant scheme, activations quantized)
    "W4A16": ("w4a16", False), "W4A16_ASYM": ("w4a16-asym", False), "W8A16": ("w8a16", False),
    "FP8": ("fp8-tensor", True), "FP8_DYNAMIC": ("fp8-channel", True), "FP8_BLOCK": ("fp8-block", True),
    "NVFP4A16": ("nvfp4a16", False), "NVFP4": ("nvfp4", True),
}
CALIBRATED = ("FP8", "NVFP4")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The full-precision tiny model, saved (oneshot reads the config back from model.config.name_or_path)."""
    cfg = transformers.Qwen3MoeConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=32, vocab_size=64, intermediate_size=H, moe_intermediate_size=I,
                                      num_experts=E, num_experts_per_tok=K, norm_topk_prob=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):  # decisive routing: no near-ties between fp32 and float64
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif ".mlp.experts." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    folder = tmp_path_factory.mktemp("base")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def compressed(base, tmp_path_factory):
    """preset -> folder written by llm-compressor (cached for the module)."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    cache = {}

    def get(preset):
        if preset not in cache:
            model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            kw = {}
            if preset in CALIBRATED:
                from datasets import Dataset

                g = torch.Generator().manual_seed(1)
                ids = torch.randint(0, 64, (4, 16), generator=g).tolist()
                kw = dict(dataset=Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 16] * 4}),
                          num_calibration_samples=4, max_seq_length=16)
            recipe = QuantizationModifier(targets="Linear", scheme=preset, ignore=["lm_head", "re:.*mlp.gate$"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                oneshot(model=model, recipe=recipe, **kw)
            folder = tmp_path_factory.mktemp(preset.lower())
            model.save_pretrained(folder, save_compressed=True)
            cache[preset] = folder
        return cache[preset]

    return get


def _ct_dequantized(folder, layer: int):
    """compressed-tensors' own decompression of layer `layer`'s experts: w13 [E, 2I, H], w2 [E, H, I] (fp32).
    Also returns each expert's w1 / w3 weight scales (per-tensor fp8 shares one: see _shared_scale)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    from _fp4_ckpt import ct_dequantize

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    group = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    fmt = group.format or qc["format"]
    w, scales = {}, {}
    with TensorIndex(folder) as ix:
        for e in range(E):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                prefix = f"model.layers.{layer}.mlp.experts.{e}.{proj}."
                local = {k[len(prefix):]: ix.read(k) for k in ix.with_prefix(prefix)}
                if fmt == "nvfp4-pack-quantized":  # the compressor rounds to bf16; the same math in fp32
                    w[e, proj] = ct_dequantize(local, "nvfp4")
                else:
                    w[e, proj] = BaseCompressor.get_value_from_registry(fmt).decompress(local, group)["weight"].float()
                scales[e, proj] = local.get("weight_scale")
    w13 = torch.stack([torch.cat([w[e, "gate_proj"], w[e, "up_proj"]]) for e in range(E)])
    w2 = torch.stack([w[e, "down_proj"] for e in range(E)])
    return w13, w2, scales


def _shared_scale(w13, scales):
    """fp8 per-tensor: the layer keeps one scale per expert for w1 and w3, max(s1, s3); the other half is re-rounded
    to fp8 on it (torch's own e4m3 cast)."""
    out = w13.clone()
    for e in range(E):
        s = torch.maximum(scales[e, "gate_proj"].float(), scales[e, "up_proj"].float())
        out[e] = (w13[e] / s).to(torch.float8_e4m3fn).float() * s
    return out


@pytest.mark.parametrize("preset", list(SCHEMES))
def test_llmcompressor_checkpoint_matches_compressed_tensors_decompression(compressed, preset):
    folder = compressed(preset)
    scheme, act_quant = SCHEMES[preset]
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(2))
    with open_checkpoint(folder) as ck:
        assert ck.moe_layers == (0, 1) and ck.format.source == "compressed-tensors"
        assert ck.index.bytes_read == ck.index.header_bytes
        for L in ck.moe_layers:
            assert ck.scheme_of(L).scheme == scheme
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # static scales: per-expert input scales collapse to their max
                block = ck.moe_block(L, dtype=torch.float32, backend="reference")
            w13, w2, scales = _ct_dequantized(folder, L)
            if scheme == "fp8-tensor":
                w13 = _shared_scale(w13, scales)
            router = ck.index.read(f"model.layers.{L}.mlp.gate.weight").float()
            out = block(x)
            ref = reference(x, router, w13, w2, K, layer=block.experts if act_quant else None)
            assert rel_err(out, ref) <= (1e-2 if act_quant else 1e-3), (preset, L)
            assert out.norm() > 0.1 * x.norm()  # the experts' output is not negligible
            if act_quant:  # the activation quantization is on: plain dequantized weights give another answer
                assert rel_err(out, reference(x, router, w13, w2, K)) > 1e-2
