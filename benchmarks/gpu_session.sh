#!/usr/bin/env bash
# One batched GPU call (the lent H100/H200 has no network): install carried wheels, print the environment, run the GPU
# tests, tune the kernels, run the benchmark. Everything lands under $OUT (logs, tuning cache, benchmark JSON).
# Usage there: bash benchmarks/gpu_session.sh [tests] [tune] [tunequant] [tunegemv] [profile] [ncu] [floor] [bench]; PYTEST_ARGS (default '-m gpu tests'), PYTEST_K,
# TUNE_ARGS, TUNE_QUANT_ARGS (with TUNE_WORKERS=8 in the environment: parallel compiles), TUNE_GEMV_ARGS and BENCH_ARGS pass
# options on.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else  # the tests that build compressed-tensors checkpoints then error at setup (not regressions): carry .whl
  echo "WARNING: no .whl folder (carry it): compressed-tensors and pydantic are missing on the lent machine" >&2
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, triton, datetime
print("card", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda", torch.version.cuda, "| date", datetime.date.today())
PY
# the card's clocks, power and temperature every 200 ms while the steps run ($OUT/clocks.csv): the same forward has
# timed ~7% apart within one process (results README, ninth 11-29 session), so each run keeps its clocks
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 200 \
    > "$OUT/clocks.csv" 2>/dev/null &
  CLOCKS_PID=$!
  trap 'kill $CLOCKS_PID 2>/dev/null' EXIT
fi
steps=${*:-tests tune bench}
for step in $steps; do
  case $step in
    tests) timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q ${PYTEST_ARGS:--m gpu tests} ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/gpu_tests.log" | tail -30 ;;
    tunegemv) timeout ${TUNE_GEMV_TIMEOUT:-300} python3 benchmarks/tune_gemv.py ${TUNE_GEMV_ARGS:-} 2>&1 | tee "$OUT/tune_gemv.log" | grep -v rejected | tail -40
           cp moequant/kernels/configs/*.json "$OUT"/ ;;
    tunequant) timeout ${TUNE_QUANT_TIMEOUT:-450} python3 benchmarks/tune_quant.py ${TUNE_QUANT_ARGS:-} 2>&1 | tee "$OUT/tune_quant.log" | grep -v rejected | tail -40
           cp moequant/kernels/configs/*.json "$OUT"/ ;;
    tune)  timeout 450 python3 benchmarks/tune_moe.py ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.log" | grep -v rejected | tail -40
           cp moequant/kernels/configs/*.json "$OUT"/ ;;
    profile) for m in ${PROFILE_MS:-1 4096}; do timeout 120 python3 benchmarks/profile_forward.py --m $m ${PROFILE_ARGS:-} 2>&1 | tee -a "$OUT/profile.log" | tail -16; done ;;
    ncu)   # NCU_RUNS: shape,scheme,m triples; NCU_K: kernel name regex
           NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
           for run in ${NCU_RUNS:-mixtral-8x7b,w4a16:g128,1}; do IFS=, read -r shp sch m <<<"$run"
             timeout 240 "$NCU" --clock-control none -k "regex:${NCU_K:-gemv}" --launch-skip ${NCU_SKIP:-8} --launch-count 2 \
               --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
               --section SchedulerStats --section InstructionStats --section MemoryWorkloadAnalysis \
               python3 benchmarks/ncu_forward.py --shape $shp --scheme $sch --m $m 2>&1 | tee -a "$OUT/ncu.txt" \
               | grep -E "gemv|Duration|DRAM Throughput|Memory Throughput|Registers|Achieved Occupancy|Issue Slots Busy|Executed Ipc A|No Eligible|Warp Cycles Per Issued|Block Size|Grid Size|Theoretical Occ" ; done
           for f in $(grep -l "${NCU_K:-gemv}" ~/.triton/cache/*/*.json 2>/dev/null); do d=$(dirname $f)
             for c in $d/*.cubin; do echo "== $c" >> "$OUT/sass.txt"; cuobjdump -sass $c >> "$OUT/sass.txt" 2>&1; done; done ;;
    floor) timeout ${FLOOR_TIMEOUT:-240} python3 benchmarks/stream_floor.py --out "$OUT/stream_floor.json" 2>&1 | tee "$OUT/stream_floor.log" | tail -12 ;;
    bench) timeout ${BENCH_TIMEOUT:-400} python3 benchmarks/bench_moe.py ${BENCH_ARGS:-} --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -60 ;;
  esac
done
