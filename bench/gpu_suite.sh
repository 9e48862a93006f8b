#!/usr/bin/env bash
# The whole GPU job (for the device tool, or any GPU machine): build the extension with its
# CUDA kernels, run every test that needs the GPU — the gpu-marked ones (CUDA kernels, Triton
# tile entries) and the Triton rows, which run on the GPU when there is one — then the
# benchmarks. Tests come first: a GPU run proves the commit before it measures it.
#   bash bench/gpu_suite.sh                  # from the repository root: tests, then benchmarks
#   STAGES=tests bash bench/gpu_suite.sh     # one call each, when one 600 s call cannot hold both
#   STAGES=models bash bench/gpu_suite.sh    # the models end to end (SmolLM2 decode, drop-in, UNet)
#   STAGES=bench bash bench/gpu_suite.sh     # the kernels
# Everything lands under $OUT (default ./gpu-out) in at most 8 files a stage: log.txt (GPU,
# commit, build time, info, every stage's summary), build.log, tests-gpu.log, tests-triton.log
# and one bench-<name>.json per family or model. Each stage is time-boxed (seconds, overridable
# below): with the defaults "tests" fits one 600 s device call, and so does "bench"; "models"
# (440 s of caps) does when the build is quick (a warm machine, build/ kept from a first call).
# Wheels in .whl/ (diffusers and gguf: the GPU machine lacks them; carry .whl) are installed first.
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export MAX_JOBS="${MAX_JOBS:-16}" FASTARCH_CUDA=1 PYTHONUNBUFFERED=1
# the default build users get without a GPU visible (not only the visible GPU's arch)
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
PY="${PYTHON:-python3}"
SRC="$PWD"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
STAGES="${STAGES:-tests bench}"
LOG="$OUT/log.txt"
say() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$LOG"
# (a copy of the tree may travel without .git: then pass COMMIT=$(git rev-parse HEAD) along)
echo "commit: ${COMMIT:-$(git -C "$SRC" rev-parse HEAD 2>/dev/null || echo unknown)}" | tee -a "$LOG"
say build
start=$(date +%s)
if ! timeout "${BUILD_S:-240}" "$PY" -m pip install --no-build-isolation --no-deps --no-index . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log" | tee -a "$LOG"
  say "pip install failed; building in place instead"
  timeout "${BUILD_S:-240}" "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
  ln -sfn ../kernels fastarch/kernels  # (installed as fastarch.kernels; this copy of the tree is the device's)
fi
echo "build: $(( $(date +%s) - start )) s" | tee -a "$LOG"
cd /tmp  # import the installed package, not the source tree
"$PY" -m fastarch info 2>&1 | tee -a "$LOG"

parallel=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
tests() {  # tests NAME SECONDS PYTEST-ARGS...: -v, so each failure is logged as it happens
  local name=$1 seconds=$2
  shift 2
  say "tests: $name"
  # (--continue-on-collection-errors: a module whose package cannot travel, as the MiniLM
  # weights' of tests/models/test_sentence.py, stops none of the others)
  timeout -k 5 "$seconds" "$PY" -m pytest "$SRC/tests" -v --tb=short -p no:cacheprovider $parallel \
    --continue-on-collection-errors "$@" \
    > "$OUT/tests-$name.log" 2>&1
  echo "exit $?" >> "$OUT/tests-$name.log"
  grep -E "FAILED|ERROR" "$OUT/tests-$name.log" | head -40 | tee -a "$LOG"
  tail -3 "$OUT/tests-$name.log" | tee -a "$LOG"
}
if [[ " $STAGES " == *" tests "* ]]; then
  # the gpu-marked tests (every row, the slow ones too), then the Triton rows that are not
  # gpu-marked (they run on the GPU here); one tile entry per kernel there, since
  # test_attention_triton_tiles.py (gpu-marked) runs every entry
  tests gpu "${TEST_GPU_S:-200}" -m gpu
  FASTARCH_TRITON_AUTOTUNE=0 tests triton "${TEST_TRITON_S:-220}" -m "not gpu" -k triton
fi

bench() {  # bench NAME SECONDS ARGS...: one family's table into the log, its rows into bench-NAME.json
  local name=$1 seconds=$2
  shift 2
  say "bench $name"
  timeout -k 5 "$seconds" "$PY" -m fastarch bench "$@" --json "$OUT/bench-$name.json" 2>&1 | tee -a "$LOG"
}
if [[ " $STAGES " == *" bench "* ]]; then
  # attention: our two GPU backends against SDPA's flash, efficient and cuDNN kernels
  # (FlexAttention's compile per case costs more than a short lease allows: --no-compile)
  # (each family's arguments can be replaced: ATTN_ARGS, DECODE_ARGS, NORMS_ARGS, GN_ARGS)
  bench attention "${BENCH_ATTN_S:-150}" ${ATTN_ARGS:---op attention,attention_causal --backend cuda,triton \
    --dtype bf16,fp16 --shapes 2x16x4096x128,1x16x16384x128,4x32x2048x64 --no-compile}
  bench decode "${BENCH_DECODE_S:-60}" ${DECODE_ARGS:---op attention_decode --backend cuda,triton --dtype bf16,fp16}
  bench norms "${BENCH_NORMS_S:-120}" ${NORMS_ARGS:---op layer_norm,rms_norm,add_layer_norm,add_rms_norm \
    --backend cuda,triton --dtype bf16,fp32 --shapes 16384x8192}
  # group_norm (+SiLU): the goal is >= 80% of copy bandwidth at batch 1 (the UNet's maps)
  bench group_norm "${BENCH_GN_S:-90}" ${GN_ARGS:---op group_norm,group_norm_nhwc --backend cuda,triton \
    --dtype bf16,fp32 --shapes 1x320x64x64,1x640x32x32,2x1280x16x16 --no-compile}
  # linear at decode rows: the cuda and triton kernels against cuBLAS on SmolLM2's weights
  say "bench linear"
  timeout -k 5 "${BENCH_LINEAR_S:-90}" "$PY" bench/linear_rows.py --device cuda --rows 1,4,16 --dtype bf16,fp32 \
    --json "$OUT/bench-linear.json" 2>&1 | tee -a "$LOG"
  # the same weights as GGUF blocks (fastarch.ops.quantized_linear's cuda kernel) against the dense kernel and cuBLAS
  say "bench quantized linear"
  timeout -k 5 "${BENCH_QLINEAR_S:-60}" "$PY" bench/linear_rows.py --device cuda --quantized q4_1,q8_0 --rows 1,4,16 \
    --dtype bf16 --json "$OUT/bench-quantized-linear.json" 2>&1 | tee -a "$LOG"
  # the k-quants and 5-bit formats (the Triton kernel there) on a 1B-class decoder's layers
  timeout -k 5 "${BENCH_QLINEAR_K_S:-60}" "$PY" bench/linear_rows.py --device cuda --quantized q4_k,q6_k,q5_0 \
    --layer 1b --rows 1,16 --dtype bf16 --json "$OUT/bench-quantized-linear-k.json" 2>&1 | tee -a "$LOG"
fi
if [[ " $STAGES " == *" models "* ]]; then
  # the models end to end, the figures issues 11-13 set for a GPU. SmolLM2 and MiniLM with
  # random weights at their architectures (their packages' files, 94 and 88 MB, cannot travel)
  bench smollm2 "${BENCH_SMOLLM2_S:-150}" --model smollm2 --random-weights --device cuda
  bench dropin "${BENCH_DROPIN_S:-200}" --dropin --random-weights --device cuda
  bench unet "${BENCH_UNET_S:-90}" --model unet --device cuda
fi
say done
