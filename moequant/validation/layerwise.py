"""Layer-wise comparison: the same inputs x [T, H] through REF's and QUANT's MoE block of one layer.

T tokens, H hidden, E experts, K top-k.

    y_ref = block_ref(x), y_quant = block_quant(x)            -> sqnr_db, rel_err, cosine, max_abs_err
    ids_ref = topk(router_ref(x)), ids_quant = topk(router_quant(x))   -> routing_changed (top-k sets differ)
    per expert e, both blocks routed by REF (so the figure is the expert's weights, not routing):
        c_e[t] = sum_k [ids_ref[t,k] = e] w_ref[t,k] expert_e(x[t])  on the tokens routed to e
    and a probe: expert_e on the first P tokens with weight 1, so an expert no token chose is still checked.
"""

from __future__ import annotations

import torch

from moequant.validate_metrics import error_stats, nonfinite_count, routing_changed, sqnr_db
from moequant.validation.inputs import ValidationError
from moequant.validation.report import ExpertReport, LayerReport

PROBE_TOKENS = 64


def random_inputs(ckpt, layer: int, tokens: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """x [T, H] Gaussian with the layer's scale: the MoE block's input is RMS-normalised and multiplied by the
    norm weight g (post_attention_layernorm), so x[t, h] ~ N(0, 1) * g[h] (g = 1 when the checkpoint has no such
    tensor)."""
    H = ckpt.settings.hidden_size
    gen = torch.Generator().manual_seed(seed + 1000 * layer)
    x = torch.randn(tokens, H, generator=gen)
    decoder = ckpt.block_prefix(layer).rsplit(".", 1)[0]
    for name in ("post_attention_layernorm", "ffn_norm", "post_attention_norm"):
        key = f"{decoder}.{name}.weight"
        if key in ckpt.index and ckpt.index.info(key).shape == (H,):
            x = x * ckpt.index.read(key).float()
            break
    return x.to(dtype)


@torch.no_grad()
def compare_layer(layer: int, ref_block, quant_block, x: torch.Tensor, inputs: str = "real",
                  scheme: str = "?") -> LayerReport:
    """Figures of one layer for inputs x [T, H] (see the module docstring)."""
    y_ref, y_q = ref_block(x), quant_block(x)
    if nonfinite_count(y_ref):
        raise ValidationError(f"REF layer {layer}: the reference block output holds {nonfinite_count(y_ref)} NaN/inf "
                              f"values on these inputs; REF must be finite")
    st = error_stats(y_ref, y_q)
    w_ref, ids_ref = ref_block.experts.route(x, ref_block.router_logits(x))
    _, ids_q = quant_block.experts.route(x, quant_block.router_logits(x))
    experts = []
    # one call per block and expert: x with every slot but e's masked (-1), then the probe rows with weight 1.
    # The probe rows are copies of x's first rows, so a per-tensor dynamic activation scale is unchanged.
    P, K = min(PROBE_TOKENS, x.shape[0]), ids_ref.shape[1]
    xp = torch.cat([x, x[:P]])
    wp = torch.cat([w_ref, torch.zeros(P, K, dtype=w_ref.dtype, device=x.device)])
    wp[x.shape[0]:, 0] = 1.0
    for e in range(ref_block.experts.global_num_experts):
        ids = torch.where(ids_ref == e, ids_ref, torch.full_like(ids_ref, -1))
        probe_ids = torch.full((P, K), -1, dtype=ids.dtype, device=x.device)
        probe_ids[:, 0] = e
        ids = torch.cat([ids, probe_ids])
        c_ref = ref_block.experts.experts_forward(xp, wp, ids)
        c_q = quant_block.experts.experts_forward(xp, wp, ids)
        rows = (ids_ref == e).any(dim=1).nonzero().squeeze(1)
        s = r = m = None
        if rows.numel():
            es = error_stats(c_ref[rows], c_q[rows])
            s, r, m = es.sqnr_db, es.rel_err, es.max_abs_err
        T = x.shape[0]
        bad = nonfinite_count(c_q[rows]) + nonfinite_count(c_q[T:])
        experts.append(ExpertReport(e, int(rows.numel()), s, r, m, sqnr_db(c_ref[T:], c_q[T:]), bad))
    rc = routing_changed(ids_ref, ids_q)
    return LayerReport(layer, st.sqnr_db, st.rel_err, st.cosine, st.max_abs_err, rc, st.nonfinite, x.shape[0],
                       inputs, scheme, experts)

