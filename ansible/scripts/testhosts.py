#!/usr/bin/python3
"""Test hosts for the Ansible roles: one "machine" per inventory host, on this machine.

Each host gets
- its own network namespace (``plct-<host>``) with the inventory address on ``eth0``, a veth
  into a bridge that lives in a "switch" namespace (``plct-sw``); the controller (this, the root
  namespace) joins the bridge with the subnet's first address (10.77.0.1 for 10.77.0.0/24), so
  Ansible and the test reach the hosts, and the hosts reach services the test starts on that address;
- its own filesystem view: a mount namespace in which an overlay of the root filesystem (upper
  and work directories on a tmpfs private to that namespace) is the host's ``/``, with its own
  /proc, /sys, /run, /tmp and /dev/shm. Installing on one host touches neither the real root nor
  the other hosts, and everything a host wrote is gone when its last process exits. One
  directory is shared: <state dir>/shared is mounted at /srv/plc-shared on every host, as one NFS
  share would be on cloud servers (the tests put the pgBackRest repository there);
- its own PID and UTS namespaces (the host name is the inventory name). The first process of
  the PID namespace is a small init (this file, ``_init``) that reaps orphans and runs sshd;
  killing it makes the kernel kill every process of the host;
- sshd on port 22 of its address, key authentication only, with a key generated here.

Usage (also ``ansible/scripts/hosts-up`` / ``hosts-down``):

    testhosts.py up INVENTORY      create the hosts named in INVENTORY (YAML, the layout module's
                                   format: all.hosts.<name>.ansible_host or private_ip) and write
                                   <inventory dir>/group_vars/all/testhosts.yml (how to connect);
                                   a host set that already runs is taken down first
    testhosts.py add INVENTORY     create the hosts of INVENTORY that are not up yet, next to a
                                   host set that runs (``up`` made it for this inventory's
                                   directory); running hosts are left untouched, and every
                                   host's /etc/hosts then lists them all. For day-2 tests:
                                   add a host to the inventory, ``add``, run add_node.yml
    testhosts.py remove INVENTORY HOST...
                                   take those hosts down (every process, the namespace, the
                                   state), leave the others running; idempotent
    testhosts.py down [INVENTORY]  stop every process of every test host, delete the namespaces,
                                   the controller's veth and the generated files; idempotent,
                                   and complete after a failed or interrupted ``up``/``add`` too

State (keys, sshd configs, logs) lives in $PLC_TESTHOSTS_DIR, default <inventory dir>/testhosts.
Needs root, iproute2, util-linux (unshare), openssh-server (scripts/setup --test installs it).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "plct-"
SWITCH = PREFIX + "sw"
CTL_VETH = PREFIX + "ctl"  # the controller's end, in the root namespace
UP_TIMEOUT = 30.0
VARS_NAME = "testhosts.yml"
SECRETS_NAME = "testhosts-secrets.yml"
SHARED_MOUNT = "/srv/plc-shared"  # the same controller directory on every host (<state dir>/shared)


class HostsError(RuntimeError):
    pass


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise HostsError(f"{' '.join(argv)}: exit {r.returncode}: {(r.stderr or r.stdout).strip()}")
    return r


# ---------------------------------------------------------------------------- inventory


def read_inventory(path: Path) -> tuple[dict[str, str], str]:
    """(host name -> address, subnet CIDR) from a YAML inventory."""
    import yaml  # Debian's python3-yaml: this runs on /usr/bin/python3

    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise HostsError(f"cannot read the inventory {path}: {exc}") from None
    top = doc.get("all", {}) or {}
    hosts: dict[str, str] = {}

    def walk(group: dict) -> None:
        for name, hv in (group.get("hosts") or {}).items():
            hv = hv or {}
            addr = hv.get("ansible_host") or hv.get("private_ip")
            if addr:
                hosts[name] = str(addr)
            else:
                hosts.setdefault(name, "")
        for child in (group.get("children") or {}).values():
            walk(child or {})

    walk(top)
    missing = [n for n, a in hosts.items() if not a]
    if missing:
        raise HostsError(f"inventory hosts without ansible_host or private_ip: {', '.join(missing)}")
    if not hosts:
        raise HostsError(f"the inventory {path} names no hosts")
    cidr = (top.get("vars") or {}).get("private_network_cidr")
    if not cidr:
        first = ipaddress.ip_address(next(iter(hosts.values())))
        cidr = str(ipaddress.ip_network(f"{first}/24", strict=False))
    net = ipaddress.ip_network(cidr)
    for name, addr in hosts.items():
        if ipaddress.ip_address(addr) not in net:
            raise HostsError(f"{name}: {addr} is not in {net}")
    if len(set(hosts.values())) != len(hosts):
        raise HostsError("two inventory hosts have the same address")
    return hosts, str(net)


def state_dir(inventory: Path | None) -> Path:
    env = os.environ.get("PLC_TESTHOSTS_DIR")
    if env:
        return Path(env).resolve()
    if inventory is None:
        raise HostsError("give the inventory path or set PLC_TESTHOSTS_DIR")
    return inventory.resolve().parent / "testhosts"


# ---------------------------------------------------------------------------- the host's init


def host_init(name: str, addr: str, hdir: str, all_hosts_json: str) -> None:
    """PID 1 of one host (runs inside its network, mount, PID and UTS namespaces)."""
    h = Path(hdir)
    fs = h / "fs"
    fs.mkdir(exist_ok=True)

    def mount(*args: str) -> None:
        sh("mount", *args)

    mount("-t", "tmpfs", "-o", "mode=0755", "plct-layers", str(fs))
    for d in ("upper", "work", "root"):
        (fs / d).mkdir()
    root = fs / "root"
    mount("-t", "overlay", "plct-root", "-o", f"lowerdir=/,upperdir={fs}/upper,workdir={fs}/work", str(root))
    mount("-t", "proc", "proc", str(root / "proc"))
    mount("-t", "sysfs", "sysfs", str(root / "sys"))
    mount("--rbind", "/dev", str(root / "dev"))
    mount("-t", "tmpfs", "-o", "mode=1777", "shm", str(root / "dev" / "shm"))
    mount("-t", "tmpfs", "-o", "mode=0755", "run", str(root / "run"))
    mount("-t", "tmpfs", "-o", "mode=1777", "tmp", str(root / "tmp"))
    # One directory of the controller that every host mounts at SHARED_MOUNT, as cloud servers
    # would mount one NFS share: the tests keep the pgBackRest repository there.
    shared = h.parent / "shared"
    shared.mkdir(mode=0o755, exist_ok=True)
    (root / SHARED_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)
    mount("--bind", str(shared), str(root / SHARED_MOUNT.lstrip("/")))
    (root / "run" / "sshd").mkdir(mode=0o755)
    ssh = root / "etc" / "ssh"
    ssh.mkdir(parents=True, exist_ok=True)
    shutil.copy(h / "ssh_host_ed25519_key", ssh / "plct_host_ed25519_key")
    os.chmod(ssh / "plct_host_ed25519_key", 0o600)
    shutil.copy(h / "authorized_keys", ssh / "plct_authorized_keys")
    (ssh / "plct_sshd_config").write_text(
        f"ListenAddress {addr}\nPort 22\nHostKey /etc/ssh/plct_host_ed25519_key\n"
        "AuthorizedKeysFile /etc/ssh/plct_authorized_keys\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "PidFile /run/sshd.pid\nSubsystem sftp /usr/lib/openssh/sftp-server\nMaxStartups 50\n"
        "MaxSessions 50\nLogLevel ERROR\n"
    )
    socket.sethostname(name)
    (root / "etc" / "hostname").write_text(name + "\n")
    others = json.loads(all_hosts_json)
    (root / "etc" / "hosts").write_text(
        "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in others.items())
    )
    os.chroot(root)
    os.chdir("/")
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", "/etc/ssh/plct_sshd_config"])
    signal.signal(signal.SIGTERM, lambda *_: sshd.terminate())
    while True:  # reap every orphan of this host; stop (taking the host down) when sshd ends
        try:
            pid, _ = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == sshd.pid:
            break


# ---------------------------------------------------------------------------- up / add / remove / down


def namespaces() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].startswith(PREFIX)]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill_namespaces(nss: list[str]) -> None:
    """Kill every process in the network namespaces ``nss`` and wait until they are gone."""
    deadline = time.monotonic() + 20
    seen: set[int] = set()
    while True:
        pids = []
        for ns in nss:
            pids += [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()]
        seen.update(pids)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise HostsError(f"processes of the test hosts do not exit: {pids}")
        time.sleep(0.1)
    # A killed process leaves the namespace before its parent has reaped it: wait until every
    # one is gone (or a zombie only), so that nothing of the hosts is left when this returns.
    while any(_alive(pid) for pid in seen) and time.monotonic() < deadline:
        time.sleep(0.05)


def down(inventory: Path | None) -> list[str]:
    """Stop everything of every test host; returns what was removed. Idempotent."""
    removed: list[str] = []
    nss = namespaces()
    # Kill every process in every host namespace (the init's death takes its PID namespace with it).
    _kill_namespaces(nss)
    for ns in nss:
        sh("ip", "netns", "del", ns, check=False)
        removed.append(f"netns {ns}")
    if sh("ip", "link", "show", CTL_VETH, check=False).returncode == 0:
        sh("ip", "link", "del", CTL_VETH, check=False)
        removed.append(f"link {CTL_VETH}")
    if inventory is not None or os.environ.get("PLC_TESTHOSTS_DIR"):
        sd = state_dir(inventory)
        if sd.is_dir():
            shutil.rmtree(sd, ignore_errors=True)
            removed.append(str(sd))
        if inventory is not None:
            gv = inventory.resolve().parent / "group_vars" / "all" / VARS_NAME
            if gv.exists():
                gv.unlink()
                removed.append(str(gv))
    return removed


def remove(inventory: Path, names: list[str]) -> list[str]:
    """Take the hosts ``names`` down (processes, namespace, state); the others keep running."""
    if os.geteuid() != 0:
        raise HostsError("removing test hosts needs root")
    removed: list[str] = []
    nss = [PREFIX + n for n in names if PREFIX + n in namespaces()]
    _kill_namespaces(nss)
    for ns in nss:
        sh("ip", "netns", "del", ns, check=False)  # takes eth0 and so its veth peer in the switch along
        removed.append(f"netns {ns}")
    sd = state_dir(inventory)
    for name in names:
        if name not in ("", ".", "..") and "/" not in name and (sd / name).is_dir():
            shutil.rmtree(sd / name, ignore_errors=True)
            removed.append(str(sd / name))
    return removed


def _wait_ssh(addr: str, deadline: float, procs: dict[str, subprocess.Popen], name: str, log: Path) -> None:
    while True:
        try:
            with socket.create_connection((addr, 22), timeout=0.5) as s:
                if s.recv(4).startswith(b"SSH"):
                    return
        except OSError:
            pass
        if procs[name].poll() is not None:
            raise HostsError(f"host {name} exited while starting; its log ({log}):\n" + log.read_text()[-2000:])
        if time.monotonic() > deadline:
            raise HostsError(f"sshd on {name} ({addr}) did not answer within {UP_TIMEOUT:g} s")
        time.sleep(0.1)


def _check_tools() -> None:
    if os.geteuid() != 0:
        raise HostsError("hosts-up needs root (network and mount namespaces)")
    for prog in ("ip", "unshare", "ssh-keygen", "/usr/sbin/sshd"):
        if not shutil.which(prog):
            raise HostsError(f"{prog} is missing (scripts/setup --test installs openssh-server)")


def _free_veths(count: int) -> list[str]:
    """``count`` names plct-v<i> not taken in the switch namespace (a veth per host lives there)."""
    taken = set(re.findall(r"^\d+: ([^:@]+)", sh("ip", "-n", SWITCH, "-o", "link", "show").stdout, re.M))
    names, i = [], 1
    while len(names) < count:
        if f"{PREFIX}v{i}" not in taken:
            names.append(f"{PREFIX}v{i}")
        i += 1
    return names


def _start_hosts(sd: Path, new: dict[str, str], net: ipaddress.IPv4Network | ipaddress.IPv6Network, ctl_addr: str,
                 all_hosts: dict[str, str]) -> None:
    """Create the hosts ``new`` (name -> address) on the running switch; wait until sshd answers."""
    key = sd / "id_ed25519"
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    for (name, addr), veth in zip(new.items(), _free_veths(len(new))):
        ns = PREFIX + name
        hdir = sd / name
        if hdir.exists():
            shutil.rmtree(hdir)
        hdir.mkdir(mode=0o700)
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(hdir / "ssh_host_ed25519_key"))
        shutil.copy(key.with_suffix(".pub"), hdir / "authorized_keys")
        sh("ip", "netns", "add", ns)
        # The MAC address follows from the IP address: a host taken down and added again keeps it,
        # so the neighbour caches of the controller and the other hosts stay right.
        mac = "02:00:" + ":".join(f"{b:02x}" for b in ipaddress.ip_address(addr).packed[-4:])
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "address", mac, "netns", ns)
        sh("ip", "link", "set", veth, "netns", SWITCH)
        sh("ip", "-n", SWITCH, "link", "set", veth, "master", "br0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "addr", "add", f"{addr}/{net.prefixlen}", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", ctl_addr)
        logs[name] = hdir / "host.log"
        with open(logs[name], "ab") as out:
            procs[name] = subprocess.Popen(
                ["ip", "netns", "exec", ns, "unshare", "--mount", "--uts", "--pid", "--fork",
                 "--propagation", "private", sys.executable, os.path.abspath(__file__), "_init",
                 name, addr, str(hdir), json.dumps(all_hosts)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
    deadline = time.monotonic() + UP_TIMEOUT
    for name, addr in new.items():
        _wait_ssh(addr, deadline, procs, name, logs[name])


def _host_address(name: str) -> str:
    out = sh("ip", "-n", PREFIX + name, "-4", "-o", "addr", "show", "dev", "eth0", check=False).stdout
    m = re.search(r"inet ([0-9.]+)/", out)
    return m.group(1) if m else ""


def _host_root(name: str) -> Path | None:
    """/proc/<pid>/root of the host's init (PID 1 of its PID namespace): its filesystem as it sees it."""
    for p in sh("ip", "netns", "pids", PREFIX + name, check=False).stdout.split():
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        m = re.search(r"^NSpid:\s+(.*)$", status, re.M)
        if m and m.group(1).split()[-1] == "1":
            return Path(f"/proc/{p}/root")
    return None


def _layout(inventory: Path) -> tuple[dict[str, str], ipaddress.IPv4Network | ipaddress.IPv6Network, str]:
    """(hosts, subnet, the controller's address: the subnet's first) of ``inventory``."""
    _check_tools()
    hosts, cidr = read_inventory(inventory)
    net = ipaddress.ip_network(cidr)
    ctl_addr = str(next(net.hosts()))
    if ctl_addr in hosts.values():
        raise HostsError(f"{ctl_addr} (the subnet's first address) is the controller's; no host may use it")
    return hosts, net, ctl_addr


def up(inventory: Path) -> dict[str, str]:
    hosts, net, ctl_addr = _layout(inventory)
    down(None)  # a clean slate: no test host from an earlier run
    sd = state_dir(inventory)
    if sd.exists():
        shutil.rmtree(sd)
    sd.mkdir(parents=True, mode=0o700)
    key = sd / "id_ed25519"
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "plc-testhosts", "-f", str(key))

    sh("ip", "netns", "add", SWITCH)
    sh("ip", "-n", SWITCH, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", SWITCH, "link", "set", "br0", "up")
    sh("ip", "link", "add", CTL_VETH, "type", "veth", "peer", "name", "ctl", "netns", SWITCH)
    sh("ip", "-n", SWITCH, "link", "set", "ctl", "master", "br0", "up")
    sh("ip", "addr", "add", f"{ctl_addr}/{net.prefixlen}", "dev", CTL_VETH)
    sh("ip", "link", "set", CTL_VETH, "up")
    _start_hosts(sd, hosts, net, ctl_addr, hosts)

    gv = inventory.resolve().parent / "group_vars" / "all"
    gv.mkdir(parents=True, exist_ok=True)
    (gv / VARS_NAME).write_text(
        "# Written by ansible/scripts/hosts-up: how to reach the namespace test hosts. hosts-down deletes it.\n"
        + json.dumps({
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(key),
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                                       "-o LogLevel=ERROR -o ConnectTimeout=10",
            "ansible_pipelining": True,
            "plc_service_manager": "daemon",
            "plc_testhosts_controller_ip": ctl_addr,
            # pgBackRest's repository on the directory every host mounts (SHARED_MOUNT), as on
            # an NFS share; cloud deployments rather use an S3 bucket (docs/operations.md).
            "plc_backup_repo_type": "posix",
            "plc_backup_repo_path": f"{SHARED_MOUNT}/pgbackrest",
        }, indent=1) + "\n"
    )  # fmt: skip
    secrets_file = gv / SECRETS_NAME
    if not secrets_file.exists():
        # Test secrets for a hand-run `terraform apply`: random, never in the repository. A test
        # that brings its own (or an ansible-vault file) writes this file before hosts-up runs.
        fd = os.open(secrets_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# Generated by ansible/scripts/hosts-up for the test hosts (random).\n" + json.dumps({
                "patroni_superuser_password": secrets.token_urlsafe(18),
                "patroni_replication_password": secrets.token_urlsafe(18),
                "patroni_rewind_password": secrets.token_urlsafe(18),
                "plc_db_password": secrets.token_urlsafe(18),
            }, indent=1) + "\n")  # fmt: skip
    return hosts


def add(inventory: Path) -> dict[str, str]:
    """Create the hosts of ``inventory`` that are not up yet; returns them (name -> address)."""
    hosts, net, ctl_addr = _layout(inventory)
    sd = state_dir(inventory)
    nss = namespaces()
    if SWITCH not in nss or not (sd / "id_ed25519").is_file() or \
            not (inventory.resolve().parent / "group_vars" / "all" / VARS_NAME).is_file():  # fmt: skip
        raise HostsError(f"no test host set of this inventory runs (nothing in {sd}): use up")
    running = {ns[len(PREFIX):]: _host_address(ns[len(PREFIX):]) for ns in nss if ns != SWITCH}
    for name, addr in hosts.items():
        if name in running and running[name] != addr:
            raise HostsError(f"{name} runs with address {running[name] or 'none'}, the inventory says {addr}")
    new = {n: a for n, a in hosts.items() if n not in running}
    clash = [n for n, a in new.items() if a in running.values()]
    if clash:
        raise HostsError(f"the address of {', '.join(clash)} is taken by a running host")
    try:
        _start_hosts(sd, new, net, ctl_addr, hosts)
    except BaseException:
        remove(inventory, list(new))  # a failed add leaves the running hosts as they were, and no new one
        raise
    # Every running host of the inventory learns the new names (/etc/hosts of its own filesystem).
    etc_hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in hosts.items())
    for name in hosts:
        if name in running and (root := _host_root(name)) is not None:
            (root / "etc" / "hosts").write_text(etc_hosts)
    return new


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[1] == "_init":
        host_init(*argv[2:6])
        return 0
    cmd, nargs = (argv[1] if len(argv) > 1 else ""), len(argv) - 2
    if not ((cmd in ("up", "add") and nargs == 1) or (cmd == "down" and nargs <= 1) or (cmd == "remove" and nargs >= 2)):
        print(__doc__.split("Usage")[0].strip(), file=sys.stderr)
        print("usage: testhosts.py up INVENTORY | add INVENTORY | remove INVENTORY HOST... | down [INVENTORY]",
              file=sys.stderr)  # fmt: skip
        return 2
    inventory = Path(argv[2]) if len(argv) > 2 else None
    try:
        if cmd == "up":
            try:
                hosts = up(inventory)
            except BaseException:
                down(inventory)  # a failed up leaves nothing behind either
                raise
            print("test hosts up: " + ", ".join(f"{n} ({a})" for n, a in hosts.items()))
        elif cmd == "add":
            hosts = add(inventory)
            print("test hosts added: " + (", ".join(f"{n} ({a})" for n, a in hosts.items()) or "none (all were up)"))
        elif cmd == "remove":
            removed = remove(inventory, argv[3:])
            print("test hosts removed" + (": " + ", ".join(removed) if removed else ": none was up"))
        else:
            removed = down(inventory)
            print("test hosts down" + (": removed " + ", ".join(removed) if removed else ": nothing was up"))
    except HostsError as exc:
        print(f"{Path(argv[0]).name}: {exc}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv))
