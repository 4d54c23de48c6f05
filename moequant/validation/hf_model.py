"""REF as a transformers model: load it, find its MoE blocks, capture their inputs, swap in moequant blocks.

T tokens, H hidden, E experts, K top-k.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from moequant.validation.inputs import ValidationError


def transformers_has(ckpt) -> str | None:
    """None when transformers can build `ckpt`'s architecture, else the reason it cannot."""
    try:
        import transformers
    except ImportError:
        return "transformers is not installed"
    arch = ckpt.architecture
    if getattr(transformers, arch, None) is None:
        return f"transformers {transformers.__version__} has no {arch}"
    return None


def load_model(ckpt, device: str, dtype: torch.dtype) -> nn.Module:
    """transformers' causal LM from the checkpoint folder, in eval mode, offline."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(ckpt.folder, dtype=dtype, local_files_only=True)
    except Exception as e:  # transformers raises many types; say which checkpoint failed and why
        raise ValidationError(f"REF {ckpt.name}: transformers could not load it ({type(e).__name__}: {e})") from None
    return model.to(device).eval().requires_grad_(False)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list (model.model.layers for the Llama-style families)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h"):
        with contextlib.suppress(AttributeError):
            return model.get_submodule(path)
    raise ValidationError(f"{type(model).__name__}: cannot find its decoder layers (looked for model.layers)")


def moe_module(model: nn.Module, layer: int) -> tuple[nn.Module, str]:
    """(module, attribute name) of the sparse MoE block in decoder layer `layer`: the child that holds `experts`."""
    dec = decoder_layers(model)[layer]
    for name, child in dec.named_children():
        if hasattr(child, "experts"):
            return child, name
    raise ValidationError(f"{type(model).__name__}: decoder layer {layer} has no MoE block (no child with experts); "
                          f"children: {[n for n, _ in dec.named_children()]}")


def returns_tuple(module: nn.Module, hidden_size: int, device, dtype) -> bool:
    """Whether an HF sparse MoE block returns (hidden, router_logits) (transformers 4.x) or a tensor (5.x)."""
    with torch.no_grad():
        out = module(torch.zeros(1, 1, hidden_size, device=device, dtype=dtype))
    return isinstance(out, tuple)


class SwappedMoE(nn.Module):
    """A moequant MoEBlock behind an HF sparse-MoE block's interface: [B, S, H] -> [B, S, H], or
    (hidden, router_logits [B*S, E]) when the replaced block returned a tuple. Records each call's top-k ids."""

    def __init__(self, block: nn.Module, tuple_out: bool, record: bool = True):
        super().__init__()
        self.block = block
        self.tuple_out = tuple_out
        self.record = record
        self.topk_ids: list[torch.Tensor] = []

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        out = self.block(x).to(hidden_states.dtype).reshape(shape)
        if not (self.record or self.tuple_out):
            return out
        logits = self.block.router_logits(x)
        if self.record:
            self.topk_ids.append(self.block.experts.route(x, logits)[1].cpu())
        return (out, logits) if self.tuple_out else out


@contextlib.contextmanager
def swapped(model: nn.Module, blocks: dict[int, nn.Module], device, dtype):
    """Within the context, decoder layer L's MoE block is SwappedMoE(blocks[L]); restored on exit.
    Yields {layer: SwappedMoE}."""
    H = model.config.hidden_size
    originals, wrappers = {}, {}
    try:
        for L, block in blocks.items():
            mod, name = moe_module(model, L)
            wrappers[L] = SwappedMoE(block, returns_tuple(mod, H, device, dtype))
            originals[L] = (decoder_layers(model)[L], name, mod)
            setattr(originals[L][0], name, wrappers[L])
        yield wrappers
    finally:
        for parent, name, mod in originals.values():
            setattr(parent, name, mod)


@contextlib.contextmanager
def capture_inputs(model: nn.Module, layers: list[int]):
    """Within the context, every forward appends the [T, H] input of layer L's MoE block to captured[L]."""
    captured: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    handles = []
    try:
        for L in layers:
            mod, _ = moe_module(model, L)

            def hook(_m, args, kwargs, L=L):
                x = args[0] if args else kwargs["hidden_states"]
                captured[L].append(x.detach().reshape(-1, x.shape[-1]))

            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        yield captured
    finally:
        for h in handles:
            h.remove()
