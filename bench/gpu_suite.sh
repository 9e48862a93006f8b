#!/usr/bin/env bash
# The whole GPU job (for the device tool, or any GPU machine): build the extension with its
# CUDA kernels, run every test that needs the GPU — the gpu-marked ones (CUDA kernels, Triton
# tile entries) and the Triton rows, which run on the GPU when there is one — then the
# benchmarks. Tests come first: a GPU run proves the commit before it measures it.
#   bash bench/gpu_suite.sh                           # from the repository root: tests, then benchmarks
#   STAGES="tests models triton" bash bench/gpu_suite.sh   # stages run in the order named
#   STAGES=bench REUSE_BUILD=1 bash bench/gpu_suite.sh     # a second call on the same machine
# Stages: tests (the gpu-marked tests: the ops', then the models'), triton (the Triton rows
# that are not gpu-marked), models (the models end to end: SmolLM2 decode, drop-in, UNet), bench
# (the kernels), diagnose (bench/gpu_diagnose.py: where a small model's time goes), amx (the CPU
# attention on this machine's CPU when it has AMX: tests at level amx, and the CPU bench at 2
# threads).
# Everything lands under $OUT (default ./gpu-out): log.txt (GPU, commit, build time, info, every
# stage's summary) and, packed into results.tgz at the end (a device call brings back 8 files),
# build.log, tests-gpu.log, tests-triton.log and one bench-<name>.json per family or model.
# Each stage is time-boxed (seconds, overridable below); DEADLINE_S (seconds from the start)
# shortens every cap so that the whole job ends inside one device call, and skips a stage that
# would get under 20 s. REUSE_BUILD=1 skips the build when the installed fastarch already loads
# its CUDA kernels (a warm machine's second call).
# Wheels in .whl/ (diffusers and gguf: the GPU machine lacks them; carry .whl) are installed first.
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export MAX_JOBS="${MAX_JOBS:-16}" FASTARCH_CUDA=1 PYTHONUNBUFFERED=1
# the default build users get without a GPU visible (not only the visible GPU's arch)
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
PY="${PYTHON:-python3}"
SRC="$PWD"
T0=$(date +%s)
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
STAGES="${STAGES:-tests triton bench}"
LOG="$OUT/log.txt"
say() { echo "== $* ($(date -u +%H:%M:%S), +$(( $(date +%s) - T0 )) s)" | tee -a "$LOG"; }
cap() {  # cap SECONDS: SECONDS, or what DEADLINE_S leaves (minus 15 s for the packing) if less
  local want=$1
  if [[ -n "${DEADLINE_S:-}" ]]; then
    local left=$(( T0 + DEADLINE_S - 15 - $(date +%s) ))
    (( left < want )) && want=$left
  fi
  echo "$want"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$LOG"
# (a copy of the tree may travel without .git: then pass COMMIT=$(git rev-parse HEAD) along)
echo "commit: ${COMMIT:-$(git -C "$SRC" rev-parse HEAD 2>/dev/null || echo unknown)}" | tee -a "$LOG"
built() { (cd /tmp && "$PY" -c "import sys, fastarch.availability as a; sys.exit(a.cuda() is not None)") 2>/dev/null; }
if [[ -n "${REUSE_BUILD:-}" ]] && built; then
  say "build: reusing the installed fastarch"
else
  say build
  start=$(date +%s)
  if ! timeout "$(cap "${BUILD_S:-240}")" "$PY" -m pip install --no-build-isolation --no-deps --no-index . > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log" | tee -a "$LOG"
    say "pip install failed; building in place instead"
    timeout "$(cap "${BUILD_S:-240}")" "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
    export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
    ln -sfn ../kernels fastarch/kernels  # (installed as fastarch.kernels; this copy of the tree is the device's)
  fi
  echo "build: $(( $(date +%s) - start )) s" | tee -a "$LOG"
fi
cd /tmp  # import the installed package, not the source tree
"$PY" -m fastarch info 2>&1 | tee -a "$LOG"

parallel=$("$PY" -c "import xdist" 2>/dev/null && echo "-n ${TEST_WORKERS:-16}")
# a test that hangs is stopped with its stack (pytest-timeout), so that the run ends and prints
# every failure's traceback inside the stage's cap
per_test=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout ${TEST_TIMEOUT_S:-90}")
tests() {  # tests NAME SECONDS PYTEST-ARGS... (of tests/, or TEST_PATH): -v, so each failure is logged as it happens
  local name=$1 seconds
  seconds=$(cap "$2")
  shift 2
  (( seconds < 20 )) && { say "tests: $name skipped (the deadline)"; return; }
  say "tests: $name (at most $seconds s)"
  # (--continue-on-collection-errors: a module whose package cannot travel, as the MiniLM
  # weights' of tests/models/test_sentence.py, stops none of the others)
  timeout -k 5 "$seconds" "$PY" -m pytest "${TEST_PATH:-$SRC/tests}" -v --tb=short -p no:cacheprovider $parallel $per_test \
    --continue-on-collection-errors --durations=15 "$@" \
    > "$OUT/tests-$name.log" 2>&1
  echo "exit $?" >> "$OUT/tests-$name.log"
  grep -E "^(FAILED|ERROR)" "$OUT/tests-$name.log" | head -60 | tee -a "$LOG"
  grep -cE " PASSED" "$OUT/tests-$name.log" | sed 's/^/passed lines: /' | tee -a "$LOG"
  tail -3 "$OUT/tests-$name.log" | tee -a "$LOG"
}
script() {  # script NAME SECONDS ARGS...: python ARGS (a bench/ script), its rows into bench-NAME.json
  local name=$1 seconds
  seconds=$(cap "$2")
  shift 2
  (( seconds < 20 )) && { say "bench $name skipped (the deadline)"; return; }
  say "bench $name (at most $seconds s)"
  timeout -k 5 "$seconds" "$PY" "$@" --json "$OUT/bench-$name.json" 2>&1 | tee -a "$LOG"
}
bench() {  # bench NAME SECONDS ARGS...: fastarch bench ARGS, one family's table into the log
  local name=$1 seconds=$2
  shift 2
  script "$name" "$seconds" -m fastarch bench "$@"
}

stage_tests() {
  # the gpu-marked tests of the ops (every row, the slow ones too), then those of the models and
  # integrations (whole models: slower, and a hang there stops no kernel's test). Autotuning off:
  # each kernel's first tile entry (test_attention_triton_tiles.py runs every entry itself)
  FASTARCH_TRITON_AUTOTUNE=0 tests gpu "${TEST_GPU_S:-240}" -m gpu --ignore="$SRC/tests/models" \
    --ignore="$SRC/tests/integrations"
  FASTARCH_TRITON_AUTOTUNE=0 tests gpu-models "${TEST_GPU_MODELS_S:-150}" -m gpu --ignore="$SRC/tests/ops"
}
stage_triton() {  # the Triton rows that are not gpu-marked (they run on the GPU here)
  FASTARCH_TRITON_AUTOTUNE=0 tests triton "${TEST_TRITON_S:-220}" -m "not gpu" -k triton
}
stage_bench() {
  # group_norm (+SiLU): the goal is >= 80% of copy bandwidth at batch 1 (the UNet's maps)
  bench group_norm "${BENCH_GN_S:-90}" ${GN_ARGS:---op group_norm,group_norm_nhwc --backend cuda,triton \
    --dtype bf16,fp32 --shapes 1x320x64x64,1x640x32x32,2x1280x16x16 --no-compile}
  # the same maps timed as CUDA graph replays: the kernels' own speed (eager calls there are
  # host-bound, ~45 us each side on 2026-12-04), which the 80% goal is about
  bench group_norm-graphs "${BENCH_GN_GRAPHS_S:-60}" --op group_norm,group_norm_nhwc --backend cuda,triton \
    --dtype bf16,fp32 --shapes 1x320x64x64,1x640x32x32,2x1280x16x16 --no-compile --pass fwd --cuda-graphs
  # linear at decode rows: the cuda and triton kernels against cuBLAS on SmolLM2's weights
  script linear "${BENCH_LINEAR_S:-90}" "$SRC/bench/linear_rows.py" --device cuda --rows 1,4,16 --dtype bf16,fp32
  # the same as CUDA graph replays: the kernels' own bandwidth (the eager calls are host-bound)
  script linear-graphs "${BENCH_LINEAR_GRAPHS_S:-60}" "$SRC/bench/linear_rows.py" --device cuda --rows 1,16 \
    --dtype bf16 --cuda-graphs
  # the same weights as GGUF blocks (fastarch.ops.quantized_linear's cuda kernel) against the dense kernel and cuBLAS
  script quantized-linear "${BENCH_QLINEAR_S:-60}" "$SRC/bench/linear_rows.py" --device cuda \
    --quantized q4_1,q8_0 --rows 1,4,16 --dtype bf16
  # the k-quants and 5-bit formats (the Triton kernel there) on a 1B-class decoder's layers
  script quantized-linear-k "${BENCH_QLINEAR_K_S:-60}" "$SRC/bench/linear_rows.py" --device cuda \
    --quantized q4_k,q6_k,q5_0 --layer 1b --rows 1,16 --dtype bf16
  # attention: our two GPU backends against SDPA's flash, efficient and cuDNN kernels
  # (FlexAttention's compile per case costs more than a short lease allows: --no-compile)
  # (each family's arguments can be replaced: ATTN_ARGS, DECODE_ARGS, NORMS_ARGS, GN_ARGS)
  bench decode "${BENCH_DECODE_S:-60}" ${DECODE_ARGS:---op attention_decode --backend cuda,triton --dtype bf16,fp16}
  bench norms "${BENCH_NORMS_S:-120}" ${NORMS_ARGS:---op layer_norm,rms_norm,add_layer_norm,add_rms_norm \
    --backend cuda,triton --dtype bf16,fp32 --shapes 16384x8192}
  bench attention "${BENCH_ATTN_S:-150}" ${ATTN_ARGS:---op attention,attention_causal --backend cuda,triton \
    --dtype bf16,fp16 --shapes 2x16x4096x128,1x16x16384x128,4x32x2048x64 --no-compile}
}
stage_models() {
  # the models end to end, the figures issues 11-13 set for a GPU. SmolLM2 and MiniLM with
  # random weights at their architectures (their packages' files, 94 and 88 MB, cannot travel)
  bench smollm2 "${BENCH_SMOLLM2_S:-150}" --model smollm2 --random-weights --device cuda
  bench dropin "${BENCH_DROPIN_S:-240}" --dropin --random-weights --device cuda  # (with "+graphs" rows)
  bench unet "${BENCH_UNET_S:-90}" --model unet --device cuda
}
stage_diagnose() {
  # where a small model's time goes (bench/gpu_diagnose.py), and the native stack of the crash
  # of 2026-12-04 (an argument error of the CUDA quantized_linear op whose message holds a
  # number: a segfault instead of the error), under cuda-gdb when the machine has it
  script diagnose "${DIAGNOSE_S:-180}" "$SRC/bench/gpu_diagnose.py"
  # the drop-in paths' host time on this machine's CPU (what its GPU waits for at these sizes)
  script dropin-host-time "${DROPIN_HOST_S:-60}" "$SRC/bench/dropin_host_time.py"
  if command -v cuda-gdb > /dev/null; then
    say "the quantized_linear argument error under cuda-gdb"
    g++ --version 2>&1 | head -1 | tee -a "$LOG"
    # the CPU kernel's same check first (does any number in an error message crash here?), the
    # libstdc++ the process loaded, then the CUDA kernel's
    timeout -k 5 "$(cap 60)" cuda-gdb -q -batch -ex run -ex "bt 25" --args "$PY" -c "import torch, fastarch
print('libstdc++:', sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libstdc++' in l}))
for device in ('cpu', 'cuda'):
    x = torch.randn(2, 64, device=device)
    w = torch.zeros(3, 68, dtype=torch.uint8, device=device)
    try:
        torch.ops.fastarch._quantized_linear(x, w, 5, None)
    except RuntimeError as e:
        print(device, 'raised as it should:', str(e)[:120], flush=True)" 2>&1 | grep -v "^\[New Thread\|^\[Thread" | tail -40 | tee -a "$LOG"
  fi
}
stage_amx() {
  # The CPU kernels on this machine's CPU, for the AMX goals of the CPU attention (2026-12-04:
  # an Emerald Rapids Xeon, level amx): the CPU attention tests at level amx (the bf16 forward's
  # and backward's products through brgemm on the AMX tiles), then the bench at 2 threads, the
  # issue's setting: bf16 forward and forward+backward through brgemm and on our register tiles,
  # side by side with SDPA (which runs on AMX) in one run, then --quick (attention at 1024 in
  # fp32 and bf16, decode, the norms, the rest)
  if ! grep -q -m1 amx_bf16 /proc/cpuinfo; then
    say "amx: this CPU has no AMX"
    return
  fi
  TEST_PATH="$SRC/tests/ops/attn" tests amx "${TEST_AMX_S:-60}" -m "not gpu" -k "cpu and not triton"
  # (the goals' shapes: bf16 forward at 4096, forward+backward and fp32 at 1024, fp32 through
  # oneDNN's fp32 brgemm and our FMA tiles; other brgemm block sizes beside the default ones, to
  # keep the fastest on AMX)
  local sizes=64x256/64x64,128x512/64x128,256x256/128x128,128x256/128x256
  script amx-attention "${BENCH_AMX_S:-90}" "$SRC/bench/attention_cpu_paths.py" --threads 2 --rounds 5 \
    --shapes 1x12x4096x64 --pass fwd --blocks "$sizes"
  script amx-attention-1024 "${BENCH_AMX_S:-90}" "$SRC/bench/attention_cpu_paths.py" --threads 2 --rounds 5 \
    --shapes 1x12x1024x64 --pass fwd,fwdbwd --dtype bf16,fp32 --blocks "$sizes"
  bench amx-quick "${BENCH_AMX_QUICK_S:-120}" --quick --device cpu --threads 2 --no-compile --rounds 5
}
for stage in $STAGES; do
  "stage_$stage"
done
say done
# one file back for everything but log.txt (a device call brings back at most 8)
(cd "$OUT" && files=$(ls | grep -v -x -e log.txt -e results.tgz) && [[ -n "$files" ]] \
  && tar czf results.tgz $files && rm -f $files)
