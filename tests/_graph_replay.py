"""A layer's forward captured in a CUDA graph and replayed with new inputs, against eager forwards (GPU tests)."""

import torch

from conftest import rel_err


def assert_graph_replays_match_eager(layer, hidden: int, experts: int, tol: float = 4e-3, replays: int = 3) -> None:
    """Capture layer(x, logits) for one bf16 token, then replay with fresh inputs copied in: each replay's output
    matches an eager forward on the same inputs within tol (atomics may add in another order)."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    logits = torch.randn(1, experts, device="cuda", generator=gen)
    layer(x, logits)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = layer(x, logits)
    for _ in range(replays):
        x.copy_(torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16, generator=gen))
        logits.copy_(torch.randn(1, experts, device="cuda", generator=gen))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(out, layer(x, logits)) <= tol
