"""`plc audit`: re-read the upstream's sequenced /export over the seq range this mirror holds
and record the ops upstream no longer serves as `vanished` divergences (plc.sync.audit); the
ops are kept and still served. Prints the report as one JSON object on stdout (missing and
mismatched seqs are listed, not stored: `plc sync` / `plc serve` ingest them).

Resumable: the position is committed after every page, and a new run goes on from it unless
--from is given (--from 0 audits everything again). SIGINT/SIGTERM stop after the page in
flight (the report then says `"complete": false`). Refuses to run with pending migrations.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

import asyncpg
import orjson

from .. import logs, settings
from ..store.database import connect, database
from ..store.embedded import EmbeddedPostgresError
from ..store.migrate import MigrationError, require_current
from .audit import AuditError, AuditReport, audit
from .upstream import Upstream, UpstreamError, check_upstream_url

PROGRESS_EVERY_PAGES = 100


def _seq(text: str) -> int:
    return settings.whole_number(text, 0, "seq")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "audit",
        help="compare the upstream's history with ours; record ops it no longer serves",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    settings.add_argument(p, settings.DATABASE_URL)
    settings.add_argument(p, settings.DATA_DIR)
    settings.add_argument(p, settings.UPSTREAM)
    settings.add_argument(p, settings.LOG_FORMAT)
    p.add_argument("--from", dest="start", type=_seq, default=None, metavar="SEQ",
                   help="audit seqs above SEQ (default: where the last audit stopped, else 0)")
    p.add_argument("--to", dest="end", type=_seq, default=None, metavar="SEQ",
                   help="audit seqs up to SEQ (default: the highest seq stored)")
    p.add_argument("--max-pages", type=_seq, default=None, metavar="N",
                   help="stop after N upstream pages (resume later)")
    p.set_defaults(func=run)


class AuditCmdError(Exception):
    """A condition `plc audit` reports in one line and exits 1 on."""


def _progress(report: AuditReport) -> None:
    if report.pages % PROGRESS_EVERY_PAGES == 0:
        logs.command_logger().info(
            "audited through seq %d of %d: %d vanished, %d missing", report.position, report.end,
            len(report.vanished), report.missing_count,
        )


async def _run(args: argparse.Namespace) -> AuditReport:
    try:
        base = check_upstream_url(args.upstream)
    except ValueError as exc:
        raise AuditCmdError(str(exc)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    say = logs.command_logger().info
    async with database(args.database_url, args.data_dir, log=say) as kwargs:
        conn = await connect(kwargs)
        try:
            await require_current(conn)
            async with Upstream(base) as up:
                report = await audit(conn, up, upstream_name=base, start=args.start, end=args.end,
                                     stop=stop, max_pages=args.max_pages, on_page=_progress)
            say("audited seqs %d..%d of %s: %d vanished (%d newly recorded), %d missing, %d mismatched%s",
                report.start, report.position, base, len(report.vanished), report.vanished_recorded,
                report.missing_count, report.mismatched_count, "" if report.complete else " (incomplete)")
            return report
        finally:
            await conn.close()


def run(args: argparse.Namespace) -> int:
    command = logs.configure(args.log_format, logging.WARNING, "plc audit")
    try:
        report = asyncio.run(_run(args))
    except (AuditCmdError, AuditError, MigrationError, EmbeddedPostgresError) as exc:
        command.error("%s", exc)
        return 1
    except UpstreamError as exc:
        command.error("upstream %s failed: %s", args.upstream, exc)
        return 1
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        command.error("database: %s", exc)
        return 1
    sys.stdout.write(orjson.dumps(report.as_dict()).decode() + "\n")
    return 0
