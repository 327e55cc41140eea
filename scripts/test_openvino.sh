#!/usr/bin/env bash
# The test suite on onnxruntime-openvino: the OPENVINO device's real tests (which skip
# elsewhere), and everything else on a second onnxruntime build (1.24 at the time of writing)
# with a fourth device present. The remote-tier and example tests, which need boto3, moto,
# redis and starlette and do not depend on the runtime, run in the main environment only.
#
# onnxruntime-openvino and onnxruntime-gpu install the same `onnxruntime` module, so they
# cannot share an environment: this builds .venv-openvino with onnxruntime-openvino and
# aioov's other dependencies (read from pyproject.toml), aioov installed without its own
# onnxruntime requirement. Where the wheel cannot be installed (no registry, no wheel for
# this platform) it says so in a banner nobody can miss and exits 0 (1 with
# AIOOV_REQUIRE_OPENVINO=1); where it installs, its provider must load and the tests must pass.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-openvino

not_run() {
    local banner
    banner=$(printf '#%.0s' {1..78})
    for stream in 1 2; do
        printf '%s\n# OPENVINO TESTS DID NOT RUN: %s\n%s\n' "$banner" "$1" "$banner" >&"$stream"
    done
    [[ -z "${AIOOV_REQUIRE_OPENVINO:-}" ]]  # the exit status: 1 where the tests are required
    exit
}
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
if ! "$venv/bin/python" -c "import tomllib" 2>/dev/null; then
    not_run "this script needs Python 3.11+ (tomllib) to read pyproject.toml"
fi
if ! "$venv/bin/pip" install --quiet onnxruntime-openvino; then
    not_run "onnxruntime-openvino cannot be installed here"
fi
mapfile -t deps < <("$venv/bin/python" - <<'PY'
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
for requirement in project["dependencies"]:
    if not requirement.startswith("onnxruntime"):
        print(requirement)
PY
)
"$venv/bin/pip" install --quiet "${deps[@]}" pytest pytest-asyncio trio hypothesis
"$venv/bin/pip" install --quiet --no-deps -e .
"$venv/bin/python" - <<'PY'
from importlib.metadata import distributions

from aioov._devices.openvino import OpenVINODevice

runtimes = sorted(d.metadata["Name"] for d in distributions() if d.metadata["Name"].startswith("onnxruntime"))
assert runtimes == ["onnxruntime-openvino"], f"one onnxruntime distribution only, found {runtimes}"
device = OpenVINODevice()
assert device.available(), f"onnxruntime-openvino is installed but its provider does not load: {device.unavailable_reason}"
PY
"$venv/bin/python" -m pytest -p no:cacheprovider -ra -m "not slow" tests \
    --ignore=tests/test_remote.py --ignore=tests/test_examples.py
