"""The shipped demo model (moequant/data/demo_model): loads offline, is a real MoE, is small, and has learned something."""

import json
import math
import platform

import pytest
import torch

from moequant.data import demo_model_path
from moequant.data.byte_tokenizer import ByteTokenizer
from moequant.data.stdlib_corpus import CORPUS_FILES, eval_windows, read_files, split_files
from moequant.validate_metrics import bits_per_byte

transformers = pytest.importorskip("transformers")

MAX_BYTES = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def folder():
    return demo_model_path()


@pytest.fixture(scope="module")
def report(folder):
    return json.loads((folder / "training_report.json").read_text())


@pytest.fixture(scope="module")
def model(folder):
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    return m.eval()


def test_folder_is_small_and_complete(folder):
    names = {p.name for p in folder.iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors", "byte_tokenizer.json", "training_report.json"} <= names
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert size <= MAX_BYTES, f"demo model folder is {size} bytes, over {MAX_BYTES}"


def test_architecture_is_moe_in_every_layer(model, folder):
    cfg = model.config
    assert cfg.model_type == "qwen3_moe" and type(model).__name__ == "Qwen3MoeForCausalLM"
    assert cfg.num_experts == 8 and cfg.num_experts_per_tok == 2
    assert cfg.decoder_sparse_step == 1 and list(cfg.mlp_only_layers) == []
    for layer in model.model.layers:
        assert type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock"
    # the on-disk config also carries the pre-transformers-5 key, so older readers see 8 experts, not the default 128
    raw = json.loads((folder / "config.json").read_text())
    assert raw["num_experts"] == 8 and raw["model_type"] == "qwen3_moe"


def test_checkpoint_has_per_expert_bf16_tensors(model, folder):
    # the hub layout of Qwen3-MoE (what moequant's loaders and vLLM read): one tensor per expert and projection
    from safetensors import safe_open

    cfg = model.config
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for layer in range(cfg.num_hidden_layers):
            pre = f"model.layers.{layer}.mlp"
            assert f.get_slice(f"{pre}.gate.weight").get_shape() == [E, H]
            for e in range(E):
                for proj, shape in (("gate_proj", [I, H]), ("up_proj", [I, H]), ("down_proj", [H, I])):
                    key = f"{pre}.experts.{e}.{proj}.weight"
                    assert key in keys, key
                    assert f.get_slice(key).get_shape() == shape
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in keys)


def test_byte_tokenizer_round_trip(folder, model):
    tok = ByteTokenizer.load(folder)
    assert tok.vocab_size == model.config.vocab_size == 260
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (model.config.bos_token_id, model.config.eos_token_id,
                                                    model.config.pad_token_id)
    text = "def f(x):\n    return 'é' * x  # non-ASCII: two bytes\n"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) == len(text.encode()) + 2
    assert tok.decode(ids) == text  # specials are dropped
    with pytest.raises(ValueError, match="outside"):
        tok.decode([300])


def test_report_records_split_and_expert_use(report):
    assert report["data"]["held_out_files"] == split_files()[1]
    held = report["held_out"]
    assert held["trained_bits_per_byte"] <= held["untrained_bits_per_byte"] - 1.5
    # the untrained model is near uniform over 260 tokens (log2 260 = 8.02 bits)
    assert abs(held["untrained_bits_per_byte"] - math.log2(260)) < 0.5
    counts = report["expert_token_counts"]["trained"]
    assert len(counts) == 4 and all(len(c) == 8 for c in counts)
    for layer, c in enumerate(counts):
        total = sum(c)  # = held-out tokens x top-k
        assert min(c) >= 0.01 * total, f"layer {layer}: an expert got under 1% of the held-out tokens: {c}"


def test_held_out_bits_per_byte_beats_untrained(model, report):
    # re-evaluate the report's quick slice (first windows of the first held-out files) on this machine's stdlib
    q = report["quick_slice"]
    names = report["data"]["held_out_files"][: q["files"]]
    texts = read_files(names, allow_missing=True)
    assert len(texts) >= 2, f"too few held-out stdlib files on this Python: {names}"
    tok = ByteTokenizer()
    x, y = eval_windows(texts, report["args"]["seq_len"], q["windows_per_file"], tok.pad_id, tok.bos_id, tok.eos_id)
    with torch.no_grad():
        logits = model(input_ids=x).logits
    bpb = bits_per_byte(logits, y)
    assert bpb <= q["untrained_bits_per_byte"] - 1.5, (bpb, q)
    # same Python (so the same file contents): the recorded figure is reproduced closely
    same_python = platform.python_version().rsplit(".", 1)[0] == report["python"].rsplit(".", 1)[0]
    assert abs(bpb - q["trained_bits_per_byte"]) < (0.02 if same_python else 0.5), (bpb, q)


def test_corpus_files_exist_and_missing_ones_are_named(tmp_path):
    assert len(read_files(CORPUS_FILES)) == len(CORPUS_FILES)  # every listed module exists on this Python
    (tmp_path / "abc.py").write_text("x = 1\n")
    with pytest.raises(FileNotFoundError, match="argparse.py"):
        read_files(["abc.py", "argparse.py"], root=tmp_path)
    train, held = split_files()
    assert sorted(train + held) == list(CORPUS_FILES) and not set(train) & set(held)
