"""`plc serve`: the mirror in one process — the read API (uvicorn, one worker) and, unless
--no-ingest, the validated ingest of the upstream (plc.sync.ingest), in one event loop.

Database: with no --database-url, the embedded PostgreSQL in <data-dir>/postgres is started
here and stopped on exit. That database is the program's own, so pending schema migrations are
applied at start. A database given by URL is the operator's: it is migrated only by
`plc migrate`, and `plc serve` refuses to start while migrations are pending.

The ingestor has its own asyncpg connection (the API has its pool). If ingest fails (upstream
refusing, unreachable for longer than its retries, database trouble), the error is logged in
one line, the API keeps serving what is stored, and ingest starts again after
INGEST_RETRY_S seconds from the stored cursor.

A `plc.metrics.NodeStatus` links the two: the ingest attaches each Ingestor to it and notes
every committed batch and every failure; the API's /metrics, /-/status and /-/ready read it.

SIGTERM or SIGINT: uvicorn stops accepting connections and finishes the requests in flight,
the ingestor finishes (commits) the batch in flight, connections are closed, the embedded
PostgreSQL is stopped, and the program exits 0. A second SIGINT cuts the graceful wait short.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import uvicorn
import uvloop

from . import __version__, logs, settings
from .api.app import create_app
from .api.routes import DATABASE_UNAVAILABLE
from .forward import config_from_args as forward_config
from .identity.resolver import config_from_args
from .metrics import NodeStatus
from .store.database import connect, database
from .store.embedded import EmbeddedPostgresError
from .store.migrate import MigrationError, migrate, require_current
from .sync.ingest import Ingestor, run_with_progress
from .sync.leader import Deposed, IngestLeadership, LostLeadership
from .sync.upstream import Upstream, check_upstream_url

SERVE_SETTINGS = (
    settings.DATABASE_URL,
    settings.READ_DATABASE_URL,
    settings.DATA_DIR,
    settings.UPSTREAM,
    settings.UPSTREAM_MODE,
    settings.LOG_FORMAT,
    settings.HOST,
    settings.PORT,
    settings.NO_INGEST,
    settings.READY_MAX_LAG,
    settings.INGEST_WORKERS,
    settings.NODE_NAME,
    settings.DOC_CACHE_SIZE,
    *settings.FORWARD_SETTINGS,
    *settings.IDENTITY_SETTINGS,
)
INGEST_RETRY_S = 30.0  # pause before ingest starts again after a failure
PROGRESS_EVERY_S = 60.0  # how often the ingest progress line is logged
GRACEFUL_SHUTDOWN_S = 10.0
STARTUP_DB_WAIT_S = 60.0  # how long `plc serve` waits for an unreachable database at start  # how long requests in flight may take after SIGTERM


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the mirror: the HTTP API and the validated ingest of the upstream",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for setting in SERVE_SETTINGS:
        settings.add_argument(p, setting)
    p.set_defaults(func=run)


def _say(text: str) -> None:
    """A progress line (``plc serve: <text>`` in text format, a JSON object with --log-format json)."""
    logs.command_logger().info(text)


def _fail(text: str) -> int:
    logs.command_logger().error(text)
    return 1


@dataclass(frozen=True)
class IngestJob:
    """What this node's ingest needs: where it reads and writes, how, and whom it tells."""

    connect_kwargs: dict[str, Any]
    upstream: str
    status: NodeStatus
    on_commit: Callable[[set[str]], Any]
    workers: int = 0
    mode: str = "auto"  # --upstream-mode
    node: str = "plc"


class ServeError(Exception):
    """A condition `plc serve` reports in one line and exits 1 on."""


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handling: `plc serve` owns SIGINT/SIGTERM and
    passes them on through `handle_exit` (uvicorn would re-raise them after shutdown)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _check_upstream_url(url: str) -> str:
    try:
        return check_upstream_url(url)
    except ValueError as exc:
        raise ServeError(str(exc)) from None


async def _connect_patiently(connect_kwargs: dict[str, Any], stop: asyncio.Event) -> Any:
    """Connect, retrying for up to STARTUP_DB_WAIT_S while the database cannot be reached (a
    cluster node may start while the primary fails over); then the last error propagates."""
    deadline = time.monotonic() + STARTUP_DB_WAIT_S
    while True:
        try:
            return await connect(connect_kwargs)
        except DATABASE_UNAVAILABLE as exc:
            if time.monotonic() >= deadline or stop.is_set():
                raise
            _say(f"database not reachable yet ({type(exc).__name__}: {exc}); retrying")
            await _wait(stop, 2.0)


async def _prepare_schema(connect_kwargs: dict[str, Any], embedded: bool, stop: asyncio.Event) -> None:
    """Embedded database: apply pending migrations. Configured database: refuse pending ones."""
    conn = await _connect_patiently(connect_kwargs, stop)
    try:
        if embedded:
            await migrate(conn, log=_say)
            return
        await require_current(conn)
    finally:
        await conn.close()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _ingest_once(job: IngestJob, stop: asyncio.Event, fence: Callable[[Any], Any] | None = None) -> None:
    conn = await connect(job.connect_kwargs)
    try:
        async with Upstream(job.upstream) as up:
            ing = Ingestor(conn, up, upstream_name=job.upstream, on_commit=job.on_commit, workers=job.workers,
                           connect_kwargs=job.connect_kwargs, mode=job.mode, fence=fence)
            job.status.attach(ing)
            await run_with_progress(ing, stop, _say, "ingest", PROGRESS_EVERY_S)
            _say(f"ingest stopped at cursor {ing.cursor} ({ing.accepted} ops accepted)")
    finally:
        await _close_or_drop(conn)


async def _close_or_drop(conn: Any) -> None:
    """Close gracefully if the server answers within 2 s, else drop the socket (a partition)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.close(), 2)
    if not conn.is_closed():
        conn.terminate()


async def _first(*aws: Any, timeout: float | None = None) -> set[Any]:
    done, _ = await asyncio.wait(set(aws), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    return done


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def _ingest_forever(job: IngestJob, stop: asyncio.Event, leadership: IngestLeadership | None = None) -> None:
    """Until `stop`: campaign for the ingest lock (plc.sync.leader); while this node leads,
    ingest with every commit fenced by its epoch, restarting after a failure (pause
    INGEST_RETRY_S) and stopping AT ONCE when the lock's session fails; then campaign again."""
    leadership = leadership or IngestLeadership(job.connect_kwargs, job.node)
    status, node = job.status, job.node
    stopped = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            status.standby()
            epoch = await leadership.campaign(stop)
            if epoch is None:
                break
            status.lead(epoch)
            _say(f"ingest: {node} leads (epoch {epoch}); following {job.upstream}")
            watcher = asyncio.create_task(leadership.watch())
            try:
                while not stop.is_set():
                    ingest = asyncio.create_task(
                        _ingest_once(job, stop, leadership.fence)
                    )
                    done = await _first(ingest, watcher)
                    if watcher in done:
                        ingest.cancel()  # at once: the batch in flight is rolled back
                        lost = watcher.exception() or LostLeadership("the lock's watch ended")
                        status.standby()  # before the cleanup, which may wait on a dead connection
                        status.failed(f"lost ingest leadership: {lost}")
                        _say(f"ingest: {node} lost leadership (epoch {epoch}): {lost}; stopped ingesting")
                        await _cancel(ingest)
                        raise lost
                    try:
                        ingest.result()
                    except (Deposed, LostLeadership):
                        raise
                    except Exception as exc:  # noqa: BLE001 — reads must survive any ingest failure
                        status.failed(f"{type(exc).__name__}: {exc}")
                        _say(f"ingest failed: {type(exc).__name__}: {exc}; retrying in {INGEST_RETRY_S:.0f}s")
                        if watcher in await _first(watcher, stopped, timeout=INGEST_RETRY_S):
                            watcher.result()
            except (Deposed, LostLeadership) as exc:
                if status.ingest_leader:  # not already said when the watch failed
                    status.standby()
                    status.failed(f"lost ingest leadership: {exc}")
                    _say(f"ingest: {node} lost leadership (epoch {epoch}): {exc}")
            finally:
                await _cancel(watcher)
                await leadership.release()
    finally:
        stopped.cancel()
        await leadership.release()
        status.standby()


async def _announce(server: uvicorn.Server, host: str, port: int) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    _say(f"listening on http://{host}:{port}")


async def _run(args: argparse.Namespace) -> int:
    no_ingest = settings.flag_value(args, settings.NO_INGEST)
    base = _check_upstream_url(args.upstream)
    stop = asyncio.Event()
    server: _Server | None = None

    def on_signal(sig: int) -> None:
        stop.set()
        if server is not None:
            server.handle_exit(sig, None)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)

    async with database(args.database_url, args.data_dir, log=_say) as kwargs:
        await _prepare_schema(kwargs, embedded=not args.database_url, stop=stop)
        if stop.is_set():
            return 0
        status = NodeStatus(ingest=not no_ingest, upstream=base)
        app = create_app(
            connect_kwargs=kwargs,
            version=__version__,
            status=status,
            ready_max_lag_s=args.ready_max_lag,
            forward=forward_config(args, base),
            doc_cache_size=args.doc_cache_size,
            identity_config=config_from_args(args),
            read_connect_kwargs={"dsn": args.read_database_url} if args.read_database_url else None,
        )

        def on_commit(dids: set[str]) -> None:
            status.committed()
            app.state.doc_cache.invalidate(dids)

        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            workers=1,
            lifespan="on",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            http="httptools",
        )
        server = _Server(config)
        ingest = None if no_ingest else asyncio.create_task(
            _ingest_forever(IngestJob(
                kwargs, base, status, on_commit, workers=args.ingest_workers, mode=args.upstream_mode,
                node=args.node_name or f"{socket.gethostname()}:{args.port}",
            ), stop)
        )
        if ingest is None:
            _say("ingest off (--no-ingest): serving what the database holds")
        announcer = asyncio.create_task(_announce(server, args.host, args.port))
        try:
            try:
                await server.serve()
            except SystemExit:  # uvicorn's startup failure (bind error, lifespan failure)
                raise ServeError(f"the HTTP server could not start on {args.host}:{args.port}") from None
            if not server.started:
                raise ServeError(f"the HTTP server could not start on {args.host}:{args.port}")
        finally:
            announcer.cancel()
            stop.set()
            if ingest is not None:
                await ingest
        _say("stopped")
        return 0


def run(args: argparse.Namespace) -> int:
    logs.configure(args.log_format, logging.WARNING, "plc serve")
    try:
        # uvloop: the event loop uvicorn is measured with (the stdlib loop costs ~2x per request)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_run(args))
    except (ServeError, settings.SettingError, MigrationError, EmbeddedPostgresError) as exc:
        return _fail(str(exc))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return _fail(f"database: {exc}")
