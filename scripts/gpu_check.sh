#!/usr/bin/env bash
# aioov on a GPU machine, in one go (under 5 minutes on an H100): the devices as aioov sees
# them, the test suite there (GPU tests run instead of skipping; AUTO picks CUDA), and the
# `gpu` benchmark scenario (plain onnxruntime vs aioov cold, cached and warmed up, in fresh
# processes) into benchmarks/results/gpu-*.json.
#
# Run from anywhere with aioov importable: on the project's lent H100 that is, after
# ../shared/gpu/README.md's transfers, `bash .gpu/install.sh && export PYTHONPATH=/tmp/site:$PWD`.
# Each step is time-boxed and the script goes on after a failure, so one run shows everything;
# it exits non-zero if any step failed. Its output under $OUT (when set) comes back to you.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/aioov-gpu-check}
mkdir -p "$OUT"
failed=0
step() {  # step NAME SECONDS COMMAND...
    local name=$1 seconds=$2
    shift 2
    echo "== $name"
    if ! timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.log"; then
        echo "== $name FAILED (or timed out after ${seconds}s)"
        failed=1
    fi
}
step versions 30 "$PY" -c "import onnxruntime as o, aioov; print('onnxruntime', o.__version__, o.get_available_providers(), 'aioov', aioov.__version__)"
step devices 60 "$PY" -m aioov devices
# The remote-tier and example tests need moto, redis and starlette, which the GPU image lacks.
step tests 150 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" -x \
    --ignore=tests/test_remote.py --ignore=tests/test_remote_dir.py --ignore=tests/test_examples.py \
    tests/test_devices.py tests/test_compile.py tests/test_properties.py tests/test_warmup.py tests/test_instant.py \
    tests/test_cache.py tests/test_errors.py
step benchmark 200 "$PY" -m benchmarks --scenario gpu --repeats 2 --out "$OUT"
cp "$OUT"/gpu-*.json benchmarks/results/ 2>/dev/null || true
exit $failed
