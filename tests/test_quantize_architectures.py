"""`quantize_checkpoint` on the other per-expert architectures: tiny random Mixtral (experts `block_sparse_moe.experts.N.
w1/w2/w3` on disk, `mlp` in the transformers layer), OLMoE (q/k norms; calibrated through a transformers fast
tokenizer) and DeepSeek-V3 (dense layer 0, shared experts, sigmoid grouped top-k with correction bias, MLA attention),
saved by transformers in fp32, quantized with RTN (w4a16 g32, fp8-channel) and GPTQ (w4a16 g32).

Checks: the experts (and only they) are quantized, within RTN error; every other tensor, DeepSeek's dense layer and
shared experts included, is copied unchanged; each MoE layer loads through open_checkpoint(...).moe_block with experts
bit-identical to compressed-tensors' decompression, and its output equals the transformers block of the same
architecture holding the dequantized experts; GPTQ's report lists the tokens routed to every expert, and they agree
with the routing the full transformers model does on the calibration text.

# T calibration tokens (N samples x S), E experts, K top-k, H hidden (64), I expert intermediate (32)
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from _quant_helpers import decompress_folder, sqnr
from moequant.quantize.api import quantize_checkpoint

transformers = pytest.importorskip("transformers")
from test_loaders_models import _randomize  # noqa: E402  (router/expert/correction-bias randomisation)

H, I, G = 64, 32, 32  # G: w4a16 group size, divides H and I
N, S = 4, 64  # calibration samples x sequence length
COMMON = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
              num_experts_per_tok=2, max_position_embeddings=256)


def _config(name):
    if name == "mixtral":
        return transformers.MixtralConfig(**COMMON, intermediate_size=I, num_local_experts=4)
    if name == "olmoe":
        return transformers.OlmoeConfig(**COMMON, intermediate_size=I, num_experts=8, pad_token_id=1, eos_token_id=0)
    # sigmoid scoring, 4 groups keep 2, correction bias, 2 shared experts, layer 0 dense (intermediate 96)
    return transformers.DeepseekV3Config(
        **{**COMMON, "num_key_value_heads": 4}, intermediate_size=96, moe_intermediate_size=I, n_routed_experts=8,
        n_shared_experts=2, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


MOE_LAYERS = {"mixtral": (0, 1), "olmoe": (0, 1), "deepseek_v3": (1,)}
ARCHS = list(MOE_LAYERS)


def _word_tokenizer(text: str, folder):
    """A tiny WordLevel fast tokenizer (words of `text`, <= 290 ids) saved with save_pretrained, for AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(text.split()))[:288]
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]") \
        .save_pretrained(folder)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(open(json.decoder.__file__).read() + open(json.encoder.__file__).read())
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory, calib):
    """name -> (folder, fp32 transformers model) of the tiny random checkpoint."""
    from moequant.data.byte_tokenizer import ByteTokenizer

    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(_config(name), dtype=torch.float32)
            _randomize(model)
            folder = tmp_path_factory.mktemp(name)
            model.save_pretrained(folder)
            if name == "olmoe":
                _word_tokenizer(calib.read_text(), folder)
            else:
                ByteTokenizer().save(folder)
            cache[name] = folder, model.eval()
        return cache[name]

    return get


def _tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _expert_modules(name: str) -> list[str]:
    block = "block_sparse_moe" if name == "mixtral" else "mlp"
    E = 4 if name == "mixtral" else 8
    projs = ("w1", "w2", "w3") if name == "mixtral" else ("gate_proj", "down_proj", "up_proj")
    return [f"model.layers.{L}.{block}.experts.{e}.{p}" for L in MOE_LAYERS[name] for e in range(E) for p in projs]


def _check_output(name, folder, out, min_sqnr):
    """Experts quantized within RTN-level error; everything else copied bit for bit. Returns the dequantized experts."""
    src, deq = _tensors(folder), decompress_folder(out)
    assert sorted(deq) == sorted(_expert_modules(name))
    for m, w in deq.items():
        assert w.shape == src[m + ".weight"].shape
        assert sqnr(src[m + ".weight"], w) > min_sqnr, m
    got = _tensors(out)
    copied = [k for k in src if k[: -len(".weight")] not in deq]
    for k in copied:
        assert got[k].dtype == src[k].dtype and torch.equal(got[k], src[k]), k
    if name == "deepseek_v3":  # dense layer 0 and the shared experts are among the copies
        assert "model.layers.0.mlp.down_proj.weight" in copied
        assert "model.layers.1.mlp.shared_experts.gate_proj.weight" in copied
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in copied
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    gate = "block_sparse_moe.gate" if name == "mixtral" else "mlp.gate"
    assert set(qc["ignore"]) == {f"model.layers.{L}.{gate}" for L in MOE_LAYERS[name]} | {"lm_head"}
    return deq


def _check_blocks(name, folder, out, deq, scheme, tmp_path):
    """Each MoE layer of `out` through moequant equals the transformers block on the dequantized experts."""
    from moequant import open_checkpoint

    ref_dir = tmp_path / "dequantized"
    ref_dir.mkdir()
    from safetensors.torch import save_file

    src = _tensors(folder)
    src.update({m + ".weight": w.to(src[m + ".weight"].dtype).contiguous() for m, w in deq.items()})
    save_file(src, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(folder / "config.json", ref_dir / "config.json")
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()

    x = 0.5 * torch.randn(2, 9, H, generator=torch.Generator().manual_seed(0))
    with open_checkpoint(out) as ck:
        assert ck.moe_layers == MOE_LAYERS[name]
        for L in ck.moe_layers:
            assert ck.scheme_of(L).scheme == scheme
            block = ck.moe_block(L, dtype=torch.float32, backend="reference")
            ex, prefix = block.experts, ck.block_prefix(L)
            g, d, u = ck.spec.proj_names
            for e in range(ck.settings.num_experts):
                w13, w2 = ex.quant_method.dequantize_expert(ex, e)
                p = f"{prefix}.experts.{e}."
                assert torch.equal(w13.float(), torch.cat([deq[p + g], deq[p + u]])), (L, e)
                assert torch.equal(w2.float(), deq[p + d]), (L, e)
            with torch.no_grad():
                ref = ref_model.model.layers[L].mlp(x)
                got = block(x)
            ref = ref[0] if isinstance(ref, tuple) else ref
            if scheme == "fp8-channel":  # dynamic fp8 activations: the output carries their rounding noise
                assert sqnr(ref, got) > 25, L
            else:
                assert ((got - ref).norm() / ref.norm()).item() < 1e-4, L


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("scheme, group, min_sqnr", [("w4a16", G, 15), ("fp8-channel", None, 28)])
def test_rtn(source, tmp_path, name, scheme, group, min_sqnr):
    folder, _ = source(name)
    out = quantize_checkpoint(folder, tmp_path / "q", scheme=scheme, group_size=group, progress=False)
    deq = _check_output(name, folder, out, min_sqnr)
    _check_blocks(name, folder, out, deq, scheme, tmp_path)
    rep = json.loads((out / "quantize_report.json").read_text())
    assert rep["calibration"] is None and set(rep["layers"]) == {str(L) for L in MOE_LAYERS[name]}


def _hf_routed_tokens(name, folder, model, ids) -> dict[tuple[int, int], int]:
    """(layer, expert) -> tokens routed to it when the full transformers model runs on `ids` (the inputs of each MoE
    block captured by hooks, routed by moequant's router, which test_loaders_models checks against transformers')."""
    from moequant import open_checkpoint

    inputs = {}
    hooks = [model.model.layers[L].mlp.register_forward_pre_hook(
        lambda _m, a, L=L: inputs.__setitem__(L, a[0].reshape(-1, H))) for L in MOE_LAYERS[name]]
    with torch.no_grad():
        model(input_ids=ids)
    for hk in hooks:
        hk.remove()
    counts = {}
    with open_checkpoint(folder) as ck:
        for L, x in inputs.items():
            block = ck.moe_block(L, dtype=torch.float32, backend="reference")
            block.experts.e_score_correction_bias = block.e_score_correction_bias
            _, top = block.experts.route(x, block.router_logits(x))
            for e in range(ck.settings.num_experts):
                counts[(L, e)] = int((top == e).sum())
    return counts



@pytest.mark.parametrize("name", ARCHS)
def test_gptq(source, calib, tmp_path, name):
    from moequant.quantize.calibration import calibration_ids

    folder, model = source(name)
    out = quantize_checkpoint(folder, tmp_path / "q", scheme="w4a16", group_size=G, algo="gptq", calib=calib,
                              num_samples=N, seq_len=S, min_tokens=8, progress=False)
    deq = _check_output(name, folder, out, 12)
    _check_blocks(name, folder, out, deq, "w4a16", tmp_path)

    rep = json.loads((out / "quantize_report.json").read_text())
    assert rep["algo"] == "gptq" and rep["calibration"]["samples"] == N and rep["calibration"]["seq_len"] == S
    tokens = rep["tokens_per_module"]
    assert sorted(tokens) == sorted(_expert_modules(name))
    for m, t in tokens.items():  # below min_tokens: RTN, listed with the reason; at or above: GPTQ
        assert (m in rep["fallbacks"]) == (t < 8), m
    # the calibration's layer walk routes like the whole transformers model on the same ids (near-ties aside)
    ids = calibration_ids(folder, str(calib), N, S)
    hf = _hf_routed_tokens(name, folder, model, ids)
    K = 2
    for L in MOE_LAYERS[name]:
        first = "w1" if name == "mixtral" else "gate_proj"
        theirs = {e: v for (L2, e), v in hf.items() if L2 == L}
        block = "block_sparse_moe" if name == "mixtral" else "mlp"
        mine = {e: tokens[f"model.layers.{L}.{block}.experts.{e}.{first}"] for e in theirs}
        assert sum(mine.values()) == N * S * K  # every token reaches K distinct experts
        diff = sum(abs(mine[e] - theirs[e]) for e in theirs)
        assert diff <= 0.02 * N * S * K, (L, mine, theirs)
        # gate and up share their inputs; down sees the same tokens
        for e in theirs:
            p = f"model.layers.{L}.{block}.experts.{e}."
            assert len({tokens[p + q] for q in (("w1", "w2", "w3") if name == "mixtral"
                                                 else ("gate_proj", "down_proj", "up_proj"))}) == 1


@pytest.mark.parametrize("name", ARCHS)
def test_calibration_walk_matches_transformers(source, calib, name):
    """The calibrator's layer-by-layer walk (transformers layers with moequant's capturing MoE block swapped in)
    ends on the hidden states the whole transformers model computes before its final norm."""
    from moequant import open_checkpoint
    from moequant.quantize.calibration import LayerCalibrator, calibration_ids

    folder, model = source(name)
    ids = calibration_ids(folder, str(calib), 2, 32)
    last = {}
    hook = model.model.layers[-1].register_forward_hook(
        lambda _m, _a, out: last.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    with open_checkpoint(folder) as ck:
        cal = LayerCalibrator(ck, ids, hessian=False)
        for L in range(2):
            stats = cal.stats(L)
            assert (L in ck.moe_layers) == any(".experts." in m for m in stats), L
        got = torch.cat(cal.hidden)
    assert ((got - last["h"]).norm() / last["h"].norm()).item() < 1e-5


def test_gptq_targets_all_deepseek_v3(source, calib, tmp_path):
    """--targets all on DeepSeek-V3, per-channel w4a16 (its MLA kv_b_proj has 16 inputs): every decoder Linear
    (MLA attention, the dense layer-0 MLP, shared and routed experts) is calibrated on the tokens that reach it and
    quantized; the router and lm_head are not; the MoE layer, its quantized shared experts dequantized, still equals
    the transformers block on the dequantized weights."""
    folder, _ = source("deepseek_v3")
    out = quantize_checkpoint(folder, tmp_path / "q", scheme="w4a16", group_size=-1, algo="gptq", calib=calib,
                              num_samples=N, seq_len=S, targets="all", min_tokens=8, progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert set(qc["ignore"]) == {"model.layers.1.mlp.gate", "lm_head"}
    src, deq = _tensors(folder), decompress_folder(out)
    linears = sorted(k[: -len(".weight")] for k, v in src.items()
                     if k.startswith("model.layers.") and v.dim() == 2 and ".gate." not in k)
    assert sorted(deq) == linears
    for m, w in deq.items():
        assert sqnr(src[m + ".weight"], w) > 12, m
    for k, v in _tensors(out).items():  # routers, correction bias, norms, embeddings, lm_head: copied
        if k in src:
            assert torch.equal(v, src[k]), k
    tokens = json.loads((out / "quantize_report.json").read_text())["tokens_per_module"]
    for m in ("model.layers.0.self_attn.q_a_proj", "model.layers.0.self_attn.kv_b_proj", "model.layers.0.mlp.up_proj",
              "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.shared_experts.gate_proj",
              "model.layers.1.mlp.shared_experts.down_proj"):
        assert tokens[m] == N * S, m  # every token reaches them
    assert sum(tokens[f"model.layers.1.mlp.experts.{e}.down_proj"] for e in range(8)) == N * S * 2
    _check_blocks("deepseek_v3", folder, out, deq, "w4a16", tmp_path)
