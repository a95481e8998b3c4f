#!/usr/bin/env bash
# One GPU-machine check: build the kernel library, run the GPU tests, run the benchmarks.
# Logs and tables go to $OUT (default /tmp/clada_gpu_check); the short tables print last.
#   bash benchmarks/gpu_check.sh            # build + GPU tests + kernel bench + decode bench
#   GPU_CHECK_STEPS="build bench" bash benchmarks/gpu_check.sh
#   KERNEL_BENCH_ARGS="--sweep" ...          # extra arguments for kernel_bench.py
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/clada_gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STEPS="${GPU_CHECK_STEPS:-build test bench decode}"
ARCHS="${CLADA_CUDA_ARCHS:-80-real;86-real;89-real;90-real;90-virtual}"
status=0
summary=()

has() { [[ " $STEPS " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/gpu.txt"

if has build; then
  t0=$(date +%s)
  if cmake -S plugins -B plugins/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
        "-DCMAKE_CUDA_ARCHITECTURES=$ARCHS" -DCLADA_PTXAS_VERBOSE=ON >"$OUT/build.log" 2>&1 \
     && cmake --build plugins/build -j >>"$OUT/build.log" 2>&1; then
    summary+=("build: ok ($(( $(date +%s) - t0 )) s)")
  else
    tail -50 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
  fi
  grep -E "spill|registers" "$OUT/build.log" | grep -B1 -E "[1-9][0-9]* bytes spill" | head -6 || true
fi

if has test; then
  t0=$(date +%s)
  # GPU tests: everything marked `gpu` or in a file named *gpu*
  python3 -m pytest -q -rs -k gpu tests/ 2>&1 | tee "$OUT/tests.log"
  rc=${PIPESTATUS[0]}
  [[ $rc -ne 0 ]] && status=1
  summary+=("tests: rc=$rc ($(( $(date +%s) - t0 )) s): $(tail -1 "$OUT/tests.log")")
fi

if has bench; then
  t0=$(date +%s)
  # shellcheck disable=SC2086
  python3 benchmarks/kernel_bench.py ${KERNEL_BENCH_ARGS:-} 2>&1 | tee "$OUT/kernel_bench.log"
  rc=${PIPESTATUS[0]}
  [[ $rc -ne 0 ]] && status=1
  summary+=("kernel bench: rc=$rc ($(( $(date +%s) - t0 )) s)")
fi

if has decode && [[ -f benchmarks/decode_bench.py ]]; then
  t0=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${DECODE_BENCH_TIMEOUT:-420}" python3 benchmarks/decode_bench.py ${DECODE_BENCH_ARGS:-} 2>&1 | tee "$OUT/decode_bench.log"
  rc=${PIPESTATUS[0]}
  [[ $rc -ne 0 ]] && status=1
  summary+=("decode bench: rc=$rc ($(( $(date +%s) - t0 )) s)")
fi


echo
echo "==================== summary ===================="
[[ -f "$OUT/kernel_bench.md" ]] && cat "$OUT/kernel_bench.md"
[[ -f "$OUT/decode_bench.md" ]] && cat "$OUT/decode_bench.md"
printf '%s\n' "${summary[@]}"
exit $status
