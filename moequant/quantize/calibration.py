"""Calibration statistics, one decoder layer at a time: the transformers model's layers are built on the meta device,
each layer is materialised from the checkpoint (mmap reads) when its turn comes, run on the hidden states of all
calibration samples, and dropped. The MoE block inside it is replaced by moequant's (router, routing and expert
weights from `Checkpoint.moe_block`, the expert math written out here) so that every expert sees only the tokens
routed to it, exactly as the transformers block computes it.

# N samples, S sequence length, T = N*S tokens, H hidden, I expert intermediate, T_e tokens routed to expert e
Per quantized Linear (module name as on disk) with inputs x [T_e, C]:
  tokens = T_e, amax = max |x|, hessian = sum_t x_t x_t^T (fp32 [C, C], only when asked for).
Expert e: gate/up inputs are the routed hidden states x_e; down's input is act(x_e W_g^T) * (x_e W_u^T).
Memory: the hidden states [N, S, H], one layer's weights and one layer's statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class Stats:
    tokens: int = 0
    amax: torch.Tensor | None = None
    hessian: torch.Tensor | None = None

    def add(self, x: torch.Tensor, hessian: bool) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return
        a = x.abs().amax()
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)
        if hessian:
            h = x.t() @ x
            self.hessian = h if self.hessian is None else self.hessian + h
        self.tokens += x.shape[0]


def calibration_ids(folder: Path, calib: str | Path | None, num_samples: int, seq_len: int) -> torch.Tensor:
    """Token ids [N, S]: consecutive windows of the tokenized calibration text (the demo model's training stdlib
    files by default, so the held-out files the validator evaluates on stay unseen; read with its byte tokenizer;
    AutoTokenizer for other models, which need `calib`)."""
    from moequant.data.byte_tokenizer import FILE_NAME, ByteTokenizer

    if calib is None:
        if not (folder / FILE_NAME).is_file():
            raise ValueError(f"{folder}: no default calibration text for this model; pass --calib TEXTFILE")
        from moequant.data.stdlib_corpus import read_files, split_files

        texts = list(read_files(split_files()[0], allow_missing=True).values())
    else:
        path = Path(calib)
        if not path.is_file():
            raise FileNotFoundError(f"--calib {path}: no such text file")
        texts = [path.read_bytes()]
    if (folder / FILE_NAME).is_file():
        tok = ByteTokenizer.load(folder)
        ids = [i for t in texts for i in tok.encode(t, bos=True)]
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
        ids = [i for t in texts for i in tok(t.decode("utf-8", "replace"))["input_ids"]]
    n = min(num_samples, len(ids) // seq_len)
    if n < 1:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one --seq-len {seq_len} window")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


class _CaptureMoE(nn.Module):
    """An MoE block (moequant's router, routing, experts) that records per-expert input statistics (names
    `{block}.experts.{e}.{proj}`; gate and up share one Stats, their inputs being the same)."""

    def __init__(self, block, ckpt, layer: int, stats: dict, hessian: bool):
        super().__init__()
        self.block, self.ckpt, self.layer, self.stats, self.hessian = block, ckpt, layer, stats, hessian
        spec, prefix = ckpt.spec, ckpt.block_prefix(layer)
        self.names = [[f"{prefix}.experts.{e}.{p}" for p in spec.proj_names] for e in range(ckpt.settings.num_experts)]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """out = sum_k w_tk * W_d,e act(W_g,e x_t) * (W_u,e x_t) (+ shared), the MoE block's math in fp32."""
        x = h.reshape(-1, h.shape[-1])
        experts = self.block.experts
        # DeepSeek-V3's correction bias lives on the block; MoEBlock.forward hands it to the experts, route() here
        # bypasses that forward, so hand it over the same way (None for the other architectures)
        experts.e_score_correction_bias = self.block.e_score_correction_bias
        tw, ids = experts.route(x, self.block.router_logits(x))
        act = nn.functional.silu if self.ckpt.settings.activation == "silu" else nn.functional.gelu
        I = self.ckpt.settings.intermediate_size
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e, (g, d, u) in enumerate(self.names):
            hit = (ids == e)
            rows = hit.any(-1)
            xe = x[rows].float()
            shared_in = self.stats.setdefault(g, Stats())  # gate and up see the same inputs: one Hessian
            self.stats[u] = shared_in
            shared_in.add(xe, self.hessian)
            w13, w2 = (t.float() for t in experts.quant_method.dequantize_expert(experts, e))
            mid = act(xe @ w13[:I].t()) * (xe @ w13[I:].t())
            self.stats.setdefault(d, Stats()).add(mid, self.hessian)
            out[rows] += (tw * hit).sum(-1)[rows, None] * (mid @ w2.t())
        if self.block.shared is not None:
            xs = x.to(self.block.shared.gate_proj.weight.dtype)
            s = self.block.shared(xs)
            if self.block.shared_gate is not None:
                s = torch.sigmoid(self.block.shared_gate(xs)) * s
            out = out + s.float()
        return out.to(h.dtype).reshape(h.shape)


class LayerCalibrator:
    """Walks the decoder layers in order; `stats(L)` returns {module name: Stats} for layer L's Linears."""

    def __init__(self, ckpt, ids: torch.Tensor, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 hessian: bool = True, batch: int = 8):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.ckpt, self.device, self.dtype, self.hessian, self.batch = ckpt, torch.device(device), dtype, hessian, batch
        cfg = AutoConfig.from_pretrained(str(ckpt.folder))
        cfg._attn_implementation = "sdpa"  # attention_mask None -> causal
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        inner = self.model.model
        self.layers = inner.layers
        rot = inner.rotary_emb
        with torch.device(self.device):
            self.rotary = type(rot)(config=inner.config).to(self.device)
        emb = ckpt.index.read("model.embed_tokens.weight").to(self.device, dtype)
        self.ids = ids
        self.hidden = [nn.functional.embedding(ids[i:i + batch].to(self.device), emb)
                       for i in range(0, ids.shape[0], batch)]
        self.pos = torch.arange(ids.shape[1], device=self.device)[None]
        self.next = 0

    @property
    def num_tokens(self) -> int:
        return int(self.ids.numel())

    def _layer_prefix(self, L: int) -> tuple[str, str]:
        """(the layer's tensor prefix on disk, the attribute of the transformers layer holding its MoE block). The
        two can differ in name: Mixtral's block is `block_sparse_moe` on disk but `mlp` in transformers 5's layer."""
        prefix = f"model.layers.{L}"
        if L not in self.ckpt.moe_layers:
            return prefix, "mlp"
        prefix, disk_name = self.ckpt.block_prefix(L).rsplit(".", 1)
        layer = self.layers[L]
        if isinstance(getattr(layer, disk_name, None), nn.Module):
            return prefix, disk_name
        found = [n for n, m in layer.named_children() if hasattr(m, "experts")]
        if len(found) != 1:
            raise ValueError(f"calibration: {type(layer).__name__} (layer {L}) has no submodule {disk_name!r} and "
                             f"{len(found)} children with experts ({found}); cannot find the MoE block of "
                             f"{self.ckpt.block_prefix(L)}")
        return prefix, found[0]

    @torch.no_grad()
    def stats(self, L: int, collect: bool = True) -> dict[str, Stats]:
        if L < self.next:
            raise RuntimeError(f"calibration already passed layer {L} (at layer {self.next}); layers go in order")
        while self.next < L:
            self._run(self.next, collect=False)
        return self._run(L, collect)

    def _run(self, L: int, collect: bool) -> dict[str, Stats]:
        prefix, mlp_name = self._layer_prefix(L)
        layer = self.layers[L]
        moe = L in self.ckpt.moe_layers
        if moe:
            setattr(layer, mlp_name, nn.Identity())
        layer.to_empty(device=self.device)
        for n, p in layer.named_parameters():
            p.data.copy_(self.ckpt.index.read(f"{prefix}.{n}").to(p.dtype))
        stats: dict[str, Stats] = {}
        hooks = []
        if collect:
            for n, m in layer.named_modules():
                if isinstance(m, nn.Linear):
                    name = f"{prefix}.{n}"
                    hooks.append(m.register_forward_pre_hook(
                        lambda _m, a, name=name: stats.setdefault(name, Stats()).add(a[0], self.hessian)))
        if moe:
            block = self.ckpt.moe_block(L, device=self.device, dtype=self.dtype)
            if collect:
                shared = block.shared
                if shared is not None:
                    sp = f"{self.ckpt.block_prefix(L)}.{self.ckpt.spec.shared}"
                    for n in ("gate_proj", "up_proj", "down_proj"):
                        hooks.append(getattr(shared, n).register_forward_pre_hook(
                            lambda _m, a, name=f"{sp}.{n}": stats.setdefault(name, Stats()).add(a[0], self.hessian)))
                setattr(layer, mlp_name, _CaptureMoE(block, self.ckpt, L, stats, self.hessian))
            else:
                setattr(layer, mlp_name, block)
        for i, h in enumerate(self.hidden):
            cos_sin = self.rotary(h, self.pos)
            out = layer(h, attention_mask=None, position_ids=self.pos, position_embeddings=cos_sin)
            self.hidden[i] = out[0] if isinstance(out, tuple) else out
        for hk in hooks:
            hk.remove()
        self.layers[L] = nn.Identity()  # free the layer's weights
        self.next = L + 1
        return stats
