"""The embedded PostgreSQL (plc/store/embedded.py) on real PostgreSQL programs: data survives
restarts and a kill -9 of the postmaster, the socket is the only way in, a dead owner's server is
taken over, failed starts leave nothing running, and set-up problems give one clear error; plus
the test fixtures' per-test database isolation."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from plc.store.embedded import (
    DataDirBusy,
    DataDirUnreachable,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    PostgresNotInstalled,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def own_dir(pg_base: Path, pg_server: EmbeddedPostgres) -> Path:
    """A data directory for this module's own servers (production settings: fsync on). The
    session server must be up first so a missing PostgreSQL fails there with its message."""
    return pg_base / "own"


def free_tcp_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_dead(pid: int, timeout: float = 10.0) -> None:
    """Wait until ``pid`` is gone or a zombie."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still alive after {timeout} s")


async def fetch_notes(kwargs: dict) -> list[str]:
    conn = await asyncpg.connect(**kwargs)
    try:
        return [r["body"] for r in await conn.fetch("SELECT body FROM notes ORDER BY id")]
    finally:
        await conn.close()


async def add_note(kwargs: dict, body: str) -> None:
    conn = await asyncpg.connect(**kwargs)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, body text NOT NULL)")
        await conn.execute("INSERT INTO notes (body) VALUES ($1)", body)
    finally:
        await conn.close()


async def test_restart_keeps_data_and_repeated_start_stop_are_harmless(own_dir: Path):
    pg = EmbeddedPostgres(own_dir)
    try:
        pg.start()
        first_pid = pg.pid
        assert pg.running and first_pid is not None
        assert (pg.pgdata / "PG_VERSION").is_file()
        await add_note(pg.connect_kwargs, "before restart")
        assert pg.start() is pg and pg.pid == first_pid  # a second start is a no-op
        pg.stop()
        assert not pg.running and pg.pid is None
        pg.stop()  # stopping a stopped server is a no-op
        pg.start()  # reuses the initialised directory
        assert pg.pid != first_pid
        assert await fetch_notes(pg.connect_kwargs) == ["before restart"]
        conn = await asyncpg.connect(pg.dsn)  # the URL form works too
        try:
            assert await conn.fetchval("SELECT current_database()") == "plc"
            assert await conn.fetchval("SHOW fsync") == "on"
            assert await conn.fetchval("SHOW server_encoding") == "UTF8"
            assert await conn.fetchval("SHOW lc_collate") == "C"
        finally:
            await conn.close()
    finally:
        pg.stop()


async def test_the_socket_is_inside_the_data_dir_and_there_is_no_tcp_listener(own_dir: Path):
    port = free_tcp_port()
    with EmbeddedPostgres(own_dir, port=port) as pg:
        sock = pg.socket_dir / f".s.PGSQL.{port}"
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert pg.socket_dir.parent == pg.data_dir
        assert stat.S_IMODE(pg.socket_dir.stat().st_mode) == 0o700
        assert pg.connect_kwargs["host"] == str(pg.socket_dir) and pg.connect_kwargs["port"] == port
        conn = await asyncpg.connect(**pg.connect_kwargs)
        try:
            assert await conn.fetchval("SHOW listen_addresses") == ""
            assert await conn.fetchval("SHOW port") == str(port)
        finally:
            await conn.close()
        for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family) as s:
                s.settimeout(2)
                try:
                    s.connect((address, port))
                except OSError:  # refused, or no IPv6 on this host: either way nothing listens
                    continue
                raise AssertionError(f"something accepts TCP connections on {address}:{port}")


async def test_kill_9_of_the_postmaster_then_start_recovers(own_dir: Path):
    pg = EmbeddedPostgres(own_dir)
    try:
        pg.start()
        await add_note(pg.connect_kwargs, "committed before kill -9")
        pid = pg.pid
        os.kill(pid, signal.SIGKILL)
        wait_dead(pid)
        assert pg.pid is None and not pg.running
        assert (pg.pgdata / "postmaster.pid").exists()  # stale, naming a dead (or zombie) postmaster
        pg.start()  # the same object starts it again
        assert pg.pid not in (None, pid)
        assert "committed before kill -9" in await fetch_notes(pg.connect_kwargs)

        # Again, and this time a new owner (as after a crash of the whole program) takes over.
        pid = pg.pid
        os.kill(pid, signal.SIGKILL)
        wait_dead(pid)
        pg.stop()  # nothing to stop; releases the directory
        pg = EmbeddedPostgres(own_dir)
        pg.start()
        assert "committed before kill -9" in await fetch_notes(pg.connect_kwargs)
    finally:
        pg.stop()


async def test_a_server_left_by_a_dead_owner_is_stopped_and_restarted(own_dir: Path):
    script = (
        "import os, signal, sys\n"
        "from plc.store.embedded import EmbeddedPostgres\n"
        "pg = EmbeddedPostgres(sys.argv[1]); pg.start()\n"
        "print(pg.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(own_dir)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    orphan = int(r.stdout.strip())
    messages: list[str] = []
    pg = EmbeddedPostgres(own_dir, log=messages.append)
    try:
        assert pg.pid == orphan  # still running, its owner gone
        pg.start()
        assert any("an earlier process left running" in m for m in messages), messages
        assert pg.pid not in (None, orphan)
        wait_dead(orphan)
        assert "committed before kill -9" in await fetch_notes(pg.connect_kwargs)
    finally:
        pg.stop()


def test_a_second_owner_of_a_running_directory_is_refused(own_dir: Path):
    with EmbeddedPostgres(own_dir) as first:
        second = EmbeddedPostgres(own_dir)
        with pytest.raises(DataDirBusy, match=rf"another process \(pid {os.getpid()}\) is running"):
            second.start()
        second.stop()  # a no-op: it never started anything
        assert first.running


def test_a_failed_start_leaves_nothing_running_and_reports_the_log(own_dir: Path):
    bad = EmbeddedPostgres(own_dir, settings={"shared_buffers": "plenty"})
    with pytest.raises(EmbeddedPostgresError, match=r"server log \(.*shared_buffers"):
        bad.start()
    assert bad.pid is None and not bad.running

    # This one starts the server, then fails creating its database: the server must go again.
    read_only = EmbeddedPostgres(own_dir, database="other", settings={"default_transaction_read_only": "on"})
    with pytest.raises(EmbeddedPostgresError, match="read-only transaction"):
        read_only.start()
    assert read_only.pid is None and read_only._server_processes() == []

    with EmbeddedPostgres(own_dir) as good:  # and the directory was released both times
        assert good.running


@pytest.mark.skipif(os.geteuid() != 0, reason="the postgres-user traversal check applies only to root")
@pytest.mark.usefixtures("pg_server")  # without PostgreSQL, fail with the fixture's message
def test_a_parent_the_postgres_user_cannot_enter_is_a_clear_error(pg_base: Path):
    locked = pg_base / "locked"
    locked.mkdir(mode=0o700)
    os.chmod(locked, 0o700)
    try:
        with pytest.raises(DataDirUnreachable) as info:
            EmbeddedPostgres(locked / "deeper" / "pg").start()
        text = str(info.value)
        assert "\n" not in text and f"cannot enter {locked} " in text and "'postgres'" in text
        assert stat.S_IMODE(locked.stat().st_mode) == 0o700  # never changed behind the user's back
        assert list(locked.iterdir()) == []
    finally:
        locked.rmdir()


def test_missing_postgresql_programs_are_a_clear_error(tmp_path: Path):
    empty = tmp_path / "bin"
    empty.mkdir()
    pg = EmbeddedPostgres(tmp_path / "pg", bin_dir=empty)
    with pytest.raises(PostgresNotInstalled) as info:
        pg.start()
    text = str(info.value)
    assert "\n" not in text and text.startswith("PostgreSQL is not installed") and str(empty) in text
    assert "apt-get install postgresql" in text
    assert not (tmp_path / "pg").exists()


@pytest.mark.usefixtures("pg_server")
def test_bad_arguments_are_clear_errors(tmp_path: Path):
    with pytest.raises(EmbeddedPostgresError, match="fixes these settings itself: listen_addresses"):
        EmbeddedPostgres(tmp_path, settings={"listen_addresses": "*"})
    with pytest.raises(EmbeddedPostgresError, match="invalid port"):
        EmbeddedPostgres(tmp_path, port=0)
    long_dir = Path("/tmp") / ("x" * 100) / "pg"
    with pytest.raises(EmbeddedPostgresError, match="too long for a unix socket"):
        EmbeddedPostgres(long_dir).start()
    assert not long_dir.parent.exists()  # refused before anything was created


@pytest.mark.parametrize("run", [1, 2])
async def test_each_test_gets_its_own_database(pg_database, run):
    conn = await asyncpg.connect(**pg_database.connect_kwargs)
    try:
        assert await conn.fetchval("SELECT current_database()") == pg_database.name
        # Whichever run comes second must not see the first run's table.
        assert await conn.fetchval("SELECT to_regclass('isolation_probe')") is None
        await conn.execute("CREATE TABLE isolation_probe (run int)")
        await conn.execute("INSERT INTO isolation_probe VALUES ($1)", run)
    finally:
        await conn.close()
