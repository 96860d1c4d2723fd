"""`plc cluster up | status | down`: the whole HA cluster on one machine (plc/cluster/local.py),
for development and the cluster tests. Production uses the same templates through Ansible."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .local import BACKUP_TYPES, DEFAULT_DIR, INGEST_MODES, MAX_MIRRORS, UP_TIMEOUT, ClusterError, LocalCluster

DESCRIPTION = """\
`plc cluster`: a local HA cluster on loopback addresses: 3 etcd members (127.0.2.1-3), 3 PostgreSQL
nodes under Patroni (127.0.1.1-3:5432, REST :8008, run as the postgres user), HAProxy on 127.0.3.1
(5432 primary, 5433 replicas, 2582 mirror HTTP, 7000 stats) and mirror nodes running `plc serve`
(127.0.4.N:2582). Every PostgreSQL node archives its WAL with pgBackRest into <dir>/backup/repo
(`backup` takes a backup, `verify-restore` restores the newest one into a scratch directory and
compares it with the live database). Configs come from ha/templates and ha/health.json. Needs
root, Debian's etcd, haproxy and pgbackrest, and the Patroni venv (scripts/setup --test). See
docs/ha.md and docs/operations.md."""


def register(sub: Any) -> None:
    p = sub.add_parser("cluster", help="start, inspect or stop a local HA cluster",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--dir", default=str(DEFAULT_DIR),
                       help=f"state directory: configs, data, logs, state.json (default: {DEFAULT_DIR})")  # fmt: skip

    up = actions.add_parser("up", help="start the cluster and wait until it is healthy")
    common(up)
    up.add_argument("--mirrors", type=int, default=2, help=f"mirror nodes to start, 1-{MAX_MIRRORS} (default: 2)")
    up.add_argument("--upstream", default="https://plc.directory",
                    help="upstream PLC directory the mirrors follow (default: https://plc.directory)")  # fmt: skip
    up.add_argument("--ingest", choices=INGEST_MODES, default="all",
                    help="which mirror nodes run with ingest: all (default), first (the others get "
                         "--no-ingest) or none")  # fmt: skip
    up.add_argument("--patroni-venv", default=None,
                    help="virtualenv with Patroni (default: $PLC_PATRONI_VENV, else /opt/plc-patroni)")  # fmt: skip
    up.add_argument("--timeout", type=float, default=UP_TIMEOUT,
                    help=f"seconds to wait for the cluster to become healthy (default: {UP_TIMEOUT:g})")  # fmt: skip
    up.add_argument("--no-backups", dest="backups", action="store_false",
                    help="no WAL archiving and no pgBackRest repository")  # fmt: skip
    up.set_defaults(func=cmd_up)

    bk = actions.add_parser("backup", help="take a pgBackRest backup on the leader")
    common(bk)
    bk.add_argument("--type", choices=BACKUP_TYPES, default="full", help="backup type (default: full)")
    bk.set_defaults(func=cmd_backup)

    vr = actions.add_parser("verify-restore",
                            help="restore the newest backup and the archived WAL into a scratch directory, "
                                 "start it and compare its row counts with the live database")  # fmt: skip
    common(vr)
    vr.set_defaults(func=cmd_verify_restore)

    rs = actions.add_parser("restore",
                            help="disaster recovery: stop everything, restore the newest backup (or the state at "
                                 "--target-time) into pg1, re-clone pg2 and pg3 from it, restart the mirrors")  # fmt: skip
    common(rs)
    rs.add_argument("--target-time", default=None,
                    help="point-in-time recovery target, e.g. '2026-11-24 03:10:00+00' (default: the end of "
                         "the archived WAL)")  # fmt: skip
    rs.set_defaults(func=cmd_restore)

    st = actions.add_parser("status", help="leader, replicas and lag, etcd, HAProxy backends, mirror nodes")
    common(st)
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    st.set_defaults(func=cmd_status)

    down = actions.add_parser("down", help="stop everything started from --dir and delete its data")
    common(down)
    down.set_defaults(func=cmd_down)


def _say(text: str) -> None:
    print(f"plc cluster: {text}", file=sys.stderr, flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        _say("--timeout must be positive")
        return 2
    try:
        cluster = LocalCluster(args.dir, mirrors=args.mirrors, upstream=args.upstream, ingest=args.ingest,
                               patroni_venv=args.patroni_venv, log=_say, backups=args.backups)  # fmt: skip
        phases = cluster.up(timeout=args.timeout)
    except ClusterError as exc:
        _say(f"up failed: {exc}")
        _say(f"what did start is still running: stop it with  plc cluster down --dir {args.dir}")
        return 1
    _say("up in " + ", ".join(f"{k} {v} s" for k, v in phases.items()))
    print(f"postgres (primary):  {cluster.app_url()}")
    print(f"mirror HTTP:         {cluster.mirror_url}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    try:
        st = LocalCluster(args.dir).status()
    except ClusterError as exc:
        _say(str(exc))
        return 1
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(format_status(st))
    healthy = (any(m["role"] == "leader" for m in st["patroni"]) and all(st["etcd"].values())
               and all(p["alive"] for p in st["processes"]))  # fmt: skip
    return 0 if healthy else 3


def format_status(st: dict[str, Any]) -> str:
    out = [f"cluster in {st['dir']}"]
    alive = sum(p["alive"] for p in st["processes"])
    dead = [p["name"] for p in st["processes"] if not p["alive"]]
    out.append(f"processes: {alive} of {len(st['processes'])} running" + (f" (stopped: {', '.join(dead)})" if dead else ""))
    out.append("etcd: " + ", ".join(f"{h} {'healthy' if ok else 'UNHEALTHY'}" for h, ok in st["etcd"].items()))
    out.append("patroni:" if st["patroni"] else "patroni: no node answers")
    for m in st["patroni"]:
        lag = "" if m["lag"] in (None, "") else f" lag {m['lag']}"
        out.append(f"  {m['name']:<6} {m['host']:<10} {m['role']:<13} {m['state']:<10} tl {m['timeline']}{lag}")
    out.append("haproxy:" if st["haproxy"] else "haproxy: not answering")
    for r in st["haproxy"]:
        out.append(f"  {r['proxy']:<18} {r['server']:<8} {r['status']:<6} {r['check']}")
    out.append("mirrors:")
    for m in st["mirrors"]:
        s = m["status"]
        if s is None:
            out.append(f"  {m['name']:<8} {m['host']:<10} not answering")
            continue
        lag = s.get("lag_seconds")
        if s.get("ingest_leader"):
            ingests = f"yes, leader epoch {s.get('ingest_epoch')}"
        else:
            ingests = "standby" if s.get("role") == "ingester" else "no"
        out.append(f"  {m['name']:<8} {m['host']:<10} {'ready' if m['ready'] else 'NOT READY':<9} role {s.get('role')}"
                   f" (ingests: {ingests}) cursor {s.get('cursor')}"
                   f" lag {'-' if lag is None else f'{lag:.0f}s'}")  # fmt: skip
    out.append("endpoints: " + ", ".join(f"{k} {v}" for k, v in st["endpoints"].items()))
    return "\n".join(out)


def cmd_backup(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    try:
        b = LocalCluster(args.dir).backup(args.type)
    except ClusterError as exc:
        _say(f"backup failed: {exc}")
        return 1
    size = b.get("info", {}).get("repository", {}).get("delta")
    wal = b.get("archive", {})
    _say(f"backup in {time.monotonic() - t0:.1f} s on {b['node']}")
    print(f"{b['label']} ({b['type']}) WAL {wal.get('start')}..{wal.get('stop')}"
          + (f", {size} bytes in the repository" if size is not None else ""))  # fmt: skip
    return 0


def cmd_verify_restore(args: argparse.Namespace) -> int:
    try:
        result = LocalCluster(args.dir).verify_restore()
    except ClusterError as exc:
        _say(f"verify-restore failed: {exc}")
        return 1
    print(json.dumps(result, indent=2))
    if result["live"] != result["restored"]:
        differ = sorted(k for k in {*result["live"], *result["restored"]}
                        if result["live"].get(k) != result["restored"].get(k))  # fmt: skip
        _say(f"the restored copy differs from the live database in: {', '.join(differ)} "
             "(writes after the check are expected to differ)")  # fmt: skip
        return 3
    _say(f"restored {result['backup']} + archived WAL in {result['seconds']} s: every table matches")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    try:
        result = LocalCluster(args.dir, log=_say).restore(args.target_time)
    except ClusterError as exc:
        _say(f"restore failed: {exc}")
        _say(f"see the logs in {args.dir}/logs; plc cluster status --dir {args.dir} shows what runs")
        return 1
    print(json.dumps(result, indent=2))
    _say(f"restored in {result['seconds']} s; the cluster runs on a new timeline")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    try:
        stopped = LocalCluster(args.dir, log=_say).down()
    except ClusterError as exc:
        _say(f"down failed: {exc}")
        return 1
    _say(f"down in {time.monotonic() - t0:.1f} s; stopped: {', '.join(stopped) or 'nothing was running'}")
    return 0
