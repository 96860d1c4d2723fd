"""Benchmark of the op log's size on disk and of its commit path.

    .venv/bin/python bench/bench_store.py [--ops 200000] [--batch 1000] [--op-form packed|cbor] [--no-write]

1. A corpus of at least --ops valid ops from `plc.tools.generate.generate` (invalid_rate 0).
2. Replayed in memory with `check_op` (REPLAY) — not timed as part of the store.
3. Committed with `plc.store.oplog.commit` in batches of --batch into a fresh embedded
   PostgreSQL (fsync on, default settings) in a mkdtemp directory under /tmp opened to 0755;
   the commit calls alone are timed (ops/s of the commit path).
4. VACUUM ANALYZE and CHECKPOINT, then bytes per op: pg_total_relation_size of plc_op and
   plc_did (heap + indexes + TOAST) over the op count, and per relation.

`--op-form cbor` stores the op as its plain DAG-CBOR map instead of the packed form, to
measure what the packing saves. Results are appended to docs/benchmarks.md unless --no-write.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from _machine import describe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import orjson  # noqa: E402

from plc.core.chain import REPLAY, DidLog, check_op  # noqa: E402
from plc.core.encoding import dag_cbor  # noqa: E402
from plc.core.jsonfmt import parse_ms  # noqa: E402
from plc.store import oplog  # noqa: E402
from plc.store.embedded import EmbeddedPostgres  # noqa: E402
from plc.store.migrate import migrate  # noqa: E402
from plc.tools.generate import generate  # noqa: E402

OPS_PER_DID = 2.98  # what the generator gives, roughly
UPSTREAM = "https://plc.directory"


def corpus(n_ops: int, seed: int) -> list[tuple]:
    """(Accepted, seq, first_seen_at) for every op of a generated corpus, replayed in memory."""
    dids = int(n_ops / OPS_PER_DID) + 1
    logs: dict[str, DidLog] = {}
    items = []
    for line, _ in generate(seed, dids, invalid_rate=0.0):
        d = orjson.loads(line)
        did = d["did"]
        created_at = parse_ms(d["createdAt"])
        log = logs.get(did)
        acc = check_op(log, did, d["operation"], mode=REPLAY, created_at=created_at, cid=d["cid"])
        logs.setdefault(did, DidLog(did)).apply(acc)
        items.append((acc, d["seq"], created_at + 1000))
    return items


RELATIONS_SQL = """
SELECT c.relname, c.relkind, pg_relation_size(c.oid) AS bytes
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relname LIKE 'plc_%' AND c.relkind IN ('r', 'i')
UNION ALL
SELECT 'toast(' || c.relname || ')', 't', pg_total_relation_size(c.reltoastrelid)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relname IN ('plc_op', 'plc_did') AND c.reltoastrelid <> 0
ORDER BY 1
"""


async def run(args: argparse.Namespace, items: list[tuple]) -> dict:
    base = Path(tempfile.mkdtemp(prefix="plc-bench-store-", dir="/tmp"))
    os.chmod(base, 0o755)
    server = EmbeddedPostgres(base / "pg", database="bench")
    server.start()
    try:
        conn = await asyncpg.connect(**server.connect_kwargs)
        try:
            await migrate(conn)
            t_commit = 0.0
            for start in range(0, len(items), args.batch):
                batch = items[start : start + args.batch]
                cursor = oplog.Cursor(batch[-1][1], batch[-1][0].created_at)
                t0 = time.perf_counter()
                await oplog.commit(conn, UPSTREAM, batch, cursor)
                t_commit += time.perf_counter() - t0
            await conn.execute("VACUUM ANALYZE")
            await conn.execute("CHECKPOINT")
            n_ops = await conn.fetchval("SELECT count(*) FROM plc_op")
            n_dids = await conn.fetchval("SELECT count(*) FROM plc_did")
            total = await conn.fetchval(
                "SELECT pg_total_relation_size('plc_op') + pg_total_relation_size('plc_did')"
            )
            rels = [tuple(r) for r in await conn.fetch(RELATIONS_SQL)]
            avg_op = await conn.fetchval("SELECT avg(octet_length(op))::float FROM plc_op")
            version = await conn.fetchval("SHOW server_version")
        finally:
            await conn.close()
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    return {
        "ops": n_ops,
        "dids": n_dids,
        "total": total,
        "rels": rels,
        "avg_op": avg_op,
        "commit_s": t_commit,
        "pg": version,
    }


def report(args: argparse.Namespace, r: dict, gen_s: float) -> str:
    ops = r["ops"]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [
        f"## Op log size on disk and commit rate (`bench/bench_store.py`, op form `{args.op_form}`) — {when}",
        "",
        f"- Machine: {describe()}; PostgreSQL {r['pg']} (embedded, default settings, fsync on)",
        f"- Command: `.venv/bin/python bench/bench_store.py {shlex.join(sys.argv[1:])}`",
        f"- Corpus: {ops:,} valid ops of {r['dids']:,} DIDs, `generate(seed={args.seed}, invalid_rate=0)`, "
        f"replayed in memory ({gen_s:.0f} s, not counted), committed in batches of {args.batch}",
        f"- Stored op (`op` column) averages {r['avg_op']:.0f} B",
        "",
        "| relation | bytes | bytes/op |",
        "|---|---|---|",
    ]
    for name, kind, size in r["rels"]:
        if name.startswith(("plc_op", "plc_did", "toast(")):
            label = name + (" (index)" if kind == "i" else "")
            lines.append(f"| {label} | {size:,} | {size / ops:.1f} |")
    lines += [
        f"| **plc_op + plc_did, total (heap + indexes + TOAST)** | {r['total']:,} | **{r['total'] / ops:.1f}** |",
        "",
        f"Commit path alone: {ops / r['commit_s']:,.0f} ops/s ({r['commit_s']:.1f} s for {ops:,} ops). "
        "Goal <= 400 B/op: " + ("met." if r["total"] / ops <= 400 else "**missed**."),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--op-form", choices=("packed", "cbor"), default="packed")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.op_form == "cbor":
        oplog.stored_op = lambda op, digest: dag_cbor(op)  # the plain DAG-CBOR map
    t0 = time.perf_counter()
    items = corpus(args.ops, args.seed)
    gen_s = time.perf_counter() - t0
    print(f"corpus: {len(items):,} ops in {gen_s:.1f} s", file=sys.stderr)
    r = asyncio.run(run(args, items))
    text = report(args, r, gen_s)
    print(text)
    if not args.no_write:
        with open(ROOT / "docs" / "benchmarks.md", "a", encoding="utf-8") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
