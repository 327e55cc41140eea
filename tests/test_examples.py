"""Every example runs, as users would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from aioov.testing import bert_like

from .helpers import ROOT, child_env

EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr
    return proc


def test_quickstart() -> None:
    out = run_example("quickstart.py").stdout
    assert "first compile" in out and "loaded from cache: False" in out
    assert "loaded from cache: True" in out


def test_bulk_startup_twice_with_one_cache(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    for seed in range(3):
        onnx.save(bert_like(2, 64, 4, vocab=300, seed=seed), folder / f"m{seed}.onnx")
    first = run_example("bulk_startup.py", str(folder), "--cache-dir", str(tmp_path / "c"))
    assert "3/3 models ready" in first.stdout and "(0 from cache)" in first.stdout
    second = run_example("bulk_startup.py", str(folder), "--cache-dir", str(tmp_path / "c"))
    assert "(3 from cache)" in second.stdout
    assert second.stderr.count("cached") == 3


def test_shared_cache_workers_compile_each_model_once() -> None:
    out = run_example("shared_cache_workers.py", "--workers", "3", "--models", "2").stdout
    assert "3 workers x 2 models: 2 compiles in total" in out


def test_trio_usage() -> None:
    assert "compiles: 1 output shape: (2, 4)" in run_example("trio_usage.py").stdout


def test_asgi_app_loads_models_in_its_lifespan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.testclient import TestClient

    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(bert_like(2, 64, 4, vocab=300, seed=1), folder / "bert.onnx")
    (folder / "broken.onnx").write_text("not a model")
    monkeypatch.setenv("MODELS_DIR", str(folder))
    monkeypatch.setenv("AIOOV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(ROOT))
    from examples.asgi_app import app

    with TestClient(app) as client:
        listing = client.get("/models").json()
        assert list(listing["models"]) == ["bert"] and "broken" in listing["failed"]
        response = client.post("/models/bert/infer", content=json.dumps({"input_ids": [[1, 2, 3]]}))
        assert response.status_code == 200
        assert np.asarray(response.json()["last_hidden_state"]).shape == (1, 3, 64)
        bad = client.post("/models/bert/infer", content=json.dumps({"input_ids": [1, 2, 3]}))
        assert bad.status_code == 422 and "rank" in bad.json()["error"]
        assert client.post("/models/nope/infer", content="{}").status_code == 404


def test_ahead_of_time_warmup_script(tmp_path: Path) -> None:
    """The container build step of examples/Dockerfile, run twice."""
    folder = tmp_path / "models"
    folder.mkdir()
    for seed in range(2):
        onnx.save(bert_like(2, 64, 4, vocab=300, seed=seed), folder / f"m{seed}.onnx")
    env = child_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    cache = tmp_path / "cache"
    runs = [subprocess.run(["sh", str(EXAMPLES / "aot_warmup.sh"), str(folder), str(cache)], capture_output=True,
                           text=True, env=env, timeout=300) for _ in range(2)]
    assert all(run.returncode == 0 for run in runs), runs[0].stderr + runs[1].stderr
    assert "2 models: 0 from cache, 2 compiled, 0 failed" in runs[0].stdout
    assert "2 models: 2 from cache, 0 compiled, 0 failed" in runs[1].stdout
    assert "verified 2 entries: 0 bad" in runs[1].stdout
    stats = dict(line.split(":", 1) for line in runs[1].stdout.splitlines() if ":" in line)
    assert int(stats["entries"].split()[0]) == 2, runs[1].stdout  # "entries:   2 (1.2 MB)", however aligned
