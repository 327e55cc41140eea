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
    assert "from cache: True output shape: (2, 4)" in run_example("trio_usage.py").stdout


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


def _dockerfile_steps() -> list[tuple[str, list[str] | str]]:
    """examples/Dockerfile as (instruction, arguments): the JSON form for CMD, text for the others."""
    steps: list[tuple[str, list[str] | str]] = []
    for line in (EXAMPLES / "Dockerfile").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, rest = line.strip().partition(" ")
            steps.append((instruction, json.loads(rest) if rest.startswith("[") else rest))
    return steps


def test_the_dockerfile_builds_from_the_repository_and_serves_from_its_cache(tmp_path: Path) -> None:
    """examples/Dockerfile's steps, performed in a venv with every absolute path moved under a
    folder standing for the image's root: the image installs aioov from the repository, warms
    its cache while it is built, and its command serves the models from that cache."""
    import shutil
    import socket
    import time
    import urllib.request

    root = tmp_path / "image"
    context = tmp_path / "context"  # the repository's files, and the models to serve
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.split():
        if (ROOT / name).is_file():
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, context / name)
    (context / "models").mkdir()
    for seed in range(2):
        onnx.save(bert_like(2, 64, 4, vocab=300, seed=seed), context / "models" / f"m{seed}.onnx")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)  # the image's Python sees what the image installed, nothing else

    def here(text: str) -> str:  # an absolute path of the image, under ``root``
        return " ".join(str(root) + word if word.startswith("/") else word for word in text.split(" "))

    steps = _dockerfile_steps()
    assert steps[0][0] == "FROM" and "python" in str(steps[0][1])
    command: list[str] = []
    for instruction, args in steps[1:]:
        if instruction == "COPY":
            source, target = str(args).split()
            assert source == "."  # the build context
            shutil.copytree(context, root / target.lstrip("/"))
        elif instruction == "RUN":
            run = subprocess.run(here(str(args).replace('"', "")), shell=True, env=env, timeout=900,
                                 capture_output=True, text=True)
            assert run.returncode == 0, f"RUN {args}:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
        elif instruction == "ENV":
            env.update((name, here(value)) for name, _, value in (pair.partition("=") for pair in str(args).split()))
        elif instruction == "CMD":
            command = [here(word) for word in args]
    assert (root / "src" / "examples" / "asgi_app.py").exists()  # installed from the repository
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = command.index("--host")
    command[host + 1] = "127.0.0.1"
    command[command.index("--workers") + 1] = "2"
    server = subprocess.Popen([*command, "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/models", timeout=5) as response:
                    listed = json.loads(response.read())
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the image's command did not serve"
                time.sleep(0.3)
    finally:
        server.terminate()
        server.wait(60)
        assert server.stderr is not None
        server.stderr.close()
    assert sorted(listed["models"]) == ["m0", "m1"] and listed["failed"] == {}, listed
    assert all(m["from_cache"] for m in listed["models"].values())  # warmed while the image was built


def test_the_asgi_app_answers_bad_requests_with_a_4xx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.testclient import TestClient

    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(bert_like(2, 64, 4, vocab=300, seed=0), folder / "bert.onnx")
    monkeypatch.setenv("MODELS_DIR", str(folder))
    monkeypatch.syspath_prepend(str(ROOT))
    from examples.asgi_app import app

    with TestClient(app) as client:
        url = "/models/bert/infer"
        assert client.post(url, content=b"{not json").status_code == 400
        assert client.post(url, json=[1, 2]).status_code == 400
        assert client.post(url, json={"nope": [[1]]}).status_code == 422
        assert client.post(url, json={"input_ids": [[0.5, 1.5]]}).status_code == 422  # no silent casts
        assert client.post(url, json={"input_ids": [[1, 2, 3]]}).status_code == 200
