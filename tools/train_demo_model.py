#!/usr/bin/env python3
"""Train moequant's built-in demo model: a small byte-level Qwen3-MoE on the Python standard library's own source.

    nice -n 19 python3 tools/train_demo_model.py            # writes moequant/data/demo_model/ (seed 0)

Reproducible on CPU for a given seed, torch version and Python version (the stdlib files are the data; the file list
and the held-out split are fixed in moequant/data/stdlib_corpus.py). Writes config.json, model.safetensors (bf16),
byte_tokenizer.json and training_report.json with the held-out bits per byte of the untrained and the trained model
and the per-layer expert token counts on the held-out text. Fails if the folder would exceed 10 MB.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moequant.data.byte_tokenizer import ByteTokenizer  # noqa: E402
from moequant.data.stdlib_corpus import eval_windows, read_files, split_files  # noqa: E402
from moequant.validate_metrics import token_nll  # noqa: E402

MAX_BYTES = 10 * 1024 * 1024
QUICK_SLICE = dict(files=4, windows_per_file=2)  # the slice tests/test_demo_model.py re-evaluates


def build_config(tok: ByteTokenizer, seq_len: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=256, moe_intermediate_size=192,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=2 * seq_len, rope_theta=10000.0, tie_word_embeddings=False,
        output_router_logits=True, router_aux_loss_coef=0.05,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
    )


def train_stream(texts: dict[str, bytes], tok: ByteTokenizer) -> torch.Tensor:
    """All training files as one int64 stream: <bos> file <eos> <bos> file <eos> ..."""
    parts = [torch.tensor([tok.bos_id, *data, tok.eos_id], dtype=torch.long) for data in texts.values()]
    return torch.cat(parts)


@torch.no_grad()
def evaluate(model, inputs: torch.Tensor, targets: torch.Tensor, pad_id: int, batch: int = 32) -> dict:
    """Held-out bits per byte and, per MoE layer, how many (non-pad) tokens each expert received."""
    model.eval()
    E = model.config.num_experts
    layers = model.model.layers
    counts = torch.zeros(len(layers), E, dtype=torch.long)
    keep = {}

    def hook(i):
        def fn(_mod, _inp, out):  # router returns (logits, top-k weights, top-k ids [T, K])
            ids = out[2][keep["mask"]]
            counts[i] += torch.bincount(ids.reshape(-1), minlength=E)
        return fn

    handles = [layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    nll, n = 0.0, 0
    try:
        for s in range(0, inputs.shape[0], batch):
            x, y = inputs[s: s + batch], targets[s: s + batch]
            keep["mask"] = (x != pad_id).reshape(-1)
            logits = model(input_ids=x).logits.float()
            a, b = token_nll(logits, y)
            nll, n = nll + a, n + b
    finally:
        for h in handles:
            h.remove()
    return {"bits_per_byte": nll / math.log(2.0) / n, "bytes": n, "expert_token_counts": counts.tolist()}


def per_layer_balance_loss(router_logits, top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss, mean over layers of E * sum_e f_e * P_e (1.0 when balanced).

    f_e: fraction of the T*K top-k assignments that go to expert e; P_e: mean router probability of e; per layer.
    transformers' built-in aux loss pools all layers' tokens before balancing, which let experts die in single layers."""
    losses = []
    for logits in router_logits:  # [T, E] per layer
        E = logits.shape[-1]
        probs = torch.softmax(logits.float(), dim=-1)
        ids = probs.topk(top_k, dim=-1).indices
        f = torch.bincount(ids.reshape(-1), minlength=E).float() / ids.numel()
        losses.append(E * (f * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to lr / 10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * p)))


def save(model, tok: ByteTokenizer, out: Path) -> None:
    """bf16 safetensors + config.json (with the pre-5.0 key names too, so older transformers read it) + tokenizer."""
    if out.exists():
        for name in ("config.json", "model.safetensors", "generation_config.json", "byte_tokenizer.json",
                     "training_report.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False  # inference default; the aux loss is a training-time term
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    (out / "model.safetensors").chmod(0o644)  # save_pretrained leaves 0600; installed data must be world-readable
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("num_experts", model.config.num_experts)
    cfg.setdefault("rope_theta", 10000.0)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok.save(out)


def folder_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "moequant" / "data" / "demo_model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=25.0,
                    help="stop training early (recorded in the report) if the wall time passes this")
    args = ap.parse_args(argv)

    from transformers import Qwen3MoeForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    tok = ByteTokenizer()
    train_names, held_names = split_files()
    stream = train_stream(read_files(train_names), tok)
    held = read_files(held_names)
    eval_x, eval_y = eval_windows(held, args.seq_len, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    quick = {k: held[k] for k in held_names[: QUICK_SLICE["files"]]}
    quick_x, quick_y = eval_windows(quick, args.seq_len, QUICK_SLICE["windows_per_file"], tok.pad_id, tok.bos_id,
                                    tok.eos_id)
    print(f"train stream {stream.numel()} tokens from {len(train_names)} files; held out {len(held_names)} files, "
          f"{int((eval_y != -100).sum())} bytes", flush=True)

    config = build_config(tok, args.seq_len)
    model = Qwen3MoeForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    init = evaluate(model, eval_x, eval_y, tok.pad_id)
    init_quick = evaluate(model, quick_x, quick_y, tok.pad_id)
    print(f"untrained: held-out {init['bits_per_byte']:.4f} bits/byte ({n_params} parameters)", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    log, step, stopped_early, t_train = [], 0, False, time.time()
    model.train()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        starts = torch.randint(0, stream.numel() - args.seq_len, (args.batch,), generator=gen)
        x = torch.stack([stream[s: s + args.seq_len] for s in starts.tolist()])
        out = model(input_ids=x, output_router_logits=True)
        ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, config.vocab_size), x[:, 1:].reshape(-1))
        aux = per_layer_balance_loss(out.router_logits, config.num_experts_per_tok)
        opt.zero_grad(set_to_none=True)
        (ce + config.router_aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            row = {"step": step, "ce_bits": ce.item() / math.log(2.0), "aux_loss": aux.item(),
                   "minutes": (time.time() - t0) / 60}
            log.append(row)
            print(f"step {step:5d}  train {row['ce_bits']:.3f} bits/byte  aux {row['aux_loss']:.3f}  "
                  f"{row['minutes']:.1f} min", flush=True)
        if (time.time() - t0) / 60 > args.max_minutes:
            stopped_early = True
            print(f"stopping early at step {step}: past --max-minutes {args.max_minutes}", flush=True)
            break
    train_minutes = (time.time() - t_train) / 60

    save(model, tok, args.out)
    shipped = Qwen3MoeForCausalLM.from_pretrained(args.out, dtype=torch.float32)  # evaluate what is shipped (bf16)
    final = evaluate(shipped, eval_x, eval_y, tok.pad_id)
    final_quick = evaluate(shipped, quick_x, quick_y, tok.pad_id)
    report = {
        "version": 1,
        "architecture": "Qwen3MoeForCausalLM",
        "parameters": n_params,
        "seed": args.seed,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "steps_run": step + 1,
        "stopped_early": stopped_early,
        "train_minutes": round(train_minutes, 2),
        "tokens_seen": (step + 1) * args.batch * args.seq_len,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "data": {"source": "Python standard library .py files (moequant/data/stdlib_corpus.py)",
                 "train_files": len(train_names), "held_out_files": held_names, "held_out_bytes": final["bytes"]},
        "held_out": {
            "untrained_bits_per_byte": init["bits_per_byte"],
            "trained_bits_per_byte": final["bits_per_byte"],
            "note": "trained = the shipped bf16 weights; bits per byte = mean next-byte cross-entropy / ln 2",
        },
        "quick_slice": {**QUICK_SLICE, "untrained_bits_per_byte": init_quick["bits_per_byte"],
                        "trained_bits_per_byte": final_quick["bits_per_byte"], "bytes": final_quick["bytes"]},
        "expert_token_counts": {"untrained": init["expert_token_counts"], "trained": final["expert_token_counts"],
                                "note": "[layer][expert] top-k assignments on the held-out text (non-pad tokens)"},
        "train_log": log,
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    size = folder_bytes(args.out)
    print(f"held-out bits/byte: untrained {init['bits_per_byte']:.4f} -> trained {final['bits_per_byte']:.4f}", flush=True)
    for i, c in enumerate(final["expert_token_counts"]):
        print(f"layer {i} expert tokens: {c}", flush=True)
    print(f"wrote {args.out} ({size / 1e6:.2f} MB) in {(time.time() - t0) / 60:.1f} min", flush=True)
    if size > MAX_BYTES:
        print(f"error: {args.out} is {size} bytes, over the {MAX_BYTES}-byte limit for the shipped demo model",
              file=sys.stderr)
        return 1
    if min(min(c) for c in final["expert_token_counts"]) == 0:
        print("warning: some expert received no held-out token", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
