"""A private PostgreSQL server owned by the program: the embedded default of `plc serve` and
`plc migrate` when no database URL is given, and the test suite's database.

Layout of ``data_dir`` (created on first start)::

    data_dir/pgdata/          the cluster (initdb: UTF8, locale C, data checksums, superuser postgres)
    data_dir/socket/          the unix socket directory (mode 0700): the only way in, no TCP at all
    data_dir/postgresql.log   the server log (rotated to .1 at start when it passes 8 MiB)
    data_dir/embedded.lock    flock held by the process that owns the running server

Local socket connections are trusted (``local all all trust``); TCP is off
(``listen_addresses=''``) and host lines are ``reject``, so only the socket directory's owner
(and root) can connect. The port only names the socket file.

PostgreSQL refuses to run as root. When this process is root, every PostgreSQL program runs as
the ``postgres`` OS user (Debian's package creates it), the data directory is chowned to it,
and every parent directory must let that user through: if one does not (e.g. /root, mode
0700), start() raises an error naming it and changes nothing.

Recovery: the flock tells a live owner from a dead one. If the owning process died and left
its server running, start() stops that server and starts a fresh one; if the postmaster itself
was killed, start() waits for its orphaned children to exit and removes the stale
postmaster.pid (which PostgreSQL alone would refuse when the dead postmaster is an unreaped
zombie or its PID was reused). A start that fails stops whatever it started and raises with the
tail of the server log.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

DEFAULT_PORT = 5432
SUPERUSER = "postgres"
RUN_AS_ROOT_USER = "postgres"  # the OS user PostgreSQL runs as when this process is root
REQUIRED_PROGRAMS = ("initdb", "pg_ctl", "postgres", "psql")
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes, NUL included
LOG_ROTATE_BYTES = 8 << 20
LOG_TAIL_LINES = 12

# Settings that make the server what this module promises; `settings=` cannot change them.
_FIXED = ("listen_addresses", "port", "unix_socket_directories", "unix_socket_permissions")


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL cannot be set up, started or stopped; the message says why."""


class PostgresNotInstalled(EmbeddedPostgresError):
    """No directory with the PostgreSQL server programs was found."""


class DataDirUnreachable(EmbeddedPostgresError):
    """The OS user PostgreSQL runs as cannot reach the data directory."""


class DataDirBusy(EmbeddedPostgresError):
    """Another live process owns the embedded PostgreSQL in this data directory."""


def _major(version_text: str) -> int | None:
    """The major version in ``pg_ctl (PostgreSQL) 15.18 (Debian ...)`` or in a PG_VERSION file."""
    m = re.search(r"(?:\)\s*|^)(\d+)(?:\.\d+)?", version_text.strip())
    return int(m.group(1)) if m else None


def _has_programs(bin_dir: Path) -> bool:
    return all((bin_dir / n).is_file() and os.access(bin_dir / n, os.X_OK) for n in REQUIRED_PROGRAMS)


def _candidate_bin_dirs() -> list[Path]:
    """Where PostgreSQL server programs may be: `pg_config --bindir`, then the newest
    /usr/lib/postgresql/<major>/bin first."""
    out: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            r = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
            )
            if r.returncode == 0 and r.stdout.strip():
                out.append(Path(r.stdout.strip()))

    def version_key(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)

    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version_key, reverse=True)
    out.extend(p for p in debian if p not in out)
    return out


def _pid_state(pid: int) -> str | None:
    """'Z' for a zombie, another one-letter state for a live process, None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return "?"
    return text[text.rfind(")") + 2 :][:1] or "?"


def _proc_available() -> bool:
    return Path("/proc/self/stat").exists()


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` is a running (not zombie) process."""
    if _proc_available():
        state = _pid_state(pid)
        return state is not None and state != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_path(link: str, path: Path) -> bool:
    try:
        return os.path.realpath(os.readlink(link)) == str(path)
    except OSError:
        return False


class EmbeddedPostgres:
    """A private PostgreSQL cluster in ``data_dir``, reachable only through a unix socket inside it.

    ``start()`` initialises the cluster on first use, starts it, waits until it accepts
    connections and creates ``database`` if missing; ``stop()`` stops it. Both are idempotent;
    the object is also a context manager. ``dsn`` / ``connect_kwargs`` say how to connect
    (asyncpg accepts either).

    ``fsync=False`` turns off fsync, full_page_writes and synchronous_commit: a crash can then
    lose or corrupt data, so only the test suite uses it. ``settings`` adds or overrides server
    settings (not the ones that define the socket-only contract). ``bin_dir`` names the directory
    with initdb/pg_ctl/postgres/psql instead of looking for it.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        database: str = "plc",
        port: int | None = None,
        log: Callable[[str], Any] | None = None,
        fsync: bool = True,
        settings: Mapping[str, str | int] | None = None,
        bin_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = 120.0,
        stop_timeout: float = 60.0,
    ) -> None:
        if not database or "\0" in database or len(database.encode()) > 63:
            raise EmbeddedPostgresError(f"invalid database name {database!r}")
        self.data_dir = Path(os.path.abspath(os.fspath(data_dir)))
        self.database = database
        self.port = DEFAULT_PORT if port is None else int(port)
        if not 1 <= self.port <= 65535:
            raise EmbeddedPostgresError(f"invalid port {port!r}")
        self.user = SUPERUSER
        self.fsync = fsync
        fixed = sorted(set(settings or ()) & set(_FIXED))
        if fixed:
            raise EmbeddedPostgresError(
                f"the embedded PostgreSQL fixes these settings itself: {', '.join(fixed)}"
            )
        self._settings = {k: str(v) for k, v in (settings or {}).items()}
        self._bin_dir_arg = Path(bin_dir) if bin_dir is not None else None
        self._bin_dir: Path | None = None
        self._log = log
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._lock_fd: int | None = None
        self._started = False

    # ---- paths and connection parameters -------------------------------------------------------

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def socket_dir(self) -> Path:
        return self.data_dir / "socket"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "postgresql.log"

    @property
    def _lock_path(self) -> Path:
        return self.data_dir / "embedded.lock"

    @property
    def _pidfile(self) -> Path:
        return self.pgdata / "postmaster.pid"

    @property
    def dsn(self) -> str:
        """libpq URL of ``database``, e.g. ``postgresql://postgres@/plc?host=/d/socket&port=5432``."""
        return self.dsn_for(self.database)

    def dsn_for(self, database: str) -> str:
        """libpq URL of another database on this server."""
        return (
            f"postgresql://{quote(self.user, safe='')}@/{quote(database, safe='')}"
            f"?host={quote(str(self.socket_dir), safe='/')}&port={self.port}"
        )

    @property
    def connect_kwargs(self) -> dict[str, Any]:
        """asyncpg.connect() keyword arguments for ``database``."""
        return self.connect_kwargs_for(self.database)

    def connect_kwargs_for(self, database: str) -> dict[str, Any]:
        return {"host": str(self.socket_dir), "port": self.port, "user": self.user, "database": database}

    @property
    def pid(self) -> int | None:
        """PID of the running postmaster of this data directory, None if none runs."""
        pid = self._pidfile_pid()
        return pid if pid is not None and self._is_our_postmaster(pid) else None

    @property
    def running(self) -> bool:
        """True while a server started by this object is up."""
        return self._started and self.pid is not None

    @property
    def bin_dir(self) -> Path:
        """The directory with the PostgreSQL programs (raises PostgresNotInstalled if none)."""
        if self._bin_dir is None:
            self._bin_dir = self._find_bin_dir()
        return self._bin_dir

    # ---- life cycle ----------------------------------------------------------------------------

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> EmbeddedPostgres:
        """Initialise (first time), start and wait for the server; create the database if
        missing. A no-op while this object's server runs; after the postmaster died, starts it
        again."""
        if self.running:
            return self
        _ = self.bin_dir  # fail early and clearly if PostgreSQL is not installed
        self._prepare_directories()
        self._acquire_lock()
        launched = False
        try:
            if not (self.pgdata / "PG_VERSION").is_file():
                self._initdb()
            self._check_version()
            self._clear_leftovers()
            self._rotate_log()
            launched = True
            self._launch()
            self._ensure_database()
        except BaseException:
            if launched:
                with contextlib.suppress(Exception):
                    self._shutdown(quiet=True)
            self._release_lock()
            self._started = False
            raise
        if not self._started:
            atexit.register(self.stop)
        self._started = True
        return self

    def stop(self) -> None:
        """Stop the server this object started (fast shutdown, immediate if that hangs, SIGKILL
        as the last resort). A no-op if this object has no server running."""
        if not self._started:
            return
        try:
            self._shutdown()
        finally:
            self._started = False
            self._release_lock()
            atexit.unregister(self.stop)

    # ---- running PostgreSQL programs -----------------------------------------------------------

    def _say(self, text: str) -> None:
        if self._log is not None:
            self._log(text)

    def _find_bin_dir(self) -> Path:
        if self._bin_dir_arg is not None:
            candidates = [self._bin_dir_arg]
        else:
            candidates = _candidate_bin_dirs()
        usable = [d for d in candidates if _has_programs(d)]
        if not usable:
            looked = ", ".join(str(d) for d in candidates) or "pg_config --bindir, /usr/lib/postgresql/*/bin"
            raise PostgresNotInstalled(
                f"PostgreSQL is not installed: no {'/'.join(REQUIRED_PROGRAMS)} in {looked} "
                "(Debian: apt-get install postgresql; scripts/setup installs it)"
            )
        # An existing cluster needs the programs of its own major version.
        want = self._cluster_major()
        if want is not None and len(usable) > 1:
            for d in usable:
                if self._programs_major(d) == want:
                    return d
        return usable[0]

    def _cluster_major(self) -> int | None:
        try:
            return _major((self.pgdata / "PG_VERSION").read_text())
        except OSError:
            return None

    def _programs_major(self, bin_dir: Path) -> int | None:
        r = self._run([str(bin_dir / "pg_ctl"), "--version"], as_owner=False, timeout=30)
        return _major(r.stdout) if r.returncode == 0 else None

    def _owner(self) -> pwd.struct_passwd | None:
        """The OS user PostgreSQL runs as: None for "this process's user"."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(RUN_AS_ROOT_USER)
        except KeyError:
            raise EmbeddedPostgresError(
                f"running as root, the embedded PostgreSQL must run as the OS user {RUN_AS_ROOT_USER!r}, "
                "which does not exist (Debian's postgresql package creates it)"
            ) from None

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", TZ="UTC")
        owner = self._owner()
        if owner is not None:
            env.update(HOME=owner.pw_dir, USER=owner.pw_name, LOGNAME=owner.pw_name)
        return env

    def _run(
        self, argv: list[str], *, as_owner: bool = True, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL program (as the owner user when root); output captured, never raises
        for a non-zero exit."""
        kwargs: dict[str, Any] = {}
        owner = self._owner() if as_owner else None
        if owner is not None:
            kwargs.update(
                user=owner.pw_uid,
                group=owner.pw_gid,
                extra_groups=os.getgrouplist(owner.pw_name, owner.pw_gid),
            )
        cwd = self.data_dir if self.data_dir.is_dir() else Path("/")
        try:
            return subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                env=self._env(),
                cwd=cwd,
                timeout=timeout,
                **kwargs,
            )
        except subprocess.TimeoutExpired:
            name = Path(argv[0]).name
            raise EmbeddedPostgresError(f"{name} did not finish within {timeout:.0f} s") from None
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot run {argv[0]}: {exc}") from None

    def _prog(self, name: str) -> str:
        return str(self.bin_dir / name)

    # ---- directories ---------------------------------------------------------------------------

    def _prepare_directories(self) -> None:
        sock = self.socket_dir / f".s.PGSQL.{self.port}"
        if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
            raise EmbeddedPostgresError(
                f"the data directory path is too long for a unix socket ({sock} has more than "
                f"{MAX_SOCKET_PATH} bytes); choose a shorter data directory"
            )
        if any(c in str(self.socket_dir) for c in ",\"'"):
            raise EmbeddedPostgresError(
                f"the data directory path must not contain , \" or ': {self.data_dir}"
            )
        owner = self._owner()
        if owner is not None:
            self._check_parents(owner)
        else:
            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.socket_dir, 0o700)  # trust auth: only the owner may reach the socket
        if owner is not None:
            self._chown_to(owner)

    def _check_parents(self, owner: pwd.struct_passwd) -> None:
        """Create missing parents (mode 0755) and check that ``owner`` can enter every parent."""
        groups = set(os.getgrouplist(owner.pw_name, owner.pw_gid))
        for parent in reversed(self.data_dir.parents):
            if not parent.exists():
                parent.mkdir(mode=0o755)
                os.chmod(parent, 0o755)  # a directory this call created; the umask may have narrowed it
            st = parent.stat()
            if st.st_uid == owner.pw_uid:
                ok = st.st_mode & stat.S_IXUSR
            elif st.st_gid in groups:
                ok = st.st_mode & stat.S_IXGRP
            else:
                ok = st.st_mode & stat.S_IXOTH
            if not ok:
                raise DataDirUnreachable(
                    f"the OS user {owner.pw_name!r}, which runs the embedded PostgreSQL, "
                    f"cannot enter {parent} "
                    f"(mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid}); put the data directory "
                    f"elsewhere or let that user through (e.g. chmod o+x {parent})"
                )

    def _chown_to(self, owner: pwd.struct_passwd) -> None:
        """Give the data directory to ``owner``: the top, the socket dir, the log, and the
        cluster (recursively, only if its owner differs)."""
        uid, gid = owner.pw_uid, owner.pw_gid
        for path in (self.data_dir, self.socket_dir, self.log_path):
            if path.exists() and (path.stat().st_uid, path.stat().st_gid) != (uid, gid):
                os.chown(path, uid, gid)
        if self.pgdata.exists() and self.pgdata.stat().st_uid != uid:
            for root, dirs, files in os.walk(self.pgdata):
                os.chown(root, uid, gid, follow_symlinks=False)
                for name in dirs + files:
                    os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)

    def _acquire_lock(self) -> None:
        if self._lock_fd is not None:
            return
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirBusy(
                f"another process (pid {other}) is running the embedded PostgreSQL in {self.data_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- initdb, start, stop -------------------------------------------------------------------

    def _initdb(self) -> None:
        """Create the cluster in a scratch directory and rename it into place, so an interrupted
        initdb never leaves a half-made cluster behind."""
        scratch = self.data_dir / "pgdata.init"
        if scratch.exists():
            shutil.rmtree(scratch)
        argv = [
            self._prog("initdb"),
            "-D", str(scratch),
            "-U", SUPERUSER,
            "--auth-local=trust",
            "--auth-host=reject",
            "--encoding=UTF8",
            "--locale=C",
            "--data-checksums",
            "--no-instructions",
        ]  # fmt: skip
        if not self.fsync:
            argv.append("--no-sync")
        t0 = time.monotonic()
        r = self._run(argv, timeout=300)
        if r.returncode != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            raise EmbeddedPostgresError(f"initdb failed in {self.data_dir}: {_tail(r.stdout)}")
        os.rename(scratch, self.pgdata)
        self._say(f"initialised a PostgreSQL cluster in {self.pgdata} ({time.monotonic() - t0:.1f} s)")

    def _check_version(self) -> None:
        have, want = self._programs_major(self.bin_dir), self._cluster_major()
        if want is not None and have is not None and have != want:
            raise EmbeddedPostgresError(
                f"the cluster in {self.pgdata} was made by PostgreSQL {want}, but the programs in "
                f"{self.bin_dir} are PostgreSQL {have}; install PostgreSQL {want} or upgrade the cluster"
            )

    def _server_settings(self) -> dict[str, str]:
        s = {
            "shared_buffers": "64MB",
            "max_connections": "100",
            "jit": "off",
            "logging_collector": "off",
            "fsync": "on" if self.fsync else "off",
        }
        if not self.fsync:
            s.update(full_page_writes="off", synchronous_commit="off")
        s.update(self._settings)
        s.update(
            listen_addresses="",
            port=str(self.port),
            unix_socket_directories=str(self.socket_dir),
            unix_socket_permissions="0700",
        )
        return s

    def _launch(self) -> None:
        """pg_ctl start and wait; on failure, stop whatever started and raise with the log tail."""
        options = " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in self._server_settings().items())
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        argv = [
            self._prog("pg_ctl"), "start",
            "-D", str(self.pgdata),
            "-l", str(self.log_path),
            "-w", "-t", str(max(1, int(self.start_timeout))),
            "-s",
            "-o", options,
        ]  # fmt: skip
        t0 = time.monotonic()
        r = self._run(argv, timeout=self.start_timeout + 30)
        if r.returncode != 0 or self.pid is None:
            with contextlib.suppress(Exception):
                self._shutdown(quiet=True)
            log_tail = self._log_tail(offset)
            raise EmbeddedPostgresError(
                f"PostgreSQL did not start in {self.data_dir}: "
                f"{_tail(r.stdout) or f'pg_ctl exit {r.returncode}'}"
                + (f"; server log ({self.log_path}) ends with: {log_tail}" if log_tail else "")
            )
        self._say(f"started PostgreSQL (pid {self.pid}) in {self.data_dir} ({time.monotonic() - t0:.1f} s)")

    def _ensure_database(self) -> None:
        exists = self._psql(f"SELECT 1 FROM pg_database WHERE datname = {_literal(self.database)}")
        if exists.strip() != "1":
            try:
                self._psql(f"CREATE DATABASE {_ident(self.database)}")
            except EmbeddedPostgresError as exc:
                raise EmbeddedPostgresError(f"cannot create the database {self.database!r}: {exc}") from None
            self._say(f"created database {self.database}")

    def _psql(self, sql: str, database: str = "postgres") -> str:
        argv = [
            self._prog("psql"), "-X", "-q", "-A", "-t",
            "-v", "ON_ERROR_STOP=1",
            "-h", str(self.socket_dir), "-p", str(self.port), "-U", SUPERUSER, "-d", database,
            "-c", sql,
        ]  # fmt: skip
        r = self._run(argv, timeout=120)
        if r.returncode != 0:
            raise EmbeddedPostgresError(f"psql failed on {database!r}: {_tail(r.stdout)}")
        return r.stdout

    def _shutdown(self, quiet: bool = False) -> None:
        """Stop the postmaster of this data directory, if one runs, and wait for its children."""
        pid = self.pid
        if pid is None:
            self._wait_for_orphans()
            return
        t0 = time.monotonic()
        ctl = self._prog("pg_ctl")
        timeout = max(1, int(self.stop_timeout))
        r = self._run([ctl, "stop", "-D", str(self.pgdata), "-m", "fast", "-w", "-t", str(timeout), "-s"],
                      timeout=timeout + 30)  # fmt: skip
        if r.returncode != 0 and self.pid is not None:
            self._say(f"PostgreSQL did not stop within {timeout} s; stopping it in immediate mode")
            immediate = [ctl, "stop", "-D", str(self.pgdata), "-m", "immediate", "-w", "-t", "30", "-s"]
            self._run(immediate, timeout=60)
        if self.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self._wait_for_orphans()
        if not quiet:
            self._say(f"stopped PostgreSQL in {self.data_dir} ({time.monotonic() - t0:.1f} s)")

    def _clear_leftovers(self) -> None:
        """With the lock held: stop a server an earlier (dead) owner left running, or clear what
        a killed postmaster left (orphaned children, a stale postmaster.pid and socket lock)."""
        pid = self._pidfile_pid()
        if pid is None and not self._pidfile.exists():
            return
        if pid is not None and self._is_our_postmaster(pid):
            self._say(
                f"stopping the PostgreSQL (pid {pid}) an earlier process left running in {self.data_dir}"
            )
            self._shutdown()
            return
        self._wait_for_orphans()
        if _proc_available() or pid is None:
            # Nothing of that server runs any more; PostgreSQL itself would refuse these files
            # when the old PID is an unreaped zombie or was reused by another process.
            self._pidfile.unlink(missing_ok=True)
            (self.socket_dir / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)
            self._say(f"removed the stale postmaster.pid of a killed PostgreSQL in {self.data_dir}")

    def _pidfile_pid(self) -> int | None:
        try:
            first = self._pidfile.read_text().split("\n", 1)[0].strip()
        except OSError:
            return None
        return int(first) if first.isdigit() and int(first) > 0 else None

    def _is_our_postmaster(self, pid: int) -> bool:
        """True if ``pid`` runs and is a server of this data directory (checked through its
        working directory where /proc exists: a reused PID is not ours)."""
        if not _pid_alive(pid):
            return False
        if not _proc_available():
            return True
        return _same_path(f"/proc/{pid}/cwd", Path(os.path.realpath(self.pgdata)))

    def _server_processes(self) -> list[int]:
        """Live postgres processes working in this data directory (a killed postmaster's orphans)."""
        if not _proc_available():
            return []
        pgdata = Path(os.path.realpath(self.pgdata))
        postgres = os.path.realpath(self._prog("postgres"))
        out = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and _same_path(f"/proc/{entry.name}/cwd", pgdata):
                try:
                    exe = os.path.realpath(os.readlink(f"/proc/{entry.name}/exe"))
                except OSError:
                    continue
                if exe == postgres and _pid_alive(int(entry.name)):
                    out.append(int(entry.name))
        return out

    def _wait_for_orphans(self, timeout: float = 10.0) -> None:
        """Wait for this data directory's server processes to exit (they do, soon after their
        postmaster dies); SIGKILL those still there after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = self._server_processes()
            if not left:
                return
            if time.monotonic() >= deadline:
                for p in left:
                    with contextlib.suppress(OSError):
                        os.kill(p, signal.SIGKILL)
                time.sleep(0.1)
                if self._server_processes():
                    raise EmbeddedPostgresError(f"PostgreSQL processes in {self.pgdata} do not exit: {left}")
                return
            time.sleep(0.02)

    def _rotate_log(self) -> None:
        with contextlib.suppress(OSError):
            if self.log_path.stat().st_size > LOG_ROTATE_BYTES:
                os.replace(self.log_path, self.log_path.with_name(self.log_path.name + ".1"))

    def _log_tail(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return _tail(text)


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of program output, joined into one line."""
    kept = [ln.strip() for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'
