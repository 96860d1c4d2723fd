"""ha/: health.json is well-formed and is what the rendered configs and docs/ha.md say; the
rendered HAProxy config passes `haproxy -c`, the rendered Patroni config passes
`patroni --validate-config`, the etcd config is a sane 3-member cluster; the template renderer
supports exactly its documented Jinja2 subset."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from plc.cluster import render
from plc.cluster.local import LocalCluster, find_patroni_venv
from plc.cluster.render import HealthError, Node, TemplateError, Topology, User

ROOT = Path(__file__).resolve().parents[1]


def topology(tmp: Path, *, etcd_hosts=("127.0.2.1", "127.0.2.2", "127.0.2.3"), etcd_port=2379,
             backup: render.Backup | None = None) -> Topology:  # fmt: skip
    return Topology(
        etcd=[Node(f"etcd{i}", h, data_dir=str(tmp / f"etcd{i}")) for i, h in enumerate(etcd_hosts, 1)],
        postgres=[Node(f"pg{i}", f"127.0.1.{i}", data_dir=str(tmp / f"pg{i}"), socket_dir=str(tmp / f"s{i}"),
                       pgpass=str(tmp / f"s{i}" / "pgpass"), backup_config=str(tmp / f"pgbackrest-pg{i}.conf"))
                  for i in (1, 2, 3)],  # fmt: skip
        backup=backup,
        mirrors=[Node(f"mirror{i}", f"127.0.4.{i}", port=2582) for i in (1, 2)],
        haproxy_host="127.0.3.1", haproxy_pidfile=str(tmp / "haproxy.pid"),
        haproxy_stats_socket=str(tmp / "haproxy.sock"),
        superuser=User("postgres", "su'pw"), replication=User("replicator", "rep-pw"),
        rewind=User("rewinder", "rw-pw"), app=User("plc", "app-pw", "plc"), etcd_client_port=etcd_port,
    )  # fmt: skip


@pytest.fixture(scope="module")
def health() -> dict:
    return render.load_health()


# ---- health.json


def test_health_json_is_plain_json_with_the_five_checks(health: dict) -> None:
    raw = json.loads((ROOT / "ha" / "health.json").read_text())
    assert raw == health
    assert set(health["checks"]) == {"pg_primary", "pg_replica", "pg_health", "mirror_ready", "mirror_live"}
    for check in health["checks"].values():  # Terraform reads these keys directly
        for key in ("port", "interval_s", "timeout_s", "fall", "rise", "expect_status"):
            assert type(check[key]) is int
    assert health["checks"]["pg_replica"]["path"] == f"/replica?lag={health['checks']['pg_replica']['max_lag_bytes']}"


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["checks"].pop("pg_primary"), "checks.pg_primary is missing"),
    (lambda d: d["checks"]["pg_primary"].update(fall=0), "fall must be a positive integer"),
    (lambda d: d["checks"]["pg_primary"].update(interval_s="1s"), "interval_s must be a positive integer"),
    (lambda d: d["checks"]["pg_replica"].update(max_lag_bytes=5), "must carry lag=5"),
    (lambda d: d["checks"]["mirror_ready"].update(path="-/ready"), "path must start with /"),
    (lambda d: d["checks"]["mirror_ready"].pop("max_lag_s"), "max_lag_s is missing"),
    (lambda d: d.pop("checks"), "'checks' must be a non-empty object"),
])  # fmt: skip
def test_a_broken_health_json_is_refused_with_the_field_named(mutate, message: str) -> None:
    doc = json.loads((ROOT / "ha" / "health.json").read_text())
    mutate(doc)
    with pytest.raises(HealthError, match=re.escape(message)):
        render.load_health(json.dumps(doc))
    with pytest.raises(HealthError, match="not JSON"):
        render.load_health("{")


def test_docs_table_matches_health_json(health: dict) -> None:
    doc = (ROOT / "docs" / "ha.md").read_text()
    assert render.health_table(health) in doc, (
        "docs/ha.md's health table is stale: paste the output of "
        "python -c 'from plc.cluster import render; print(render.health_table(render.load_health()))'"
    )


# ---- HAProxy


def test_haproxy_config_is_valid_and_carries_health_json(tmp_path: Path, health: dict) -> None:
    text = render.render_haproxy(topology(tmp_path), health)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    haproxy = shutil.which("haproxy")
    assert haproxy, "haproxy is not installed: run scripts/setup --test"
    r = subprocess.run([haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

    blocks = {m.group(1): m.group(2) for m in re.finditer(r"^listen (\S+)\n(.*?)(?=^\S|\Z)", text, re.M | re.S)}
    assert set(blocks) == {"stats", "postgres_primary", "postgres_replicas", "mirror"}
    for name, check in (("postgres_primary", "pg_primary"), ("postgres_replicas", "pg_replica"),
                        ("mirror", "mirror_ready")):  # fmt: skip
        c = health["checks"][check]
        block = blocks[name]
        assert f"option httpchk {c['method']} {c['path']}\n" in block
        assert f"http-check expect status {c['expect_status']}\n" in block
        assert f"timeout check {c['timeout_s']}s\n" in block
        assert f"default-server inter {c['interval_s']}s fall {c['fall']} rise {c['rise']}" in block
    for name in ("postgres_primary", "postgres_replicas"):
        servers = re.findall(r"server (pg\d) (127\.0\.1\.\d):5432 check port (\d+)", blocks[name])
        assert servers == [(f"pg{i}", f"127.0.1.{i}", str(health["checks"]["pg_primary"]["port"])) for i in (1, 2, 3)]
        assert "on-marked-down shutdown-sessions" in blocks[name]
    assert "shutdown-sessions" not in blocks["mirror"]
    assert re.findall(r"server (mirror\d) (\S+) check", blocks["mirror"]) == [
        ("mirror1", "127.0.4.1:2582"), ("mirror2", "127.0.4.2:2582")]  # fmt: skip
    assert "bind 127.0.3.1:5432" in blocks["postgres_primary"] and "bind 127.0.3.1:5433" in blocks["postgres_replicas"]


def test_a_mirror_port_other_than_health_json_is_refused(tmp_path: Path, health: dict) -> None:
    t = topology(tmp_path)
    bad = Topology(**{**t.__dict__, "mirrors": [Node("mirror1", "127.0.4.1", port=8080)]})
    with pytest.raises(ValueError, match="port 2582"):
        render.render_haproxy(bad, health)


# ---- Patroni


def listening_etcd_stand_ins() -> tuple[list[socket.socket], int]:
    """`patroni --validate-config` checks that every etcd host accepts TCP connections; three
    listening sockets on 127.0.9.1-3 (one port) stand in for them, away from a running cluster."""
    first = socket.socket()
    first.bind(("127.0.9.1", 0))
    port = first.getsockname()[1]
    socks = [first]
    for host in ("127.0.9.2", "127.0.9.3"):
        s = socket.socket()
        s.bind((host, port))
        socks.append(s)
    for s in socks:
        s.listen()
    return socks, port


@pytest.mark.parametrize("with_backup", [False, True])
def test_patroni_config_passes_validate_config(tmp_path: Path, health: dict, with_backup: bool) -> None:
    venv = find_patroni_venv()
    socks, port = listening_etcd_stand_ins()
    try:
        t = topology(tmp_path, etcd_hosts=("127.0.9.1", "127.0.9.2", "127.0.9.3"), etcd_port=port,
                     backup=render.Backup(str(tmp_path / "repo")) if with_backup else None)  # fmt: skip
        for node in t.postgres:
            cfg = tmp_path / f"{node.name}.yml"
            cfg.write_text(render.render_patroni(t, node, health))
            r = subprocess.run([str(venv / "bin" / "patroni"), "--ignore-listen-port", "--validate-config", str(cfg)],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
            assert r.returncode == 0, r.stdout + r.stderr
    finally:
        for s in socks:
            s.close()


def test_patroni_config_values(tmp_path: Path, health: dict) -> None:
    t = topology(tmp_path)
    text = render.render_patroni(t, t.postgres[1], health)
    for line in ("name: pg2", "listen: 127.0.1.2:8008", "listen: 127.0.1.2:5432", "ttl: 20", "loop_wait: 2",
                 "retry_timeout: 5", "synchronous_mode: true", "synchronous_mode_strict: true",
                 "failsafe_mode: true", "wal_sender_timeout: 5s", "wal_receiver_timeout: 5s",
                 "hosts: 127.0.2.1:2379,127.0.2.2:2379,127.0.2.3:2379", "password: \"su'pw\"",
                 "- host plc plc 127.0.0.0/8 scram-sha-256",
                 "- host replication replicator 127.0.0.0/8 scram-sha-256"):  # fmt: skip
        assert f"{line}\n" in text, line
    assert f"unix_socket_directories: {tmp_path / 's2'}\n" in text
    assert f"data_dir: {tmp_path / 'pg2'}\n" in text


def test_patroni_config_archives_wal_only_with_a_backup(tmp_path: Path, health: dict) -> None:
    plain = render.render_patroni(topology(tmp_path), topology(tmp_path).postgres[0], health)
    assert "archive_" not in plain and "restore_command" not in plain and "pgbackrest" not in plain
    t = topology(tmp_path, backup=render.Backup(str(tmp_path / "repo"), stanza="st", archive_timeout=30))
    text = render.render_patroni(t, t.postgres[1], health)
    conf = tmp_path / "pgbackrest-pg2.conf"
    params = text[text.index("\n  parameters:\n") :]  # the node's own postgresql.parameters
    for line in ('    archive_mode: "on"', "    archive_timeout: 30",
                 f'    archive_command: "/usr/bin/pgbackrest --config={conf} --stanza=st archive-push %p"'):  # fmt: skip
        assert f"\n{line}\n" in params, line
    assert (f'\n  recovery_conf:\n    restore_command: "/usr/bin/pgbackrest --config={conf} --stanza=st '
            'archive-get %f \\"%p\\""\n') in text  # fmt: skip


def test_pgbackrest_config_for_a_shared_directory(tmp_path: Path, health: dict) -> None:
    repo = tmp_path / "repo"
    t = topology(tmp_path, backup=render.Backup(str(repo), log_dir=str(tmp_path / "log"),
                                                lock_dir=str(tmp_path / "lock")))  # fmt: skip
    text = render.render_pgbackrest(t, t.postgres[2], health)
    assert not re.search(r"{{|}}|{%|%}", text)
    assert "repo1-type" not in text and "cipher" not in text
    for line in (f"repo1-path={repo}", "repo1-retention-full=2", "compress-type=zst", "[plc]",
                 f"pg1-path={tmp_path / 'pg3'}", f"pg1-socket-path={tmp_path / 's3'}", "pg1-port=5432",
                 "pg1-user=postgres"):  # fmt: skip
        assert f"\n{line}\n" in text, line
    # pgBackRest itself reads it: `info` on the empty repository parses every option
    if shutil.which("pgbackrest"):
        repo.mkdir()
        conf = tmp_path / "pgbackrest.conf"
        conf.write_text(text)
        r = subprocess.run(["pgbackrest", f"--config={conf}", "--output=json", "info"], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout) == []


def test_pgbackrest_config_for_s3_with_encryption(tmp_path: Path, health: dict) -> None:
    b = render.Backup("/plc", cipher_pass="c1pher", s3_bucket="bkt", s3_endpoint="fsn1.your-objectstorage.com",
                      s3_region="fsn1", s3_key="AK", s3_key_secret="SK")  # fmt: skip
    t = topology(tmp_path, backup=b)
    text = render.render_pgbackrest(t, t.postgres[0], health)
    for line in ("repo1-type=s3", "repo1-s3-bucket=bkt", "repo1-s3-endpoint=fsn1.your-objectstorage.com",
                 "repo1-s3-region=fsn1", "repo1-s3-key=AK", "repo1-s3-key-secret=SK", "repo1-s3-uri-style=path",
                 "repo1-path=/plc", "repo1-cipher-type=aes-256-cbc", "repo1-cipher-pass=c1pher"):  # fmt: skip
        assert f"\n{line}\n" in text, line


def test_pgbackrest_needs_backup_settings(tmp_path: Path, health: dict) -> None:
    t = topology(tmp_path)
    with pytest.raises(ValueError, match="no backup settings"):
        render.render_pgbackrest(t, t.postgres[0], health)


@pytest.mark.parametrize("change, message", [
    ({"backup": render.Backup("relative/repo")}, "must be absolute"),
    ({"backup": render.Backup("/repo", retention_full=0)}, "at least 1"),
    ({"backup": render.Backup("/repo"), "postgres": [Node("pg1", "127.0.1.1"), Node("pg2", "127.0.1.2")]},
     "pgBackRest config path"),
    ({"ttl": 10}, "ttl >= 20"),
    ({"loop_wait": 10, "retry_timeout": 10}, "must not exceed ttl"),
    ({"etcd": []}, "odd number"),
])  # fmt: skip
def test_topology_check_refuses_what_patroni_or_etcd_would(tmp_path: Path, change: dict, message: str) -> None:
    t = topology(tmp_path)
    with pytest.raises(ValueError, match=message):
        Topology(**{**t.__dict__, **change}).check()


def test_haproxy_keeps_server_states_across_a_reload(tmp_path: Path, health: dict) -> None:
    t = topology(tmp_path)
    text = render.render_haproxy(t, health)
    glob = text[text.index("\nglobal\n") : text.index("\ndefaults\n")]
    assert f"\n    server-state-file {t.haproxy_state_file}\n" in glob
    defaults = text[text.index("\ndefaults\n") : text.index("\nlisten ")]
    assert "\n    load-server-state-from-file global\n" in defaults


# ---- etcd


def test_etcd_configs_form_one_three_member_cluster(tmp_path: Path) -> None:
    t = topology(tmp_path)
    texts = [render.render_etcd(t, m) for m in t.etcd]
    want = "initial-cluster: etcd1=http://127.0.2.1:2380,etcd2=http://127.0.2.2:2380,etcd3=http://127.0.2.3:2380\n"
    for i, text in enumerate(texts, 1):
        assert want in text
        assert f"name: etcd{i}\n" in text
        assert f"listen-client-urls: http://127.0.2.{i}:2379\n" in text
        assert f"initial-advertise-peer-urls: http://127.0.2.{i}:2380\n" in text
        assert f"data-dir: {tmp_path / f'etcd{i}'}\n" in text
        assert "enable-grpc-gateway: true\n" in text  # Patroni's etcd3 client needs /v3 JSON
        assert "initial-cluster-state: new\n" in text  # `plc cluster up` bootstraps the members together
        assert not re.search(r"{{|{%", text)


def test_etcd_config_of_a_member_joining_a_running_cluster(tmp_path: Path) -> None:
    """ansible/add_node.yml's case: the member was registered with `etcdctl member add` and starts
    with state existing; every other setting is the bootstrap's."""
    t = topology(tmp_path)
    new = render.render_etcd(t, t.etcd[2])
    joining = render.render_etcd(Topology(**{**t.__dict__, "etcd_initial_cluster_state": "existing"}), t.etcd[2])
    assert "initial-cluster-state: existing\n" in joining
    assert joining.replace("initial-cluster-state: existing", "initial-cluster-state: new") == new
    with pytest.raises(ValueError, match="new or existing"):
        render.render_etcd(Topology(**{**t.__dict__, "etcd_initial_cluster_state": "joining"}), t.etcd[2])


# ---- the template subset


def test_renderer_handles_vars_loops_and_trim_blocks() -> None:
    tpl = "a {{ x.y }}\n{% for i in items %}\n- {{ i.n }} {{ flag }}\n{% endfor %}\nend\n"
    out = render.render_text(tpl, {"x": {"y": 1}, "items": [{"n": "p"}, {"n": "q"}], "flag": False})
    assert out == "a 1\n- p false\n- q false\nend\n"


def test_renderer_if_blocks_follow_jinja_truthiness() -> None:
    tpl = "{% for i in items %}\n{% if i.on %}\n{{ i.n }}\n{% endif %}\n{% endfor %}\n{% if empty %}\nnever\n{% endif %}\nend\n"
    items = [{"n": "a", "on": True}, {"n": "b", "on": False}, {"n": "c", "on": "yes"}, {"n": "d", "on": ""},
             {"n": "e", "on": [0]}, {"n": "f", "on": 0}]  # fmt: skip
    assert render.render_text(tpl, {"items": items, "empty": []}) == "a\nc\ne\nend\n"


@pytest.mark.parametrize("tpl, message", [
    ("{{ x | upper }}", "only dotted names"),
    ("{% if x %}a{% else %}b{% endif %}", "only for/endfor and if/endif"),
    ("{% if x == 1 %}{% endif %}", "only for/endfor and if/endif"),
    ("{% for i in xs %}", "for without endfor"),
    ("{% if x %}", "if without endif"),
    ("{% endfor %}", "endfor without for"),
    ("{% endif %}", "endif without if"),
    ("{% for i in xs %}{% endif %}{% endfor %}", "endif without if"),
    ("{% if nope %}{% endif %}", "undefined name"),
    ("{{ missing }}", "undefined name"),
    ("{{ x.nope }}", "no 'nope'"),
    ("{% for i in x %}{% endfor %}", "is not a list"),
])  # fmt: skip
def test_renderer_refuses_what_it_does_not_support(tpl: str, message: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(message)):
        render.render_text(tpl, {"x": {"y": 1}, "xs": []})


def test_every_template_renders_without_leftover_syntax(tmp_path: Path, health: dict) -> None:
    t = topology(tmp_path)
    for text in (render.render_haproxy(t, health), render.render_patroni(t, t.postgres[0], health),
                 render.render_etcd(t, t.etcd[0])):  # fmt: skip
        assert not re.search(r"{{|}}|{%|%}", text.replace("%(asctime)s %(levelname)s: %(message)s", ""))


def test_local_cluster_uses_health_json_port_and_lag(tmp_path: Path, health: dict) -> None:
    c = LocalCluster(tmp_path / "c")
    t = c.topology()
    assert {m.port for m in t.mirrors} == {health["checks"]["mirror_ready"]["port"]}
    assert t.rest_port == health["checks"]["pg_primary"]["port"]
