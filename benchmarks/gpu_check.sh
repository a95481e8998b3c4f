#!/usr/bin/env bash
# The one GPU-machine check: install (which builds the kernel library into the package), GPU
# tests, kernel benchmark, generation benchmark. Logs and tables go to $OUT (default
# /tmp/clada_gpu_check); a short table prints last. Tables are also written to
# benchmarks/results/<GPU name>*.md.
#   bash benchmarks/gpu_check.sh                        # every step
#   GPU_CHECK_STEPS="install bench" bash benchmarks/gpu_check.sh
#   KERNEL_BENCH_ARGS="--sweep"  BENCH_ARGS="--compile"  # extra arguments
# Steps: install test kernel bench trt. The install uses the machine's own packages
# (--no-deps --no-build-isolation): nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/clada_gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STEPS="${GPU_CHECK_STEPS:-install test kernel bench trt}"
status=0
summary=()
has() { [[ " $STEPS " == *" $1 "* ]]; }
step_done() { summary+=("$1: rc=$2 ($(( $(date +%s) - $3 )) s)"); [[ $2 -ne 0 ]] && status=1; }

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
SLUG=$(echo "$GPU" | sed -E 's/[^A-Za-z0-9._-]+/_/g; s/^_+|_+$//g')
RESULTS=benchmarks/results
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/gpu.txt"

if has install; then
  t0=$(date +%s)
  CLADA_BUILD_KERNELS=1 python3 -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
  rc=$?
  python3 -c "from clada_export.ops import native; native.load_library(); print('kernel library:', native.library_path())" \
    2>&1 | tee -a "$OUT/install.log"
  [[ $rc -eq 0 ]] && rc=${PIPESTATUS[0]}
  step_done "install (builds the kernels)" $rc $t0
  [[ $rc -ne 0 ]] && { tail -40 "$OUT/install.log"; echo "INSTALL FAILED"; exit 1; }
fi

if has test; then
  t0=$(date +%s)
  # GPU tests: the files named *gpu*; -rs lists every skip with its reason
  python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels_gpu.py tests/test_decode_kernels_gpu.py \
    tests/test_gpu_decode.py 2>&1 | tee "$OUT/tests.log"
  step_done "GPU tests [$(tail -1 "$OUT/tests.log")]" ${PIPESTATUS[0]} $t0
fi

if has kernel; then
  t0=$(date +%s)
  # shellcheck disable=SC2086
  python3 benchmarks/kernel_bench.py ${KERNEL_BENCH_ARGS:-} 2>&1 | tee "$OUT/kernel_bench.log"
  step_done "kernel bench" ${PIPESTATUS[0]} $t0
fi

if has bench; then
  t0=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-420}" python3 -m clada_export.cli.main bench --synthetic llama3-8b --batches 1 2 4 8 --prompt-len 128 \
    --new-tokens 64 --repeats 3 -o "$OUT/bench_llama3-8b" ${BENCH_ARGS:-} 2>"$OUT/bench.err" | tee "$OUT/bench.log"
  rc=${PIPESTATUS[0]}
  [[ $rc -ne 0 ]] && tail -30 "$OUT/bench.err"
  [[ -f "$OUT/bench_llama3-8b/bench.md" ]] && cp "$OUT/bench_llama3-8b/bench.md" "$RESULTS/${SLUG}_bench_llama3-8b.md"
  step_done "bench llama3-8b" $rc $t0
fi

if has trt; then
  if [[ -f plugins/tensorrt/check_gpu.sh && -n "${TENSORRT_ROOT:-}" ]]; then
    t0=$(date +%s)
    bash plugins/tensorrt/check_gpu.sh 2>&1 | tee "$OUT/trt.log"
    step_done "TensorRT plugin check" ${PIPESTATUS[0]} $t0
  else
    summary+=("TensorRT plugin check: skipped: no TensorRT headers")
  fi
fi

echo
echo "==================== summary: $GPU ===================="
[[ -f "$RESULTS/$SLUG.md" ]] && grep -E "^\| (shape|---|llama3-8b \| (1|4) \|)" "$RESULTS/$SLUG.md"
echo
[[ -f "$OUT/bench_llama3-8b/bench.md" ]] && sed -n '/^| backend/,$p' "$OUT/bench_llama3-8b/bench.md"
echo
printf '%s\n' "${summary[@]}"
exit $status
