"""The Ansible deployment (ansible/), applied for real to namespace test hosts.

The end-to-end test provisions three nodes (etcd + PostgreSQL/Patroni + HAProxy + plc mirror) and
one balancer (HAProxy) exactly as it would cloud servers: over SSH, as root, each host with its own
address (network namespace) and its own filesystem (an overlay of the root filesystem in a mount
namespace), made by ansible/scripts/hosts-up. When terraform is on PATH it goes through
terraform/local (apply = hosts-up + playbook, destroy = hosts-down); otherwise it calls the scripts
itself. Then: the cluster is healthy, the mirrors ingest a fake upstream (served on the test
network's controller address) and answer through the balancer, pgBackRest archives to the
repository the hosts share and plc-backup backs up on the primary only, a second run and a --check run
change nothing, a rolling upgrade drops no read, the rendered systemd units pass
`systemd-analyze verify`; then day 2 under reads: a fourth node (etcd member, Patroni, mirror) is
brought up with `testhosts.py add` and joined with add_node.yml, removed again with remove_node.yml,
and site.yml on the three nodes changes nothing; restore.yml undoes an operator error (every op
deleted) by a point-in-time restore of the whole cluster; after the destroy nothing of the hosts
is left.

Needs root, /opt/plc-ansible (ansible-core + ansible-lint), /opt/plc-wheelhouse, /opt/plc-patroni,
openssh-server, etcd, haproxy, PostgreSQL: `scripts/setup --test` installs them all. Uses the fixed
subnet 10.77.0.0/24 and namespaces named plct-*, so it must not run twice at the same time.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from cluster_fixtures import until

REPO = Path(__file__).resolve().parent.parent
ANSIBLE = REPO / "ansible"
TOOLS = Path(os.environ.get("PLC_ANSIBLE_VENV", "/opt/plc-ansible")) / "bin"
WHEELHOUSE = Path(os.environ.get("PLC_WHEELHOUSE", "/opt/plc-wheelhouse"))
PATRONI_VENV = Path(os.environ.get("PLC_PATRONI_VENV", "/opt/plc-patroni"))
TERRAFORM = shutil.which("terraform")
SUBNET = "10.77.0.0/24"
CONTROLLER = "10.77.0.1"
NODES = {"plc-node-1": "10.77.0.11", "plc-node-2": "10.77.0.12", "plc-node-3": "10.77.0.13"}
BALANCER = ("plc-balancer-1", "10.77.0.101")
NEW_NODE = ("plc-node-4", "10.77.0.14")  # added by add_node.yml, then removed by remove_node.yml
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)
HA_TEMPLATES = ("etcd.yml.j2", "patroni.yml.j2", "haproxy.cfg.j2", "pgbackrest.conf.j2")


def missing_tools() -> list[str]:
    out = []
    if os.geteuid() != 0:
        out.append("root")
    for path in (TOOLS / "ansible-playbook", TOOLS / "ansible-lint", PATRONI_VENV / "bin" / "patroni",
                 Path("/usr/sbin/sshd"), Path("/usr/bin/etcd"), Path("/usr/sbin/haproxy")):  # fmt: skip
        if not path.exists():
            out.append(str(path))
    if not any(WHEELHOUSE.glob("*.whl")):
        out.append(f"{WHEELHOUSE}/*.whl")
    return out


needs_tools = pytest.mark.skipif(bool(missing_tools()), reason=f"run scripts/setup --test (missing: {missing_tools()})")


def tool_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "PLC_", "TF_VAR_"))}
    env.update(
        PATH=f"{TOOLS}:{env.get('PATH', '/usr/bin:/bin')}",
        ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_DEPRECATION_WARNINGS="0",
        TF_IN_AUTOMATION="1",
        CHECKPOINT_DISABLE="1",
        TF_INPUT="0",
    )
    return env


def run(argv: list[str], env: dict[str, str], log: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    log.write_text(proc.stdout + proc.stderr)
    return proc


def explain(proc: subprocess.CompletedProcess, lines: int = 60) -> str:
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return f"exit {proc.returncode}:\n" + "\n".join(text[-lines:])


def recap(text: str) -> dict[str, dict[str, int]]:
    return {m.group(1): {"ok": int(m.group(2)), "changed": int(m.group(3)), "unreachable": int(m.group(4)),
                         "failed": int(m.group(5))} for m in RECAP.finditer(text)}  # fmt: skip


def changed_tasks(text: str) -> list[str]:
    """The task lines under which a host reported `changed` (for a readable failure)."""
    out, task = [], ""
    for line in text.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            task = line.rstrip("* ")
        elif line.startswith("changed:"):
            out.append(f"{task}: {line}")
    return out


# ------------------------------------------------------------------------------ fast checks


def test_roles_render_the_ha_templates_and_keep_no_copy() -> None:
    """ha/templates is the one source of truth: no role carries its own etcd/Patroni/HAProxy
    template, and each role renders the ha/ one."""
    for name in HA_TEMPLATES:
        assert not list(ANSIBLE.rglob(name)), f"a copy of {name} under ansible/"
    uses = {
        "etcd.yml.j2": "etcd",
        "patroni.yml.j2": "postgres",
        "haproxy.cfg.j2": "haproxy",
        "pgbackrest.conf.j2": "postgres",
    }
    assert set(uses) == set(HA_TEMPLATES)
    for template, role in uses.items():
        tasks = "".join(p.read_text() for p in (ANSIBLE / "roles" / role / "tasks").glob("*.yml"))
        assert f'src: "{{{{ common_ha_dir }}}}/templates/{template}"' in tasks
    defaults = (ANSIBLE / "roles" / "common" / "defaults" / "main.yml").read_text()
    assert "common_ha_dir: \"{{ (role_path ~ '/../../..') if role_path is defined else (playbook_dir ~ '/..') }}/ha\"" in defaults
    assert (ANSIBLE / "roles" / "common" / ".." / ".." / ".." / "ha" / "templates" / "patroni.yml.j2").resolve().is_file()


def test_no_secret_in_the_roles() -> None:
    """Passwords have no defaults anywhere under ansible/: they come from vault or vars files."""
    for path in ANSIBLE.rglob("*.yml"):
        text = path.read_text()
        for var in ("patroni_superuser_password", "patroni_replication_password", "patroni_rewind_password",
                    "plc_db_password"):  # fmt: skip
            assert not re.search(rf"(?m)^\s*{var}\s*:", text), f"{path} sets {var}"


def test_hosts_scripts_refuse_bad_usage(tmp_path: Path) -> None:
    script = str(ANSIBLE / "scripts" / "testhosts.py")
    for argv in (["up"], ["sideways"], [], ["add"], ["add", "a.yml", "b.yml"], ["remove", "a.yml"], ["down", "a", "b"]):
        proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and "usage:" in proc.stderr, argv
        assert "add INVENTORY" in proc.stderr and "remove INVENTORY HOST..." in proc.stderr
    bad = tmp_path / "inventory.yml"
    bad.write_text("all:\n  hosts:\n    a: {}\n")
    for argv in ([str(ANSIBLE / "scripts" / "hosts-up"), str(bad)], [script, "add", str(bad)]):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 1
        assert "without ansible_host or private_ip: a" in proc.stderr or "needs root" in proc.stderr
    # add only grows a host set that up made for this inventory: here none (and it touches no other set)
    good = tmp_path / "good.yml"
    good.write_text("all:\n  hosts:\n    a: {ansible_host: 10.78.0.5}\n")
    proc = subprocess.run([script, "add", str(good)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "no test host set of this inventory runs" in proc.stderr or "needs root" in proc.stderr
    dup = tmp_path / "dup.yml"
    dup.write_text("all:\n  hosts:\n    a: {ansible_host: 10.78.0.5}\n    b: {ansible_host: 10.78.0.5}\n")
    proc = subprocess.run([script, "add", str(dup)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "two inventory hosts have the same address" in proc.stderr or "needs root" in proc.stderr


def test_build_wheels_refuses_a_non_checkout(tmp_path: Path) -> None:
    proc = subprocess.run([str(ANSIBLE / "scripts" / "build-wheels"), sys.executable, str(tmp_path),
                           str(tmp_path / "w.tar")], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 1 and "is not a plc checkout" in proc.stderr


@pytest.mark.skipif(not (TOOLS / "ansible-playbook").exists(), reason="run scripts/setup --test (no ansible-playbook)")
def test_restore_refuses_a_restore_node_outside_the_postgres_group(tmp_path: Path) -> None:
    """restore.yml checks its input on the controller before it stops anything on any host (the
    hosts here do not even exist: nothing could be touched)."""
    inventory = tmp_path / "inventory.yml"
    inventory.write_text("all:\n  hosts:\n    a: {ansible_host: 192.0.2.1}\n  children:\n"
                         "    postgres: {hosts: {a: {}}}\n    plc: {hosts: {a: {}}}\n")  # fmt: skip
    proc = subprocess.run([str(TOOLS / "ansible-playbook"), "-i", str(inventory), str(ANSIBLE / "restore.yml"),
                           "-e", "restore_node=b"], cwd=REPO, env={**tool_env(), "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert "restore_node must name a host of the postgres group" in proc.stdout + proc.stderr
    assert "Stop the mirror" not in proc.stdout  # it stopped before the first play on the hosts


# ------------------------------------------------------------------------------ lint


@pytest.mark.slow
@needs_tools
def test_ansible_lint_production_profile(tmp_path: Path) -> None:
    proc = subprocess.run([str(TOOLS / "ansible-lint"), "--offline", "--profile", "production", "--nocolor"],
                          cwd=ANSIBLE, env={**tool_env(), "HOME": str(tmp_path)}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    assert "Passed" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ end to end


class Upstream:
    """tests/fake_upstream.py's FakeUpstream (a small valid corpus) served by uvicorn in a thread
    on CONTROLLER:<port>. The address exists only once hosts-up has run, so the socket is bound
    with IP_FREEBIND."""

    def __init__(self) -> None:
        from cluster_fixtures import corpus_lines
        from fake_upstream import FakeUpstream, record_from_line

        self.fake = FakeUpstream([record_from_line(line) for line in corpus_lines()])
        self.dids = sorted({r.did for r in self.fake.records})
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND
        self.sock.bind((CONTROLLER, 0))
        self.url = f"http://{CONTROLLER}:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(self.fake.app, log_level="critical", lifespan="off", ws="websockets-sansio",
                                ws_ping_interval=None, timeout_graceful_shutdown=1)  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
                                       name="ansible-upstream", daemon=True)  # fmt: skip

    def __enter__(self) -> Upstream:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the fake upstream did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def write_inventory(path: Path) -> None:
    """The layout module's inventory format (what terraform/local writes), for runs without terraform."""
    hosts = {**NODES, BALANCER[0]: BALANCER[1]}
    lines = ["all:", "  vars:", '    ansible_python_interpreter: "/usr/bin/python3"',
             f'    private_network_cidr: "{SUBNET}"', "  hosts:"]  # fmt: skip
    for name, ip in hosts.items():
        lines += [f"    {name}:", f'      ansible_host: "{ip}"', f'      private_ip: "{ip}"']
    lines.append("  children:")
    for group in ("etcd", "postgres", "plc"):
        lines += [f"    {group}:", "      hosts:"] + [f"        {n}:" for n in NODES]
    lines += ["    balancers:", "      hosts:", f"        {BALANCER[0]}:"]
    path.write_text("\n".join(lines) + "\n")


def write_test_vars(inventory_dir: Path, upstream: str, source: Path) -> None:
    """The test's own vars file: random secrets and where to build and fetch from."""
    import secrets

    gv = inventory_dir / "group_vars" / "all"
    gv.mkdir(parents=True, exist_ok=True)
    values = {
        "patroni_superuser_password": secrets.token_urlsafe(18),
        "patroni_replication_password": secrets.token_urlsafe(18),
        "patroni_rewind_password": secrets.token_urlsafe(18),
        "plc_db_password": secrets.token_urlsafe(18),
        "plc_upstream": upstream,
        "plc_source_dir": str(source),
        "plc_wheel_tar": str(inventory_dir / "plc-wheels.tar"),
        "plc_wheel_pip_args": ["--no-index", "--find-links", str(WHEELHOUSE)],
        # The fake upstream's corpus does not grow: its newest op ages with the test. /-/ready's
        # lag bound (300 s by default) would turn every ingester unready after five minutes.
        "plc_ready_max_lag": 3600,
    }
    path = gv / "testhosts-secrets.yml"
    path.write_text(json.dumps(values, indent=1) + "\n")
    path.chmod(0o600)


def snapshot_source(dest: Path) -> Path:
    """A copy of the package source, so edits others make to the checkout during the test do not
    change the wheel between the first and the second run."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "plc", dest / "plc", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def host_pids() -> dict[int, str]:
    """pid -> /proc/<pid>/stat start time of every process in a test host's network namespace."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    pids: dict[int, str] = {}
    for line in out.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith("plct-"):
            for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
                try:
                    pids[int(p)] = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[19]
                except (OSError, IndexError):
                    pass
    return pids


def still_alive(pids: dict[int, str]) -> list[int]:
    """The processes of ``pids`` (same start time) that still run (a zombie has ended)."""
    left = []
    for pid, start in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if fields[19] == start and fields[0] != "Z":
                left.append(pid)
        except (OSError, IndexError):
            pass
    return left


def ssh(ip: str, key: Path, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                           "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", f"root@{ip}", command],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def check_cluster(upstream: Upstream) -> None:
    members = httpx.get(f"http://{NODES['plc-node-1']}:8008/cluster", timeout=5).json()["members"]
    assert sorted(m["name"] for m in members) == sorted(NODES)
    assert [m["state"] for m in members if m["role"] == "leader"] == ["running"]
    assert sum(m["state"] == "streaming" for m in members) == 2
    assert any(m["role"] == "sync_standby" for m in members)
    base = f"http://{BALANCER[1]}:2582"
    assert httpx.get(f"{base}/_health", timeout=5).status_code == 200
    deadline = time.monotonic() + 60  # the mirrors ingest the corpus in a second or two
    while True:
        ready = httpx.get(f"{base}/-/ready", timeout=5)
        doc = httpx.get(f"{base}/{upstream.dids[-1]}", timeout=5)
        if ready.status_code == 200 and doc.status_code == 200:
            break
        assert time.monotonic() < deadline, f"/-/ready {ready.status_code} {ready.text}; DID {doc.status_code}"
        time.sleep(0.5)
    assert doc.json()["id"] == upstream.dids[-1]


# Reload a node's HAProxy, wait until the new worker answers on the admin socket, and count the
# UP servers of its two PostgreSQL backends at once: "<old pid> <new pid> <primary> <replicas>".
RELOAD_AND_COUNT = """set -eu
pid() { /usr/local/sbin/plc-haproxy-admin cmd "show info" 2>/dev/null | awk -F': ' '$1 == "Pid" {print $2}'; }
old=$(pid)
/usr/local/sbin/plc-service-plc-haproxy reload >/dev/null
for _ in $(seq 200); do new=$(pid || true); [ -n "$new" ] && [ "$new" != "$old" ] && break; sleep 0.05; done
echo "$old $new $(/usr/local/sbin/plc-haproxy-admin count-up postgres_primary) $(/usr/local/sbin/plc-haproxy-admin count-up postgres_replicas)"
"""


def check_backups(key: Path) -> None:
    members = httpx.get(f"http://{NODES['plc-node-1']}:8008/cluster", timeout=5).json()["members"]
    leader = next(m["name"] for m in members if m["role"] == "leader")
    replica = next(m["name"] for m in members if m["role"] != "leader")
    skipped = ssh(NODES[replica], key, "plc-backup full")
    assert skipped.returncode == 0 and "is not the Patroni primary" in skipped.stdout, skipped.stdout + skipped.stderr
    taken = ssh(NODES[leader], key, "plc-backup full", timeout=300)
    assert taken.returncode == 0, taken.stdout + taken.stderr
    bad = ssh(NODES[leader], key, "plc-backup weekly")
    assert bad.returncode == 2 and "usage:" in bad.stderr
    # every node sees the one repository: the backup just taken, and WAL archived by the leader
    for ip in NODES.values():
        info = ssh(ip, key, "runuser -u postgres -- pgbackrest --stanza=plc --output=json info")
        assert info.returncode == 0, info.stderr
        (stanza,) = json.loads(info.stdout)
        assert stanza["status"]["code"] == 0, stanza["status"]
        assert [b["type"] for b in stanza["backup"]] == ["full"]
        assert stanza["archive"][0]["max"] >= stanza["backup"][0]["archive"]["stop"]


class Reader:
    """Reads one DID document through the balancer in a loop; counts answers that are not 200."""

    def __init__(self, url: str) -> None:
        self.url, self.ok, self.failed, self.stop = url, 0, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                try:
                    r = client.get(self.url)
                    if r.status_code == 200:
                        self.ok += 1
                    else:
                        self.failed.append(f"{r.status_code} {r.text[:100]}")
                except httpx.HTTPError as exc:
                    self.failed.append(repr(exc))
                time.sleep(0.02)


def playbook_under_reads(url: str, min_ok: int, argv: list[str], env: dict[str, str], log: Path,
                         timeout: float = 600) -> subprocess.CompletedProcess:  # fmt: skip
    """Run ``argv`` (a playbook) while a Reader reads ``url`` through the balancer; it must succeed
    with more than ``min_ok`` reads and not one failed read."""
    reader = Reader(url)
    reader.thread.start()
    try:
        proc = run(argv, env, log, timeout=timeout)
    finally:
        reader.stop.set()
        reader.thread.join(15)
    assert proc.returncode == 0, explain(proc, 120)
    assert reader.failed == [] and reader.ok > min_ok, (reader.ok, reader.failed[:5])
    return proc


def assert_changed_nothing(proc: subprocess.CompletedProcess, hosts: set[str]) -> None:
    """A playbook run that succeeded on exactly ``hosts`` and changed nothing on any of them."""
    assert proc.returncode == 0, explain(proc, 120)
    counts = recap(proc.stdout)
    assert set(counts) == hosts
    assert all(c["changed"] == 0 and c["failed"] == 0 for c in counts.values()), changed_tasks(proc.stdout)


def add_host_to_inventory(path: Path, name: str, ip: str, groups: tuple[str, ...]) -> None:
    """Add a host with new_node: true to an inventory in the layout module's format (what
    terraform/local and write_inventory write): under all.hosts and in ``groups``."""
    text = path.read_text()
    block = f'    {name}:\n      ansible_host: "{ip}"\n      private_ip: "{ip}"\n      new_node: true\n'
    text, n = re.subn(r"(?m)^  children:\n", lambda m: block + m.group(0), text, count=1)  # after the last host
    assert n == 1, text
    for group in groups:
        text, n = re.subn(rf"(?m)^    {group}:\n      hosts:\n(?:        \S.*\n)*", lambda m: m.group(0) + f"        {name}:\n",
                          text)  # fmt: skip
        assert n == 1, (group, text)
    path.write_text(text)


def patroni_members() -> list[dict]:
    return httpx.get(f"http://{NODES['plc-node-1']}:8008/cluster", timeout=5).json()["members"]


def etcd_members() -> list[str]:
    """The names of the etcd members (an added member that has not started yet has none: '')."""
    r = httpx.post(f"http://{NODES['plc-node-1']}:2379/v3/cluster/member/list", content=b"{}", timeout=5)
    return sorted(m.get("name", "") for m in r.json()["members"])


def psql_on(ip: str, key: Path, sql: str) -> str:
    """One value from the plc database on a PostgreSQL test host, as its postgres OS user."""
    r = ssh(ip, key, f"runuser -u postgres -- psql -h /var/lib/postgresql/plc-sock -d plc -XAtc {shlex.quote(sql)}")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def restore_point_in_time(inventory: Path, env: dict[str, str], logs: Path, key: Path, upstream: Upstream) -> None:
    """An operator error (every op deleted on the primary) undone by restore.yml to the moment
    before it: the whole cluster comes back with every op, a new timeline, replicas and mirrors."""
    members = patroni_members()
    leader_ip = NODES[next(m["name"] for m in members if m["role"] == "leader")]
    ops = int(psql_on(leader_ip, key, "select count(*) from plc_op"))
    assert ops == len(upstream.fake.records)
    target = psql_on(leader_ip, key, "select now()::text")
    time.sleep(1)
    psql_on(leader_ip, key, "delete from plc_op")
    assert psql_on(leader_ip, key, "select count(*) from plc_op") == "0"
    check = ssh(leader_ip, key, "runuser -u postgres -- pgbackrest --stanza=plc check", timeout=120)  # archive past the target
    assert check.returncode == 0, check.stderr
    timeline = max(m["timeline"] for m in members)
    restore = run(["ansible-playbook", "-i", str(inventory), str(ANSIBLE / "restore.yml"),
                   "-e", json.dumps({"restore_target_time": target})], env, logs / "restore.log", timeout=900)  # fmt: skip
    assert restore.returncode == 0, explain(restore, 120)
    members = patroni_members()
    leader = next(m for m in members if m["role"] == "leader")
    assert leader["name"] == "plc-node-1" and leader["timeline"] > timeline, members
    assert sum(m["state"] == "streaming" for m in members) == len(NODES) - 1, members
    assert psql_on(NODES["plc-node-1"], key, "select count(*) from plc_op") == str(ops)
    check_cluster(upstream)


def haproxy_servers(ip: str, key: Path, proxy: str) -> dict[str, dict[str, str]]:
    """The servers of one proxy on a host's HAProxy (its admin socket's `show stat`): name -> row."""
    out = ssh(ip, key, "/usr/local/sbin/plc-haproxy-admin cmd 'show stat'")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    head = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(head, line.split(","))) for line in lines[1:] if line]
    return {r["svname"]: r for r in rows if r["pxname"] == proxy and r["svname"] not in ("FRONTEND", "BACKEND")}


@pytest.mark.slow
@pytest.mark.timeout(1800)
@needs_tools
def test_deploy_to_namespace_hosts(tmp_path: Path) -> None:
    env = tool_env()
    inv_dir = tmp_path / "inv"
    inv_dir.mkdir()
    inventory = inv_dir / "inventory.yml"
    source = snapshot_source(tmp_path / "src")
    logs = tmp_path / "logs"
    logs.mkdir()
    use_terraform = TERRAFORM is not None
    tf_data, tf_state = tmp_path / "tf-data", tmp_path / "terraform.tfstate"
    tf_vars = ["-var", f"inventory_path={inventory}"]
    tf_dir = REPO / "terraform" / "local"
    if use_terraform:
        (tmp_path / "terraformrc").write_text("# empty\n")
        env.update(TF_DATA_DIR=str(tf_data), TF_CLI_CONFIG_FILE=str(tmp_path / "terraformrc"))
    key = inv_dir / "testhosts" / "id_ed25519"
    pids: dict[int, str] = {}
    with Upstream() as upstream:
        write_test_vars(inv_dir, upstream.url, source)
        try:
            # -- bootstrap: hosts up + the playbook
            if use_terraform:
                init = run([TERRAFORM, f"-chdir={tf_dir}", "init", "-input=false"], env, logs / "tf-init.log")
                assert init.returncode == 0, explain(init)
                apply = run([TERRAFORM, f"-chdir={tf_dir}", "apply", "-auto-approve", "-input=false",
                             f"-state={tf_state}", *tf_vars], env, logs / "tf-apply.log", timeout=900)  # fmt: skip
                assert apply.returncode == 0, explain(apply, 120)
                first = apply.stdout
            else:
                write_inventory(inventory)
                up = run([str(ANSIBLE / "scripts" / "hosts-up"), str(inventory)], env, logs / "hosts-up.log")
                assert up.returncode == 0, explain(up)
                play = run(["ansible-playbook", "-i", str(inventory), str(ANSIBLE / "site.yml")], env,
                           logs / "run1.log", timeout=900)  # fmt: skip
                assert play.returncode == 0, explain(play, 120)
                first = play.stdout
            assert all(r["failed"] == 0 and r["unreachable"] == 0 for r in recap(first).values()), first[-3000:]
            pids = host_pids()
            assert len(pids) > 20  # sshd, etcd, Patroni + PostgreSQL, HAProxy, plc serve on every host

            # -- the cluster is healthy; the mirrors ingest and answer through the balancer
            check_cluster(upstream)

            # -- backups: the stanza exists and WAL reaches the shared repository; plc-backup
            # backs up on the primary only
            check_backups(key)

            # -- a second run changes nothing
            second = run(["ansible-playbook", "-i", str(inventory), str(ANSIBLE / "site.yml"), "--diff"], env,
                         logs / "run2.log")  # fmt: skip
            assert_changed_nothing(second, {*NODES, BALANCER[0]})

            # -- --check runs through and would change nothing either
            check = run(["ansible-playbook", "-i", str(inventory), str(ANSIBLE / "site.yml"), "--check", "--diff"],
                        env, logs / "check.log")  # fmt: skip
            assert check.returncode == 0, explain(check, 120)
            assert all(c["changed"] == 0 and c["failed"] == 0 for c in recap(check.stdout).values()), \
                changed_tasks(check.stdout)  # fmt: skip

            # -- a reload keeps the servers' states: the new HAProxy process does not start every
            # server UP (it would send writes to replicas until its checks caught up)
            reload = ssh(NODES["plc-node-1"], key, RELOAD_AND_COUNT)
            old_pid, new_pid, primary_up, replicas_up = reload.stdout.split()
            assert reload.returncode == 0 and old_pid != new_pid, reload.stdout + reload.stderr
            assert (primary_up, replicas_up) == ("1", str(len(NODES) - 1)), reload.stdout

            # -- the systemd units the roles write pass systemd-analyze verify (on a provisioned node)
            verify = ssh(NODES["plc-node-1"], key, "command -v systemd-analyze >/dev/null || exit 77; "
                         "ls /etc/systemd/system/plc-*.service /etc/systemd/system/plc-*.timer && "
                         "systemd-analyze verify /etc/systemd/system/plc-*.service /etc/systemd/system/plc-*.timer")  # fmt: skip
            if verify.returncode != 77:
                assert verify.returncode == 0, verify.stdout + verify.stderr
                # etcd, Patroni, HAProxy, the mirror, and the full and differential backups
                assert verify.stdout.count(".service") == 6 and verify.stdout.count(".timer") == 2, verify.stdout

            # -- rolling upgrade of the mirrors: every read through the balancer keeps working
            before = {n: ssh(ip, key, "cat /run/plc/plc-mirror.pid").stdout.strip() for n, ip in NODES.items()}
            read_url = f"http://{BALANCER[1]}:2582/{upstream.dids[-1]}"  # check_cluster read it: 200
            playbook_under_reads(read_url, 50, ["ansible-playbook", "-i", str(inventory),
                                                str(ANSIBLE / "rolling_upgrade.yml")], env, logs / "upgrade.log")  # fmt: skip
            after = {n: ssh(ip, key, "cat /run/plc/plc-mirror.pid").stdout.strip() for n, ip in NODES.items()}
            assert all(before[n] and after[n] and before[n] != after[n] for n in NODES), (before, after)
            check_cluster(upstream)

            # -- day 2: add a fourth node (etcd + PostgreSQL/Patroni + mirror) under reads.
            # Day-2 adds go through add_node.yml, not through terraform/local (an apply there would
            # run site.yml): the test adds the host to the inventory file itself, in the layout
            # format terraform/local writes, and brings only that host up (testhosts.py add).
            new_name, new_ip = NEW_NODE
            three_nodes = inventory.read_text()
            add_host_to_inventory(inventory, new_name, new_ip, ("etcd", "postgres", "plc"))
            etcd_pids = {n: ssh(ip, key, "cat /run/plc/plc-etcd.pid").stdout.strip() for n, ip in NODES.items()}
            hosts_add = run([str(ANSIBLE / "scripts" / "testhosts.py"), "add", str(inventory)], env,
                            logs / "hosts-add.log")  # fmt: skip
            assert hosts_add.returncode == 0, explain(hosts_add)
            assert f"test hosts added: {new_name} ({new_ip})" in hosts_add.stdout, hosts_add.stdout
            pids.update(host_pids())
            playbook_under_reads(read_url, 50, ["ansible-playbook", "-i", str(inventory), str(ANSIBLE / "add_node.yml")],
                                 env, logs / "add-node.log", timeout=900)  # fmt: skip
            pids.update(host_pids())
            members = patroni_members()
            assert sorted(m["name"] for m in members) == sorted([*NODES, new_name]), members
            assert [m["state"] for m in members if m["role"] == "leader"] == ["running"], members
            assert sum(m["state"] == "streaming" for m in members) == 3, members
            assert etcd_members() == sorted([*NODES, new_name])
            # the old etcd members kept running (a join changes nothing on them)
            assert {n: ssh(ip, key, "cat /run/plc/plc-etcd.pid").stdout.strip() for n, ip in NODES.items()} == etcd_pids
            # the balancer routes to the new mirror, and it answers a DID through it
            servers = until("the new mirror UP on the balancer", lambda: (
                s := haproxy_servers(BALANCER[1], key, "mirror")).get(new_name, {}).get("status") == "UP" and s)
            assert sorted(servers) == sorted([*NODES, new_name]) and {r["status"] for r in servers.values()} == {"UP"}
            served_before = int(servers[new_name]["stot"])
            did = upstream.dids[-1]  # check_cluster read it through the balancer: 200
            for _ in range(3 * len(servers)):  # round robin: every server gets some
                doc = httpx.get(f"http://{BALANCER[1]}:2582/{did}", timeout=10)
                assert doc.status_code == 200 and doc.json()["id"] == did, doc.text
            assert int(haproxy_servers(BALANCER[1], key, "mirror")[new_name]["stot"]) > served_before
            direct = httpx.get(f"http://{new_ip}:2582/{did}", timeout=10)
            assert direct.status_code == 200 and direct.json()["id"] == did, direct.text
            # every old node's HAProxy has the new PostgreSQL and mirror backends
            for name, ip in NODES.items():
                cfg = ssh(ip, key, "cat /etc/plc/haproxy.cfg").stdout
                assert f"server {new_name} {new_ip}:2582 check\n" in cfg, (name, cfg)
                assert cfg.count(f"server {new_name} {new_ip}:5432 check port 8008\n") == 2, (name, cfg)

            # -- day 2: remove it again under reads
            playbook_under_reads(read_url, 20, ["ansible-playbook", "-i", str(inventory), str(ANSIBLE / "remove_node.yml"),
                                                "-e", f"remove_node={new_name}"], env, logs / "remove-node.log")  # fmt: skip
            # Patroni drops the stopped member's key by itself (at the latest after ttl)
            members = until("3 Patroni members", lambda: (m := patroni_members()) and len(m) == 3 and m)
            assert sorted(m["name"] for m in members) == sorted(NODES), members
            assert sum(m["state"] == "streaming" for m in members) == 2, members
            assert etcd_members() == sorted(NODES)
            assert sorted(haproxy_servers(BALANCER[1], key, "mirror")) == sorted(NODES)
            for ip in (*NODES.values(), BALANCER[1]):
                assert new_name not in ssh(ip, key, "cat /etc/plc/haproxy.cfg").stdout, ip
            # nothing of the cluster runs on the removed node any more (the host itself still does,
            # until the teardown below, which must take it down with the others)
            status = ssh(new_ip, key, "for s in plc-mirror plc-patroni plc-etcd plc-haproxy; do "
                         "/usr/local/sbin/plc-service-$s status; done")  # fmt: skip
            assert status.stdout.count("not running") == 4, status.stdout + status.stderr

            # -- the host leaves the inventory: site.yml on the three nodes changes nothing
            inventory.write_text(three_nodes)
            final = run(["ansible-playbook", "-i", str(inventory), str(ANSIBLE / "site.yml"), "--diff"], env,
                        logs / "run-after-remove.log")  # fmt: skip
            assert_changed_nothing(final, {*NODES, BALANCER[0]})
            check_cluster(upstream)
            assert f"plct-{new_name}" in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout

            # -- disaster recovery: restore.yml undoes an operator error (point in time)
            restore_point_in_time(inventory, env, logs, key, upstream)
        finally:
            pids.update(host_pids())
            # -- tear down: terraform destroy (runs hosts-down), or hosts-down itself
            if use_terraform and tf_state.exists():
                destroy = run([TERRAFORM, f"-chdir={tf_dir}", "destroy", "-auto-approve", "-input=false",
                               f"-state={tf_state}", *tf_vars], env, logs / "tf-destroy.log")  # fmt: skip
            else:
                destroy = run([str(ANSIBLE / "scripts" / "hosts-down"), str(inventory)], env, logs / "hosts-down.log")
            again = run([str(ANSIBLE / "scripts" / "hosts-down"), str(inventory)], env, logs / "hosts-down-2.log")
    assert destroy.returncode == 0, explain(destroy)
    assert again.returncode == 0 and "nothing was up" in again.stdout, explain(again)
    # -- nothing is left: no namespace, no veth, no process of any host
    assert "plct-" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", "plct-ctl"], capture_output=True).returncode != 0
    assert pids and still_alive(pids) == []
    assert not (inv_dir / "testhosts").exists()
    assert not list(tf_dir.glob("*.tfstate*")) and not (tf_dir / ".terraform").exists()
