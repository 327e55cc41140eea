#!/usr/bin/env bash
# aioov on a GPU machine: the devices as aioov sees them, the GPU tests, the `gpu` benchmark
# scenario (plain onnxruntime against aioov: fresh processes cold / first / warm, one process
# with CUDA up, 4 hits at once, graphs saved at two levels) into benchmarks/results/gpu-*.json,
# the real-model corpus on CUDA (corpus-gpu.json), and the test suite (AUTO picks CUDA there).
#   bash scripts/gpu_check.sh [quick|bench|suite|all]   quick: all but the suite (~4 min on an H100);
#       bench: quick without the corpus (~3 min); suite: the test suite alone (~6 min); all: both
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
PART=${1:-all}
want() { [ "$PART" = all ] || [ "$PART" = "$1" ] || { [ "$PART" = bench ] && [ "$1" = quick ]; }; }
step versions 30 "$PY" -c "import onnxruntime as o, aioov; print('onnxruntime', o.__version__, o.get_available_providers(), 'aioov', aioov.__version__)"
# stderr kept apart: onnxruntime's warnings and error blocks land there, and there should be none
if want quick; then
    step devices 60 bash -c "$PY -m aioov devices 2> $OUT/devices.stderr; cat $OUT/devices.stderr"
    step gpu-tests 100 "$PY" -m pytest -p no:cacheprovider -v -o console_output_style=classic -rfE \
        tests/test_gpu_entries.py tests/test_devices.py
    step benchmark 240 "$PY" -m benchmarks --scenario gpu --repeats 3 --out "$OUT"
    [ "$PART" = bench ] || step corpus 130 "$PY" -m tests.corpus GPU 110
fi
if want suite; then
    # The remote-tier and example tests need moto, redis and starlette, which the GPU image lacks.
    # -v: the log names every test as it ends, so a time-out still shows what passed and failed.
    step tests 540 "$PY" -m pytest -p no:cacheprovider -v -o console_output_style=classic -rfE -m "not slow" \
        --ignore=tests/test_remote.py --ignore=tests/test_remote_dir.py --ignore=tests/test_examples.py tests
fi
cp "$OUT"/gpu-*.json "$OUT"/corpus-gpu.json benchmarks/results/ 2>/dev/null || true
exit $failed
