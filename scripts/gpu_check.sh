#!/usr/bin/env bash
# aioov on a GPU machine, in one go (about 6 minutes on an H100): the devices as aioov sees
# them, the GPU tests, the `gpu` benchmark scenario (plain onnxruntime against aioov: fresh
# processes cold / first / warm, one process with CUDA up, 4 hits at once) into
# benchmarks/results/gpu-*.json, the real-model corpus on CUDA (corpus-gpu.json), and the
# tests that touch devices, compiles and the cache (AUTO picks CUDA there).
#
# Run from the project's root with aioov importable: on the project's lent H100 that is,
# after ../shared/gpu/README.md's transfers, `bash .gpu/install.sh && export PYTHONPATH=/tmp/site:$PWD`.
# Corpus models carried over as .gpu/m*.tar.xz (see docs/performance.md, "GPU") are unpacked
# into /tmp/corpus; the others cannot be downloaded there and are reported unavailable.
# Each step is time-boxed and the script goes on after a failure, so one run shows everything;
# it exits non-zero if any step failed. Logs and results go to $OUT (when set), which comes back.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/aioov-gpu-check}
mkdir -p "$OUT"
export PIP_NO_INDEX=1 AIOOV_CORPUS_DIR=/tmp/corpus AIOOV_CORPUS_OUT="$OUT"
for tarball in .gpu/m*.tar.xz /tmp/oc/m*.tar.xz; do
    [ -f "$tarball" ] && "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
        "$tarball" /tmp/corpus
done
echo "corpus models carried over: $(find /tmp/corpus -name '*.onnx' 2>/dev/null | wc -l)"
failed=0
step() {  # step NAME SECONDS COMMAND...
    local name=$1 seconds=$2 started=$SECONDS
    shift 2
    echo "== $name"
    if ! timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1; then
        echo "== $name FAILED (or timed out after ${seconds}s)"
        failed=1
    fi
    tail -n 25 "$OUT/$name.log"
    echo "== $name took $((SECONDS - started)) s"
}
step versions 30 "$PY" -c "import onnxruntime as o, aioov; print('onnxruntime', o.__version__, o.get_available_providers(), 'aioov', aioov.__version__)"
# stderr kept apart: onnxruntime's warnings and error blocks land there, and there should be none
step devices 60 bash -c "$PY -m aioov devices 2> $OUT/devices.stderr; cat $OUT/devices.stderr"
step gpu-tests 100 "$PY" -m pytest -p no:cacheprovider -v -o console_output_style=classic -rfE \
    tests/test_gpu_entries.py tests/test_devices.py
step benchmark 200 "$PY" -m benchmarks --scenario gpu --repeats 3 --out "$OUT"
step corpus 100 "$PY" -m tests.corpus GPU 70
# The remote-tier and example tests need moto, redis and starlette, which the GPU image lacks.
step tests 150 "$PY" -m pytest -p no:cacheprovider -v -o console_output_style=classic -rfE -m "not slow" \
    tests/test_compile.py tests/test_properties.py tests/test_errors.py tests/test_cache.py \
    tests/test_warmup.py tests/test_instant.py tests/test_checked_entries.py tests/test_bulk.py
cp "$OUT"/gpu-*.json "$OUT"/corpus-gpu.json benchmarks/results/ 2>/dev/null || true
exit $failed
