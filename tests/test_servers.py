"""Real servers, as docs/deployment.md deploys them (#40, "How it is shown").

- gunicorn ``--preload`` with two uvicorn workers: the app module makes a ``Core`` and
  compiles a model at import, in gunicorn's master, before the fork; each worker serves it,
  and compiles another model after the fork (the case that used to hang).
- uvicorn stopped by SIGTERM while its lifespan startup compiles (``examples/asgi_app.py``):
  it stops within docs/deployment.md's bound ("Graceful shutdown"), leaves no builder and no
  ``.incomplete`` folder, and the next start serves from what it left.

Each server runs in a process group of its own, bound to a free port, with its output in a
file; the group is killed in a ``finally``. Outputs are compared with plain onnxruntime.
Waits are for events (a port that answers, a file that appears, a log line), each with a
deadline far above what a busy machine needs, so that a hang fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import aioov
from aioov.testing import mlp

from .helpers import ROOT, builders_of, child_env, gone, make_models, reference

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork(), /proc: Linux's")

pytest.importorskip("gunicorn")
pytest.importorskip("uvicorn")

#: docs/deployment.md, "Graceful shutdown": what a closing Core gives its pending exports
EXPORT_GRACE = 10.0
#: what a busy, niced machine may add to it: interpreter exit, killing builders, removing folders
SLACK = 30.0
#: a deadline for what takes seconds on an idle machine (a start, a compile): a hang detector
DEADLINE = 300.0

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(port: int, path: str, body: object = None, timeout: float = DEADLINE) -> Any:
    """A real HTTP request on a new connection (GET, or POST with a JSON ``body``)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"content-type": "application/json"})
    with _NO_PROXY.open(request, timeout=timeout) as response:
        return json.load(response)


class Server:
    """A server process in a session (process group) of its own, its output in ``log``."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env=env, cwd=cwd, start_new_session=True)
        self.builders: set[int] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def watch_builders(self, *pids: int) -> None:
        """Note the builders that ``pids`` (default: the server) have now, to check later
        that none outlived the server."""
        for pid in pids or (self.pid,):
            self.builders.update(builders_of(pid))

    def wait_until(self, what: str, ready: Any, deadline: float = DEADLINE) -> Any:
        """``ready()``'s first true value, while the server runs."""
        end = time.monotonic() + deadline
        while True:
            self.watch_builders()
            value = ready()
            if value:
                return value
            exited = self.proc.poll()
            assert exited is None, f"the server exited ({exited}) before {what}:\n{self.output()}"
            assert time.monotonic() < end, f"no {what} in {deadline:.0f}s:\n{self.output()}"
            time.sleep(0.02)

    def answers(self, port: int, path: str) -> Any:
        def get() -> Any:
            try:
                return call(port, path, timeout=10)
            except OSError:
                return None
        return self.wait_until(f"answer on port {port}", get)

    def stop(self, within: float) -> int:
        """SIGTERM, then the exit status, which must come ``within`` seconds."""
        self.watch_builders()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(within)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not exit {within:.0f}s after SIGTERM:\n{self.output()}")

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@contextmanager
def serving(command: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> Iterator[Server]:
    server = Server(command, log, env, cwd)
    try:
        yield server
    finally:
        server.kill()


def in_group(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid`` (Linux's /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            state, _ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            found.append(int(entry.name))
    return found


def nothing_left(server: Server) -> None:
    """No builder the server was seen with outlives it, nor any process of its group (its
    workers' builders included), once it exited; before the ``finally`` kills the group."""
    left = [pid for pid in server.builders if not gone(pid, within=10)]
    assert not left, f"builders {left} outlived their server"
    deadline = time.monotonic() + 10
    while (group := in_group(server.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group, f"processes {group} of the server's group outlived it"


def entries_verify(cache_dir: Path) -> int:
    """The number of entries in ``cache_dir``; every one whole and verified; no temp folder."""
    store = aioov.CacheStore(cache_dir)
    keys = list(store.keys())
    for key in keys:
        entry = store.lookup(key)
        assert entry is not None and store.verify(entry) is None, f"entry {key} is incomplete or corrupt"
    assert not list(cache_dir.rglob("*.incomplete")), "a temp folder outlived its server"
    return len(keys)


# -- gunicorn --preload ---------------------------------------------------------------------

SERVED = '''
"""The app gunicorn serves: its Core and first model are made at import, which --preload
runs in the master, before it forks the workers. Each worker closes it when it shuts down."""
import contextlib, os, time
from pathlib import Path

import anyio
import numpy as np
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import aioov

CACHE, FIRST, SECOND = os.environ["SERVED_CACHE"], os.environ["SERVED_FIRST"], os.environ["SERVED_SECOND"]
MEET = Path(os.environ["SERVED_MEET"])
MASTER = os.getpid()

core = aioov.Core(cache_dir=CACHE)
first = anyio.run(core.compile_model, FIRST, "CPU")  # in the master: its export may still run at the fork


async def run(model, body):
    return (await model.infer({"x": np.asarray(body["x"], np.float32)}))["y"].tolist()


async def health(request):
    return JSONResponse({"pid": os.getpid(), "master": MASTER})


async def infer(request):
    model = first if request.path_params["name"] == "first" else await core.compile_model(SECOND, "CPU")
    return JSONResponse({"pid": os.getpid(), "y": await run(model, await request.json())})


async def meet(request):
    """One request per worker: a worker here blocks its event loop (accepts no connection)
    until the other worker has one too; then it compiles the second model, after the fork."""
    body = await request.json()
    (MEET / str(os.getpid())).touch()
    deadline = time.monotonic() + 120
    while len(list(MEET.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # blocking on purpose: the next connection can only go to the other worker
    second = await core.compile_model(SECOND, "CPU")
    return JSONResponse({"pid": os.getpid(), "first": await run(first, body), "second": await run(second, body)})


@contextlib.asynccontextmanager
async def lifespan(app):
    yield
    await core.aclose()  # as docs/deployment.md says: a worker killed by SIGTERM runs no exit handler


app = Starlette(routes=[Route("/health", health), Route("/meet", meet, methods=["POST"]),
                        Route("/infer/{name}", infer, methods=["POST"])], lifespan=lifespan)
'''


def gunicorn_command(port: int, app_dir: Path) -> list[str]:
    """What docs/deployment.md ("Forked workers") shows, bound to ``port``; without the control
    socket that gunicorn 25.1+ opens in ``~/.gunicorn`` (one for every run on this machine)."""
    import gunicorn

    no_control = ["--no-control-socket"] if gunicorn.version_info >= (25, 1) else []
    return [sys.executable, "-m", "gunicorn", "--preload", "-w", "2", "-k", "uvicorn.workers.UvicornWorker",
            "-b", f"127.0.0.1:{port}", "--chdir", str(app_dir), *no_control,
            "--timeout", str(int(DEADLINE)),  # a worker blocked at the meeting point is not hung
            "served:app"]


def test_gunicorn_preload_workers_serve_a_core_made_before_the_fork(tmp_path: Path) -> None:
    models = {}
    for name, seed in (("first", 11), ("second", 12)):
        models[name] = tmp_path / f"{name}.onnx"
        onnx.save(mlp(seed=seed), models[name])
    app_dir, meet, cache_dir = tmp_path / "app", tmp_path / "meet", tmp_path / "cache"
    app_dir.mkdir()
    meet.mkdir()
    (app_dir / "served.py").write_text(SERVED)
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    want = {name: reference(path, {"x": x})[0] for name, path in models.items()}
    port = free_port()
    env = child_env(SERVED_CACHE=str(cache_dir), SERVED_FIRST=str(models["first"]),
                    SERVED_SECOND=str(models["second"]), SERVED_MEET=str(meet),
                    # uvicorn 0.55 deprecates uvicorn.workers for the uvicorn-worker package; it works
                    PYTHONWARNINGS="ignore::DeprecationWarning:uvicorn.workers")
    with serving(gunicorn_command(port, app_dir), tmp_path / "gunicorn.log", env) as server:
        master = server.answers(port, "/health")["master"]
        assert master == server.pid  # the app was imported in the master: --preload
        body = {"x": x.tolist()}
        with ThreadPoolExecutor(8) as pool:
            one = pool.submit(call, port, "/meet", body)
            server.wait_until("a worker at the meeting point", lambda: any(meet.iterdir()))
            two = pool.submit(call, port, "/meet", body)  # the first worker is blocked: the other takes it
            met = [one.result(), two.result()]
            workers = {reply["pid"] for reply in met}
            assert len(workers) == 2 and master not in workers, met
            server.watch_builders(*workers)
            for reply in met:  # each worker: the model compiled before the fork, and one after it
                np.testing.assert_allclose(reply["first"], want["first"], rtol=1e-4, atol=1e-4)
                np.testing.assert_allclose(reply["second"], want["second"], rtol=1e-4, atol=1e-4)
            replies = list(pool.map(lambda name: (name, call(port, f"/infer/{name}", body)), ["first", "second"] * 6))
        for name, reply in replies:
            assert reply["pid"] in workers
            np.testing.assert_allclose(reply["y"], want[name], rtol=1e-4, atol=1e-4)
        server.watch_builders(master, *workers)
        # gunicorn gives its workers graceful_timeout (30 s), each Core its exports 10 s
        assert server.stop(within=30 + EXPORT_GRACE + SLACK) == 0, server.output()
        nothing_left(server)
    assert entries_verify(cache_dir) == 2  # the master's export, and a worker's after the fork
    assert "Traceback" not in server.output(), server.output()


# -- uvicorn: SIGTERM during the lifespan startup --------------------------------------------


def uvicorn_command(port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "examples.asgi_app:app", "--app-dir", str(ROOT),
            "--host", "127.0.0.1", "--port", str(port)]


def test_uvicorn_stopped_by_sigterm_while_its_startup_compiles(tmp_path: Path) -> None:
    """SIGTERM while examples/asgi_app.py's lifespan compiles its models (sent once uvicorn says
    it waits for the startup: its signal handlers are in place, and the compiles of a cold cache
    follow; any later sign of a compile can come after a fast machine's startup ended). uvicorn
    lets a lifespan startup finish (it only flags the signal); then its shutdown closes the Core,
    which gives pending exports at most 10 s: the process must be gone that long, plus slack,
    after the startup ended. No builder outlives it, no ``.incomplete`` folder stays, and the
    next start with the same cache serves every model, correctly, from each entry it left."""
    folder = tmp_path / "models"
    # more models than compile_all runs at once: the startup goes on well past the first sign
    paths = make_models(folder, 8 * min(os.cpu_count() or 1, 8), layers=4, hidden=256, vocab=2000)
    cache_dir = tmp_path / "cache"
    env = child_env(MODELS_DIR=str(folder), AIOOV_CACHE_DIR=str(cache_dir))

    with serving(uvicorn_command(free_port()), tmp_path / "first.log", env) as server:
        server.wait_until("the startup", lambda: "Waiting for application startup" in server.output())
        server.proc.send_signal(signal.SIGTERM)
        signalled, ready = time.monotonic(), None
        while server.proc.poll() is None:  # noting each builder, and when the startup ended
            server.watch_builders()
            if ready is None and "models ready" in server.output():
                ready = time.monotonic()
            assert time.monotonic() - signalled < DEADLINE, f"no exit after SIGTERM:\n{server.output()}"
            time.sleep(0.02)
        exited = time.monotonic()
        assert "models ready" in server.output(), f"the startup did not finish:\n{server.output()}"
        assert f'"misses": {len(paths)}' in server.output(), server.output()  # it compiled them all
        assert exited - (ready or exited) < EXPORT_GRACE + SLACK, (exited - (ready or exited), server.output())
        assert server.proc.returncode in (0, -signal.SIGTERM), server.output()  # uvicorn re-raises the signal
        assert "aioov: stopped" in server.output()  # the lifespan closed its Core
        nothing_left(server)
    published = entries_verify(cache_dir)
    assert "Traceback" not in server.output(), server.output()

    port = free_port()
    with serving(uvicorn_command(port), tmp_path / "second.log", env) as again:
        listing = again.answers(port, "/models")
        assert sorted(listing["models"]) == sorted(p.stem for p in paths) and not listing["failed"], listing
        assert sum(m["from_cache"] for m in listing["models"].values()) == published
        ids = np.random.default_rng(1).integers(0, 2000, (2, 12), dtype=np.int64)
        for path in paths:
            got = call(port, f"/models/{path.stem}/infer", {"input_ids": ids.tolist()})["last_hidden_state"]
            np.testing.assert_allclose(got, reference(path, {"input_ids": ids})[0], rtol=1e-4, atol=1e-4)
        assert again.stop(within=EXPORT_GRACE + SLACK) in (0, -signal.SIGTERM), again.output()
        nothing_left(again)
    entries_verify(cache_dir)
