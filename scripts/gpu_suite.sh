#!/usr/bin/env bash
# One-call GPU validation: build the extension and the C++ tests for sm_90a, run the C++ CUDA
# tests (plain, then under compute-sanitizer), the Python suite on the GPU, and optionally the
# benchmark. Usage: scripts/gpu_suite.sh LOGDIR [steps...]; steps default to
# "build ctest pytest sanitize". Each step logs to LOGDIR/<step>.log and the run goes on after a
# failing step, so one call reports everything.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGDIR="${1:?usage: gpu_suite.sh LOGDIR [steps...]}"
shift
STEPS="${*:-build ctest pytest sanitize}"
mkdir -p "$LOGDIR"
export PYTHONUNBUFFERED=1 FLCE_CUDA_ARCHS="${FLCE_CUDA_ARCHS:-90a}"
summary="$LOGDIR/summary.txt"
: > "$summary"

step() {  # step NAME COMMAND...
  local name="$1"; shift
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$summary"
  "$@" > "$LOGDIR/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$summary"
  tail -n 25 "$LOGDIR/$name.log"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$summary"
for s in $STEPS; do
  case "$s" in
    build)
      step build python3 -m pip install --no-build-isolation --no-deps -e . -v ;;
    ctest)
      gtest_src=""
      if [ -n "${FLCE_GTEST_SOURCE_DIR:-}" ]; then gtest_src="-DFLCE_GTEST_SOURCE_DIR=$FLCE_GTEST_SOURCE_DIR"; fi
      # The test binary in one process: ctest starts one process per test, which took about 0.8 s
      # each on a lent H200 machine (450 tests: over 6 minutes) against about 1 minute in one.
      step ctest bash -c "cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_CUDA_ARCHITECTURES=90a $gtest_src && cmake --build build-gpu -j16 && \
        build-gpu/flce_tests" ;;
    pytest)
      step pytest timeout ${PYTEST_TIMEOUT:-480} python3 -m pytest tests/python -q --maxfail=25 --device cuda -p no:cacheprovider --durations=15 ${PYTEST_ARGS:-} ;;
    sanitize)
      step memcheck timeout 400 compute-sanitizer --tool memcheck --error-exitcode 1 \
        build-gpu/flce_tests --gtest_filter='Cuda*:-*Huge*'
      # Read the report by kernel: on an H200 (CUDA 13.0) racecheck also reports hazards inside
      # cuBLAS's own nvjet_* kernels (the reference GEMMs, the unfused path); leaving them out with
      # --kernel-name-exclude made the sanitizer fail ("failed to handle a hardware exception").
      step racecheck timeout 200 compute-sanitizer --tool racecheck --error-exitcode 1 \
        build-gpu/flce_tests --gtest_filter='Cuda/CudaLogits.*:Cuda/CudaFused.*plain*:Cuda/CudaFused.*gif_compact*:Cuda/CudaFusedLogits.*' ;;
    bench-quick)
      step bench-quick python3 -m flce.bench --quick ;;
    bench)
      step bench python3 -m flce.bench ;;
    e2e)
      step e2e python3 bench/e2e_train.py ;;
    *) echo "unknown step $s" | tee -a "$summary" ;;
  esac
done
cat "$summary"
