#!/usr/bin/env bash
# The SparseMLP TensorRT plugin on a GPU, without TensorRT's runtime: builds
# libclada_trt_plugin.so and clada_trt_plugin_check against the headers in $TENSORRT_ROOT
# (include/NvInfer.h) for this machine's GPU, then runs the check with --gpu: the host
# checks (creator, fields, formats, shapes, workspace, serialization) and enqueue against a
# host reference (fp16 and bf16, decode and chunked prefill shapes, Llama-3-8B's MLP).
# Also compiles the C++ runner (runtime/examples, compile only: no libnvinfer needed) and runs
# its loop against a stand-in engine session (clada_run_loop_test).
#   TENSORRT_ROOT=/path/to/tensorrt bash plugins/tensorrt/check_gpu.sh
# BUILD (default /tmp/clada_trt_check) holds the build. Exit code: 0 only if all passed.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${TENSORRT_ROOT:?set TENSORRT_ROOT to a directory with include/NvInfer.h}"
[[ -f "$TENSORRT_ROOT/include/NvInfer.h" ]] || { echo "no $TENSORRT_ROOT/include/NvInfer.h" >&2; exit 2; }
BUILD="${BUILD:-/tmp/clada_trt_check}"
NVCC="${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
# this GPU's architecture only (e.g. 9.0 -> 90-real): a quick build
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')
GENERATOR=(); command -v ninja >/dev/null && GENERATOR=(-G Ninja)

echo "== plugin: TensorRT headers $TENSORRT_ROOT ($(grep -hE 'define (TRT_MAJOR_ENTERPRISE|NV_TENSORRT_MAJOR) [0-9]' "$TENSORRT_ROOT/include/NvInferVersion.h" | head -1)), sm_$ARCH"
CUDACXX="$NVCC" cmake -S plugins -B "$BUILD/plugins" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DTENSORRT_ROOT="$TENSORRT_ROOT" -DCLADA_TRT_BUILD_CHECK=ON -DCMAKE_CUDA_ARCHITECTURES="${ARCH}-real" >"$BUILD.configure.log"
cmake --build "$BUILD/plugins" -j "$(nproc)" >"$BUILD.build.log" || { tail -40 "$BUILD.build.log"; exit 1; }
"$BUILD/plugins/clada_trt_plugin_check" "$BUILD/plugins/libclada_trt_plugin.so" --gpu

echo "== clada_run (runtime/examples), compile only"
cmake -S runtime/examples -B "$BUILD/examples" "${GENERATOR[@]}" -DTENSORRT_ROOT="$TENSORRT_ROOT" \
  -DCLADA_RUN_COMPILE_ONLY=ON | grep "clada_run"
cmake --build "$BUILD/examples" >"$BUILD.examples.log" || { tail -40 "$BUILD.examples.log"; exit 1; }
# skipped (the reason printed above) where a dependency such as nlohmann/json is missing
if compgen -G "$BUILD/examples/CMakeFiles/clada_run.dir/*.o" >/dev/null; then
  echo "clada_run compiled"
  echo "== clada_run's loop against a stand-in engine session (no TensorRT runs)"
  "$BUILD/examples/clada_run_loop_test" tests/data/controller
fi
