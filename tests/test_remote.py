"""The remote tier: a real local S3 (moto's server) and a real redis-server, separate local
cache dirs standing for separate hosts."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import aioov

from .helpers import child_env, make_models, manifests, reference

pytestmark = pytest.mark.anyio
boto3 = pytest.importorskip("boto3")
pytest.importorskip("redis")
pytest.importorskip("moto")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.skip(f"{what} exited at start (code {proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.skip(f"{what} did not start")


@contextlib.contextmanager
def serve(command: list[str], port: int, what: str) -> Iterator[None]:
    """A real server process on loopback, for the duration of the block."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, what)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A TCP server on loopback that accepts connections and never answers: a hung endpoint."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(server.accept()[0])  # and never a byte back

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield int(server.getsockname()[1])
    finally:
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)  # wakes the accept
        server.close()
        for conn in accepted:
            conn.close()


class Relay:
    """A TCP relay on loopback to a real server (moto's), that answers some requests slowly:
    once a request for which ``slow(first bytes)`` is true passes on a connection, what comes
    back on that connection is relayed a byte every ``delay`` seconds (well inside any read
    timeout), until ``give_up`` seconds have passed: then the connection is dropped. ``sent``
    counts the bytes relayed back to the client. A request for which ``refuse(first bytes)`` is
    true is not passed on: its connection is dropped (a host lost mid-upload)."""

    def __init__(self, upstream: str, slow: Callable[[bytes], bool], *, delay: float = 1.0,
                 give_up: float = 40.0, refuse: Callable[[bytes], bool] = lambda data: False) -> None:
        self.upstream = int(upstream.rsplit(":", 1)[1])
        self.slow, self.delay, self.give_up, self.refuse = slow, delay, give_up, refuse
        self.sent = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self._socks: list[socket.socket] = []
        self._closed = threading.Event()
        self.port = int(self._server.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client = self._server.accept()[0]
                upstream = socket.create_connection(("127.0.0.1", self.upstream))
                self._socks += [client, upstream]
                slow = threading.Event()
                threading.Thread(target=self._up, args=(client, upstream, slow), daemon=True).start()
                threading.Thread(target=self._down, args=(upstream, client, slow), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, slow: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(1 << 16):
                if self.refuse(data):
                    break
                if self.slow(data):
                    slow.set()
                upstream.sendall(data)
        self._drop(client, upstream)

    def _down(self, upstream: socket.socket, client: socket.socket, slow: threading.Event) -> None:
        started: float | None = None
        with contextlib.suppress(OSError):
            while data := upstream.recv(1 << 16):
                if not slow.is_set():
                    client.sendall(data)
                    self.sent += len(data)
                    continue
                for i in range(len(data)):
                    started = started or time.monotonic()
                    if time.monotonic() - started > self.give_up or self._closed.wait(self.delay):
                        raise OSError("gave up")
                    client.sendall(data[i:i + 1])
                    self.sent += 1
        self._drop(client, upstream)

    @staticmethod
    def _drop(*socks: socket.socket) -> None:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        self._drop(self._server, *self._socks)
        self._server.close()
        for sock in self._socks:
            sock.close()


@contextlib.contextmanager
def relay(upstream: str, slow: Callable[[bytes], bool], **kwargs: Any) -> Iterator[Relay]:
    server = Relay(upstream, slow, **kwargs)
    try:
        yield server
    finally:
        server.close()


def requests_for(name: str) -> Callable[[bytes], bool]:
    """``slow`` for a ``Relay``: GET requests for objects named ``name``."""
    def slow(data: bytes) -> bool:
        line = data.split(b"\r\n", 1)[0]
        return line.startswith(b"GET ") and any(f"/{name}{end}".encode() in line for end in " ?")

    return slow


@pytest.fixture(autouse=True)
def _fresh_breakers() -> None:
    """Each test starts with every remote trusted: a breaker opened by another test (the same
    Redis URL, say) is that test's business."""
    from aioov._cache import remote

    remote._BREAKERS.clear()


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto in server mode: a real HTTP S3 endpoint on loopback."""
    port = free_port()
    with serve([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, "moto server"):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with serve(command, port, "redis-server"):
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A fresh bucket; credentials and endpoint the usual AWS way (inherited by subprocesses)."""
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(name, value)
    from aioov._cache import remote

    remote._REMOTES.clear()
    name = f"models-{abs(hash(request.node.nodeid)) % 10**8}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}/aioov"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_models(tmp_path_factory.mktemp("remote_models"), 2)


async def test_a_second_host_downloads_instead_of_compiling(models: list[Path], bucket: str, tmp_path: Path) -> None:
    ids = np.arange(8, dtype=np.int64).reshape(1, 8)
    async with aioov.Core(cache_dir=tmp_path / "host-a", properties={"CACHE_REMOTE_URL": bucket}) as core:
        await core.compile_model(models[0], "CPU")
        await core.wait_exports()
        assert core.cache_stats.uploads == 1
    async with aioov.Core(cache_dir=tmp_path / "host-b", properties={"CACHE_REMOTE_URL": bucket}) as core:
        compiled = await core.compile_model(models[0], "CPU")
        stats = core.cache_stats
        got = (await compiled.infer(ids))["last_hidden_state"]
    assert compiled.get_property("LOADED_FROM_CACHE") is True
    assert (stats.remote_hits, stats.compiles, stats.uploads) == (1, 0, 0)
    np.testing.assert_allclose(got, reference(models[0], {"input_ids": ids})[0], rtol=1e-4, atol=1e-4)
    assert len(list((tmp_path / "host-b" / "v1").glob("??/*"))) == 1  # now in host B's local cache too


HOST = """
import json, sys, time, anyio, aioov
async def main():
    cache_dir, start_at, *paths = sys.argv[1:]
    time.sleep(max(0.0, float(start_at) - time.time()))
    async with aioov.Core(cache_dir=cache_dir) as core:
        results = await core.compile_all(paths, "CPU")
        await core.wait_exports()
        print(json.dumps({"compiles": core.cache_stats.compiles, "ok": all(r.ok for r in results),
                          "remote_hits": core.cache_stats.remote_hits}))
anyio.run(main)
"""


def run_hosts(tmp_path: Path, models: list[Path], env: dict[str, str], hosts: int = 3) -> list[dict[str, int]]:
    start_at = str(time.time() + 2.5)
    procs = [subprocess.Popen([sys.executable, "-c", HOST, str(tmp_path / f"host-{i}"), start_at,
                               *map(str, models)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=child_env(**env)) for i in range(hosts)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["ok"] for r in reports)
    return reports


def test_hosts_with_a_redis_lock_compile_each_model_once(
    models: list[Path], bucket: str, redis_url: str, tmp_path: Path
) -> None:
    reports = run_hosts(tmp_path, models, {"AIOOV_CACHE_REMOTE_URL": bucket, "AIOOV_CACHE_REMOTE_LOCK_URL": redis_url})
    assert sum(r["compiles"] for r in reports) == len(models)
    assert sum(r["remote_hits"] for r in reports) == len(models) * 2


FORKED = """
import json, os, sys, anyio, aioov
from aioov._cache.remote import RemoteStore
cache_dir, bucket, first, second = sys.argv[1:]
async def compile_shared(path, cache):
    async with aioov.Core(cache_dir=cache, properties={"CACHE_REMOTE_URL": bucket}) as core:
        compiled = await core.compile_model(path, "CPU")
        await core.wait_exports()
        return compiled.get_property("LOADED_FROM_CACHE"), core.cache_stats.uploads
assert anyio.run(compile_shared, first, cache_dir) == (False, 1)  # the parent's client, used
pid = os.fork()
if pid == 0:  # a pool worker forked after the parent used the bucket: a client of its own
    code = 0 if anyio.run(compile_shared, second, cache_dir + "-child") == (False, 1) else 3
    code = code or (0 if anyio.run(compile_shared, first, cache_dir + "-child2") == (True, 0) else 4)
    os._exit(code)
_, status = os.waitpid(pid, 0)
print(json.dumps({"child": os.waitstatus_to_exitcode(status),
                  "parent": anyio.run(compile_shared, second, cache_dir + "-after")}))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX's")
def test_a_child_forked_after_its_parent_used_the_bucket_uses_it_too(
    models: list[Path], bucket: str, tmp_path: Path
) -> None:
    """boto3 clients (their sessions, their pooled connections) are not shared across fork: a
    forked child uploads and downloads through clients of its own, and the parent goes on
    with its own after the child is gone."""
    proc = subprocess.run([sys.executable, "-c", FORKED, str(tmp_path / "cache"), bucket, *map(str, models[:2])],
                          capture_output=True, text=True, timeout=180, env=child_env())
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"child": 0, "parent": [True, 0]}, (report, proc.stderr)


def test_hosts_without_a_lock_may_compile_twice_but_never_corrupt(
    models: list[Path], bucket: str, tmp_path: Path
) -> None:
    reports = run_hosts(tmp_path, models, {"AIOOV_CACHE_REMOTE_URL": bucket})
    assert len(models) <= sum(r["compiles"] for r in reports) <= 3 * len(models)
    store = aioov.CacheStore(tmp_path / "fresh")
    store.ensure()
    from aioov._cache.remote import RemoteStore

    remote = RemoteStore(bucket)
    keys = {e.name for i in range(3) for e in (tmp_path / f"host-{i}" / "v1").glob("??/*")}
    assert len(keys) == len(models)
    for key in keys:  # every remote entry downloads and verifies
        assert remote.fetch(key, store)
        found = store.lookup(key)
        assert found is not None and store.verify(found) is None


async def test_a_tampered_remote_entry_is_not_served(models: list[Path], bucket: str, tmp_path: Path,
                                                     caplog_warnings) -> None:
    async with aioov.Core(cache_dir=tmp_path / "a", properties={"CACHE_REMOTE_URL": bucket}) as core:
        compiled = await core.compile_model(models[1], "CPU")
        await core.wait_exports()
    key = compiled.get_property("CACHE_KEY")
    name, prefix = bucket.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3")
    upload = s3.get_object(Bucket=name, Key=f"{prefix}/v1/{key}/HEAD")["Body"].read().decode()
    weights_key = f"{prefix}/v1/{key}/{upload}/weights.bin"
    weights = bytearray(s3.get_object(Bucket=name, Key=weights_key)["Body"].read())
    weights[len(weights) // 2] ^= 0xFF
    s3.put_object(Bucket=name, Key=weights_key, Body=bytes(weights))
    async with aioov.Core(cache_dir=tmp_path / "b", properties={"CACHE_REMOTE_URL": bucket}) as core:
        again = await core.compile_model(models[1], "CPU")
        stats = core.cache_stats
    assert again.get_property("LOADED_FROM_CACHE") is False and stats.compiles == 1
    assert "checksum mismatch" in caplog_warnings.text


def _remote_objects(bucket: str, key: str) -> list[str]:
    name, prefix = bucket.removeprefix("s3://").split("/", 1)
    listing = boto3.client("s3").list_objects_v2(Bucket=name, Prefix=f"{prefix}/v1/{key}/")
    return sorted(o["Key"].removeprefix(f"{prefix}/v1/{key}/") for o in listing.get("Contents", []))


async def _published_entry(model: Path, cache: Path) -> tuple[str, Path]:
    async with aioov.Core(cache_dir=cache) as core:
        compiled = await core.compile_model(model, "CPU")
        await core.wait_exports()
    key = compiled.get_property("CACHE_KEY")
    return key, aioov.CacheStore(cache).entry_path(key)


async def test_a_host_that_loses_the_upload_race_leaves_the_winners_entry_whole(
    models: list[Path], bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aioov._cache.remote import RemoteStore

    key, entry = await _published_entry(models[0], tmp_path / "local")
    winner, loser = RemoteStore(bucket), RemoteStore(bucket)
    assert winner.upload(key, entry) is True
    won = _remote_objects(bucket, key)
    # why: two hosts' uploads interleaving (HEAD read by one before the other wrote it) is a race
    # no test can time through S3; only the loser's look is made to come early
    monkeypatch.setattr(loser, "_head", lambda key: None)  # it looked before the winner named its upload
    assert loser.upload(key, entry) is False
    assert _remote_objects(bucket, key) == won  # its own upload deleted, the winner's untouched
    store = aioov.CacheStore(tmp_path / "fresh")
    store.ensure()
    assert winner.fetch(key, store)
    found = store.lookup(key)
    assert found is not None and store.verify(found) is None


async def test_an_upload_that_died_before_naming_itself_is_no_entry(
    models: list[Path], bucket: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aioov._cache.remote import RemoteError, RemoteStore

    key, entry = await _published_entry(models[1], tmp_path / "local")

    def naming_the_upload(data: bytes) -> bool:  # the PUT of the entry's HEAD
        line = data.split(b"\r\n", 1)[0]
        return line.startswith(b"PUT ") and any(f"/{key}/HEAD{end}".encode() in line for end in " ?")

    with relay(s3_endpoint, lambda data: False, refuse=naming_the_upload) as lost:
        monkeypatch.setenv("AWS_ENDPOINT_URL", lost.url)
        dying = RemoteStore(bucket)  # its files and manifest get through, its HEAD never does
        with pytest.raises(RemoteError):
            dying.upload(key, entry)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert _remote_objects(bucket, key) and "HEAD" not in _remote_objects(bucket, key)
    store = aioov.CacheStore(tmp_path / "fresh")
    store.ensure()
    healthy = RemoteStore(bucket)
    assert healthy.fetch(key, store) is False  # absent, not broken
    assert healthy.upload(key, entry) is True and healthy.fetch(key, store) is True


async def test_remote_down_falls_back_to_local(models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog_warnings) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    from aioov._cache import remote

    remote._REMOTES.clear()
    props = {"CACHE_REMOTE_URL": "s3://nowhere/x", "CACHE_REMOTE_LOCK_URL": f"redis://127.0.0.1:{free_port()}/0"}
    async with aioov.Core(cache_dir=tmp_path / "c", properties=props) as core:
        compiled = await core.compile_model(models[0], "CPU")
        await core.wait_exports()
        again = await core.compile_model(models[0], "CPU")
    assert compiled.get_property("LOADED_FROM_CACHE") is False
    assert again.get_property("LOADED_FROM_CACHE") is True  # the local tier still works
    assert caplog_warnings.text.count("using the local cache only") == 1


def test_a_dead_hosts_lock_expires_with_its_ttl(models: list[Path], bucket: str, redis_url: str,
                                                tmp_path: Path) -> None:
    import anyio
    import redis

    async def key_of() -> str:
        async with aioov.Core(cache_dir=tmp_path / "probe", properties={"CACHE_EXPORT": "SYNC"}) as core:
            return str((await core.compile_model(models[0], "CPU")).get_property("CACHE_KEY"))

    key = anyio.run(key_of)
    # A host took the lock with a 6 s lease and died.
    assert redis.Redis.from_url(redis_url).set(f"aioov:lock:{key}", "dead-host", nx=True, px=6000)
    started = time.monotonic()
    reports = run_hosts(tmp_path, models[:1], {"AIOOV_CACHE_REMOTE_URL": bucket,
                                               "AIOOV_CACHE_REMOTE_LOCK_URL": redis_url}, hosts=1)
    elapsed = time.monotonic() - started
    assert reports[0]["compiles"] == 1
    assert 5.5 < elapsed < 60  # it waited for the lease to run out, then compiled


def test_bad_remote_urls_are_property_errors() -> None:
    with pytest.raises(aioov.PropertyError, match="s3://"):
        aioov.Core(properties={"CACHE_REMOTE_URL": "http://bucket"})
    with pytest.raises(aioov.PropertyError, match="redis://"):
        aioov.Core(properties={"CACHE_REMOTE_LOCK_URL": "localhost:6379"})


async def test_with_redis_down_the_bucket_is_still_shared(models: list[Path], bucket: str, tmp_path: Path,
                                                          caplog_warnings) -> None:
    props = {"CACHE_REMOTE_URL": bucket, "CACHE_REMOTE_LOCK_URL": f"redis://127.0.0.1:{free_port()}/0"}
    async with aioov.Core(cache_dir=tmp_path / "a", properties=props) as core:
        await core.compile_model(models[0], "CPU")
        await core.wait_exports()
        assert core.cache_stats.uploads == 1
    async with aioov.Core(cache_dir=tmp_path / "b", properties=props) as core:
        compiled = await core.compile_model(models[0], "CPU")
    assert compiled.get_property("LOADED_FROM_CACHE") is True
    assert "using the local cache only" in caplog_warnings.text  # redis was reported


@pytest.mark.anyio
async def test_one_redis_connection_pool_serves_every_compile(models: list[Path], bucket: str, redis_url: str,
                                                              tmp_path: Path) -> None:
    """Each compile takes the hosts' lock through the process's one client, not a client of its own."""
    import redis

    watcher = redis.Redis.from_url(redis_url)
    before = len(watcher.client_list())
    props = {"CACHE_REMOTE_URL": bucket, "CACHE_REMOTE_LOCK_URL": redis_url}
    async with aioov.Core(cache_dir=tmp_path / "host", properties=props) as core:
        for model in models:
            await core.compile_model(model, "CPU", {"CACHE_EXPORT": "SYNC"})
        await core.wait_exports()
    assert len(watcher.client_list()) - before <= 1  # a pool's idle connection at most


@pytest.mark.anyio
async def test_a_cancelled_compile_stops_waiting_for_another_hosts_lock(
    models: list[Path], bucket: str, redis_url: str, tmp_path: Path
) -> None:
    import anyio
    import redis

    props = {"CACHE_REMOTE_URL": bucket, "CACHE_REMOTE_LOCK_URL": redis_url}
    async with aioov.Core(cache_dir=tmp_path / "probe", properties={"CACHE_EXPORT": "SYNC"}) as core:
        key = str((await core.compile_model(models[1], "CPU")).get_property("CACHE_KEY"))
    holder = redis.Redis.from_url(redis_url)
    assert holder.set(f"aioov:lock:{key}", "another-host", nx=True, px=60_000)  # compiling elsewhere
    try:
        async with aioov.Core(cache_dir=tmp_path / "host", properties=props) as core:
            with anyio.move_on_after(1):
                await core.compile_model(models[1], "CPU")
            started = time.monotonic()
            await core.aclose()  # the job saw its cancel and left the lock wait
            assert time.monotonic() - started < 5
    finally:
        holder.delete(f"aioov:lock:{key}")


# -- #41.2: a slow or silent remote never holds a compile up --------------------------------
TIMED_HOST = """
import json, logging, sys, time, anyio, aioov
logging.basicConfig(level=logging.WARNING, format="%(message)s")
async def main():
    cache_dir, *paths = sys.argv[1:]
    times = []
    async with aioov.Core(cache_dir=cache_dir) as core:
        for path in paths:
            started = time.monotonic()
            await core.compile_model(path, "CPU")
            times.append(time.monotonic() - started)
        await core.wait_exports()
    print(json.dumps({"times": times, "uploads": core.cache_stats.uploads}))
anyio.run(main)
"""


def run_timed_host(tmp_path: Path, models: list[Path], env: dict[str, str]) -> tuple[dict[str, list[float]], str]:
    """One host compiling ``models`` one after the other, in a process of its own (a hung remote
    would keep it from exiting: it is killed after a minute)."""
    proc = subprocess.Popen([sys.executable, "-c", TIMED_HOST, str(tmp_path / "host"), *map(str, models)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(**env))
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the host was still compiling after 60 s: {err[-2000:]}")
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def test_a_silent_endpoint_costs_one_deadline_then_is_left_alone(models: list[Path], bucket: str,
                                                                  tmp_path: Path) -> None:
    """#41.2: an endpoint that accepts and never answers added ~90 s to every cold model."""
    from aioov._cache.remote import DEADLINE_BASE

    with silent_server() as port:
        report, err = run_timed_host(tmp_path, models, {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                                                        "AIOOV_CACHE_REMOTE_URL": bucket})
    first, *others = report["times"]
    assert first < DEADLINE_BASE + 10, report
    assert all(t < 5 for t in others), report  # the breaker: not tried again for each model
    assert err.count("unusable") == 1, err


def test_a_trickling_endpoint_cannot_hold_a_compile(models: list[Path], bucket: str, s3_endpoint: str,
                                                    tmp_path: Path) -> None:
    """#41.2: a byte every second (inside every read timeout) held ``compile_model`` without end."""
    from aioov._cache.remote import DEADLINE_BASE

    with relay(s3_endpoint, lambda data: True) as slow:
        report, err = run_timed_host(tmp_path, models, {"AWS_ENDPOINT_URL": slow.url,
                                                        "AIOOV_CACHE_REMOTE_URL": bucket})
    first, *others = report["times"]
    assert first < DEADLINE_BASE + 10, report
    assert all(t < 5 for t in others), report
    assert "too slow" in err and err.count("unusable") == 1, err


@pytest.mark.parametrize("recorded", [True, False], ids=["compile-time-recorded", "none-recorded"])
async def test_a_download_slower_than_the_compile_goes_on_aside(
    models: list[Path], bucket: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog_warnings: pytest.LogCaptureFixture, recorded: bool,
) -> None:
    """The entry's files come a byte a second. The compile waits for them no longer than the
    model's compile took where its entry was written (the manifest's ``export_seconds``, at
    least ``WAIT_FLOOR``), then compiles it here; this host uploads nothing (the bucket has the
    entry). The download goes on aside until its own deadline cuts it (a blocking read cannot
    watch a clock: its connection is shut under it), and that failure is dealt with as if it
    had been waited for: one warning, and the tier left alone for a while. An entry that does
    not say how long its compile took (one written by an older aioov) is waited for until the
    tier's own deadline for its files, no longer.

    What is asserted of time leaves room for a stalled machine (a CI run once lost 12 s here):
    the compile has waited at least as long as it should, and came back while the download
    still went on (with a compile time recorded), or long before the relay would have given up
    (without one)."""
    from aioov._cache import remote
    from aioov._cache.tiered import WAIT_FLOOR

    ids = np.arange(8, dtype=np.int64).reshape(1, 8)
    async with aioov.Core(cache_dir=tmp_path / "a", properties={"CACHE_REMOTE_URL": bucket}) as core:
        await core.compile_model(models[0], "CPU")
        await core.wait_exports()
        assert core.cache_stats.uploads == 1
    (manifest,) = manifests(tmp_path / "a")
    # why: the real deadline (DEADLINE_BASE, 10 s, no property) is set so a trickle outlasts it soon, yet
    # well after a recorded compile time (the download must still go on when the compile is back)
    base = 12.0 if recorded else 3.0
    monkeypatch.setattr(remote, "DEADLINE_BASE", base, raising=False)
    caplog_warnings.set_level(logging.INFO, logger="aioov")  # the timeline, should it fail
    files = sum(f["size"] for f in manifest["files"].values())
    waited = min(max(WAIT_FLOOR, manifest["build"]["export_seconds"]), base + files / remote.MIN_RATE)
    if not recorded:
        s3 = boto3.client("s3")
        name, prefix = bucket[len("s3://"):].split("/", 1)
        (uploaded,) = [o["Key"] for o in s3.list_objects_v2(Bucket=name, Prefix=prefix)["Contents"]
                       if o["Key"].endswith("/manifest.json")]
        data = json.loads(s3.get_object(Bucket=name, Key=uploaded)["Body"].read())
        del data["build"]["export_seconds"]
        s3.put_object(Bucket=name, Key=uploaded, Body=json.dumps(data).encode())
        waited = base + files / remote.MIN_RATE
    give_up = 60.0  # the relay's: a compile that waited for the download itself would be back after it
    with relay(s3_endpoint, requests_for("weights.bin"), give_up=give_up) as slow:
        monkeypatch.setenv("AWS_ENDPOINT_URL", slow.url)
        remote._REMOTES.clear()
        async with aioov.Core(cache_dir=tmp_path / "b", properties={"CACHE_REMOTE_URL": bucket}) as core:
            started, t0 = time.monotonic(), time.time()
            compiled = await core.compile_model(models[0], "CPU")
            elapsed = time.monotonic() - started
            downloading = any(t.name == "aioov-remote-fetch" for t in threading.enumerate())
            got = (await compiled.infer(ids))["last_hidden_state"]
            await core.wait_exports()
            stats = core.cache_stats
        timeline = [(round(r.created - t0, 2), r.getMessage()[:120]) for r in caplog_warnings.records]
        assert compiled.get_property("LOADED_FROM_CACHE") is False and stats.compiles == 1
        assert elapsed >= waited - 0.5, (elapsed, waited, timeline)
        if recorded:
            assert downloading, (elapsed, waited, timeline)
        else:
            assert elapsed < give_up / 2, (elapsed, waited, timeline)
        assert stats.uploads == 0 and stats.remote_hits == 0
        end = time.monotonic() + base + 10
        while any(t.name == "aioov-remote-fetch" for t in threading.enumerate()):
            assert time.monotonic() < end, "the download outlived its deadline"
            time.sleep(0.1)
    assert "too slow" in caplog_warnings.text and caplog_warnings.text.count("unusable") == 1
    assert remote.breaker_for(bucket).open  # left alone for its cooldown
    np.testing.assert_allclose(got, reference(models[0], {"input_ids": ids})[0], rtol=1e-4, atol=1e-4)


async def test_an_upload_is_done_on_a_host_whose_cores_are_all_busy(
    models: list[Path], bucket: str, tmp_path: Path, caplog_warnings: pytest.LogCaptureFixture
) -> None:
    """Exports use only spare CPU; an upload must not. Run in the idle class with the export
    worker, it was starved on a busy host: it missed its deadline, and the healthy remote was
    taken for a failing one (left alone for a while, downloads too). Here every core runs a busy
    loop at this process's own priority, and the entry (written while the caller waits) is
    uploaded all the same."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(len(os.sched_getaffinity(0)))]
    try:
        async with aioov.Core(cache_dir=tmp_path / "host", properties={"CACHE_REMOTE_URL": bucket}) as core:
            await core.compile_model(models[1], "CPU", {"CACHE_EXPORT": "SYNC", "CACHE_ALWAYS": True})
            assert await core.wait_exports(120)
            stats = core.cache_stats
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    assert "upload" not in caplog_warnings.text and "unusable" not in caplog_warnings.text
    assert (stats.exports, stats.uploads) == (1, 1)


@pytest.mark.parametrize("refused", ["aioov-remote-fetch", "aioov-remote-deadline"])
async def test_a_download_without_a_thread_of_its_own_is_waited_for(
    models: list[Path], bucket: str, tmp_path: Path, refuse_threads: Callable[[str], None], refused: str,
) -> None:
    """Under a thread limit (RLIMIT_NPROC, a container's pids.max) a download that cannot run
    beside the compile runs in it, and one whose deadline cannot watch its sockets is checked
    between reads: the second host still downloads the entry."""
    async with aioov.Core(cache_dir=tmp_path / "a", properties={"CACHE_REMOTE_URL": bucket}) as core:
        await core.compile_model(models[0], "CPU")
        await core.wait_exports()
        assert core.cache_stats.uploads == 1
    refuse_threads(refused)
    async with aioov.Core(cache_dir=tmp_path / "b", properties={"CACHE_REMOTE_URL": bucket}) as core:
        compiled = await core.compile_model(models[0], "CPU")
        stats = core.cache_stats
    assert compiled.get_property("LOADED_FROM_CACHE") is True
    assert (stats.remote_hits, stats.compiles) == (1, 0)


async def test_a_silent_redis_costs_one_timeout_then_is_left_alone(
    models: list[Path], bucket: str, tmp_path: Path, caplog_warnings: pytest.LogCaptureFixture
) -> None:
    """#41.2: a Redis that never answers added 10.7 s to every compile."""
    with silent_server() as port:
        props = {"CACHE_REMOTE_URL": bucket, "CACHE_REMOTE_LOCK_URL": f"redis://127.0.0.1:{port}/0"}
        times = []
        async with aioov.Core(cache_dir=tmp_path / "host", properties=props) as core:
            for model in models:
                started = time.monotonic()
                await core.compile_model(model, "CPU")
                times.append(time.monotonic() - started)
            await core.wait_exports()
            uploads = core.cache_stats.uploads
    assert times[0] < 9 and all(t < 3 for t in times[1:]), times
    assert uploads == len(models)  # the bucket is still shared
    assert caplog_warnings.text.count("unusable") == 1


def test_a_breaker_lets_one_caller_try_again_after_its_cooldown(monkeypatch: pytest.MonkeyPatch) -> None:
    from aioov._cache import remote

    # why: the real cooldown is 60 s, and no property sets it
    monkeypatch.setattr(remote, "BREAKER_COOLDOWN", 0.3)
    breaker = remote.Breaker()
    assert breaker.allow() and breaker.allow()  # healthy: every caller
    breaker.failed()
    assert breaker.open and not breaker.allow()
    time.sleep(0.35)
    assert breaker.allow()  # one caller tries again...
    assert not breaker.allow()  # ...the others keep away until it knows
    breaker.succeeded()
    assert not breaker.open and breaker.allow() and breaker.allow()
    breaker.failed()
    time.sleep(0.35)
    assert breaker.allow()
    breaker.failed()  # the retry failed too: another cooldown
    assert not breaker.allow()


# -- #41.3: remote entries are bounded and repaired -----------------------------------------
def _s3_object(bucket: str, key: str, name: str) -> tuple[str, str]:
    """(bucket name, object key) of file ``name`` of the upload the entry's HEAD names."""
    bucket_name, prefix = bucket.removeprefix("s3://").split("/", 1)
    upload = boto3.client("s3").get_object(Bucket=bucket_name, Key=f"{prefix}/v1/{key}/HEAD")["Body"].read()
    return bucket_name, f"{prefix}/v1/{key}/{upload.decode()}/{name}"


@pytest.mark.parametrize("name", ["manifest.json", "weights.bin"])
async def test_a_remote_object_larger_than_its_bound_is_not_downloaded(
    name: str, models: list[Path], bucket: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """#41.3: a remote manifest is read up to the local 1 MiB cap (a 400 MB one cost 2.5 GB of
    memory), a file up to the size its manifest records (it was downloaded whole, then refused)."""
    from aioov._cache.remote import RemoteError, RemoteStore

    key, entry = await _published_entry(models[0], tmp_path / "local")
    assert RemoteStore(bucket).upload(key, entry)
    bucket_name, object_key = _s3_object(bucket, key, name)
    boto3.client("s3").put_object(Bucket=bucket_name, Key=object_key, Body=b"{" * (48 << 20))
    store = aioov.CacheStore(tmp_path / "fresh")
    store.ensure()
    with relay(s3_endpoint, lambda data: False) as counting:
        monkeypatch.setenv("AWS_ENDPOINT_URL", counting.url)
        with pytest.raises(RemoteError, match="larger than|its manifest records"):
            RemoteStore(bucket).fetch(key, store)
        time.sleep(0.5)  # what the relay still had to send
        assert counting.sent < 24 << 20  # socket buffers at most, never the object
    assert store.lookup(key) is None and not list(store.tmp.iterdir())


async def test_a_damaged_remote_entry_is_replaced_by_the_host_that_rejected_it(
    models: list[Path], bucket: str, tmp_path: Path, caplog_warnings: pytest.LogCaptureFixture
) -> None:
    """#41.3: a damaged object made every host download, reject and recompile the model for
    good. The first host to reject it uploads its own entry in its place."""
    props = {"CACHE_REMOTE_URL": bucket}
    async with aioov.Core(cache_dir=tmp_path / "a", properties=props) as core:
        key = (await core.compile_model(models[1], "CPU")).get_property("CACHE_KEY")
        await core.wait_exports()
    bucket_name, weights_key = _s3_object(bucket, key, "weights.bin")
    s3 = boto3.client("s3")
    weights = bytearray(s3.get_object(Bucket=bucket_name, Key=weights_key)["Body"].read())
    weights[len(weights) // 2] ^= 0xFF
    s3.put_object(Bucket=bucket_name, Key=weights_key, Body=bytes(weights))
    damaged = _remote_objects(bucket, key)
    async with aioov.Core(cache_dir=tmp_path / "b", properties=props) as core:
        assert (await core.compile_model(models[1], "CPU")).get_property("LOADED_FROM_CACHE") is False
        await core.wait_exports()
        assert core.cache_stats.uploads == 1
    assert "checksum mismatch" in caplog_warnings.text
    repaired = _remote_objects(bucket, key)
    assert "HEAD" in repaired and not set(damaged) - {"HEAD"} & set(repaired)  # the bad upload is gone
    async with aioov.Core(cache_dir=tmp_path / "c", properties=props) as core:
        compiled = await core.compile_model(models[1], "CPU")
        stats = core.cache_stats
    assert compiled.get_property("LOADED_FROM_CACHE") is True and (stats.remote_hits, stats.compiles) == (1, 0)


async def test_an_entry_signed_with_another_key_is_not_replaced(
    models: list[Path], bucket: str, tmp_path: Path
) -> None:
    """During a key rotation hosts with different keys would replace each other's entries for
    ever: an entry signed under a key this host does not hold is not damaged, only not its own."""
    async with aioov.Core(cache_dir=tmp_path / "a", properties={"CACHE_REMOTE_URL": bucket,
                                                                 "CACHE_HMAC_KEY": "old secret"}) as core:
        key = (await core.compile_model(models[0], "CPU")).get_property("CACHE_KEY")
        await core.wait_exports()
    before = _remote_objects(bucket, key)
    async with aioov.Core(cache_dir=tmp_path / "b", properties={"CACHE_REMOTE_URL": bucket,
                                                                 "CACHE_HMAC_KEY": "new secret"}) as core:
        assert (await core.compile_model(models[0], "CPU")).get_property("LOADED_FROM_CACHE") is False
        await core.wait_exports()
        assert core.cache_stats.uploads == 0
    assert _remote_objects(bucket, key) == before
    # #41.8: a host rotating its key accepts the old key's entry (it rejected it and recompiled)
    rotating = {"CACHE_REMOTE_URL": bucket, "CACHE_HMAC_KEY": ["new secret", "old secret"]}
    async with aioov.Core(cache_dir=tmp_path / "c", properties=rotating) as core:
        compiled = await core.compile_model(models[0], "CPU")
        await core.wait_exports()
        stats = core.cache_stats
    assert compiled.get_property("LOADED_FROM_CACHE") is True
    assert (stats.remote_hits, stats.compiles, stats.uploads) == (1, 0, 0)
    assert _remote_objects(bucket, key) == before
