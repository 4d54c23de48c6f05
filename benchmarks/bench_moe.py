"""GPU benchmark of the moequant FusedMoE forward (routing -> output) per shape, scheme and token count M.

T = M tokens, E experts, H hidden, I intermediate, K top-k.
Each row gives the time of one forward (CUDA-graph replay and eager), the expert bytes it touched, the achieved
bandwidth against the card's copy bandwidth, the achieved rate 2*M*K*3*H*I / time against the card's dense rate of
the scheme's compute dtype (both measured in the same run), the speed-up over unquantized and the relative error
||out - ref|| / ||ref|| against the layer's own reference path in fp32.

    python -m benchmarks.bench_moe --schemes unquantized,fp8-tensor --shapes qwen3-30b-a3b --ms 1,64
    python -m benchmarks.bench_moe --device cpu --out /tmp/bench.json   # tiny shape, reference path, no GPU
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import moequant
from moequant.quantize import fp8_math as fm


@dataclass(frozen=True)
class Shape:
    name: str
    E: int
    K: int
    H: int
    I: int


SHAPES = {s.name: s for s in (
    Shape("mixtral-8x7b", 8, 2, 4096, 14336),
    Shape("qwen3-30b-a3b", 128, 8, 2048, 768),
    Shape("deepseek-v3-shard", 256, 8, 7168, 256),  # one GPU's shard of DeepSeek-V3's routed experts
    Shape("tiny", 4, 2, 64, 32),  # the CPU dry run
)}
GPU_SHAPES = ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3-shard")
GPU_MS = (1, 8, 64, 256, 1024, 4096)
CPU_MS = (1, 8)
REPLICAS = 8  # input sets per timed step: different experts per forward, so small M does not run from L2
ERR_TOKENS = 4096  # the error check runs on at most this many tokens: all of them at the benchmark's M, so a
# dynamic per-tensor activation scale (the max over every token) is the same in the layer and its reference
DENSE_N = 8192
COPY_BYTES = 1 << 30
WEIGHT_STD = 0.02


# --- the card ---------------------------------------------------------------------------------------------------
def _do_bench_s(fn) -> float:
    """Median seconds of fn, by triton.testing.do_bench (which flushes L2 between calls)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3


def copy_bandwidth_gbps() -> float:
    """A COPY_BYTES device-to-device copy; bytes read + written per second, in GB/s."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").random_(0, 256)
    dst = torch.empty_like(src)
    t = _do_bench_s(lambda: dst.copy_(src))
    return 2 * COPY_BYTES / t / 1e9


def dense_bf16_tflops() -> float:
    a = torch.randn(DENSE_N, DENSE_N, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(DENSE_N, DENSE_N, dtype=torch.bfloat16, device="cuda")
    return 2 * DENSE_N**3 / _do_bench_s(lambda: torch.matmul(a, b)) / 1e12


def dense_fp8_tflops() -> float | None:
    """torch._scaled_mm with e4m3 operands and per-tensor scales; None where the card or torch lacks fp8 GEMMs."""
    try:
        a = torch.randn(DENSE_N, DENSE_N, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(DENSE_N, DENSE_N, device="cuda").to(torch.float8_e4m3fn).t()  # column-major, as required
        one = torch.ones((), dtype=torch.float32, device="cuda")
        fn = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
        return 2 * DENSE_N**3 / _do_bench_s(fn) / 1e12
    except (RuntimeError, AttributeError, TypeError) as e:
        print(f"bench_moe: no dense fp8 rate ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def measure_card(device: str) -> dict:
    """Card name, versions and the measured bounds (None on the CPU)."""
    import triton

    gpu = device == "cuda"
    meta = {
        "card": torch.cuda.get_device_name() if gpu else "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(),
        "copy_bandwidth_GBps": copy_bandwidth_gbps() if gpu else None,
        "dense_bf16_TFLOPs": dense_bf16_tflops() if gpu else None,
        "dense_fp8_TFLOPs": dense_fp8_tflops() if gpu else None,
    }
    _free()
    return meta


# --- the layer --------------------------------------------------------------------------------------------------
def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_weights(shape: Shape, device: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bf16 experts, std WEIGHT_STD: w13 [E, 2I, H], w2 [E, H, I]."""
    def rnd(*size):
        return torch.randn(*size, generator=gen, device=device, dtype=torch.bfloat16).mul_(WEIGHT_STD)

    return rnd(shape.E, 2 * shape.I, shape.H), rnd(shape.E, shape.H, shape.I)


ACT_ORDER = "+actorder"  # scheme suffix: integer scheme with a random act-order channel permutation per expert
STATIC = "+static"  # scheme suffix: fp8-tensor with static input scales calibrated on a random batch (CT's FP8 preset)
# e.g. w4a16:g128+actorder, fp8-tensor+static
GROUP = re.compile(r"^(?P<base>[\w-]+?)(?::g(?P<g>\d+))?(?P<act>\+actorder)?(?P<static>\+static)?$")


def bench_config(name: str) -> moequant.QuantConfig:
    """A benchmark scheme name -> QuantConfig: a registry name, optionally ':gN' (group size N), '+actorder' and,
    for fp8-tensor, '+static'."""
    m = GROUP.match(name)
    if m is None or m["base"] not in moequant.list_methods() or m["static"] and m["base"] != "fp8-tensor":
        raise argparse.ArgumentTypeError(f"bad scheme {name!r}: a registry name ({', '.join(moequant.list_methods())}), "
                                         f"optionally with ':gN' and, for integer schemes, '{ACT_ORDER}' "
                                         f"(fp8-tensor: '{STATIC}')")
    return moequant.QuantConfig(scheme=m["base"], group_size=int(m["g"]) if m["g"] else None,
                                act_order=bool(m["act"]), activation_scheme="static" if m["static"] else "dynamic")


def _random_g_idx(layer: moequant.FusedMoE, gen: torch.Generator) -> None:
    """Replace the identity grouping by g_idx[perm[j]] = j // G with a random perm per expert and projection, as an
    act-order checkpoint has (the weights then no longer match w13/w2, which the timing does not care about)."""
    G = layer.quant_config.group_size
    for p in ("w13", "w2"):
        g_idx = getattr(layer, f"{p}_weight_g_idx").data
        E, K = g_idx.shape
        for e in range(E):
            perm = torch.randperm(K, generator=gen, device="cpu").to(g_idx.device)
            g_idx[e, perm] = (torch.arange(K, device=g_idx.device) // G).to(g_idx.dtype)


def _calibrate_input_scales(layer: moequant.FusedMoE, w13: torch.Tensor, w2: torch.Tensor, gen: torch.Generator,
                            tokens: int = 64) -> None:
    """Static fp8 input scales as a calibration gives them: max |x| / 448 over a batch like make_inputs' and
    max |act(x W1^T, x W3^T)| / 448 over every expert's intermediate on it (bf16 weights, silu)."""
    x = torch.randn(tokens, w13.shape[2], generator=gen, device=w13.device, dtype=torch.bfloat16).float()
    I = w2.shape[2]
    inter = torch.stack([(torch.nn.functional.silu(h[:, :I]) * h[:, I:]).abs().max()
                         for h in (x @ w13[e].float().T for e in range(w13.shape[0]))]).max()
    layer.w13_input_scale.data.copy_(fm.div_by_max(x.abs().max()))
    layer.w2_input_scale.data.copy_(fm.div_by_max(inter))


def build_layer(shape: Shape, scheme: str, w13: torch.Tensor, w2: torch.Tensor, device: str) -> moequant.FusedMoE:
    """A FusedMoE on `device` holding w13/w2, quantized by the scheme's RTN (load_dense_weights); a +actorder
    scheme gets a random act-order grouping, a +static one calibrated input scales, before
    process_weights_after_loading."""
    qc = bench_config(scheme)
    with torch.device(device):
        layer = moequant.FusedMoE(shape.E, shape.K, shape.H, shape.I, params_dtype=torch.bfloat16, quant_config=qc)
    if qc.act_order:
        layer.quant_method.quantize_dense(layer, w13, w2)
        _random_g_idx(layer, torch.Generator().manual_seed(1))
        layer.quant_method.process_weights_after_loading(layer)
    elif qc.activation_scheme == "static":
        layer.quant_method.quantize_dense(layer, w13, w2)
        _calibrate_input_scales(layer, w13, w2, torch.Generator(device=device).manual_seed(2))
        layer.quant_method.process_weights_after_loading(layer)
    else:
        layer.load_dense_weights(w13, w2)
    if device == "cpu":
        layer.backend = "reference"
    return layer


def random_layer(shape_name: str, scheme: str, device: str = "cuda", seed: int = 0) -> moequant.FusedMoE:
    """A layer of the named shape holding random bf16 weights (make_weights) quantized by the scheme (build_layer)."""
    sh = SHAPES[shape_name]
    w13, w2 = make_weights(sh, device, torch.Generator(device=device).manual_seed(seed))
    return build_layer(sh, scheme, w13, w2, device)


def make_inputs(shape: Shape, M: int, device: str, gen: torch.Generator, replicas: int):
    """`replicas` sets of (x bf16 [M, H], router_logits fp32 [M, E]); random logits spread tokens over the experts."""
    return [(torch.randn(M, shape.H, generator=gen, device=device, dtype=torch.bfloat16),
             torch.randn(M, shape.E, generator=gen, device=device, dtype=torch.float32)) for _ in range(replicas)]


def bytes_per_forward(layer: moequant.FusedMoE, inputs) -> tuple[float, float]:
    """(expert bytes, all bytes) one forward touches, averaged over the input sets: distinct experts routed to
    x (every parameter's bytes / E_local), plus x and router_logits read and the output written."""
    per_expert = sum(p.numel() * p.element_size() for p in layer.parameters()) / layer.local_num_experts
    expert, total = [], []
    for x, logits in inputs:
        ids = layer.to_local_ids(layer.route(x, logits)[1])
        n = torch.unique(ids[ids >= 0]).numel()
        expert.append(n * per_expert)
        total.append(n * per_expert + 2 * x.numel() * x.element_size() + logits.numel() * logits.element_size())
    return statistics.mean(expert), statistics.mean(total)


def _median_s(fn, device: str, budget_s: float = 0.3, max_iters: int = 100) -> float:
    """Median seconds of fn over as many calls as fit in about budget_s (5 at least); CUDA events on the GPU."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    n = max(5, min(max_iters, int(budget_s / max(time.perf_counter() - t0, 1e-6))))
    if device != "cuda":
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in ev:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in ev) * 1e-3


def capture_graph(layer, inputs):
    """One CUDA graph running the forward on every input set (warmed up on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, logits in inputs:
            layer(x, logits)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [layer(x, logits) for x, logits in inputs]
    return graph, outs


def time_forward(layer, inputs, device: str) -> dict:
    """Seconds per forward, eager and (on the GPU) as a graph replay; each step runs every input set once."""
    R = len(inputs)

    def eager():
        for x, logits in inputs:
            layer(x, logits)

    for _ in range(2):  # compile / autotune every kernel for this M
        eager()
    res = {"eager_s": _median_s(eager, device) / R, "graph_s": None}
    if device == "cuda":
        try:
            graph, outs = capture_graph(layer, inputs)
            res["graph_s"] = _median_s(graph.replay, device) / R
            del graph, outs
        except Exception as e:  # a host sync inside the forward cannot be captured: keep the eager time
            res["graph_error"] = f"{type(e).__name__}: {e}"[:300]
    return res


def rel_error(layer, x: torch.Tensor, logits: torch.Tensor) -> tuple[float, int]:
    """(||out - ref|| / ||ref||, tokens checked): out = the layer's forward, ref = the same layer with
    backend="reference" on fp32 inputs (fp32 math and output), on the first ERR_TOKENS tokens."""
    n = min(x.shape[0], ERR_TOKENS)
    out = layer(x, logits)[:n].double()
    saved = layer.backend
    layer.backend = "reference"
    try:
        ref = layer(x[:n].float(), logits[:n]).double()
    finally:
        layer.backend = saved
    if not torch.isfinite(out).all():
        return float("inf"), n
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item(), n


# --- rows -------------------------------------------------------------------------------------------------------
def bench_row(layer, shape: Shape, scheme: str, M: int, inputs, card: dict, device: str) -> dict:
    t = time_forward(layer, inputs, device)
    expert_bytes, total_bytes = bytes_per_forward(layer, inputs)
    err, n_err = rel_error(layer, *inputs[0])
    sec = t["graph_s"] if t["graph_s"] is not None else t["eager_s"]
    flops = 2 * M * shape.K * 3 * shape.H * shape.I
    compute = getattr(layer.quant_method, "compute_dtype", "bf16")
    gbps, tflops = total_bytes / sec / 1e9, flops / sec / 1e12
    bw, dense = card["copy_bandwidth_GBps"], card.get(f"dense_{compute}_TFLOPs")
    row = {
        "shape": shape.name, "E": shape.E, "K": shape.K, "H": shape.H, "I": shape.I, "scheme": scheme, "M": M,
        "compute_dtype": compute, "replicas": len(inputs),
        "graph_us": None if t["graph_s"] is None else t["graph_s"] * 1e6, "eager_us": t["eager_s"] * 1e6,
        "expert_bytes": expert_bytes, "bytes": total_bytes, "GBps": gbps,
        "pct_copy_bw": None if not bw else 100 * gbps / bw, "TFLOPs": tflops,
        "pct_dense": None if not dense else 100 * tflops / dense, "speedup_vs_unquantized": None,
        "rel_err": err, "err_tokens": n_err,
    }
    if "graph_error" in t:
        row["graph_error"] = t["graph_error"]
    return row


def error_row(shape: Shape, scheme: str, M: int, e: Exception) -> dict:
    print(f"bench_moe: {shape.name} {scheme} M={M} failed: {type(e).__name__}: {e}", file=sys.stderr)
    return {"shape": shape.name, "scheme": scheme, "M": M, "error": f"{type(e).__name__}: {e}"[:500]}


def _time_of(row: dict) -> float | None:
    return row.get("graph_us") if row.get("graph_us") is not None else row.get("eager_us")


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_unquantized = unquantized time / row time at the same shape and M (rows of this run only)."""
    base = {(r["shape"], r["M"]): _time_of(r) for r in rows if r["scheme"] == "unquantized" and "error" not in r}
    for r in rows:
        b, t = base.get((r["shape"], r["M"])), _time_of(r)
        if "error" not in r and b and t:
            r["speedup_vs_unquantized"] = b / t


def bench_shape(shape: Shape, schemes: list[str], ms: list[int], card: dict, device: str, seed: int) -> list[dict]:
    """All rows of one shape; the bf16 weights are made once and every layer is freed before the next."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w13, w2 = make_weights(shape, device, gen)
    rows = []
    for scheme in schemes:
        try:
            layer = build_layer(shape, scheme, w13, w2, device)
        except Exception as e:
            rows += [error_row(shape, scheme, M, e) for M in ms]
            continue
        for M in ms:
            in_gen = torch.Generator(device=device).manual_seed(seed + M)  # same inputs for every scheme
            inputs = make_inputs(shape, M, device, in_gen, 1 if device == "cpu" else REPLICAS)
            try:
                with torch.no_grad():
                    rows.append(bench_row(layer, shape, scheme, M, inputs, card, device))
            except Exception as e:
                rows.append(error_row(shape, scheme, M, e))
            del inputs
            _free()
        del layer
        _free()
    del w13, w2
    _free()
    return rows


# --- output -----------------------------------------------------------------------------------------------------
def card_slug(card: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")


def default_out(meta: dict) -> Path:
    return Path(__file__).resolve().parent / "results" / f"{meta['date']}-{card_slug(meta['card'])}.json"


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    """Write meta + rows; rows already in the file are kept unless this run has the same (shape, scheme, M)."""
    key = lambda r: (r["shape"], r["scheme"], r["M"])  # noqa: E731
    merged = {}
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("card") != meta["card"]:
            raise SystemExit(f"bench_moe: {path} holds results of {old.get('card')!r}, not {meta['card']!r}; "
                             f"pass another --out")
        merged = {key(r): r for r in old.get("rows", [])}
    merged.update({key(r): r for r in rows})
    order = {name: i for i, name in enumerate(SHAPES)}
    out = dict(meta, rows=sorted(merged.values(), key=lambda r: (order.get(r["shape"], 99), r["scheme"], r["M"])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")


def _fmt(v, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:{width}{spec}}"


def print_table(rows: list[dict], meta: dict) -> None:
    print(f"\n{meta['card']}  copy {_fmt(meta['copy_bandwidth_GBps'], '.0f', 0)} GB/s  "
          f"bf16 {_fmt(meta['dense_bf16_TFLOPs'], '.0f', 0)} TFLOP/s  fp8 {_fmt(meta['dense_fp8_TFLOPs'], '.0f', 0)} TFLOP/s")
    print(f"{'shape':18} {'scheme':24} {'M':>5} {'graph_us':>9} {'eager_us':>9} {'MB/fwd':>8} {'GB/s':>7} {'%bw':>5} "
          f"{'TFLOP/s':>8} {'%dense':>6} {'x_unq':>6} {'rel_err':>8}")
    for r in rows:
        head = f"{r['shape']:18} {r['scheme']:24} {r['M']:>5}"
        if "error" in r:
            print(f"{head} ERROR {r['error'][:80]}")
            continue
        print(f"{head} {_fmt(r['graph_us'], '.1f', 9)} {r['eager_us']:9.1f} {r['expert_bytes'] / 1e6:8.1f} "
              f"{r['GBps']:7.0f} {_fmt(r['pct_copy_bw'], '.0f', 5)} {r['TFLOPs']:8.2f} {_fmt(r['pct_dense'], '.0f', 6)} "
              f"{_fmt(r['speedup_vs_unquantized'], '.2f', 6)} {r['rel_err']:8.1e}")


# --- command line -----------------------------------------------------------------------------------------------
def _csv(kind: str, choices=None, conv=str):
    def parse(text: str):
        items = [conv(t.strip()) for t in text.split(",") if t.strip()]
        bad = [i for i in items if (choices is not None and i not in choices) or (conv is int and i <= 0)]
        if not items or bad:
            want = f"choose from {', '.join(choices)}" if choices is not None else "positive integers"
            raise argparse.ArgumentTypeError(f"bad {kind} {bad or text!r}: {want}")
        return items
    return parse


def _schemes(text: str) -> list[str]:
    names = _csv("scheme")(text)
    for n in names:
        bench_config(n)
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_moe", description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", type=_schemes, default=["unquantized"],
                   help=f"comma-separated registry names, optionally ':gN' (group size) and {ACT_ORDER} "
                        "(e.g. w4a16:g128+actorder; default unquantized)")
    p.add_argument("--shapes", type=_csv("shape", list(SHAPES)), default=None,
                   help=f"comma-separated, from {', '.join(SHAPES)} (default: {', '.join(GPU_SHAPES)}; tiny on --device cpu)")
    p.add_argument("--ms", type=_csv("token counts", conv=int), default=None,
                   help=f"comma-separated token counts (default {','.join(map(str, GPU_MS))}; {','.join(map(str, CPU_MS))} on cpu)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: dry run of the tiny shape through the reference path, no graphs, no card measurements")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<date>-<card>.json)")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.shapes = args.shapes or (["tiny"] if cpu else list(GPU_SHAPES))
    args.ms = args.ms or list(CPU_MS if cpu else GPU_MS)
    if cpu and args.shapes != ["tiny"]:
        p.error("--device cpu runs only the tiny shape (the real shapes need a GPU)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_moe: CUDA is not available (torch " + torch.__version__ + "); this benchmark needs "
                         "an NVIDIA GPU. Use --device cpu for the dry run of the tiny shape.")
    meta = measure_card(args.device)
    out = args.out or default_out(meta)
    rows: list[dict] = []
    for name in args.shapes:
        rows += bench_shape(SHAPES[name], args.schemes, args.ms, meta, args.device, args.seed)
        add_speedups(rows)
        write_json(out, meta, rows)  # after every shape, so a run cut short keeps what it measured
    print_table(rows, meta)
    print(f"\nwrote {out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
