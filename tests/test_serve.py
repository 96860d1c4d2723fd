"""`plc serve` as a subprocess: the embedded PostgreSQL, the API and the ingest of the fake
upstream in one process; what it serves equals the core's rendering of an in-memory replay of
the same corpus; SIGTERM stops everything (exit 0, PostgreSQL stopped, nothing listening);
--no-ingest never contacts the upstream; an ingest failure never stops the reads."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest

from fake_upstream import fake_upstream_factory, record_from_line  # noqa: F401
from plc import settings
from plc.core import render
from plc.core.chain import DidLog, replay
from plc.core.jsonfmt import parse_ms
from plc.serve_cmd import SERVE_SETTINGS
from plc.store.migrate import migrate
from plc.tools.generate import generate

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
JSON = "application/json; charset=utf-8"


def corpus(seed: int, dids: int) -> list[bytes]:
    return [line for line, _ in generate(seed, dids, fmt="sequenced", invalid_rate=0.05)]


def replayed(lines: list[bytes]) -> dict[str, DidLog]:
    """did → its log as the core replays the corpus (rejected ops skipped)."""
    items: dict[str, list] = collections.defaultdict(list)
    for line in lines:
        obj = orjson.loads(line)
        items[obj["did"]].append((obj["operation"], parse_ms(obj["createdAt"]), obj["cid"]))
    return {did: replay(did, ops)[0] for did, ops in items.items()}


def expected_document(did: str, log: DidLog) -> tuple[int, bytes]:
    latest = render.latest_entry(log.entries)
    if latest is None:  # every op of the DID was refused: it is not registered here
        return 404, render.error_body(render.not_registered(did))
    doc = render.did_document_json(did, latest.op)
    return (200, doc) if doc is not None else (404, render.error_body(render.not_available(did)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Serve:
    """One `plc serve` subprocess; its stderr goes to a file (read with `log()`)."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.err_path = workdir / f"serve-{self.port}.log"
        env = {**os.environ, "PYTHONPATH": str(REPO), "PLC_PORT": str(self.port), **(env or {})}
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "plc", "serve", *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO,
            )

    def log(self) -> str:
        return self.err_path.read_text(errors="replace")

    async def until(self, client: httpx.AsyncClient, path: str, want, timeout: float = 60) -> httpx.Response:
        """GET `path` until `want(response)` holds; fails if the process exits first."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"plc serve exited {self.proc.returncode}:\n{self.log()}"
            try:
                r = await client.get(self.url + path)
                if want(r):
                    return r
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"GET {path} never gave what was wanted:\n{self.log()}"
            await asyncio.sleep(0.1)

    async def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"plc serve ignored SIGTERM:\n{self.log()}"
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def healthy(r: httpx.Response) -> bool:
    return r.status_code == 200 and r.json() == {"version": __import__("plc").__version__}


async def test_serve_mirrors_the_upstream_and_stops_cleanly_on_sigterm(pg_base, fake_upstream_factory):
    lines = corpus(21, 120)
    logs = replayed(lines)
    fake = await fake_upstream_factory([record_from_line(line) for line in lines])
    data_dir = pg_base / "serve-embedded"
    data_dir.mkdir(mode=0o755)
    pidfile = data_dir / "postgres" / "pgdata" / "postmaster.pid"
    # the DID of the corpus's last line: once its audit log is complete, every batch is committed
    last_did = orjson.loads(lines[-1])["did"]
    last_audit = render.audit_json_from_entries(last_did, logs[last_did].entries)

    serve = Serve(pg_base, "--data-dir", str(data_dir), "--upstream", fake.url)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await serve.until(client, "/_health", healthy)
            await serve.until(client, f"/{last_did}/log/audit", lambda r: r.content == last_audit)
            for did, log in logs.items():
                r = await client.get(f"{serve.url}/{did}")
                assert (r.status_code, r.content) == expected_document(did, log), did
            assert fake.requests_of("export"), "the upstream was never asked"
            assert pidfile.exists()
            code = await serve.terminate()
    finally:
        serve.kill()
    err = serve.log()
    assert code == 0, err
    assert "Traceback" not in err and "applied migration" in err and "ingest stopped at cursor" in err
    assert not pidfile.exists(), "the embedded PostgreSQL is still running"
    assert not listening(serve.port)

    # --no-ingest on the same data directory: serves what is stored, never asks the upstream
    fake.requests.clear()
    serve = Serve(pg_base, "--data-dir", str(data_dir), "--no-ingest", env={"PLC_UPSTREAM": fake.url})
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await serve.until(client, "/_health", healthy)
            r = await client.get(f"{serve.url}/{last_did}")
            assert (r.status_code, r.content) == expected_document(last_did, logs[last_did])
            await asyncio.sleep(0.5)
            assert fake.requests == []
            code = await serve.terminate()
    finally:
        serve.kill()
    assert code == 0, serve.log()
    assert "ingest off" in serve.log() and "applied migration" not in serve.log()
    assert fake.requests == []
    assert not pidfile.exists() and not listening(serve.port)


async def test_serve_keeps_serving_when_ingest_fails(pg_base, pg_dsn, fake_upstream_factory):
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    fake = await fake_upstream_factory([])
    serve = Serve(pg_base, "--database-url", pg_dsn, "--upstream", fake.url + "/nowhere")  # 404
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await serve.until(client, "/_health", healthy)
            deadline = time.monotonic() + 30
            while "ingest failed" not in serve.log():
                assert time.monotonic() < deadline, serve.log()
                await asyncio.sleep(0.1)
            r = await client.get(f"{serve.url}/did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")
            assert r.status_code == 404 and r.headers["content-type"] == JSON
            code = await serve.terminate()
    finally:
        serve.kill()
    err = serve.log()
    assert code == 0, err
    assert "404" in err and "Traceback" not in err
    assert not listening(serve.port)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "plc", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=60)


def test_serve_refuses_pending_migrations_on_a_configured_database(pg_dsn):
    out = run_cli("serve", "--database-url", pg_dsn, "--port", str(free_port()))
    assert out.returncode == 1
    assert "run `plc migrate`" in out.stderr and "Traceback" not in out.stderr


def test_serve_bad_settings_are_one_line_errors():
    out = run_cli("serve", "--upstream", "ftp://x", "--database-url", "postgresql://nobody@127.0.0.1:9/x")
    assert out.returncode == 1 and "must be an http(s) URL" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("serve", "--database-url", "postgresql://nobody@127.0.0.1:9/x", env={"PLC_NO_INGEST": "maybe"})
    assert out.returncode == 1 and "PLC_NO_INGEST must be one of" in out.stderr
    out = run_cli("serve", "--port", "70000")
    assert out.returncode == 2 and "port out of range" in out.stderr


def test_serve_help_lists_every_flag():
    out = run_cli("serve", "--help")
    assert out.returncode == 0
    for setting in SERVE_SETTINGS:
        assert setting.flag in out.stdout and setting.env in out.stdout
    assert set(SERVE_SETTINGS) == set(settings.SETTINGS)


def test_configuration_doc_lists_every_setting():
    """docs/configuration.md holds the table generated from plc.settings.SETTINGS
    (regenerate it with `python -m plc.settings`)."""
    doc = (REPO / "docs" / "configuration.md").read_text()
    assert settings.markdown_table() in doc
    for setting in settings.SETTINGS:
        assert f"`{setting.flag}`" in doc and f"`{setting.env}`" in doc


def test_serve_waits_for_an_unreachable_database_and_stops_on_sigterm():
    """A cluster node may start while the primary fails over: `plc serve` retries the database
    (saying so) instead of exiting at once, and SIGTERM still ends it."""
    port = free_port()  # nothing listens there
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "plc", "serve", "--database-url", f"postgresql://nobody@127.0.0.1:{port}/x",
         "--no-ingest", "--port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO, text=True,
    )
    try:
        time.sleep(4)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "database not reachable yet" in err
    assert proc.returncode == 1 and "Traceback" not in err
