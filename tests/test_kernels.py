"""Triton kernels against their torch twins: in the interpreter on the CPU (fp16/fp32), and bf16 on the GPU."""

from dataclasses import dataclass

import pytest
import torch

from conftest import ON_GPU, rel_err
from moequant.kernels.align import SORT_SLOTS, moe_align
from moequant.kernels.moe_gemm import fused_experts
from moequant.kernels.reference import fused_moe_ref, moe_align_ref

DEVICE = "cuda" if ON_GPU else "cpu"


@dataclass(frozen=True)
class Case:
    T: int
    K: int
    E: int
    H: int
    I: int
    why: str
    activation: str = "silu"
    bias: bool = False
    routing: str = "random"  # random | one_expert | half_empty


CASES = [
    Case(1, 1, 3, 16, 16, "T=1, K=1"),
    Case(7, 2, 7, 33, 17, "prime E, odd H and I"),
    Case(16, 4, 4, 32, 16, "K = E: every expert gets every token", routing="random"),
    Case(24, 2, 5, 48, 32, "all tokens to one expert", routing="one_expert"),
    Case(20, 2, 11, 40, 24, "empty experts: only even experts used", routing="half_empty"),
    Case(9, 3, 6, 32, 24, "gelu with biases", activation="gelu", bias=True),
    Case(5, 2, 4, 24, 16, "gpt-oss clamped swiglu with biases", activation="swigluoai", bias=True),
    Case(0, 2, 4, 16, 16, "no tokens"),
]


def make_routing(c: Case, gen):
    if c.routing == "one_expert":
        ids = torch.full((c.T, c.K), 3, dtype=torch.int32)
        ids[:, 1:] = torch.arange(c.K - 1, dtype=torch.int32) % 3  # other picks distinct from expert 3
    elif c.routing == "half_empty":
        even = torch.arange(0, c.E, 2)
        ids = torch.stack([even[torch.randperm(len(even), generator=gen)[: c.K]] for _ in range(c.T)]).int()
    else:
        rows = [torch.randperm(c.E, generator=gen)[: c.K] for _ in range(c.T)]
        ids = torch.stack(rows).int() if rows else torch.zeros(0, c.K, dtype=torch.int32)
    w = torch.rand(c.T, c.K, generator=gen)
    return w, ids


def make_weights(c: Case, dtype, gen):
    w13 = (torch.randn(c.E, 2 * c.I, c.H, generator=gen) / c.H**0.5).to(dtype)
    w2 = (torch.randn(c.E, c.H, c.I, generator=gen) / c.I**0.5).to(dtype)
    b13 = (torch.randn(c.E, 2 * c.I, generator=gen) * 0.1).to(dtype) if c.bias else None
    b2 = (torch.randn(c.E, c.H, generator=gen) * 0.1).to(dtype) if c.bias else None
    return w13, w2, b13, b2


def run_case(c: Case, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(c.T, c.H, generator=gen).to(dtype)
    w, ids = make_routing(c, gen)
    w13, w2, b13, b2 = make_weights(c, dtype, gen)
    mv = lambda t: None if t is None else t.to(device)
    out = fused_experts(mv(x), mv(w13), mv(w2), mv(w), mv(ids), activation=c.activation, w13_bias=mv(b13), w2_bias=mv(b2))
    ref = fused_moe_ref(x, w, ids, lambda e: (w13[e].float(), w2[e].float()), c.E, c.activation, b13, b2)
    return out.cpu(), ref


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.why)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)], ids=["fp32", "fp16"])
def test_fused_experts_matches_reference(c, dtype, tol):
    if ON_GPU and dtype == torch.float32:
        pytest.skip("fp32 on the GPU is covered by the interpreter run; the GPU runs bf16 below")
    out, ref = run_case(c, dtype, DEVICE)
    assert out.shape == (c.T, c.H)
    assert rel_err(out, ref) <= tol, c.why


def test_router_weight_on_input_and_remote_experts():
    """K=1 with the weight applied to the input (Llama-4 style), and ids of -1 (experts on other EP ranks)."""
    gen = torch.Generator().manual_seed(1)
    T, E, H, I = 10, 4, 32, 16
    x = torch.randn(T, H, generator=gen)
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen) * 0.2, torch.randn(E, H, I, generator=gen) * 0.2
    b13 = torch.randn(E, 2 * I, generator=gen)
    ids = torch.randint(0, E, (T, 1), generator=gen, dtype=torch.int32)
    ids[::3] = -1
    w = torch.rand(T, 1, generator=gen)
    d = lambda t: t.to(DEVICE)
    out = fused_experts(d(x), d(w13), d(w2), d(w), d(ids), w13_bias=d(b13), apply_router_weight_on_input=True,
                        has_remote_experts=True).cpu()
    ref = fused_moe_ref(x, w, ids, lambda e: (w13[e], w2[e]), E, w13_bias=b13, apply_router_weight_on_input=True)
    assert torch.all(out[::3] == 0)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("T,K,E,BM", [
    (1, 2, 8, 16),  # decode
    (37, 3, 13, 16),  # prime E
    (100, 8, 64, 32),  # 800 slots: the largest sort-in-one-program size class
    (0, 2, 4, 16),  # no tokens
    (600, 6, 5, 64),  # 3600 slots: count/scatter kernels
    (300, 8, 129, 16),  # E + 1 > 128 bins, many programs
])
def test_align_matches_twin_and_invariants(T, K, E, BM):
    gen = torch.Generator().manual_seed(T)
    ids = torch.randint(0, E, (T, K), generator=gen, dtype=torch.int32)
    if T > 4:
        ids[3] = -1  # a token whose experts live on another rank
    got = [t.cpu() for t in moe_align(ids.to(DEVICE), E, BM)]
    want = moe_align_ref(ids, E, BM)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    if T * K <= SORT_SLOTS:
        assert torch.equal(got[0], want[0])
    else:  # the scatter kernel may order slots differently inside an expert's run of blocks
        owner = want[1].long().repeat_interleave(BM)
        tag = lambda sid: torch.sort(owner * (T * K + 1) + sid.long()).values
        assert torch.equal(tag(got[0]), tag(want[0]))
    sorted_ids, expert_ids, total = got
    S = T * K
    real = sorted_ids[sorted_ids < S]
    flat = ids.reshape(-1)
    # every routed slot appears exactly once; dropped slots never
    assert torch.equal(torch.sort(real.long()).values, torch.nonzero(flat >= 0).squeeze(1))
    # each block holds slots of its own expert only
    for b in range(int(total) // BM):
        blk = sorted_ids[b * BM:(b + 1) * BM]
        blk = blk[blk < S].long()
        assert torch.all(flat[blk] == expert_ids[b])
    assert torch.all(expert_ids[int(total) // BM:] == -1)


@pytest.mark.gpu
@pytest.mark.parametrize("T,K,E,H,I", [(1, 8, 128, 2048, 768), (64, 2, 8, 1024, 1408), (700, 8, 64, 512, 256),
                                       (4096, 8, 128, 256, 128)])
def test_bf16_gpu_matches_reference(T, K, E, H, I):
    """bf16 on the GPU; T*K > 4096 also takes the torch align path."""
    c = Case(T, K, E, H, I, "gpu")
    out, ref = run_case(c, torch.bfloat16, "cuda")
    assert rel_err(out, ref) <= 1e-2


@pytest.mark.gpu
def test_layer_captures_in_a_cuda_graph():
    from moequant import FusedMoE

    E, K, H, I, T = 16, 4, 256, 128, 8
    layer = FusedMoE(E, K, H, I, params_dtype=torch.bfloat16).cuda()
    layer.load_dense_weights(torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.05,
                             torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * 0.05)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(T, E, device="cuda")
    eager = layer(x, logits)
    g = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        out = layer(x, logits)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.parametrize("T,E,K,scoring,renorm,scale", [(1, 8, 2, "softmax", True, 1.0), (13, 7, 3, "sigmoid", False, 2.5),
                                                          (6, 128, 8, "softmax", False, 1.0), (5, 4, 4, "softmax", True, 1.0),
                                                          (0, 8, 2, "softmax", True, 1.0),
                                                          (3, 300, 8, "sigmoid", True, 2.5)])
def test_fused_topk_matches_select_experts(T, E, K, scoring, renorm, scale):
    from moequant.kernels.topk import fused_topk
    from moequant.routing import select_experts

    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(E))
    w, ids = fused_topk(logits.to(DEVICE), K, renorm, scoring, scale)
    rw, rids = select_experts(logits, logits, K, False, renorm, scoring_func=scoring, routed_scaling_factor=scale)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.cpu(), rids)
    assert torch.allclose(w.cpu(), rw, rtol=1e-6, atol=1e-7)


def test_fused_topk_ties_go_to_the_lower_index():
    from moequant.kernels.topk import fused_topk

    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    _, ids = fused_topk(logits.to(DEVICE), 2, True)
    assert ids.cpu().tolist() == [[1, 2]]


def test_fused_topk_orders_negative_zero_and_infinite_logits():
    """The selection runs on integer keys made from the logits' bits: negative logits order by value (not by bits),
    -0.0 ties +0.0 (lower index first), -inf experts come last, and K = E returns every expert."""
    from moequant.kernels.topk import fused_topk

    logits = torch.tensor([[-2.0, -0.5, 0.0, -0.0, -float("inf"), -3.0, -0.5]])
    w, ids = fused_topk(logits.to(DEVICE), 7, False)
    assert ids.cpu().tolist() == [[2, 3, 1, 6, 0, 5, 4]]
    assert torch.allclose(w.cpu(), torch.softmax(logits, -1)[0, [2, 3, 1, 6, 0, 5, 4]][None], rtol=1e-6)
    _, ids = fused_topk(torch.tensor([[-0.0, 0.0, -1.0]]).to(DEVICE), 1, True)
    assert ids.cpu().tolist() == [[0]]


@pytest.mark.parametrize("T,K,C,row_div", [(3, 2, 1500, 2), (5, 3, 40, 1), (1, 8, 64, 8)])
def test_gather_slot_columns_matches_twin(T, K, C, row_div):
    """Each slot's row in its expert's sorted column order (x rows shared by a token's slots: row_div = K; GEMM1's
    output: one row per slot); a slot routed to another rank (-1) stays zero; C over one program's block."""
    from moequant.kernels.gather import gather_slot_columns
    from moequant.kernels.reference import gather_slot_columns_ref

    gen = torch.Generator().manual_seed(C)
    E = 4
    a = torch.randn(T * K // row_div, C, generator=gen).to(torch.float16)
    sort_idx = torch.stack([torch.randperm(C, generator=gen) for _ in range(E)]).int()
    ids = torch.randint(0, E, (T, K), generator=gen).int()
    ids[0, 0] = -1
    got = gather_slot_columns(a.to(DEVICE), sort_idx.to(DEVICE), ids.to(DEVICE), row_div).cpu()
    want = gather_slot_columns_ref(a, sort_idx, ids, row_div)
    assert torch.equal(got, want)
    assert not got[0].any()
    with pytest.raises(ValueError, match="do not match"):
        gather_slot_columns(a.to(DEVICE), sort_idx[:, :-1].to(DEVICE), ids.to(DEVICE), row_div)


@pytest.mark.parametrize("T,E,K,C,scoring,renorm", [(1, 128, 8, 600, "softmax", True), (5, 8, 2, 64, "sigmoid", False),
                                                      (0, 8, 2, 64, "softmax", True)])
def test_fused_topk_gather_matches_topk_and_gather(T, E, K, C, scoring, renorm):
    """Routing with the act-order gather in the same launch: the same weights and ids as fused_topk (hence
    select_experts), and each slot's row of x in its expert's sorted order (C over several programs' blocks)."""
    from moequant.kernels.reference import gather_slot_columns_ref
    from moequant.kernels.topk import fused_topk, fused_topk_gather

    gen = torch.Generator().manual_seed(C)
    logits = torch.randn(T, E, generator=gen)
    x = torch.randn(T, C, generator=gen).to(torch.float16)
    sort_idx = torch.stack([torch.randperm(C, generator=gen) for _ in range(E)]).int()
    w, ids, rows = (t.cpu() for t in fused_topk_gather(logits.to(DEVICE), K, renorm, scoring, 2.0, x.to(DEVICE),
                                                        sort_idx.to(DEVICE)))
    rw, rids = (t.cpu() for t in fused_topk(logits.to(DEVICE), K, renorm, scoring, 2.0))
    assert torch.equal(ids, rids) and torch.equal(w, rw)
    assert torch.equal(rows, gather_slot_columns_ref(x, sort_idx, ids, K))
    with pytest.raises(ValueError, match="do not match"):
        fused_topk_gather(logits.to(DEVICE), K, renorm, scoring, 1.0, x.to(DEVICE), sort_idx[:, :-1].to(DEVICE))


@pytest.mark.parametrize("T,E,K,C", [(1, 128, 8, 2500), (4, 6, 2, 64), (0, 8, 2, 64)])
def test_routed_rows_order_slots_as_topk(T, E, K, C):
    """routed_rows (no routing; each program ranks one expert) writes the rows fused_topk_gather writes, every slot
    where fused_topk's top k puts its expert: logits with many ties (ties to the lower index), -0.0 and +0.0
    (equal), -inf entries, and C over several programs' blocks."""
    from moequant.kernels.topk import fused_topk_gather, routed_rows

    gen = torch.Generator().manual_seed(E)
    logits = torch.randint(-2, 3, (T, E), generator=gen).float()
    if T:
        logits[0, :3] = torch.tensor([-0.0, 0.0, -float("inf")])
    x = torch.randn(T, C, generator=gen).to(torch.float16)
    sort_idx = torch.stack([torch.randperm(C, generator=gen) for _ in range(E)]).int()
    rows = routed_rows(logits.to(DEVICE), K, x.to(DEVICE), sort_idx.to(DEVICE)).cpu()
    _, _, want = fused_topk_gather(logits.to(DEVICE), K, True, "softmax", 1.0, x.to(DEVICE), sort_idx.to(DEVICE))
    assert torch.equal(rows, want.cpu())
    with pytest.raises(ValueError, match="do not match"):
        routed_rows(logits.to(DEVICE), K, x.to(DEVICE), sort_idx[:, :-1].to(DEVICE))


@pytest.mark.parametrize("T,K,H", [(1, 8, 2048), (7, 3, 33), (0, 2, 16)])
def test_moe_sum_matches_twin(T, K, H):
    from moequant.kernels.moe_gemm import moe_sum
    from moequant.kernels.reference import moe_sum_ref

    y = torch.randn(T * K, H, generator=torch.Generator().manual_seed(H)).to(torch.float16)
    assert torch.equal(moe_sum(y.to(DEVICE), T, K).cpu(), moe_sum_ref(y, T, K))


def test_fit_shared_memory_shrinks_fp32_tiles_only_as_needed():
    from moequant.kernels.tuning import SHARED_MEMORY_BUDGET, GemmConfig, fit_shared_memory

    big = GemmConfig(128, 128, 64, 8, 8, 4)
    assert fit_shared_memory(big, 2, gated=False) == big  # bf16 prefill config fits as tuned
    small = fit_shared_memory(big, 4, gated=True)  # fp32, two B tiles: 4 stages need 384 KB
    assert (small.BLOCK_M, small.BLOCK_N) == (128, 128)  # stages, then BLOCK_K give way; the tile stays
    assert small.num_stages * (128 + 256) * small.BLOCK_K * 4 <= SHARED_MEMORY_BUDGET
    assert small.num_stages >= 2 and small.BLOCK_K >= 16
