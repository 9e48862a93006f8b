#!/usr/bin/env bash
# The whole GPU job in one call (for the device tool, or any GPU machine): build the extension
# with its CUDA kernels, run the gpu-marked (CUDA) tests, the benchmarks, then the Triton tests
# on the GPU. Everything lands under $OUT (default ./gpu-out) in at most 8 files: log.txt (GPU,
# build time, info, every stage's tail), build.log, tests-gpu.log, tests-triton.log and one
# bench-<family>.json per family.
#   bash bench/gpu_suite.sh            # from the repository root
# Each stage is time-boxed (seconds, overridable below) so that a lent GPU's short budget still
# brings back the CUDA tests and the benchmarks; the stages run most valuable first. With the
# defaults the whole job fits one 600 s device call when the build takes its usual ~40 s.
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export MAX_JOBS="${MAX_JOBS:-16}" FASTARCH_CUDA=1 PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
SRC="$PWD"
LOG="$OUT/log.txt"
say() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$LOG"
say build
start=$(date +%s)
if ! timeout "${BUILD_S:-240}" "$PY" -m pip install --no-build-isolation --no-deps --no-index . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log" | tee -a "$LOG"
  say "pip install failed; building in place instead"
  timeout "${BUILD_S:-240}" "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  export PYTHONPATH="$SRC"
fi
echo "build: $(( $(date +%s) - start )) s" | tee -a "$LOG"
cd /tmp  # import the installed package, not the source tree
"$PY" -m fastarch info 2>&1 | tee -a "$LOG"

parallel=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
say "gpu-marked tests (the CUDA kernels)"
# -v: each failure's name is in the log as it happens, even when the stage is cut short
timeout -k 5 "${TEST_GPU_S:-130}" "$PY" -m pytest "$SRC/tests" -m gpu -v --tb=short -p no:cacheprovider $parallel \
  > "$OUT/tests-gpu.log" 2>&1
echo "exit $?" >> "$OUT/tests-gpu.log"
grep -E "FAILED|ERROR" "$OUT/tests-gpu.log" | head -40 | tee -a "$LOG"
tail -3 "$OUT/tests-gpu.log" | tee -a "$LOG"

bench() {  # bench NAME SECONDS ARGS...: one family's table into the log, its rows into bench-NAME.json
  local name=$1 seconds=$2
  shift 2
  say "bench $name"
  timeout -k 5 "$seconds" "$PY" -m fastarch bench "$@" --json "$OUT/bench-$name.json" 2>&1 | tee -a "$LOG"
}
# attention: our two GPU backends against SDPA's flash, efficient and cuDNN kernels (FlexAttention's
# compile per case costs more than a short lease allows: --no-compile; run it without for flex)
# (each family's arguments can be replaced: ATTN_ARGS, DECODE_ARGS, NORMS_ARGS)
bench attention "${BENCH_ATTN_S:-130}" ${ATTN_ARGS:---op attention,attention_causal --backend cuda,triton \
  --dtype bf16,fp16 --shapes 2x16x4096x128,1x16x16384x128,4x32x2048x64 --no-compile}
bench decode "${BENCH_DECODE_S:-45}" ${DECODE_ARGS:---op attention_decode --backend cuda,triton --dtype bf16,fp16}
bench norms "${BENCH_NORMS_S:-110}" ${NORMS_ARGS:---op layer_norm,rms_norm,add_layer_norm,add_rms_norm \
  --backend cuda,triton --dtype bf16,fp32 --shapes 16384x8192}

[ "${TEST_TRITON_S:-75}" -gt 0 ] || { say done; exit 0; }
say "Triton tests on the GPU"
# (one tile entry per kernel: every entry runs in the gpu-marked test_attention_triton_tiles.py)
FASTARCH_TRITON_AUTOTUNE=0 timeout -k 5 "${TEST_TRITON_S:-75}" "$PY" -m pytest "$SRC/tests/ops" -k triton -q -p no:cacheprovider $parallel > "$OUT/tests-triton.log" 2>&1
echo "exit $?" >> "$OUT/tests-triton.log"
tail -30 "$OUT/tests-triton.log" | tee -a "$LOG"
say done
