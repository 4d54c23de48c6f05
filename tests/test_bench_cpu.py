"""The benchmark driver's code path on the CPU: `--device cpu` runs the tiny shape (E=4, K=2, H=64, I=32, M in {1, 8})
through the reference path, without graphs or card measurements, and writes the JSON the GPU run writes."""

import json

import pytest
import torch

from benchmarks import bench_moe

META_KEYS = {"card", "torch", "triton", "cuda", "date", "copy_bandwidth_GBps", "dense_bf16_TFLOPs", "dense_fp8_TFLOPs",
             "rows"}
ROW_KEYS = {"shape", "E", "K", "H", "I", "scheme", "M", "compute_dtype", "replicas", "graph_us", "eager_us",
            "expert_bytes", "bytes", "GBps", "pct_copy_bw", "TFLOPs", "pct_dense", "speedup_vs_unquantized", "rel_err",
            "err_tokens"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "cpu.json"
    rc = bench_moe.main(["--device", "cpu", "--out", str(out)])
    return rc, out, json.loads(out.read_text())


def test_dry_run_writes_every_field(dry_run):
    rc, _, data = dry_run
    assert rc == 0
    assert set(data) == META_KEYS
    assert data["card"] == "cpu" and data["copy_bandwidth_GBps"] is None and data["dense_bf16_TFLOPs"] is None
    assert [(r["shape"], r["scheme"], r["M"]) for r in data["rows"]] == [("tiny", "unquantized", 1), ("tiny", "unquantized", 8)]
    for r in data["rows"]:
        assert set(r) == ROW_KEYS, set(r) ^ ROW_KEYS
        assert (r["E"], r["K"], r["H"], r["I"]) == (4, 2, 64, 32)
        assert r["graph_us"] is None and r["eager_us"] > 0  # no graphs on the CPU
        assert r["compute_dtype"] == "bf16"
        assert r["pct_copy_bw"] is None and r["pct_dense"] is None  # nothing measured to compare with
        assert r["speedup_vs_unquantized"] == 1.0  # unquantized against itself
        # bf16 output against the fp32 reference: rounding only (~4e-3 at most)
        assert 0 <= r["rel_err"] < 1e-2
        assert r["err_tokens"] == r["M"]


def test_bytes_count_distinct_experts(dry_run):
    _, _, data = dry_run
    per_expert = 3 * 64 * 32 * 2  # w13 + w2 of one expert in bf16
    for r in data["rows"]:
        experts = r["expert_bytes"] / per_expert
        # M=1, K=2 touches exactly 2 experts; M=8 touches between 2 and all 4
        assert experts == 2 if r["M"] == 1 else 2 <= experts <= 4, experts
        assert experts == int(experts)
        act = 2 * r["M"] * 64 * 2 + r["M"] * 4 * 4  # x in + out (bf16), router logits (fp32)
        assert r["bytes"] == r["expert_bytes"] + act
        assert r["TFLOPs"] == pytest.approx(2 * r["M"] * 2 * 3 * 64 * 32 / (r["eager_us"] * 1e-6) / 1e12)


def test_merge_replaces_same_key_and_keeps_others(dry_run, tmp_path):
    _, out, data = dry_run
    path = tmp_path / "merge.json"
    path.write_text(json.dumps(dict(data, rows=data["rows"] + [dict(data["rows"][0], M=3, eager_us=-1.0)])))
    assert bench_moe.main(["--device", "cpu", "--ms", "1", "--out", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [r["M"] for r in rows] == [1, 3, 8]  # M=1 replaced (not duplicated), M=3 and M=8 kept
    assert rows[1]["eager_us"] == -1.0


def test_merge_refuses_another_card(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"card": "NVIDIA H100 80GB HBM3", "rows": []}))
    with pytest.raises(SystemExit, match="H100"):
        bench_moe.main(["--device", "cpu", "--ms", "1", "--out", str(path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_no_cuda_is_a_clear_message():
    with pytest.raises(SystemExit, match="CUDA is not available"):
        bench_moe.main(["--ms", "1"])


@pytest.mark.parametrize("argv", [["--schemes", "no-such-scheme"], ["--ms", "0"], ["--device", "cpu", "--shapes",
                                                                                    "mixtral-8x7b"]])
def test_bad_flags_are_rejected(argv):
    with pytest.raises(SystemExit) as exc:
        bench_moe.parse_args(argv)
    assert exc.value.code == 2  # argparse's usage error, not a traceback


def test_card_slug():
    assert bench_moe.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_static_fp8_scheme_gets_calibrated_input_scales(tmp_path):
    """`fp8-tensor+static` builds the layer with static input scales from a calibration batch (CT's FP8 preset), and
    other schemes refuse the suffix."""
    layer = bench_moe.build_layer(bench_moe.SHAPES["tiny"], "fp8-tensor+static", *bench_moe.make_weights(
        bench_moe.SHAPES["tiny"], "cpu", torch.Generator().manual_seed(0)), "cpu")
    assert layer.quant_method.static
    for name in ("w13_input_scale", "w2_input_scale"):
        s = getattr(layer, name)
        assert s.shape == (1,) and torch.isfinite(s).all() and (s > 0).all()
    out = tmp_path / "static.json"
    assert bench_moe.main(["--device", "cpu", "--schemes", "fp8-tensor+static", "--ms", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["scheme"] == "fp8-tensor+static"
    with pytest.raises(SystemExit):
        bench_moe.main(["--device", "cpu", "--schemes", "w4a16+static", "--out", str(out)])


def test_gemv_tuner_axes_and_grid():
    """tune_gemv varies only the axes a GEMV kernel reads (splits: GEMM2 of the rows kernel; UNIT: A16 fp4 on it;
    the fp8 rows GEMV's tensor-core body its own) and its grid keeps each config's neighbourhood; the worker pool
    stays off unless TUNE_WORKERS asks for it."""
    from benchmarks import tune_gemv as tg
    from moequant.kernels.gemv import GemvConfig

    def axes(name, down):
        return {a for a in tg.AXES if tg.applies(a, name, down)}

    common = {"BLOCK_N", "NG", "num_warps"}
    assert axes("gemv-up-fp8-tensor", False) == axes("gemv-down-fp4-g16", True) == common
    assert axes("gemv-up-int8-g128", False) == common | {"STAGES"}
    assert axes("gemv-down-int4-g128", True) == common | {"STAGES", "SPLIT_K", "PART_SPLIT", "PREFETCH"}
    assert axes("gemv-down-fp4-g16-rows", True) == common | {"STAGES", "SPLIT_K", "PART_SPLIT", "PREFETCH", "UNIT"}
    up = tg.grid(GemvConfig(32, 32, 4, PREFETCH=True, UNIT=8), "gemv-up-fp4-g16-rows", False)
    assert len(up) == 108 and len(set(up)) == 108
    assert {c.BLOCK_N for c in up} == {16, 32, 64} and {c.NG for c in up} == {16, 32, 64}
    assert {c.UNIT for c in up} == {4, 8} and {c.PREFETCH for c in up} == {False, True}
    assert {(c.PREFETCH, c.STAGES) for c in up} == {(True, 1), (False, 1), (False, 3)}  # one pipeline at a time
    down = tg.grid(GemvConfig(32, 2, 4, SPLIT_K=4, PART_SPLIT=True), "gemv-down-int4-g128", True)
    assert len(down) == 54 and {c.SPLIT_K for c in down} == {2, 4, 8} and all(c.PART_SPLIT for c in down)
    assert {c.UNIT for c in down} == {2} and {c.num_warps for c in down} == {4}
    # the fp8 rows GEMV: its CUDA-core body's axes plus the switch to the tensor-core body, whose own axes differ
    core, mma = GemvConfig(16, 4, 4), GemvConfig(16, 1, 8, MMA=True)
    assert {a for a in tg.AXES if tg.applies(a, "gemv-up-fp8-tensor-rows", False, core)} == common | {"MMA"}
    assert {a for a in tg.AXES if tg.applies(a, "gemv-down-fp8-row-rows", True, core)} == common | {"MMA", "SPLIT_K"}
    assert ({a for a in tg.AXES if tg.applies(a, "gemv-down-fp8-row-rows", True, mma)}
            == {"BLOCK_N", "num_warps", "STAGES", "MMA"})
    assert tg.neighbours(GemvConfig(64, 4, 4, SPLIT_K=2), "MMA") == [GemvConfig(32, 1, 4, MMA=True)]
    assert {c.STAGES for c in tg.neighbours(mma, "STAGES")} == {2, 3}
    assert {c.BLOCK_N for c in tg.neighbours(mma, "BLOCK_N")} == {32}
    assert {c.num_warps for c in tg.neighbours(mma, "num_warps")} == {2, 4, 16}
    m_grid = tg.grid(mma, "gemv-up-fp8-tensor-rows", False)
    assert len(m_grid) == 18 and all(c.MMA and c.BLOCK_N in (16, 32) and c.STAGES in (1, 2, 3) for c in m_grid)
    assert tg.Precompiler("tiny", "unquantized", tg.configure).pool is None  # TUNE_WORKERS unset: nothing spawned


def test_gemv_tuner_explicit_axes_sweep_only_the_named_gemv(monkeypatch):
    """TUNE_GEMV_AXES naming one GEMV: that GEMV's grid is the product of the values given (axes that do not apply
    dropped), the other GEMV keeps its config instead of falling back to the default grid."""
    from benchmarks import tune_gemv as tg
    from moequant.kernels.gemv import GemvConfig

    monkeypatch.setattr(tg, "EXPLICIT", {"up": {"BLOCK_N": [32, 64], "num_warps": [4, 8], "SPLIT_K": [2]}})
    cfg = GemvConfig(32, 16, 4, PREFETCH=True, UNIT=8)
    up = tg.grid(cfg, "gemv-up-fp4-g16-rows", False)
    assert {(c.BLOCK_N, c.num_warps) for c in up} == {(32, 4), (32, 8), (64, 4), (64, 8)} and len(up) == 4
    assert all(c.SPLIT_K == 1 and c.NG == 16 for c in up)  # SPLIT_K means nothing to GEMM1: dropped
    assert tg.grid(cfg, "gemv-down-fp4-g16-rows", True) == [cfg]
    monkeypatch.setattr(tg, "EXPLICIT", {})
    assert len(tg.grid(GemvConfig(32, 2, 4, SPLIT_K=4, PART_SPLIT=True), "gemv-down-int4-g128", True)) == 54


def test_precompile_workers_install_each_jobs_configs(monkeypatch):
    """The tuners' configure(payload), which a precompile worker calls before its forward: tune_gemv's sets both
    GEMVs' overrides; tune_quant's installs a ConfigOverride once, then swaps its fixed configs per job."""
    import moequant.kernels.fp8_gemm as f8
    import moequant.kernels.gemv as gv
    from benchmarks import tune_gemv as tg
    from benchmarks import tune_quant as tq
    from moequant.kernels.gemv import GemvConfig
    from moequant.kernels.tuning import GemmConfig

    monkeypatch.setattr(gv, "OVERRIDE", {True: GemvConfig(4, 1)})
    tg.configure({False: GemvConfig(32, 2)})
    assert gv.OVERRIDE == {False: GemvConfig(32, 2)}
    orig, dev = f8.fp8_config, torch.device("cpu")
    try:
        for cfg in (GemmConfig(16, 32, 128, 1, 4, 3), GemmConfig(16, 64, 256, 1, 4, 4)):
            tq.configure({"w13": cfg})
            assert f8.fp8_config("w13-fp8", 1, 8, 64, 32, True, dev, 2, False) == cfg
            assert len(tq._WORKER_OVERRIDE) == 1
    finally:
        for ov in tq._WORKER_OVERRIDE:
            ov.__exit__(None, None, None)
        tq._WORKER_OVERRIDE.clear()
    assert f8.fp8_config is orig


def test_quant_tuner_reaches_the_fp8_launcher():
    """tune_quant swaps fp8_config (not only get_config) while it times a GEMM, records the kernel name the launcher
    asks for (block scales: "-block"), rejects block-scale tiles whose BLOCK_K does not divide 128, and restores it."""
    import moequant.kernels.fp8_gemm as f8
    from benchmarks import tune_quant as tq
    from moequant.kernels.tuning import GemmConfig

    orig = f8.fp8_config
    dev = torch.device("cpu")
    with tq.ConfigOverride() as ov:
        ov.fixed = {"w13": GemmConfig(16, 64, 256, 1, 4, 4)}
        assert f8.fp8_config("w13-fp8", 1, 8, 64, 32, True, dev, 2, False) == ov.fixed["w13"]
        with pytest.raises(ValueError, match="divide 128"):
            f8.fp8_config("w13-fp8", 1, 8, 64, 32, True, dev, 2, True)
        assert ov.asked["w13"] == ("w13-fp8-block", 8, 64, 32)
        assert f8.fp8_config("w2-fp8", 1, 8, 32, 64, False, dev, 2, False) == orig("w2-fp8", 1, 8, 32, 64, False, dev,
                                                                                   2, False)
    assert f8.fp8_config is orig
    assert len(tq.candidates(1, 8, 2, fp8=True)) == 2 * len(tq.candidates(1, 8, 2))


def test_stream_floor_kernel_and_command(tmp_path):
    """stream_floor's kernel XORs each program's slab (partial last slab, with and without prefetch, against torch);
    its command line writes the card, the empty-launch time and each launch's sweep (here the interpreter's)."""
    from benchmarks import stream_floor as sf

    st = sf.Stream(0.01, "cpu")  # 2496 words: slabs of 1024, the last partial
    assert st.n_words == 2496
    for prefetch in (False, True):
        st.launch(0, 512, 2, prefetch)
        words = st.bufs[0]
        want = []
        for i in range(0, 2496, 1024):
            v = 0
            for w in words[i:i + 1024].tolist():
                v ^= w
            want.append(v)
        assert st.out[:3].tolist() == want
    out = tmp_path / "floor.json"
    assert sf.main(["--device", "cpu", "--mb", "0.004,0.002", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["card"] == "cpu" and res["empty_launch_us"] > 0
    (pair,) = res["pairs"]
    assert pair["mb"] == [0.004, 0.002] and pair["gemm1"][0]["programs"] >= 1 and pair["pair_us"] > 0
    with pytest.raises(SystemExit, match="two numbers"):
        sf.main(["--device", "cpu", "--mb", "1"])
    assert sf.gemv_mbytes("qwen3-30b-a3b", "int4") == pytest.approx((12.58, 6.29), rel=1e-3)


def test_stream_layout_kernels_read_the_same_words():
    """stream_layout's two kernels XOR the same words of each program when the tiled kernel reads tile() of the
    rows-contiguous words (so the benchmark compares access patterns, not amounts); small CW and N."""
    from benchmarks import stream_layout as sl

    cw, n, bn, gw = 16, 32, 8, 8
    words = torch.randint(0, 2**31, (128, cw, n), dtype=torch.int32)  # [E, CW, N]: N stride 1
    rows_view = words.transpose(1, 2)  # [E, N, CW], strides (CW*N, 1, N)
    tiled = sl.tile(rows_view)
    assert tiled.shape == (128, n // 4, cw, 4) and torch.equal(tiled[3, 2, 5], rows_view[3, 8:12, 5])
    got = []
    for kernel, buf in ((sl.rows_kernel, words.reshape(-1)), (sl.tiled_kernel, tiled.reshape(-1))):
        out = torch.zeros(sl.S * (n // 2 // bn), dtype=torch.int32)
        kernel[(sl.S, n // 2 // bn)](buf, out, cw, n, BN=bn, GW=gw)
        got.append(out)
    assert torch.equal(got[0], got[1]) and got[0].ne(0).all()


def test_tuner_search_confirms_a_single_timing_win(monkeypatch):
    """search's fastest candidate replaces the incumbent only if it wins again over CONFIRM alternating timings
    (medians); a noisy single win is dropped, a real one kept; CONFIRM=0 or an incumbent that failed to run lets the
    single timings decide."""
    from benchmarks import tune_moe as tm

    def runner(override, times):
        queues = {k: list(v) for k, v in times.items()}
        return lambda: queues[override["g"]].pop(0)

    monkeypatch.setattr(tm, "time_config", lambda run: run())
    noisy = {"A": [10.0, 10.0, 10.2, 9.9], "B": [9.0, 10.5, 10.4, 10.6], "C": [11.0]}
    ov = {}
    assert tm.search(ov, "g", runner(ov, noisy), ["B", "C"], "A") == (10.0, "A") and ov["g"] == "A"
    real = {"A": [10.0, 10.0, 10.2, 9.9], "B": [9.0, 9.1, 9.2, 9.0], "C": [11.0]}
    ov = {}
    assert tm.search(ov, "g", runner(ov, real), ["B", "C"], "A") == (9.1, "B") and ov["g"] == "B"
    monkeypatch.setattr(tm, "CONFIRM", 0)
    ov = {}
    assert tm.search(ov, "g", runner(ov, noisy), ["B", "C"], "A") == (9.0, "B")
    monkeypatch.setattr(tm, "CONFIRM", 3)
    failed = {"A": [float("inf")], "B": [9.0], "C": [11.0]}
    ov = {}
    assert tm.search(ov, "g", runner(ov, failed), ["B", "C"], "A") == (9.0, "B")
    # confirmed alone: both sides through apply, the winner left installed, medians returned
    ov = {}
    win, t_ch, t_inc = tm.confirmed(lambda c: ov.__setitem__("g", c), runner(ov, {"A": [5, 6, 7], "B": [6, 6, 6]}),
                                    "A", "B", n=3)
    assert (win, t_ch, t_inc, ov["g"]) == (False, 6, 6, "A")


def test_fused_tuner_candidates_and_no_gpu(capsys):
    """benchmarks/tune_fused.py: candidates keep GEMM1's BLOCK_N dividing I and its step within H (Qwen3-30B: every
    combination; DeepSeek-V3's shard, I = 256: all BLOCK_N; the tiny shape: none past H = 64 columns per step), and
    without a GPU the tuner says so and returns 2."""
    from benchmarks import tune_fused

    qwen = tune_fused.candidates(768, 2048, 16)
    assert len(qwen) == 3 * 3 * 2 * 2 * 2 and all(c["UNIT"] == 8 for c in qwen)
    assert {c["BLOCK_N"] for c in tune_fused.candidates(256, 7168, 16)} == {16, 32, 64}
    assert {c["BLOCK_N"] for c in tune_fused.candidates(48, 2048, 16)} == {16}
    assert not tune_fused.candidates(32, 64, 16)
    if not torch.cuda.is_available():
        assert tune_fused.main(["--shapes", "tiny"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
