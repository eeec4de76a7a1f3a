#!/usr/bin/env bash
# A subset of the test suite on a GPU machine (the device tool's nvidia-h200: its own
# jax with CUDA, no network), every failure named in $OUT_DIR/gpu_tests.log even when
# the run is cut short: pytest's -v report streamed to the log as it happens and the
# summary (-rfE) at the end. (No per-test cap: pytest-timeout is not a dependency and
# the device machine cannot install it; the whole run is capped at 360 s.)
#
#     run(command="bash benchmarks/gpu_tests.sh $OUT", timeout_s=480)
#
# The first GPU run of these files (2026-11-30, jax 0.11.2, H200) was cut by its 400 s
# limit at 53% with 9 failures whose names were lost: pytest -q prints names only in its
# final summary. This script keeps them (-v lines as they happen) and runs at most 6
# minutes.
set -uo pipefail
OUT_DIR=${1:-${OUT:-/tmp/jattri_gpu_tests}}
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false JATTRI_COMPILE_CACHE=0 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
FILES=${JATTRI_GPU_TEST_FILES:-"tests/test_compile_sharing.py tests/test_inputs.py tests/test_kronecker_projection.py tests/test_methods_core.py"}
{
    python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
    # shellcheck disable=SC2086
    timeout 360 python3 -m pytest -v -rfE -p no:cacheprovider -n 8 --dist loadfile $FILES
} 2>&1 | grep --line-buffered -v "PytestBenchmarkWarning\|warner(" | tee "$OUT_DIR/gpu_tests.log"
grep -E "FAILED|ERROR" "$OUT_DIR/gpu_tests.log" | sort -u > "$OUT_DIR/gpu_failures.txt"
echo "failures named: $(wc -l < "$OUT_DIR/gpu_failures.txt") (in $OUT_DIR/gpu_failures.txt)"
