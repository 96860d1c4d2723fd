"""The Ansible deployment (ansible/), applied for real to namespace test hosts.

The end-to-end test provisions three nodes (etcd + PostgreSQL/Patroni + HAProxy + plc mirror) and
one balancer (HAProxy) exactly as it would cloud servers: over SSH, as root, each host with its own
address (network namespace) and its own filesystem (an overlay of the root filesystem in a mount
namespace), made by ansible/scripts/hosts-up. When terraform is on PATH it goes through
terraform/local (apply = hosts-up + playbook, destroy = hosts-down); otherwise it calls the scripts
itself. Then: the cluster is healthy, the mirrors ingest a fake upstream (served on the test
network's controller address) and answer through the balancer, a second run and a --check run
change nothing, a rolling upgrade drops no read, the rendered systemd units pass
`systemd-analyze verify`, and after the destroy nothing of the hosts is left.

Needs root, /opt/plc-ansible (ansible-core + ansible-lint), /opt/plc-wheelhouse, /opt/plc-patroni,
openssh-server, etcd, haproxy, PostgreSQL: `scripts/setup --test` installs them all. Uses the fixed
subnet 10.77.0.0/24 and namespaces named plct-*, so it must not run twice at the same time.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
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
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)
HA_TEMPLATES = ("etcd.yml.j2", "patroni.yml.j2", "haproxy.cfg.j2")


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
        "etcd": "etcd.yml.j2",
        "postgres": "patroni.yml.j2",
        "haproxy": "haproxy.cfg.j2",
    }
    for role, template in uses.items():
        tasks = (ANSIBLE / "roles" / role / "tasks" / "main.yml").read_text()
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
    for argv in (["up"], ["sideways"], []):
        proc = subprocess.run([sys.executable, str(ANSIBLE / "scripts" / "testhosts.py"), *argv],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert proc.returncode == 2 and "usage:" in proc.stderr
    bad = tmp_path / "inventory.yml"
    bad.write_text("all:\n  hosts:\n    a: {}\n")
    proc = subprocess.run([str(ANSIBLE / "scripts" / "hosts-up"), str(bad)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "without ansible_host or private_ip: a" in proc.stderr or "needs root" in proc.stderr


def test_build_wheels_refuses_a_non_checkout(tmp_path: Path) -> None:
    proc = subprocess.run([str(ANSIBLE / "scripts" / "build-wheels"), sys.executable, str(tmp_path),
                           str(tmp_path / "w.tar")], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 1 and "is not a plc checkout" in proc.stderr


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
        sys.path.insert(0, str(REPO / "tests"))
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


@pytest.mark.slow
@pytest.mark.timeout(1200)
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

            # -- a second run changes nothing
            second = run(["ansible-playbook", "-i", str(inventory), str(ANSIBLE / "site.yml"), "--diff"], env,
                         logs / "run2.log")  # fmt: skip
            assert second.returncode == 0, explain(second, 120)
            counts = recap(second.stdout)
            assert set(counts) == {*NODES, BALANCER[0]}
            assert all(c["changed"] == 0 and c["failed"] == 0 for c in counts.values()), changed_tasks(second.stdout)

            # -- --check runs through and would change nothing either
            check = run(["ansible-playbook", "-i", str(inventory), str(ANSIBLE / "site.yml"), "--check", "--diff"],
                        env, logs / "check.log")  # fmt: skip
            assert check.returncode == 0, explain(check, 120)
            assert all(c["changed"] == 0 and c["failed"] == 0 for c in recap(check.stdout).values()), \
                changed_tasks(check.stdout)  # fmt: skip

            # -- the systemd units the roles write pass systemd-analyze verify (on a provisioned node)
            verify = ssh(NODES["plc-node-1"], key, "command -v systemd-analyze >/dev/null || exit 77; "
                         "ls /etc/systemd/system/plc-*.service && systemd-analyze verify /etc/systemd/system/plc-*.service")  # fmt: skip
            if verify.returncode != 77:
                assert verify.returncode == 0, verify.stdout + verify.stderr
                assert verify.stdout.count(".service") == 4, verify.stdout

            # -- rolling upgrade of the mirrors: every read through the balancer keeps working
            before = {n: ssh(ip, key, "cat /run/plc/plc-mirror.pid").stdout.strip() for n, ip in NODES.items()}
            reader = Reader(f"http://{BALANCER[1]}:2582/{upstream.dids[-1]}")  # check_cluster read it: 200
            reader.thread.start()
            try:
                upgrade = run(["ansible-playbook", "-i", str(inventory), str(ANSIBLE / "rolling_upgrade.yml")], env,
                              logs / "upgrade.log")  # fmt: skip
            finally:
                reader.stop.set()
                reader.thread.join(15)
            assert upgrade.returncode == 0, explain(upgrade, 120)
            after = {n: ssh(ip, key, "cat /run/plc/plc-mirror.pid").stdout.strip() for n, ip in NODES.items()}
            assert all(before[n] and after[n] and before[n] != after[n] for n in NODES), (before, after)
            assert reader.failed == [] and reader.ok > 50, (reader.ok, reader.failed[:5])
            check_cluster(upstream)
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
