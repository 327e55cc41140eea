"""Where do prepacked weights pay? A hit's load with a plain blob against a prepacked one.

For each model (the corpus of ``tests/corpus.py`` and the BERT-like models of ``models.py``)
both blobs are written as aioov's builder writes them, then loaded as a hit loads them, in
fresh processes, alternating: ``plain`` (weights packed at load), ``plain-instant`` (packing
skipped: ``plain - plain-instant`` is the most a prepacked blob can save) and ``prepacked``.
The table shows medians and what the prepacked blob saves; ``CACHE_PREPACK=AUTO`` publishes it
where it saves at least ``FASTER_SHARE`` of the load and ``FASTER_SECONDS`` (``aioov/_variants.py``).

    .venv/bin/python -m benchmarks.prepack [--repeats 5] [--only NAME ...]

writes ``benchmarks/results/prepack.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from . import ROOT, child_env

_EXPORT = r"""
import sys, onnxruntime as ort
src, out, prepack = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.log_severity_level = 3
o.optimized_model_filepath = out + "/model.onnx"
o.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.bin")
o.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
if prepack:
    o.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
ort.InferenceSession(src, o, providers=["CPUExecutionProvider"])
"""
_LOAD = r"""
import sys, time, onnxruntime as ort
o = ort.SessionOptions(); o.log_severity_level = 3
o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
if sys.argv[2] == "1":
    o.add_session_config_entry("session.disable_prepacking", "1")
t = time.perf_counter(); ort.InferenceSession(sys.argv[1] + "/model.onnx", o, providers=["CPUExecutionProvider"])
print(time.perf_counter() - t)
"""
MODES = {"plain": ("plain", "0"), "plain-instant": ("plain", "1"), "prepacked": ("prepacked", "0")}


def measure(source: Path, work: Path, repeats: int) -> dict[str, object]:
    env = child_env()
    for name, flag in (("plain", "0"), ("prepacked", "1")):
        (work / name).mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", _EXPORT, str(source), str(work / name), flag], check=True, env=env)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for repeat in range(repeats):
        order = list(MODES) if repeat % 2 == 0 else list(MODES)[::-1]
        for mode in order:
            blob, instant = MODES[mode]
            out = subprocess.run([sys.executable, "-c", _LOAD, str(work / blob), instant], capture_output=True,
                                 text=True, check=True, env=env)
            times[mode].append(float(out.stdout))
    median = {mode: statistics.median(v) for mode, v in times.items()}
    return {"median": median, "spread": {mode: [min(v), max(v)] for mode, v in times.items()},
            "saved": median["plain"] - median["prepacked"], "bound": median["plain"] - median["plain-instant"],
            "blob_mb": {b: sum(f.stat().st_size for f in (work / b).iterdir()) / 2**20 for b in ("plain", "prepacked")}}


def models(only: list[str]) -> list[tuple[str, Path]]:
    sys.path.insert(0, str(ROOT))
    from tests.corpus import CORPUS, fetch

    from .models import model

    found = [(f"bench/{size}", model(size)) for size in ("bert-small", "bert-medium", "bert-base")]
    for real in CORPUS:
        try:
            found.append((real.name, fetch(real)))
        except OSError as exc:
            print(f"{real.name}: not measured ({exc})", file=sys.stderr)
    return [(name, path) for name, path in found if not only or any(o in name for o in only)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", action="append", default=[], help="models whose name contains this")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from aioov._variants import FASTER_SECONDS, FASTER_SHARE

    rows = {}
    print(f"{'model':52s} {'plain':>7s} {'instant':>7s} {'prepack':>7s} {'saved':>7s}  published")
    for name, path in models(args.only):
        with tempfile.TemporaryDirectory() as tmp:
            row = measure(path, Path(tmp), args.repeats)
        median, saved = row["median"], float(row["saved"])  # type: ignore[arg-type]
        pays = saved >= FASTER_SECONDS and saved >= FASTER_SHARE * median["plain"]  # type: ignore[index]
        rows[name] = {**row, "prepacked_published": pays}
        print(f"{name:52s} {median['plain']:7.3f} {median['plain-instant']:7.3f} "  # type: ignore[index]
              f"{median['prepacked']:7.3f} {saved:+7.3f}  {'prepacked' if pays else 'plain'}", flush=True)  # type: ignore[index]
    out = ROOT / "benchmarks" / "results" / "prepack.json"
    import onnxruntime

    out.write_text(json.dumps({"onnxruntime": onnxruntime.__version__, "repeats": args.repeats, "models": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
