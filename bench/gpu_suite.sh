#!/usr/bin/env bash
# The whole GPU job in one call (for the device tool, or any GPU machine): build the extension
# with its CUDA kernels, run every test (the gpu-marked ones included), then the benchmarks.
# Everything lands under $OUT (default ./gpu-out): build log, info, test log, bench JSON.
#   bash bench/gpu_suite.sh            # from the repository root
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export MAX_JOBS="${MAX_JOBS:-16}" FASTARCH_CUDA=1 PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
start=$(date +%s)
"$PY" -m pip install --no-build-isolation --no-deps --no-index . > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; echo "build failed"; exit 1; }
echo "build: $(( $(date +%s) - start )) s" | tee "$OUT/build-time.txt"
cd /tmp  # import the installed package, not the source tree
"$PY" -m fastarch info | tee "$OUT/info.txt"
# every test: with a GPU visible the Triton backend runs on it (not the interpreter) and the
# gpu-marked CUDA tests run too. Each stage is time-boxed (seconds, overridable), so that a
# lent GPU's short budget still brings back the benchmarks.
parallel=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
timeout "${TEST_S:-240}" "$PY" -m pytest "$OLDPWD/tests" -q -p no:cacheprovider $parallel 2>&1 | tee "$OUT/tests.log" | tail -25
for family in "attention,attention_causal" "attention_decode" "layer_norm,rms_norm,add_layer_norm,add_rms_norm"; do
  name=${family%%,*}
  timeout "${BENCH_S:-300}" "$PY" -m fastarch bench --op "$family" --json "$OUT/bench-$name.json" 2>&1 | tee "$OUT/bench-$name.txt"
done
