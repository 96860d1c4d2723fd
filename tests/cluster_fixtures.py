"""Fixtures for tests that need the local HA cluster (plc/cluster/local.py, docs/ha.md).

tests/conftest.py makes them available to every test module (one definition, so one cluster
and one upstream per session); test modules import only the helpers from here.

- ``cluster_upstream`` (session): a FakeUpstream (tests/fake_upstream.py) serving a small valid
  corpus on 127.0.0.1, run by uvicorn in a thread of its own so it outlives every test's event
  loop. Its newest op is a few seconds old, so an ingesting mirror node becomes ready.
- ``cluster_session`` (session): a ``LocalCluster`` whose state directory is a fresh directory
  under /tmp that the ``postgres`` user can enter; NOT started. At the end of the session it is
  stopped (``down()``) and its directory removed. Tests may call ``down()``/``up()`` on it.
- ``local_cluster`` (function): ``cluster_session``, started when it is not healthy (not
  running, or no Patroni leader + sync standby + streaming replica); so a drill that broke the
  cluster costs the next test one fresh ``up`` (10-20 s), and a healthy cluster costs nothing.

There is one cluster per machine at a time (fixed loopback addresses 127.0.1-4.x), so tests that
use these fixtures must not run in parallel with each other or with a manual ``plc cluster up``.
The mirror nodes run with ``CLUSTER_INGEST`` = "all": every node campaigns for the ingest lock
(plc.sync.leader) and exactly one ingests; the others serve and stand by.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fake_upstream import FakeUpstream, record_from_line, serve, stop
from pg import remove_tree, traversable_tmpdir
from plc.cluster.local import ClusterError, LocalCluster
from plc.tools.generate import generate

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_INGEST = "all"
CLUSTER_MIRRORS = 2
CORPUS_SEED = 5
CORPUS_DIDS = 12


def corpus_lines() -> list[bytes]:
    """A small valid sequenced export whose newest op is about 5 s old."""
    lines = [line for line, _ in generate(CORPUS_SEED, CORPUS_DIDS, fmt="sequenced", invalid_rate=0.0)]
    first = orjson.loads(lines[0])["createdAt"]
    last = orjson.loads(lines[-1])["createdAt"]
    from plc.core.jsonfmt import parse_ms

    span = parse_ms(last) - parse_ms(first)
    start = int(time.time() * 1000) - span - 5000
    return [line for line, _ in generate(CORPUS_SEED, CORPUS_DIDS, fmt="sequenced", invalid_rate=0.0, start_ms=start)]


_LOOPS: dict[int, asyncio.AbstractEventLoop] = {}  # id(FakeUpstream) -> the loop serving it


def append_live(fake: FakeUpstream, records: list) -> None:
    """``fake.append(records)`` on the loop that serves ``fake`` (an UpstreamThread's), so that
    open /export/stream connections are woken (asyncio.Event is not thread-safe). Returns once
    the records are appended."""
    loop = _LOOPS.get(id(fake))
    if loop is None:
        raise RuntimeError("this FakeUpstream is not served by a running UpstreamThread")

    async def _append() -> None:
        fake.append(records)

    asyncio.run_coroutine_threadsafe(_append(), loop).result(10)


class UpstreamThread:
    """A FakeUpstream served from its own thread and event loop."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-upstream", daemon=True)
        self._handles: tuple | None = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self._handles = self.loop.run_until_complete(serve(self.fake))
        except BaseException as exc:  # noqa: BLE001 — reported by start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()

    def start(self) -> FakeUpstream:
        self._thread.start()
        if not self._started.wait(30) or self._error is not None:
            raise RuntimeError(f"fake upstream did not start: {self._error!r}")
        _LOOPS[id(self.fake)] = self.loop
        return self.fake

    def stop(self) -> None:
        _LOOPS.pop(id(self.fake), None)
        if self._handles is not None:
            asyncio.run_coroutine_threadsafe(stop(*self._handles), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(15)


@pytest.fixture(scope="session")
def cluster_upstream() -> Iterator[FakeUpstream]:
    runner = UpstreamThread(FakeUpstream([record_from_line(line) for line in corpus_lines()]))
    fake = runner.start()
    try:
        yield fake
    finally:
        runner.stop()


@pytest.fixture(scope="session")
def cluster_session(cluster_upstream: FakeUpstream) -> Iterator[LocalCluster]:
    base = traversable_tmpdir("ha-cluster-")
    cluster = LocalCluster(base / "cluster", mirrors=CLUSTER_MIRRORS, upstream=cluster_upstream.url,
                           ingest=CLUSTER_INGEST)  # fmt: skip
    try:
        yield cluster
    finally:
        try:
            cluster.down()
        finally:
            remove_tree(base)


def plc(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """``python -m plc ARGS`` from the repository root; output captured."""
    return subprocess.run([sys.executable, "-m", "plc", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, **(env or {})})  # fmt: skip


def until(what: str, probe: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll ``probe`` until it returns a true value, and return it; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.25)


def cluster_is_healthy(cluster: LocalCluster) -> bool:
    procs = cluster._load_state()
    return bool(procs) and all(p.alive() for p in procs) and cluster._patroni_healthy()


def ensure_healthy(cluster: LocalCluster) -> LocalCluster:
    """The cluster, (re)started when it is not healthy; fails the test when it cannot start."""
    if not cluster_is_healthy(cluster):
        cluster.down()
        try:
            cluster.up()
        except ClusterError as exc:
            cluster.down()
            pytest.fail(f"cannot start the local cluster: {exc}", pytrace=False)
    return cluster


@pytest.fixture
def local_cluster(cluster_session: LocalCluster) -> LocalCluster:
    return ensure_healthy(cluster_session)


def leftovers(directory: Path) -> list[str]:
    """Live processes whose command line or working directory is inside ``directory``."""
    import os

    root = str(directory) + os.sep
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            if stat[stat.rfind(")") + 2 :][:1] == "Z":
                continue
            args = Path(f"/proc/{entry.name}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
            cwd = os.readlink(f"/proc/{entry.name}/cwd") + os.sep
        except OSError:
            continue
        if root in args or cwd.startswith(root):
            out.append(f"{entry.name}: {args.strip()}")
    return out
