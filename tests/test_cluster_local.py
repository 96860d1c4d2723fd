"""`plc cluster up | status | down` against real etcd, Patroni, PostgreSQL, HAProxy and `plc serve`
processes on loopback (fixtures: tests/cluster_fixtures.py). The cluster tests are slow (one
`up` is 10-20 s, one `down` about 8 s); the bad-usage tests at the end are not."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest

from cluster_fixtures import leftovers, plc, until
from fake_upstream import FakeUpstream
from plc.cluster.local import ClusterError, LocalCluster

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_PORTS = [(f"127.0.1.{i}", p) for i in (1, 2, 3) for p in (5432, 8008)] + \
    [(f"127.0.2.{i}", p) for i in (1, 2, 3) for p in (2379, 2380)] + \
    [("127.0.3.1", p) for p in (5432, 5433, 2582, 7000)] + [(f"127.0.4.{i}", 2582) for i in (1, 2)]  # fmt: skip


def busy_ports() -> list[tuple[str, int]]:
    busy = []
    for host, port in CLUSTER_PORTS:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            busy.append((host, port))
        finally:
            s.close()
    return busy


def get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None


@pytest.mark.slow
def test_up_gives_leader_two_replicas_and_mirrors_behind_haproxy(
    local_cluster: LocalCluster, cluster_upstream: FakeUpstream
) -> None:
    st = local_cluster.status()
    roles = sorted((m["role"], m["state"]) for m in st["patroni"])
    assert roles[0] == ("leader", "running")
    assert [s for _, s in roles[1:]] == ["streaming", "streaming"]
    assert "sync_standby" in [r for r, _ in roles]
    assert all(st["etcd"].values())
    up = {(r["proxy"], r["server"]) for r in st["haproxy"] if r["status"] == "UP"}
    leader = next(m["name"] for m in st["patroni"] if m["role"] == "leader")
    assert {s for p, s in up if p == "postgres_primary"} == {leader}

    # The mirror nodes answer through HAProxy (a node is in rotation once its /-/ready passes).
    r = until("GET /_health through HAProxy", lambda: (x := get(f"{local_cluster.mirror_url}/_health"))
              and x.status_code == 200 and x)  # fmt: skip
    assert r.json()["version"]

    # Exactly one node (the ingest-lock holder) ingests the fake upstream through HAProxy's
    # primary; every node then serves it.
    latest = cluster_upstream.latest_seq
    until("a leader to ingest the upstream", lambda: any(
        (x := get(f"http://{h}:2582/-/status")) and x.json()["cursor"] == latest
        for h in ("127.0.4.1", "127.0.4.2")))  # fmt: skip
    st = local_cluster.status()
    assert [m["status"]["role"] for m in st["mirrors"]] == ["ingester", "ingester"]
    assert sorted(m["status"]["ingest_leader"] for m in st["mirrors"]) == [False, True]
    # HAProxy starts its servers UP, marks them down while /-/ready fails before the first ingest
    # (fall 2) and back up after two passes (rise 2): wait for both to be in rotation again.
    until("both mirrors UP in HAProxy", lambda: sorted(
        r["server"] for r in local_cluster.status()["haproxy"]
        if r["proxy"] == "mirror" and r["status"] == "UP") == ["mirror1", "mirror2"])  # fmt: skip
    did = cluster_upstream.records[-1].did
    for host in ("127.0.4.1", "127.0.4.2", "127.0.3.1"):
        assert httpx.get(f"http://{host}:2582/{did}/log/audit", timeout=5).status_code == 200
    # reads go to the replicas (HAProxy's replicas frontend), not to the primary
    for host in ("127.0.4.1", "127.0.4.2"):
        reads = get(f"http://{host}:2582/-/status").json()["reads"]
        assert reads["replica_configured"] and reads["from_replica"] > 0, reads

    # The CLI shows the same cluster.
    out = plc("cluster", "status", "--dir", str(local_cluster.dir), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [m["name"] for m in doc["patroni"] if m["role"] == "leader"] == [leader]
    text = plc("cluster", "status", "--dir", str(local_cluster.dir))
    assert text.returncode == 0 and "leader" in text.stdout and "ingests: yes, leader epoch" in text.stdout
    assert "ingests: standby" in text.stdout


@pytest.mark.slow
def test_down_leaves_no_process_port_or_data(local_cluster: LocalCluster) -> None:
    out = plc("cluster", "down", "--dir", str(local_cluster.dir))
    assert out.returncode == 0, out.stderr
    assert "stopped:" in out.stderr
    assert leftovers(local_cluster.dir) == []
    assert busy_ports() == []
    assert not (local_cluster.dir / "data").exists()
    assert not (local_cluster.dir / "state.json").exists()
    again = plc("cluster", "down", "--dir", str(local_cluster.dir))
    assert again.returncode == 0 and "nothing was running" in again.stderr


@pytest.mark.slow
def test_down_after_a_failed_up_cleans_up(cluster_session: LocalCluster) -> None:
    cluster_session.down()
    # Something else holds mirror1's address: its `plc serve` cannot bind, so `up` fails after
    # etcd, Patroni, PostgreSQL and HAProxy have started.
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.4.1", 2582))
    blocker.listen()
    try:
        with pytest.raises(ClusterError, match="mirror1 exited"):
            cluster_session.up()
        assert len(cluster_session.running()) >= 7  # 3 etcd, 3 Patroni, HAProxy (+ mirror2)
        assert leftovers(cluster_session.dir)
    finally:
        blocker.close()
    stopped = cluster_session.down()
    assert {"etcd1", "pg1", "haproxy"} <= set(stopped)
    assert leftovers(cluster_session.dir) == []
    assert busy_ports() == []
    assert not list(cluster_session.dir.glob("data/pg*/postmaster.pid"))


# ---- bad usage: clear message, non-zero exit (fast)


def test_status_of_a_directory_without_cluster(tmp_path: Path) -> None:
    out = plc("cluster", "status", "--dir", str(tmp_path / "none"))
    assert out.returncode == 1
    assert "no cluster in" in out.stderr and "plc cluster up" in out.stderr


def test_down_refuses_a_directory_that_is_not_a_cluster(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("x")
    out = plc("cluster", "down", "--dir", str(tmp_path))
    assert out.returncode == 1 and "holds no cluster" in out.stderr
    assert (tmp_path / "precious.txt").exists()
    assert plc("cluster", "down", "--dir", str(tmp_path / "missing")).returncode == 0


def test_up_refuses_a_non_empty_directory_that_is_not_a_cluster(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("x")
    out = plc("cluster", "up", "--dir", str(tmp_path))
    assert out.returncode == 1 and "not empty and holds no cluster" in out.stderr


def test_up_without_patroni_venv_says_how_to_install_it(tmp_path: Path) -> None:
    out = plc("cluster", "up", "--dir", str(tmp_path / "c"), "--patroni-venv", str(tmp_path / "novenv"))
    assert out.returncode == 1
    assert "Patroni is not installed" in out.stderr and "scripts/setup --test" in out.stderr
    assert not (tmp_path / "c").exists()
    env_out = plc("cluster", "up", "--dir", str(tmp_path / "c"), env={"PLC_PATRONI_VENV": str(tmp_path / "nv")})
    assert env_out.returncode == 1 and str(tmp_path / "nv") in env_out.stderr


@pytest.mark.parametrize("args, message", [
    (["--mirrors", "0"], "--mirrors must be between 1 and 3"),
    (["--mirrors", "9"], "--mirrors must be between 1 and 3"),
    (["--timeout", "-1"], "--timeout must be positive"),
])  # fmt: skip
def test_up_rejects_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    out = plc("cluster", "up", "--dir", str(tmp_path / "c"), *args)
    assert out.returncode in (1, 2) and message in out.stderr
    assert not (tmp_path / "c").exists()


def test_cluster_without_action_is_a_usage_error() -> None:
    out = plc("cluster")
    assert out.returncode == 2 and "ACTION" in out.stderr
