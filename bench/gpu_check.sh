#!/usr/bin/env bash
# The GPU checks in one command, on a machine with a CUDA GPU (`make gpu-check`, or
# `bash bench/gpu_check.sh` from the repository root):
#   1. tests/test_gpu.py: tiny XPs trained on CUDA (float32, bf16, fp16, HTDemucs bf16),
#      CUDA graphs against eager, a real out-of-memory stop, CUDA separation against the
#      CPU, the norms' CUDA path;
#   2. bench/bench_train.py on the full-size models (batch 4 x 7.8 s): eager in float32,
#      bf16 and fp16, then with CUDA graphs in float32 and bf16 (the figures of
#      bench/README.md), then one profiled step of each precision (kernels, casts);
#   3. bench/bench_group_norm.py: could the norms of a bf16 step skip their float32 copies.
# Each part writes its log under $OUT (default bench/results/gpu); the exit status is the
# tests'. Environment:
#   PYTHON   the interpreter (default python3); its torch must be a CUDA build
#   WHEELS   a folder of wheels to install first, without an index and without their
#            dependencies, into a temporary folder put first on PYTHONPATH: for a GPU
#            machine without network whose Python already has torch, numpy and pytest
#            (`bash bench/gpu_check.sh --wheels DIR [PYTHON_VERSION]` fills DIR here)
#   MODELS   the models benchmarked (default "demucs hdemucs htdemucs")
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MODELS=${MODELS:-demucs hdemucs htdemucs}
OUT=${OUT:-bench/results/gpu}

# What the checks import beyond torch, numpy and pytest (the separation path, the solver,
# Hydra and Dora, the synthetic dataset): pure-Python packages (wheels built here where
# the registry has only sources), and four with compiled parts, fetched for the GPU
# machine's Python version.
PURE=(antlr4-python3-runtime==4.9.3 colorlog dora-search ffmpeg-python future hydra-colorlog
      hydra-core julius musdb 'omegaconf>=2.3,<2.4' pyaml pycparser retrying stempeg submitit
      tqdm treetable)
COMPILED=(cffi lameenc PyYAML soundfile)

if [ "${1:-}" = "--wheels" ]; then
    dir=${2:?usage: bash bench/gpu_check.sh --wheels DIR [PYTHON_VERSION]}
    version=${3:-3.12}
    "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$dir" "${PURE[@]}" || exit 1
    exec "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version "$version" --platform manylinux_2_28_x86_64 \
        --platform manylinux2014_x86_64 --dest "$dir" "${COMPILED[@]}"
fi

export PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then
    site=$(mktemp -d)
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
        --target "$site" "$WHEELS"/*.whl || { echo "gpu_check: could not install $WHEELS"; exit 1; }
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null
then
    echo "gpu_check: $PYTHON has no torch that sees a CUDA GPU; run this on a machine with one."
    exit 1
fi
mkdir -p "$OUT"

run() {  # NAME SECONDS COMMAND...: one part, its output shown and kept in $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local status=${PIPESTATUS[0]}
    [ "$status" = 0 ] || echo "== $name ended with status $status"
    return "$status"
}

"$PYTHON" -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name(),
      f'({torch.cuda.get_device_properties(0).total_memory / 2 ** 30:.1f} GiB)')" \
    | tee "$OUT/device.log"
run tests 300 "$PYTHON" -m pytest -p no:cacheprovider -q -rfEs tests/test_gpu.py
tests=$?
# shellcheck disable=SC2086  # MODELS is a list
run bench_eager 240 "$PYTHON" bench/bench_train.py --devices cuda --steps 5 --threads 8 \
    --amps float32 bf16 fp16 --models $MODELS
# shellcheck disable=SC2086
run bench_graphed 240 "$PYTHON" bench/bench_train.py --devices cuda --steps 5 --threads 8 \
    --amps float32 bf16 --models $MODELS --cuda-graph
# shellcheck disable=SC2086
run bench_profile 180 "$PYTHON" bench/bench_train.py --devices cuda --steps 2 --threads 8 \
    --amps float32 bf16 --models $MODELS --profile 15
run bench_group_norm 60 "$PYTHON" bench/bench_group_norm.py --device cuda
echo "gpu_check: logs in $OUT; tests $([ "$tests" = 0 ] && echo passed || echo FAILED)"
exit "$tests"
