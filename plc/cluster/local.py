"""A whole HA cluster on one machine, from the same templates as production (plc/cluster/render.py):
3 etcd members, 3 PostgreSQL nodes under Patroni, HAProxy, and 2-3 `plc serve` mirror nodes.

Addresses (all of 127.0.0.0/8 reaches `lo` on Linux, so every node keeps its production port):

    etcd        127.0.2.1-3:2379/2380
    PostgreSQL  127.0.1.1-3:5432, Patroni REST 127.0.1.1-3:8008
    HAProxy     127.0.3.1: 5432 primary, 5433 replicas, 2582 mirror HTTP, 7000 stats
    mirrors     127.0.4.1-N:2582

State directory (``--dir``; every user must be able to traverse it, because PostgreSQL and
Patroni run as the ``postgres`` OS user)::

    state.json     what runs: one entry per process (pid, start time, argv, log), written after
                   every start, so ``down`` can stop what a failed or interrupted ``up`` left
    secrets.json   generated passwords (mode 0600)
    cfg/           rendered configs (Patroni's owned by postgres, mode 0600)
    data/          etcd and PostgreSQL data, one directory per node
    sock/          one unix socket directory per PostgreSQL node (a shared one collides, ha-notes F3)
    run/           HAProxy's pidfile and admin socket, pgBackRest's lock files
    backup/        the pgBackRest repository (repo/) and its logs (log/), shared by the three
                   PostgreSQL nodes as a shared mount or bucket would be; absent with backups=False
    logs/          one log per process

``down`` stops processes by recorded PID (checking the start time, so a reused PID is never
signalled), then stops anything still running from this directory: postmasters named by
``postmaster.pid`` only after checking their command line (ha-notes F7), and every process whose
command line or working directory is inside the state directory. Then it deletes data/, sock/,
run/ and backup/; cfg/ and logs/ stay for a post-mortem until the next ``up``.

With backups (the default) every PostgreSQL node archives its WAL with pgBackRest into backup/repo
(ha/templates/pgbackrest.conf.j2, archive_command in patroni.yml.j2); ``up`` creates the stanza and
checks that archiving works, ``backup()`` takes a backup on the leader, ``verify_restore()``
restores the newest backup plus the archived WAL into a scratch directory, starts it and counts
what it holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import render
from .render import Node, Topology, User

DEFAULT_DIR = Path("/var/tmp/plc-cluster")
DEFAULT_PATRONI_VENV = Path("/opt/plc-patroni")
PATRONI_VENV_ENV = "PLC_PATRONI_VENV"
RUN_AS = "postgres"
HAPROXY_HOST = "127.0.3.1"
MIRROR_PORT = 2582
UP_TIMEOUT = 180.0
STOP_TIMEOUT = 30.0
ETCD_HOSTS = ("127.0.2.1", "127.0.2.2", "127.0.2.3")
PG_HOSTS = ("127.0.1.1", "127.0.1.2", "127.0.1.3")
MAX_MIRRORS = 3
INGEST_MODES = ("all", "first", "none")
MARKER = ".plc-cluster"  # written by up; down and status touch only directories that have it
STANZA = "plc"
EMPTY_SERVER_STATE = "1\n"  # HAProxy's server-state file format version, and no server
BACKUP_TYPES = ("full", "diff", "incr")
DATA_DIRS = ("data", "sock", "run", "backup")  # deleted by down (and by up, before it starts)


# Rows per table of the application database's public schema, one "table count" line each.
_COUNT_SQL = """select table_name, (xpath('/row/c/text()', query_to_xml(format('select count(*) as c from %I.%I',
  table_schema, table_name), false, true, '')))[1]::text from information_schema.tables
  where table_schema = 'public' and table_type = 'BASE TABLE' order by 1"""


class ClusterError(RuntimeError):
    """The local cluster cannot be started, inspected or stopped; the message says why."""


# ---------------------------------------------------------------------------- small helpers


def find_patroni_venv(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The Patroni virtualenv: ``explicit``, else $PLC_PATRONI_VENV, else /opt/plc-patroni."""
    venv = Path(explicit or os.environ.get(PATRONI_VENV_ENV) or DEFAULT_PATRONI_VENV)
    if not os.access(venv / "bin" / "patroni", os.X_OK):
        raise ClusterError(
            f"Patroni is not installed in {venv} (no bin/patroni): run scripts/setup --test, "
            f"or point --patroni-venv / ${PATRONI_VENV_ENV} at a venv built from /usr/bin/python3"
        )
    return venv


def _required_program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ClusterError(f"{name} is not installed: run scripts/setup --test (apt: etcd-server haproxy)")
    return path


def _pg_bin_dir() -> Path:
    from ..store.embedded import _candidate_bin_dirs, _has_programs

    for d in _candidate_bin_dirs():
        if _has_programs(d):
            return d
    raise ClusterError("PostgreSQL is not installed (apt-get install postgresql; scripts/setup installs it)")


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 and fields[0] != "Z" else None


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _http(url: str, timeout: float = 2.0, data: bytes | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET (a POST with ``data``); (0, b"") when nothing answers. Never raises."""
    try:
        with urllib.request.urlopen(url, data=data, timeout=timeout) as r:  # noqa: S310 — loopback URLs we built
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read() if e.fp else b""
    except (OSError, ValueError):
        return 0, b""


def _http_json(url: str, timeout: float = 2.0) -> Any:
    status, body = _http(url, timeout)
    if status == 0:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_bytes()[-8192:].decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n    ".join(text.strip().splitlines()[-lines:])


def _traversable_by(user: pwd.struct_passwd, path: Path) -> Path | None:
    """The first directory on ``path``'s way that ``user`` cannot enter (by mode bits), or None."""
    p = Path("/")
    for part in path.parts[1:]:
        p = p / part
        if not p.exists():
            return None
        st = p.stat()
        if st.st_uid == user.pw_uid:
            ok = st.st_mode & 0o100
        elif st.st_gid in os.getgrouplist(user.pw_name, user.pw_gid):
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            return p
    return None


# ---------------------------------------------------------------------------- the cluster


@dataclass
class Proc:
    name: str
    pid: int
    start: int | None
    argv: list[str]
    log: str

    def alive(self) -> bool:
        return self.start is not None and _start_time(self.pid) == self.start


class LocalCluster:
    """The local cluster whose state lives in ``directory``. ``up()``, ``status()``, ``down()``."""

    def __init__(
        self,
        directory: str | os.PathLike[str] = DEFAULT_DIR,
        *,
        mirrors: int = 2,
        upstream: str = "https://plc.directory",
        ingest: str = "all",
        patroni_venv: str | os.PathLike[str] | None = None,
        log: Callable[[str], Any] | None = None,
        python: str = sys.executable,
        backups: bool = True,
    ) -> None:
        if not 1 <= mirrors <= MAX_MIRRORS:
            raise ClusterError(f"--mirrors must be between 1 and {MAX_MIRRORS}, not {mirrors}")
        if ingest not in INGEST_MODES:
            raise ClusterError(f"--ingest must be one of {', '.join(INGEST_MODES)}, not {ingest!r}")
        self.dir = Path(os.path.abspath(os.fspath(directory)))
        self.mirror_count = mirrors
        self.upstream = upstream
        self.ingest = ingest
        self._patroni_venv_arg = patroni_venv
        self._log = log or (lambda s: None)
        self.python = python
        self.backups = backups
        self.health = render.load_health()

    # ---- layout ----------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    def _path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def topology(self, secrets_: dict[str, str] | None = None) -> Topology:
        s = secrets_ or {"superuser": "x", "replication": "x", "rewind": "x", "app": "x"}
        d = self.dir
        return Topology(
            etcd=[Node(f"etcd{i}", h, data_dir=str(d / "data" / f"etcd{i}")) for i, h in enumerate(ETCD_HOSTS, 1)],
            postgres=[
                Node(f"pg{i}", h, data_dir=str(d / "data" / f"pg{i}"), socket_dir=str(d / "sock" / f"pg{i}"),
                     pgpass=str(d / "sock" / f"pg{i}" / "pgpass"), backup_config=str(d / "cfg" / f"pgbackrest-pg{i}.conf"))
                for i, h in enumerate(PG_HOSTS, 1)
            ],  # fmt: skip
            mirrors=[Node(f"mirror{i}", f"127.0.4.{i}", port=MIRROR_PORT) for i in range(1, self.mirror_count + 1)],
            haproxy_host=HAPROXY_HOST,
            haproxy_pidfile=str(d / "run" / "haproxy.pid"),
            haproxy_stats_socket=str(d / "run" / "haproxy.sock"),
            haproxy_state_file=str(d / "run" / "haproxy.state"),
            superuser=User("postgres", s["superuser"]),
            replication=User("replicator", s["replication"]),
            rewind=User("rewinder", s["rewind"]),
            app=User("plc", s["app"], "plc"),
            pg_bin_dir=str(_pg_bin_dir()),
            backup=render.Backup(str(d / "backup" / "repo"), stanza=STANZA, log_dir=str(d / "backup" / "log"),
                                 lock_dir=str(d / "run" / "pgbackrest"), bin=shutil.which("pgbackrest") or "pgbackrest")
            if self.backups else None,
        )  # fmt: skip

    def app_url(self, secrets_: dict[str, str] | None = None, *, replicas: bool = False) -> str:
        """The application's database URL through HAProxy's primary frontend (or, with
        ``replicas``, its replicas frontend: replicas within the lag bound)."""
        s = secrets_ or self._load_secrets()
        t = self.topology(s)
        port = t.haproxy_replicas_port if replicas else t.haproxy_primary_port
        return (f"postgresql://{t.app.name}:{quote(t.app.password, safe='')}@{HAPROXY_HOST}:"
                f"{port}/{t.app.database}")  # fmt: skip

    @property
    def mirror_url(self) -> str:
        return f"http://{HAPROXY_HOST}:{MIRROR_PORT}"

    # ---- state -----------------------------------------------------------------------------

    def _load_state(self) -> list[Proc]:
        try:
            doc = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return []
        except ValueError as exc:
            raise ClusterError(f"{self.state_path} is not valid JSON ({exc}); remove it after stopping by hand") from None
        return [Proc(**p) for p in doc.get("processes", [])]

    def _save_state(self, procs: list[Proc]) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"dir": str(self.dir), "processes": [p.__dict__ for p in procs]}, indent=1))
        os.replace(tmp, self.state_path)

    def _load_secrets(self) -> dict[str, str]:
        try:
            return json.loads(self._path("secrets.json").read_text())
        except (OSError, ValueError):
            raise ClusterError(f"no cluster in {self.dir} (no secrets.json): run plc cluster up first") from None

    def running(self) -> list[Proc]:
        return [p for p in self._load_state() if p.alive()]

    # ---- drills: stop and start one process (tests/test_failover_drills.py, bench/drills.py) ----

    def process(self, name: str) -> Proc | None:
        """The recorded process ``name`` (etcd1, pg2, haproxy, mirror1, ...), alive or not."""
        return next((p for p in self._load_state() if p.name == name), None)

    def postmaster_pids(self, name: str) -> list[int]:
        """The postmaster of PostgreSQL node ``name`` (from its postmaster.pid, checked by command
        line: ha-notes F7) followed by its live children; [] when it does not run."""
        pidfile = self._path("data", name, "postmaster.pid")
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return []
        args = _cmdline(pid)
        if "-D" not in args or os.path.realpath(args[args.index("-D") + 1]) != os.path.realpath(pidfile.parent):
            return []
        children = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    stat = Path(f"/proc/{entry.name}/stat").read_text()
                    if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid:
                        children.append(int(entry.name))
        return [pid, *children]

    def kill_node(self, name: str, sig: int = signal.SIGKILL, *, postgres: bool = True) -> list[int]:
        """Send ``sig`` (default SIGKILL) to the recorded process ``name``; for a PostgreSQL node
        (pgN) also, at the same moment, to its postmaster and the postmaster's children unless
        ``postgres`` is False (Patroni double-forks the postmaster: killing Patroni alone leaves
        PostgreSQL running, ha-notes §2). Returns the PIDs signalled."""
        proc = self.process(name)
        if proc is None:
            raise ClusterError(f"no process named {name!r} in {self.state_path}")
        pids = [proc.pid] if proc.alive() else []
        if postgres and name.startswith("pg"):
            pids += self.postmaster_pids(name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def restart_node(self, name: str, *, cgroup: str | os.PathLike[str] | None = None) -> Proc:
        """Start the recorded process ``name`` again with the argv it was first started with (a
        killed Patroni rejoins; a restarted etcd member rejoins with its data). With ``cgroup``
        (a cgroup v2 directory) the new process is moved into it right after it is forked,
        before it opens any socket. Raises ClusterError if it still runs."""
        procs = self._load_state()
        old = next((p for p in procs if p.name == name), None)
        if old is None:
            raise ClusterError(f"no process named {name!r} in {self.state_path}")
        if old.alive():
            raise ClusterError(f"{name} (pid {old.pid}) still runs: kill it first")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PLC_"))}
        if Path(old.argv[0]).name == "setpriv":
            owner = pwd.getpwnam(RUN_AS)
            env.update(HOME=owner.pw_dir, USER=RUN_AS, LOGNAME=RUN_AS, LC_ALL="C.UTF-8")
        cwd = self._path("data", name) if name.startswith("mirror") else self.dir
        with open(old.log, "ab") as out:
            p = subprocess.Popen(old.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 cwd=cwd, env=env, start_new_session=True)  # fmt: skip
        if cgroup is not None:
            Path(cgroup, "cgroup.procs").write_text(str(p.pid))
        new = Proc(name, p.pid, _start_time(p.pid), old.argv, old.log)
        self._save_state([new if q.name == name else q for q in procs])
        self._log(f"restarted {name} (pid {p.pid})")
        return new

    def patronictl(self, *args: str, timeout: float = 60, input_: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``patronictl -c <pg1's config> ARGS`` from the Patroni venv (as root: it only reads
        the config and talks to etcd and the REST APIs); ``input_`` answers its prompts."""
        venv = find_patroni_venv(self._patroni_venv_arg)
        return subprocess.run([str(venv / "bin" / "patronictl"), "-c", str(self._path("cfg", "pg1.yml")), *args],
                              capture_output=True, text=True, timeout=timeout, input=input_)  # fmt: skip

    # ---- up --------------------------------------------------------------------------------

    def up(self, timeout: float = UP_TIMEOUT) -> dict[str, float]:
        """Start everything and wait until it is healthy; returns seconds per phase. On failure
        raises ClusterError (with the failing process's log tail) and leaves what runs for
        ``down()`` to stop."""
        deadline = time.monotonic() + timeout
        t0 = time.monotonic()
        venv = find_patroni_venv(self._patroni_venv_arg)
        etcd_bin, haproxy_bin, setpriv = (_required_program(n) for n in ("etcd", "haproxy", "setpriv"))
        try:
            owner = pwd.getpwnam(RUN_AS)
        except KeyError:
            raise ClusterError(f"the OS user {RUN_AS!r} does not exist (Debian's postgresql package creates it)") from None
        if os.geteuid() != 0:
            raise ClusterError("plc cluster up must run as root: PostgreSQL and Patroni run as the postgres user")
        live = self.running()
        if live:
            raise ClusterError(f"a cluster already runs from {self.dir} ({len(live)} processes): "
                               "run plc cluster down first")  # fmt: skip
        if len(self.dir.parts) < 3:
            raise ClusterError(f"--dir {self.dir} is too close to /: give a directory of its own")
        if self.dir.is_dir() and any(self.dir.iterdir()) and not self._path(MARKER).exists():
            raise ClusterError(f"{self.dir} is not empty and holds no cluster: give a new or empty --dir")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._path(MARKER).write_text("state directory of plc cluster (plc/cluster/local.py)\n")
        os.chmod(self.dir, 0o755)
        blocked = _traversable_by(owner, self.dir)
        if blocked is not None:
            raise ClusterError(f"the {RUN_AS} user cannot enter {blocked}: choose a --dir it can reach "
                               f"(e.g. {DEFAULT_DIR})")  # fmt: skip
        self._kill_leftovers()
        for sub in (*DATA_DIRS, "cfg", "logs"):
            shutil.rmtree(self._path(sub), ignore_errors=True)
            self._path(sub).mkdir(mode=0o755)
        if self.backups:
            _required_program("pgbackrest")
            for d in (self._path("backup", "repo"), self._path("backup", "log"), self._path("run", "pgbackrest")):
                d.mkdir(mode=0o750)
                os.chown(d, owner.pw_uid, owner.pw_gid)
        self.state_path.unlink(missing_ok=True)

        sec = {k: secrets.token_urlsafe(18) for k in ("superuser", "replication", "rewind", "app")}
        sp = self._path("secrets.json")
        sp.write_text(json.dumps(sec))
        os.chmod(sp, 0o600)
        topo = self.topology(sec)
        topo.check()
        procs: list[Proc] = []
        phases: dict[str, float] = {}

        def spawn(name: str, argv: list[str], *, as_postgres: bool = False, cwd: Path | None = None,
                  env: dict[str, str] | None = None) -> Proc:  # fmt: skip
            logp = self._path("logs", f"{name}.log")
            full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PLC_"))}
            full_env.update(env or {})
            if as_postgres:
                full_env.update(HOME=owner.pw_dir, USER=RUN_AS, LOGNAME=RUN_AS, LC_ALL="C.UTF-8")
                argv = [setpriv, f"--reuid={RUN_AS}", f"--regid={RUN_AS}", "--init-groups", *argv]
            with open(logp, "ab") as out:
                p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     cwd=cwd or self.dir, env=full_env, start_new_session=True)  # fmt: skip
            proc = Proc(name, p.pid, _start_time(p.pid), argv, str(logp))
            procs.append(proc)
            self._save_state(procs)
            self._log(f"started {name} (pid {p.pid})")
            return proc

        def wait(what: str, probe: Callable[[], Any], watch: Iterable[Proc]) -> Any:
            """Poll ``probe`` until it returns a true value; fail at the deadline or as soon as a
            watched process has exited."""
            watch = list(watch)
            while True:
                result = probe()
                if result:
                    return result
                for p in watch:
                    if not p.alive():
                        raise ClusterError(f"{p.name} exited while waiting for {what}; its log ({p.log}):\n    "
                                           + _tail(Path(p.log)))  # fmt: skip
                if time.monotonic() > deadline:
                    logs = "\n".join(f"  {p.name}: {_tail(Path(p.log), 5)}" for p in watch)
                    raise ClusterError(f"timed out after {timeout:g} s waiting for {what}; log tails:\n{logs}")
                time.sleep(0.25)

        def phase(name: str, start: float) -> None:
            phases[name] = round(time.monotonic() - start, 1)
            self._log(f"{name}: ready in {phases[name]} s")

        # -- etcd
        t = time.monotonic()
        etcd_procs = []
        for m in topo.etcd:
            Path(m.data_dir).mkdir(mode=0o700)
            cfg = self._path("cfg", f"{m.name}.yml")
            cfg.write_text(render.render_etcd(topo, m))
            etcd_procs.append(spawn(m.name, [etcd_bin, "--config-file", str(cfg)]))
        wait("etcd health", lambda: all(self._etcd_healthy(m.host) for m in topo.etcd), etcd_procs)
        phase("etcd", t)

        # -- Patroni + PostgreSQL
        t = time.monotonic()
        pat_procs = []
        for n in topo.postgres:
            for d in (Path(n.data_dir), Path(n.socket_dir)):
                d.mkdir(mode=0o700)
                os.chown(d, owner.pw_uid, owner.pw_gid)
            cfg = self._path("cfg", f"{n.name}.yml")
            cfg.write_text(render.render_patroni(topo, n, self.health))
            os.chown(cfg, owner.pw_uid, owner.pw_gid)
            os.chmod(cfg, 0o600)
            if topo.backup is not None:
                bcfg = Path(n.backup_config)
                bcfg.write_text(render.render_pgbackrest(topo, n, self.health))
                os.chown(bcfg, owner.pw_uid, owner.pw_gid)
                os.chmod(bcfg, 0o600)
            pat_procs.append(spawn(n.name, [str(venv / "bin" / "patroni"), str(cfg)], as_postgres=True))
        wait("a Patroni leader, a sync standby and a streaming replica", self._patroni_healthy, pat_procs)
        phase("patroni", t)

        # -- the application's role and database (Patroni 4 has no bootstrap users)
        t = time.monotonic()
        leader = next(m for m in self.patroni_members() if m.get("role") == "leader")
        self._create_app_role(topo, leader["host"])
        phase("app role", t)

        # -- the backup repository: the stanza, and a check that WAL reaches it
        if topo.backup is not None:
            t = time.monotonic()
            for command in ("stanza-create", "check"):
                r = self.pgbackrest(leader["name"], command, timeout=max(10.0, deadline - time.monotonic()))
                if r.returncode != 0:
                    raise ClusterError(f"pgbackrest {command} failed (exit {r.returncode}): "
                                       f"{(r.stderr or r.stdout).strip()}")  # fmt: skip
            phase("backup stanza", t)

        # -- HAProxy
        t = time.monotonic()
        hcfg = self._path("cfg", "haproxy.cfg")
        hcfg.write_text(render.render_haproxy(topo, self.health))
        Path(topo.haproxy_state_file).write_text(EMPTY_SERVER_STATE)  # no saved states: checks decide
        check = subprocess.run([haproxy_bin, "-c", "-q", "-f", str(hcfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise ClusterError(f"rendered HAProxy config is invalid: {check.stdout}{check.stderr}")
        hp = spawn("haproxy", [haproxy_bin, "-db", "-f", str(hcfg)])
        wait("HAProxy to route to the primary", lambda: self._backend_up_count("postgres_primary") == 1,
             [hp, *pat_procs])  # fmt: skip
        phase("haproxy", t)

        # -- schema, once, through HAProxy
        t = time.monotonic()
        url = self.app_url(sec)
        mig = subprocess.run([self.python, "-m", "plc", "migrate", "--database-url", url],
                             capture_output=True, text=True, timeout=max(10.0, deadline - time.monotonic()),
                             cwd=self.dir, env={k: v for k, v in os.environ.items() if not k.startswith("PLC_")})  # fmt: skip
        self._path("logs", "migrate.log").write_text(mig.stdout + mig.stderr)
        if mig.returncode != 0:
            raise ClusterError(f"plc migrate failed (exit {mig.returncode}): {(mig.stderr or mig.stdout).strip()}")
        phase("migrate", t)

        # -- mirror nodes
        t = time.monotonic()
        max_lag = self.health["checks"]["mirror_ready"]["max_lag_s"]
        mirror_procs = []
        for i, m in enumerate(topo.mirrors):
            mdir = self._path("data", m.name)
            mdir.mkdir(mode=0o755)
            argv = [self.python, "-m", "plc", "serve", "--database-url", url, "--data-dir", str(mdir),
                    "--read-database-url", self.app_url(sec, replicas=True),
                    "--host", m.host, "--port", str(m.port), "--upstream", self.upstream,
                    "--ready-max-lag", str(max_lag), "--node-name", m.name]  # fmt: skip
            if self.ingest == "none" or (self.ingest == "first" and i > 0):
                argv.append("--no-ingest")
            mirror_procs.append(spawn(m.name, argv, cwd=mdir))
        wait("the mirror nodes' /_health", lambda: all(
            _http(f"http://{m.host}:{m.port}/_health")[0] == 200 for m in topo.mirrors), mirror_procs)  # fmt: skip
        phase("mirrors", t)
        phases["total"] = round(time.monotonic() - t0, 1)
        return phases

    def _etcd_healthy(self, host: str) -> bool:
        """The member reports health and its v3 JSON gateway (what Patroni's etcd3 DCS uses) lists
        all members."""
        doc = _http_json(f"http://{host}:2379/health", timeout=1.0)
        if not (isinstance(doc, dict) and doc.get("health") == "true"):
            return False
        status, body = _http(f"http://{host}:2379/v3/cluster/member/list", timeout=1.0, data=b"{}")
        try:
            return status == 200 and len(json.loads(body).get("members", [])) == len(ETCD_HOSTS)
        except (ValueError, AttributeError):
            return False

    def patroni_members(self) -> list[dict[str, Any]]:
        """Patroni's /cluster members, from the first node that answers ([] if none does)."""
        for h in PG_HOSTS:
            doc = _http_json(f"http://{h}:8008/cluster", timeout=1.0)
            if isinstance(doc, dict) and isinstance(doc.get("members"), list):
                return doc["members"]
        return []

    def _patroni_healthy(self) -> bool:
        members = self.patroni_members()
        leaders = [m for m in members if m.get("role") == "leader" and m.get("state") == "running"]
        streaming = [m for m in members if m.get("state") == "streaming"]
        sync = [m for m in streaming if m.get("role") == "sync_standby"]
        return len(leaders) == 1 and len(streaming) == len(PG_HOSTS) - 1 and len(sync) >= 1

    def _create_app_role(self, topo: Topology, leader_host: str) -> None:
        psql = str(Path(topo.pg_bin_dir) / "psql")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGPASSWORD": topo.superuser.password,
               "PGCONNECT_TIMEOUT": "5", "LC_ALL": "C"}  # fmt: skip
        pw = topo.app.password.replace("'", "''")
        base = [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", leader_host, "-p", str(topo.pg_port),
                "-U", topo.superuser.name]  # fmt: skip
        steps = [
            ["-d", "postgres", "-c", f"CREATE ROLE {topo.app.name} LOGIN PASSWORD '{pw}'"],
            ["-d", "postgres", "-c", f"CREATE DATABASE {topo.app.database} OWNER {topo.app.name}"],
        ]
        for step in steps:
            r = subprocess.run(base + step, capture_output=True, text=True, env=env, timeout=60)
            if r.returncode != 0:
                raise ClusterError(f"creating the application role failed: {r.stderr.strip()}")

    # ---- backups (pgBackRest) --------------------------------------------------------------

    def _as_postgres(self, argv: list[str], timeout: float, env: dict[str, str] | None = None
                     ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        owner = pwd.getpwnam(RUN_AS)
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": owner.pw_dir, "USER": RUN_AS,
                    "LOGNAME": RUN_AS, "LC_ALL": "C.UTF-8", **(env or {})}  # fmt: skip
        return subprocess.run([_required_program("setpriv"), f"--reuid={RUN_AS}", f"--regid={RUN_AS}", "--init-groups",
                               *argv], capture_output=True, text=True, timeout=timeout, env=full_env, cwd="/")  # fmt: skip

    def pgbackrest(self, node: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """``pgbackrest --config=<node's config> --stanza=plc ARGS`` as the postgres user."""
        conf = self._path("cfg", f"pgbackrest-{node}.conf")
        if not conf.is_file():
            raise ClusterError(f"no pgBackRest config for {node!r} in {self.dir / 'cfg'}: "
                               "the cluster was started without backups")  # fmt: skip
        return self._as_postgres([_required_program("pgbackrest"), f"--config={conf}", f"--stanza={STANZA}", *args],
                                 timeout)  # fmt: skip

    def _require_backups(self) -> None:
        if not self._path(MARKER).exists():
            raise ClusterError(f"no cluster in {self.dir}: run plc cluster up --dir {self.dir}")
        if not self._path("cfg", "pgbackrest-pg1.conf").is_file():
            raise ClusterError(f"the cluster in {self.dir} was started with --no-backups")

    def _backup_leader(self) -> str:
        """The Patroni leader's name, where backups run (ClusterError: no cluster, no backups, no leader)."""
        self._require_backups()
        names = [m["name"] for m in self.patroni_members() if m.get("role") == "leader" and m.get("state") == "running"]
        if not names:
            raise ClusterError("no running Patroni leader: backups are taken on the primary")
        return names[0]

    def backup(self, kind: str = "full") -> dict[str, Any]:
        """Take a ``kind`` (full, diff, incr) backup on the leader; returns it as `pgbackrest
        info` describes it (label, type, WAL range, sizes)."""
        if kind not in BACKUP_TYPES:
            raise ClusterError(f"backup type must be one of {', '.join(BACKUP_TYPES)}, not {kind!r}")
        leader = self._backup_leader()
        r = self.pgbackrest(leader, "backup", f"--type={kind}")
        if r.returncode != 0:
            raise ClusterError(f"pgbackrest backup on {leader} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()}")
        backups = self.backup_info()["backup"]
        if not backups:
            raise ClusterError("pgbackrest backup succeeded but the repository lists no backup")
        return {"node": leader, **backups[-1]}

    def backup_info(self) -> dict[str, Any]:
        """The stanza as `pgbackrest info --output=json` gives it (status, backups, archive)."""
        r = self.pgbackrest(self._backup_leader(), "info", "--output=json", timeout=60)
        try:
            doc = json.loads(r.stdout)
        except ValueError:
            doc = None
        if r.returncode != 0 or not isinstance(doc, list) or len(doc) != 1:
            raise ClusterError(f"pgbackrest info failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()}")
        return doc[0]

    def _table_counts(self, psql_args: list[str], timeout: float = 60) -> dict[str, int]:
        r = self._as_postgres([str(_pg_bin_dir() / "psql"), "-X", "-At", "-F", " ", *psql_args, "-c", _COUNT_SQL],
                              timeout)  # fmt: skip
        if r.returncode != 0:
            raise ClusterError(f"counting rows failed: {r.stderr.strip()}")
        rows = [line.split(" ") for line in r.stdout.splitlines() if line]
        return {name: int(count) for name, count in rows}

    def _recover(self, conf_node: str, data: Path, sock: Path, restore_args: list[str], *, archive: bool,
                 log_name: str, timeout: float) -> dict[str, int]:  # fmt: skip
        """pgBackRest-restore into ``data`` (with ``conf_node``'s config), start PostgreSQL there
        on the unix socket ``sock`` alone, wait until archive recovery has replayed what it should
        and promoted, count the rows of every table of the application database, stop it."""
        topo = self.topology()
        owner = pwd.getpwnam(RUN_AS)
        for d in (data, sock):
            d.mkdir(mode=0o700, exist_ok=True)
            os.chown(d, owner.pw_uid, owner.pw_gid)
        log = self._path("logs", log_name)
        log.write_bytes(b"")
        os.chown(log, owner.pw_uid, owner.pw_gid)
        r = self.pgbackrest(conf_node, f"--pg1-path={data}", *restore_args, "restore", timeout=timeout)
        if r.returncode != 0:
            raise ClusterError(f"pgbackrest restore failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()}")
        conf = self._path("cfg", f"pgbackrest-{conf_node}.conf")
        # The restored postgresql.conf is the one of the node the backup was taken on: listen
        # nowhere but the socket, and (when archiving) archive with this node's pgBackRest config.
        archiving = (f"-c archive_mode=on -c archive_command='{_required_program('pgbackrest')} --config={conf} "
                     f"--stanza={STANZA} archive-push %p'") if archive else "-c archive_mode=off"  # fmt: skip
        opts = (f"-c listen_addresses='' -c unix_socket_directories='{sock}' -c port={topo.pg_port} "
                f"-c hba_file='{data}/pg_hba.conf' -c ident_file='{data}/pg_ident.conf' "
                f"-c synchronous_standby_names='' -c hot_standby=on {archiving}")  # fmt: skip
        pg_ctl = str(_pg_bin_dir() / "pg_ctl")
        db = ["-h", str(sock), "-d", topo.app.database, "-p", str(topo.pg_port)]
        try:
            r = self._as_postgres([pg_ctl, "-D", str(data), "-o", opts, "-l", str(log), "-w", "-t", str(int(timeout)),
                                   "start"], timeout + 10)  # fmt: skip
            if r.returncode != 0:
                raise ClusterError(f"the restored copy did not start: {(r.stderr or r.stdout).strip()}; "
                                   f"log: {_tail(log)}")  # fmt: skip
            deadline = time.monotonic() + timeout
            while True:  # archive recovery replays the archived WAL (up to the target), then promotes
                q = self._as_postgres([str(_pg_bin_dir() / "psql"), "-X", "-At", *db, "-c", "select pg_is_in_recovery()"],
                                      30)  # fmt: skip
                if q.returncode == 0 and q.stdout.strip() == "f":
                    break
                if time.monotonic() > deadline:
                    raise ClusterError(f"the restored copy was still in recovery after {timeout:g} s; log: {_tail(log)}")
                time.sleep(0.25)
            return self._table_counts(db)
        finally:
            self._as_postgres([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], 120)

    def verify_restore(self, timeout: float = 300) -> dict[str, Any]:
        """Prove the repository restores: archive the leader's current WAL (`pgbackrest check`),
        count the rows of every table of the application database on the leader, restore the
        newest backup plus all archived WAL into a scratch directory, start PostgreSQL on it
        (unix socket only, archiving off), count again, stop it and delete the directory.
        Returns {"node", "backup", "live", "restored", "seconds"}; raises ClusterError on any failure."""
        t0 = time.monotonic()
        leader = self._backup_leader()
        topo = self.topology()
        node = next(n for n in topo.postgres if n.name == leader)
        r = self.pgbackrest(leader, "check", timeout=timeout)
        if r.returncode != 0:
            raise ClusterError(f"pgbackrest check on {leader} failed: {(r.stderr or r.stdout).strip()}")
        live = self._table_counts(["-h", node.socket_dir, "-d", topo.app.database, "-p", str(topo.pg_port)])
        backups = self.backup_info()["backup"]
        if not backups:
            raise ClusterError("the repository holds no backup yet: run plc cluster backup first")
        scratch, sock = self._path("data", "restore-check"), self._path("sock", "restore-check")
        for d in (scratch, sock):
            shutil.rmtree(d, ignore_errors=True)
        try:
            restored = self._recover(leader, scratch, sock, ["--archive-mode=off"], archive=False,
                                     log_name="restore-check.log", timeout=timeout)  # fmt: skip
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(sock, ignore_errors=True)
        return {"node": leader, "backup": backups[-1]["label"], "live": live, "restored": restored,
                "seconds": round(time.monotonic() - t0, 1)}  # fmt: skip

    def restore(self, target_time: str | None = None, timeout: float = 600) -> dict[str, Any]:
        """Disaster recovery of the whole cluster from the repository: stop the mirrors and every
        Patroni node (and its PostgreSQL), remove the cluster from the DCS (`patronictl remove`),
        restore the newest backup (or, with ``target_time``, the state at that moment:
        point-in-time recovery) into pg1 and let it replay the archived WAL and promote, start
        pg1's Patroni (it becomes the leader of a new timeline), let pg2 and pg3 clone from it
        with empty data directories, and start the mirrors again (they ingest what the upstream
        has beyond the restored cursor). Returns {"restored": row counts, "target", "seconds"}."""
        t0 = time.monotonic()
        self._require_backups()
        topo = self.topology()
        procs = self._load_state()
        mirrors = [p for p in procs if p.name.startswith("mirror")]
        patronis = [p for p in procs if p.name.startswith("pg")]
        self._terminate([p for p in mirrors if p.alive()], signal.SIGTERM, STOP_TIMEOUT)
        self._terminate([p for p in patronis if p.alive()], signal.SIGTERM, STOP_TIMEOUT)
        for n in topo.postgres:  # a PostgreSQL whose Patroni was killed still runs (ha-notes §2)
            self._terminate([Proc(n.name, pid, _start_time(pid) or 0, [], "") for pid in self.postmaster_pids(n.name)[:1]],
                            signal.SIGINT, STOP_TIMEOUT)  # fmt: skip
        self._log("stopped the mirrors and every Patroni node")
        r = self.patronictl("remove", topo.scope, input_=f"{topo.scope}\nYes I am aware\n")
        if r.returncode != 0:
            raise ClusterError(f"patronictl remove {topo.scope} failed: {(r.stderr or r.stdout).strip()}")
        args = ["--delta"]
        if target_time:
            args += ["--type=time", f"--target={target_time}", "--target-action=promote"]
        first = topo.postgres[0]
        restored = self._recover(first.name, Path(first.data_dir), Path(first.socket_dir), args, archive=True,
                                 log_name=f"restore-{first.name}.log", timeout=timeout)  # fmt: skip
        self._log(f"restored {first.name}: {restored}")
        deadline = time.monotonic() + timeout
        self.restart_node(first.name)
        while not any(m.get("name") == first.name and m.get("role") == "leader" and m.get("state") == "running"
                      for m in self.patroni_members()):  # fmt: skip
            if time.monotonic() > deadline:
                raise ClusterError(f"{first.name} did not become the leader after the restore")
            time.sleep(0.25)
        owner = pwd.getpwnam(RUN_AS)
        for n in topo.postgres[1:]:
            shutil.rmtree(n.data_dir, ignore_errors=True)
            Path(n.data_dir).mkdir(mode=0o700)
            os.chown(n.data_dir, owner.pw_uid, owner.pw_gid)
            self.restart_node(n.name)
        while not self._patroni_healthy():
            if time.monotonic() > deadline:
                raise ClusterError("the replicas did not clone from the restored leader in time")
            time.sleep(0.25)
        for m in mirrors:
            self.restart_node(m.name)
        return {"restored": restored, "target": target_time, "seconds": round(time.monotonic() - t0, 1)}

    # ---- status ----------------------------------------------------------------------------

    def haproxy_backends(self) -> list[dict[str, str]]:
        """HAProxy's per-server rows (proxy, server, status, check) from its CSV stats; [] if down."""
        status, body = _http(f"http://{HAPROXY_HOST}:7000/;csv", timeout=1.0)
        if status != 200:
            return []
        lines = body.decode(errors="replace").splitlines()
        if not lines:
            return []
        header = lines[0].lstrip("# ").split(",")
        rows = []
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("svname") not in ("FRONTEND", "BACKEND") and row.get("pxname") != "stats":
                rows.append({"proxy": row.get("pxname", ""), "server": row.get("svname", ""),
                             "status": row.get("status", ""), "check": row.get("check_status", "")})  # fmt: skip
        return rows

    def _backend_up_count(self, proxy: str) -> int:
        return sum(1 for r in self.haproxy_backends() if r["proxy"] == proxy and r["status"] == "UP")

    def status(self) -> dict[str, Any]:
        """What runs and how healthy it is: processes, etcd, Patroni, HAProxy, mirror nodes."""
        if not self._path(MARKER).exists():
            raise ClusterError(f"no cluster in {self.dir}: run plc cluster up --dir {self.dir}")
        procs = self._load_state()
        mirror_count = len([p for p in procs if p.name.startswith("mirror")]) or self.mirror_count
        etcd = {h: self._etcd_healthy(h) for h in ETCD_HOSTS}
        members = [{"name": m.get("name"), "host": m.get("host"), "role": m.get("role"), "state": m.get("state"),
                    "timeline": m.get("timeline"), "lag": m.get("lag")} for m in self.patroni_members()]  # fmt: skip
        mirrors = []
        for i in range(1, mirror_count + 1):
            host = f"127.0.4.{i}"
            st = _http_json(f"http://{host}:{MIRROR_PORT}/-/status", timeout=2.0)
            ready, _ = _http(f"http://{host}:{MIRROR_PORT}/-/ready", timeout=3.0)
            mirrors.append({"name": f"mirror{i}", "host": host, "ready": ready == 200,
                            "status": st if isinstance(st, dict) else None})  # fmt: skip
        return {
            "dir": str(self.dir),
            "processes": [{"name": p.name, "pid": p.pid, "alive": p.alive()} for p in procs],
            "etcd": etcd,
            "patroni": members,
            "haproxy": self.haproxy_backends(),
            "mirrors": mirrors,
            "endpoints": {
                "postgres_primary": f"{HAPROXY_HOST}:5432",
                "postgres_replicas": f"{HAPROXY_HOST}:5433",
                "mirror": self.mirror_url,
                "haproxy_stats": f"http://{HAPROXY_HOST}:7000/",
            },
        }

    # ---- down ------------------------------------------------------------------------------

    def down(self, timeout: float = STOP_TIMEOUT) -> list[str]:
        """Stop everything started from this directory and delete its data; returns what was
        stopped. Safe to call any number of times, after a failed ``up`` too."""
        if not self.dir.is_dir():
            return []
        if not self._path(MARKER).exists():
            raise ClusterError(f"{self.dir} holds no cluster (no {MARKER} file): nothing of it was stopped")
        stopped: list[str] = []
        procs = self._load_state()
        # Mirrors first (they hold database sessions), then HAProxy, then Patroni (each stops its
        # own PostgreSQL), and etcd last, so that Patroni can still reach its DCS while stopping.
        order = ("mirror", "haproxy", "pg", "etcd")
        for prefix in order:
            group = [p for p in procs if p.name.startswith(prefix) and p.alive()]
            self._terminate(group, signal.SIGTERM if prefix != "etcd" else signal.SIGKILL, timeout)
            stopped += [p.name for p in group]
        stopped += self._kill_leftovers()
        for sub in DATA_DIRS:
            shutil.rmtree(self._path(sub), ignore_errors=True)
        self.state_path.unlink(missing_ok=True)
        return stopped

    def _terminate(self, group: list[Proc], sig: int, timeout: float) -> None:
        for p in group:
            if p.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)
        end = time.monotonic() + timeout
        while time.monotonic() < end and any(p.alive() for p in group):
            time.sleep(0.1)
        for p in group:
            if p.alive():
                self._log(f"{p.name} (pid {p.pid}) did not stop within {timeout:g} s: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        end = time.monotonic() + 10
        while time.monotonic() < end and any(p.alive() for p in group):
            time.sleep(0.05)

    def _ours(self) -> list[int]:
        """PIDs of live processes whose command line names, or whose working directory is in,
        this state directory (a postmaster: ``-D <our data dir>``; its children: their cwd)."""
        root = str(self.dir) + os.sep
        mine = os.getpid()
        out = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == mine:
                continue
            pid = int(entry.name)
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd") + os.sep
            except OSError:
                cwd = ""
            args = _cmdline(pid)
            if cwd.startswith(root) or any(a.startswith(root) or f"={root}" in a for a in args):
                if _start_time(pid) is not None:
                    out.append(pid)
        return out

    def _kill_leftovers(self) -> list[str]:
        """Stop postmasters of our data dirs (checked by command line, ha-notes F7) and anything
        else still running from this directory."""
        killed: list[str] = []
        for pidfile in self._path("data").glob("pg*/postmaster.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().split("\n", 1)[0])
                args = _cmdline(pid)
                if "-D" in args and os.path.realpath(args[args.index("-D") + 1]) == os.path.realpath(pidfile.parent):
                    os.kill(pid, signal.SIGQUIT)  # immediate shutdown: the data is thrown away
                    killed.append(f"postmaster {pid}")
        end = time.monotonic() + 10
        while time.monotonic() < end:
            left = self._ours()
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if f"pid {pid}" not in killed:
                    killed.append(f"pid {pid}")
            time.sleep(0.1)
        else:
            raise ClusterError(f"processes from {self.dir} do not exit: {self._ours()}")
        return killed
