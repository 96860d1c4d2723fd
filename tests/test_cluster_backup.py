"""Backups on the local HA cluster with real pgBackRest: every PostgreSQL node archives its WAL
into one repository (ha/templates/pgbackrest.conf.j2, archive_command in patroni.yml.j2),
`plc cluster backup` takes a backup on the leader, `plc cluster verify-restore` restores the
newest backup plus the archived WAL into a scratch directory and compares every table with the
live database. The test writes ops after the backup and across a switchover (a new timeline), so
only WAL archived by two different primaries can make the restored copy match.

Uses the session cluster of cluster_fixtures (one per machine) and leaves it healthy. Slow."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest

from cluster_fixtures import ensure_healthy, plc, until
from fake_upstream import FakeUpstream
from plc.cluster.local import LocalCluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import drills  # noqa: E402

needs_pgbackrest = pytest.mark.skipif(shutil.which("pgbackrest") is None,
                                      reason="pgbackrest is not installed (scripts/setup --test)")  # fmt: skip

SEED = drills.APPENDER_SEED + 17  # ops no other test reveals


def cursors(cluster: LocalCluster) -> list[int | None]:
    out = []
    for m in cluster.status()["mirrors"]:
        out.append((m["status"] or {}).get("cursor"))
    return out


def reveal(cluster: LocalCluster, fake: FakeUpstream, seconds: float, seed: int) -> int:
    """Reveal new ops upstream (from generator seed ``seed``) for ``seconds`` and wait until a
    mirror has ingested all of them; returns how many were revealed."""
    appender = drills.Appender(fake, rate=200, seed=seed).start()
    time.sleep(seconds)
    appender.stop()
    assert appender.error is None, appender.error
    latest = fake.latest_seq
    until(f"a mirror to ingest up to seq {latest}", lambda: latest in cursors(cluster))
    return appender.appended


@pytest.mark.slow
@needs_pgbackrest
def test_backup_then_writes_and_a_switchover_restore_exactly(local_cluster: LocalCluster,
                                                              cluster_upstream: FakeUpstream) -> None:  # fmt: skip
    cluster = local_cluster
    # up created the stanza and checked that WAL reaches the repository
    info = cluster.backup_info()
    assert info["name"] == "plc" and info["status"]["message"] == "no valid backups", info["status"]
    assert info["archive"] and info["archive"][0]["max"], info["archive"]  # `check` archived a segment
    until("the mirrors to ingest the corpus", lambda: cluster_upstream.latest_seq in cursors(cluster))

    out = plc("cluster", "backup", "--dir", str(cluster.dir))
    assert out.returncode == 0, out.stderr
    label = out.stdout.split()[0]
    assert label.endswith("F") and "(full)" in out.stdout

    # ops written after the backup, then a switchover (new primary, new timeline), then more ops
    revealed = reveal(cluster, cluster_upstream, 2.0, SEED)
    old = cluster._backup_leader()
    cand = next(m["name"] for m in cluster.patroni_members() if m["role"] == "sync_standby")
    sw = cluster.patronictl("switchover", "--leader", old, "--candidate", cand, "--force")
    assert sw.returncode == 0, sw.stdout + sw.stderr
    until("the candidate to lead", lambda: cluster._backup_leader() == cand if cluster._patroni_healthy() else False)
    ensure_healthy(cluster)
    revealed += reveal(cluster, cluster_upstream, 2.0, SEED + 1)
    assert revealed > 100

    # an incremental backup on the new primary chains onto the full one
    out = plc("cluster", "backup", "--dir", str(cluster.dir), "--type", "incr")
    assert out.returncode == 0, out.stderr
    assert "(incr)" in out.stdout
    backups = cluster.backup_info()["backup"]
    assert [b["type"] for b in backups][-2:] == ["full", "incr"] and backups[-1]["reference"][0] == label

    # more ops after the newest backup: only the archived WAL can bring these back
    assert reveal(cluster, cluster_upstream, 1.0, SEED + 2) > 0
    out = plc("cluster", "verify-restore", "--dir", str(cluster.dir))
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["node"] == cand
    assert result["restored"] == result["live"]
    # every op upstream revealed is in the restored copy (each op of the corpus is valid)
    assert result["restored"]["plc_op"] == len(cluster_upstream.records)
    assert "every table matches" in out.stderr

    # the mirrors still answer after all this
    did = cluster_upstream.records[-1].did
    r = until("a read through HAProxy", lambda: (x := httpx.get(f"{cluster.mirror_url}/{did}", timeout=5))
              and x.status_code == 200 and x)  # fmt: skip
    assert r.json()["id"] == did


def leader_counts(cluster: LocalCluster) -> tuple[str, dict[str, int]]:
    """(now() on the leader, rows per table of the application database there)."""
    topo = cluster.topology()
    node = next(n for n in topo.postgres if n.name == cluster._backup_leader())
    db = ["-h", node.socket_dir, "-d", topo.app.database, "-p", str(topo.pg_port)]
    now = cluster._as_postgres(["psql", "-X", "-At", *db, "-c", "select now()::text"], 30)
    assert now.returncode == 0, now.stderr
    return now.stdout.strip(), cluster._table_counts(db)


@pytest.mark.slow
@needs_pgbackrest
def test_point_in_time_restore_of_the_whole_cluster(local_cluster: LocalCluster,
                                                    cluster_upstream: FakeUpstream) -> None:  # fmt: skip
    """Disaster recovery to a moment before the newest ops: the restored cluster holds exactly
    what it held then, runs with a leader, a sync standby and a replica again, and its mirrors
    ingest the newer ops again from the upstream."""
    cluster = local_cluster
    if not cluster.backup_info()["backup"]:
        assert plc("cluster", "backup", "--dir", str(cluster.dir)).returncode == 0
    until("the mirrors to ingest everything", lambda: cluster_upstream.latest_seq in cursors(cluster))
    time.sleep(1.0)
    target, then = leader_counts(cluster)
    time.sleep(1.0)
    assert reveal(cluster, cluster_upstream, 2.0, SEED + 3) > 0
    _, later = leader_counts(cluster)
    assert later["plc_op"] > then["plc_op"]
    check = cluster.pgbackrest(cluster._backup_leader(), "check")  # archive the WAL past the target
    assert check.returncode == 0, check.stderr

    out = plc("cluster", "restore", "--dir", str(cluster.dir), "--target-time", target)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["restored"] == then and result["target"] == target
    assert cluster._patroni_healthy()
    assert cluster._backup_leader() == "pg1"

    # the mirrors pick up from the restored cursor and ingest the newer ops again
    latest = cluster_upstream.latest_seq
    until("the restored cluster to ingest the newer ops", lambda: latest in cursors(cluster), timeout=120)
    _, now = leader_counts(cluster)
    assert now["plc_op"] == len(cluster_upstream.records) == later["plc_op"]
    # backups go on, on the new timeline
    out = plc("cluster", "backup", "--dir", str(cluster.dir), "--type", "full")
    assert out.returncode == 0, out.stderr


def test_backup_commands_refuse_bad_input(tmp_path: Path) -> None:
    out = plc("cluster", "backup", "--dir", str(tmp_path / "none"))
    assert out.returncode == 1 and "no cluster in" in out.stderr
    out = plc("cluster", "verify-restore", "--dir", str(tmp_path / "none"))
    assert out.returncode == 1 and "no cluster in" in out.stderr
    out = plc("cluster", "restore", "--dir", str(tmp_path / "none"))
    assert out.returncode == 1 and "no cluster in" in out.stderr
    out = plc("cluster", "backup", "--dir", str(tmp_path), "--type", "weekly")
    assert out.returncode == 2 and "invalid choice" in out.stderr
