#!/usr/bin/env bash
# The scale benchmark (benchmarks/scale.py) on a GPU machine, same runs as on CPU.
#
# From the repository root:
#     bash benchmarks/scale_gpu.sh [OUT_DIR [scale.py flags...]]
#     (default OUT_DIR: $OUT or /tmp/jattri_scale_gpu; e.g. `... /tmp/x --quick` to try it)
# Through the device tool (one call; an estimate of 5-9 min on one H200, most of it
# compiling the 11 subprocesses; not yet run):
#     run(command="bash benchmarks/scale_gpu.sh $OUT", timeout_s=600)
# or, to stay well inside the 10-minute limit of one call, two calls:
#     run(command="bash benchmarks/scale_gpu.sh $OUT/a --parts nanogpt,profile", timeout_s=420)
#     run(command="bash benchmarks/scale_gpu.sh $OUT/b --parts scaling,gpt2", timeout_s=420)
#
# Writes OUT_DIR/scale_gpu.md (the tables), OUT_DIR/scale_gpu.json (every figure),
# OUT_DIR/sharded_gpu.{md,json} (TRAK featurisation sharded over 1 ... all visible GPUs,
# benchmarks/sharded_throughput.py; JATTRI_SKIP_SHARDED=1 skips it) and
# OUT_DIR/scale_gpu.log. Only the sharded part, in one call:
#     run(command="python benchmarks/sharded_throughput.py --gpu --n-train 128 --chunk 8", timeout_s=420) Uses whatever jax is installed (jax with CUDA if present; the
# machine has no network, so nothing is downloaded): it prints the backend and devices
# first and the tables say which backend ran. Peak device memory per run comes from
# jax.devices()[0].memory_stats()["peak_bytes_in_use"] ("device peak GiB" column);
# preallocation is off so that each run's process holds only what it uses.
set -uo pipefail

OUT_DIR=${1:-${OUT:-/tmp/jattri_scale_gpu}}
shift || true
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."

# The package from this checkout, without touching the network or installed deps.
pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || echo "pip install -e . failed; using PYTHONPATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false

{
    nvidia-smi -L 2>/dev/null || echo "nvidia-smi: none"
    python -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices())" \
        || { echo "jax/flax/optax not importable: nothing run"; exit 1; }
    # Full sizes (nanoGPT 10.7M: 512 train / 64 test blocks, k = 2048 SJLT, top-10; the
    # TRAK cache at 64..512; the projection profile; GPT-2 small on 64 x 512 tokens).
    # GPT-2 runs with chunk 8 on a GPU (2 on CPU); each run is capped at 4 minutes.
    python benchmarks/scale.py --gpt2-chunk-size 8 --timeout 240 \
        --json "$OUT_DIR/scale_gpu.json" --markdown "$OUT_DIR/scale_gpu.md" "$@"
    # TRAK featurisation of nanoGPT sharded over 1, 2, 4, ... all visible GPUs
    # (jattri.shard over a one-axis mesh; one process per device count).
    if [ "${JATTRI_SKIP_SHARDED:-0}" != 1 ]; then
        python benchmarks/sharded_throughput.py --gpu --n-train 128 --chunk 8 \
            --timeout 240 --json "$OUT_DIR/sharded_gpu.json" | tee "$OUT_DIR/sharded_gpu.md"
    fi
} 2>&1 | tee "$OUT_DIR/scale_gpu.log"
exit "${PIPESTATUS[0]}"
