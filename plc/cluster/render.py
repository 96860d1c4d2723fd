"""Config rendering for the HA cluster: (topology, health) → config text. Pure: no I/O except
reading the templates and ha/health.json, which callers may also pass in as text.

The templates in ha/templates/ are written in the subset of Jinja2 that this module renders,
so Ansible's `template` module renders the same files:

- ``{{ name }}`` and ``{{ name.attr.attr }}`` (dict keys or attributes); booleans render as
  ``true``/``false`` (YAML), everything else with ``str()``;
- ``{% for x in name.attr %}`` … ``{% endfor %}`` (nestable);
- ``{% if name.attr %}`` … ``{% endif %}`` (nestable, no else): the body when the value is
  true in Python's and Jinja2's common sense (true, a non-empty string or list, a non-zero number);
- Jinja2's ``trim_blocks`` behaviour, which is Ansible's default: the newline right after a
  ``{% … %}`` tag is dropped.

Anything else inside ``{{ }}`` or ``{% %}`` is an error (TemplateError), never passed through.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

HA_DIR = Path(__file__).resolve().parents[2] / "ha"
TEMPLATES_DIR = HA_DIR / "templates"
HEALTH_PATH = HA_DIR / "health.json"

CHECK_KEYS = ("component", "port", "method", "path", "expect_status", "interval_s", "timeout_s", "fall", "rise",
              "used_by", "meaning")  # fmt: skip
COMPONENTS = ("postgres", "mirror")


class TemplateError(ValueError):
    """A template uses syntax outside the supported subset, or names a missing value."""


class HealthError(ValueError):
    """ha/health.json is not what the cluster expects; the message says which field."""


# ---------------------------------------------------------------------------- health.json


def load_health(text: str | None = None) -> dict[str, Any]:
    """Parse and check ha/health.json (or ``text``); returns the parsed document."""
    if text is None:
        text = HEALTH_PATH.read_text()
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise HealthError(f"health.json is not JSON: {exc}") from None
    checks = doc.get("checks") if isinstance(doc, dict) else None
    if not isinstance(checks, dict) or not checks:
        raise HealthError("health.json: 'checks' must be a non-empty object")
    for name, check in checks.items():
        if not isinstance(check, dict):
            raise HealthError(f"health.json: checks.{name} must be an object")
        missing = [k for k in CHECK_KEYS if k not in check]
        if missing:
            raise HealthError(f"health.json: checks.{name} lacks {', '.join(missing)}")
        if check["component"] not in COMPONENTS:
            raise HealthError(f"health.json: checks.{name}.component must be one of {', '.join(COMPONENTS)}")
        for k in ("port", "expect_status", "interval_s", "timeout_s", "fall", "rise"):
            v = check[k]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise HealthError(f"health.json: checks.{name}.{k} must be a positive integer")
        if not isinstance(check["path"], str) or not check["path"].startswith("/"):
            raise HealthError(f"health.json: checks.{name}.path must start with /")
        if check["method"] not in ("GET", "HEAD", "OPTIONS"):
            raise HealthError(f"health.json: checks.{name}.method must be GET, HEAD or OPTIONS")
        if "max_lag_bytes" in check:
            lag = parse_qs(urlsplit(check["path"]).query).get("lag")
            if lag != [str(check["max_lag_bytes"])]:
                raise HealthError(f"health.json: checks.{name}.path must carry lag={check['max_lag_bytes']} "
                                  "(its max_lag_bytes)")  # fmt: skip
    for needed in ("pg_primary", "pg_replica", "mirror_ready", "mirror_live", "pg_health"):
        if needed not in checks:
            raise HealthError(f"health.json: checks.{needed} is missing")
    if "max_lag_s" not in checks["mirror_ready"]:
        raise HealthError("health.json: checks.mirror_ready.max_lag_s is missing")
    return doc


def health_table(health: Mapping[str, Any]) -> str:
    """The Markdown table of docs/ha.md's health section (a test checks the doc holds it)."""
    lines = [
        "| check | component | request | passes when | interval | timeout | fall | rise | used by |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in health["checks"].items():
        lines.append(
            f"| `{name}` | {c['component']} | `{c['method']} :{c['port']}{c['path']}` | "
            f"{c['expect_status']}: {c['meaning']} | {c['interval_s']} s | {c['timeout_s']} s | "
            f"{c['fall']} | {c['rise']} | {', '.join(c['used_by'])} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class Node:
    """One host of one role. ``data_dir``/``socket_dir``/``pgpass`` matter only for the roles
    that have them."""

    name: str
    host: str
    data_dir: str = ""
    socket_dir: str = ""
    pgpass: str = ""
    port: int = 0
    backup_config: str = ""  # the node's pgBackRest config file (when the topology has a Backup)


@dataclass(frozen=True)
class User:
    name: str
    password: str
    database: str = ""


@dataclass(frozen=True)
class Backup:
    """pgBackRest: one repository for every PostgreSQL node (a directory every node mounts, or
    an S3 bucket when ``s3_bucket`` is set), WAL archiving from the primary, backups taken on it."""

    repo_path: str
    stanza: str = "plc"
    retention_full: int = 2
    archive_timeout: int = 60
    compress_type: str = "zst"
    process_max: int = 1
    log_dir: str = "/var/log/pgbackrest"
    lock_dir: str = "/tmp/pgbackrest"
    bin: str = "/usr/bin/pgbackrest"
    cipher_pass: str = ""
    s3_bucket: str = ""
    s3_endpoint: str = ""
    s3_region: str = ""
    s3_key: str = ""
    s3_key_secret: str = ""
    s3_uri_style: str = "path"


@dataclass(frozen=True)
class Topology:
    """Everything host-specific that the templates need; health timings come from health.json."""

    etcd: Sequence[Node]
    postgres: Sequence[Node]
    mirrors: Sequence[Node]
    haproxy_host: str
    haproxy_pidfile: str
    haproxy_stats_socket: str
    superuser: User
    replication: User
    rewind: User
    app: User
    pg_bin_dir: str = "/usr/lib/postgresql/15/bin"
    scope: str = "plc"
    namespace: str = "/service/"
    allowed_cidrs: Sequence[str] = ("127.0.0.0/8",)
    etcd_client_port: int = 2379
    etcd_peer_port: int = 2380
    etcd_token: str = "plc-etcd"
    # "new": the members in `etcd` bootstrap a cluster together (`plc cluster up`); "existing": a
    # member joins a running cluster after `etcdctl member add` (ansible/add_node.yml).
    etcd_initial_cluster_state: str = "new"
    pg_port: int = 5432
    rest_port: int = 8008
    haproxy_primary_port: int = 5432
    haproxy_replicas_port: int = 5433
    haproxy_mirror_port: int = 2582
    haproxy_stats_port: int = 7000
    haproxy_maxconn: int = 500
    haproxy_state_file: str = "/run/plc-haproxy/server-state"  # written before a reload, read at start
    # DCS and replication timings (docs/ha.md explains each): ttl 20 is Patroni's floor, and
    # loop_wait + 2 * retry_timeout <= ttl must hold.
    ttl: int = 20
    loop_wait: int = 2
    retry_timeout: int = 5
    maximum_lag_on_failover: int = 1048576
    synchronous_mode_strict: bool = True
    failsafe_mode: bool = True
    wal_sender_timeout: str = "5s"
    wal_receiver_timeout: str = "5s"
    shared_buffers: str = "32MB"
    max_connections: int = 100
    extra: Mapping[str, Any] = field(default_factory=dict)
    backup: Backup | None = None  # None: no WAL archiving and no backups

    def check(self) -> None:
        """Raise ValueError for a topology Patroni or etcd would refuse or run badly."""
        if len(self.etcd) % 2 == 0 or not self.etcd:
            raise ValueError(f"etcd needs an odd number of members, not {len(self.etcd)}")
        if len(self.postgres) < 2:
            raise ValueError("synchronous replication needs at least 2 PostgreSQL nodes")
        if self.ttl < 20 or self.loop_wait < 1 or self.retry_timeout < 3:
            raise ValueError("Patroni clamps ttl >= 20, loop_wait >= 1, retry_timeout >= 3")
        if self.loop_wait + 2 * self.retry_timeout > self.ttl:
            raise ValueError("loop_wait + 2 * retry_timeout must not exceed ttl")
        if self.backup is not None:
            if not self.backup.repo_path.startswith("/"):
                raise ValueError("the backup repository path must be absolute")
            if self.backup.retention_full < 1 or self.backup.archive_timeout < 1:
                raise ValueError("backup retention_full and archive_timeout must be at least 1")
            if not all(n.backup_config for n in self.postgres):
                raise ValueError("with backups every PostgreSQL node needs its pgBackRest config path")
        names = [n.name for n in (*self.etcd, *self.postgres, *self.mirrors)]
        if len(set(names)) != len(names):
            raise ValueError("node names must be unique")


# ---------------------------------------------------------------------------- the renderer

_TOKEN = re.compile(r"{{(.*?)}}|{%(.*?)%}\n?", re.S)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_FOR = re.compile(r"^for\s+([A-Za-z_][A-Za-z0-9_]*)\s+in\s+(\S+)$")
_IF = re.compile(r"^if\s+(\S+)$")


def _lookup(expr: str, ctx: Mapping[str, Any]) -> Any:
    expr = expr.strip()
    if not _NAME.match(expr):
        raise TemplateError(f"unsupported expression {{{{ {expr} }}}}: only dotted names")
    head, *rest = expr.split(".")
    if head not in ctx:
        raise TemplateError(f"undefined name {head!r}")
    value = ctx[head]
    for part in rest:
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif not isinstance(value, Mapping) and hasattr(value, part):
            value = getattr(value, part)
        else:
            raise TemplateError(f"{expr}: no {part!r}")
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        raise TemplateError("a value is None")
    return str(value)


def _parse(text: str) -> list[Any]:
    """Nodes: str (literal), ("var", expr), ("for", var, expr, body), ("if", expr, body)."""
    root: list[Any] = []
    stack: list[tuple[list[Any], str]] = []  # (the enclosing body, the block's end tag)
    out = root
    pos = 0
    for m in _TOKEN.finditer(text):
        out.append(text[pos : m.start()])
        pos = m.end()
        if m.group(1) is not None:
            out.append(("var", m.group(1)))
            continue
        tag = m.group(2).strip()
        fm, im = _FOR.match(tag), _IF.match(tag)
        if fm or im:
            body: list[Any] = []
            out.append(("for", fm.group(1), fm.group(2), body) if fm else ("if", im.group(1), body))  # type: ignore[union-attr]
            stack.append((out, "endfor" if fm else "endif"))
            out = body
        elif tag in ("endfor", "endif"):
            if not stack or stack[-1][1] != tag:
                raise TemplateError(f"{tag} without {tag[3:]}")
            out = stack.pop()[0]
        else:
            raise TemplateError(f"unsupported tag {{% {tag} %}}: only for/endfor and if/endif")
    if stack:
        raise TemplateError(f"{stack[-1][1][3:]} without {stack[-1][1]}")
    out.append(text[pos:])
    return root


def _emit(nodes: list[Any], ctx: Mapping[str, Any], parts: list[str]) -> None:
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif node[0] == "var":
            parts.append(_fmt(_lookup(node[1], ctx)))
        elif node[0] == "if":
            if _lookup(node[1], ctx):
                _emit(node[2], ctx, parts)
        else:
            _, var, expr, body = node
            seq = _lookup(expr, ctx)
            if isinstance(seq, (str, bytes, Mapping)) or not isinstance(seq, Sequence):
                raise TemplateError(f"{expr} is not a list")
            for item in seq:
                _emit(body, {**ctx, var: item}, parts)


def render_text(template: str, context: Mapping[str, Any]) -> str:
    """Render ``template`` (the Jinja2 subset above) with ``context``."""
    parts: list[str] = []
    _emit(_parse(template), context, parts)
    return "".join(parts)


def render_template(name: str, context: Mapping[str, Any]) -> str:
    return render_text((TEMPLATES_DIR / name).read_text(), context)


# ---------------------------------------------------------------------------- contexts


def _users(t: Topology) -> dict[str, Any]:
    return {"superuser": t.superuser, "replication": t.replication, "rewind": t.rewind, "app": t.app}


def _etcd(t: Topology) -> dict[str, Any]:
    if t.etcd_initial_cluster_state not in ("new", "existing"):
        raise ValueError(f"etcd_initial_cluster_state must be new or existing, not {t.etcd_initial_cluster_state!r}")
    return {
        "client_port": t.etcd_client_port,
        "peer_port": t.etcd_peer_port,
        "token": t.etcd_token,
        "initial_cluster": ",".join(f"{m.name}=http://{m.host}:{t.etcd_peer_port}" for m in t.etcd),
        "initial_cluster_state": t.etcd_initial_cluster_state,
        "hosts": ",".join(f"{m.host}:{t.etcd_client_port}" for m in t.etcd),
    }


def etcd_context(t: Topology, member: Node) -> dict[str, Any]:
    return {"member": member, "etcd": _etcd(t)}


def patroni_context(t: Topology, node: Node, health: Mapping[str, Any]) -> dict[str, Any]:
    rest_port = health["checks"]["pg_primary"]["port"]
    if rest_port != t.rest_port:
        raise ValueError(f"health.json checks Patroni on port {rest_port}, the topology puts it on {t.rest_port}")
    patroni = {
        "scope": t.scope, "namespace": t.namespace, "rest_port": t.rest_port, "pg_port": t.pg_port,
        "ttl": t.ttl, "loop_wait": t.loop_wait, "retry_timeout": t.retry_timeout,
        "maximum_lag_on_failover": t.maximum_lag_on_failover,
        "synchronous_mode_strict": t.synchronous_mode_strict, "failsafe_mode": t.failsafe_mode,
        "wal_sender_timeout": t.wal_sender_timeout, "wal_receiver_timeout": t.wal_receiver_timeout,
        "shared_buffers": t.shared_buffers, "max_connections": t.max_connections,
        "bin_dir": t.pg_bin_dir, "allowed_cidrs": list(t.allowed_cidrs),
    }  # fmt: skip
    return {"node": node, "patroni": patroni, "etcd": _etcd(t), "users": _users(t), "backup": _backup(t)}


def _backup(t: Topology) -> dict[str, Any]:
    """The ``backup`` object of patroni.yml.j2 and pgbackrest.conf.j2 (``enabled`` false: none)."""
    if t.backup is None:
        return {"enabled": False}
    return {"enabled": True, **{k: getattr(t.backup, k) for k in Backup.__dataclass_fields__}}


def haproxy_context(t: Topology, health: Mapping[str, Any]) -> dict[str, Any]:
    checks = health["checks"]
    if any(m.port != checks["mirror_ready"]["port"] for m in t.mirrors):
        raise ValueError(f"health.json checks the mirror nodes on port {checks['mirror_ready']['port']}, "
                         "the topology has them listen on another")  # fmt: skip
    if checks["pg_replica"]["port"] != t.rest_port or checks["pg_primary"]["port"] != t.rest_port:
        raise ValueError(f"health.json checks Patroni on another port than the topology's {t.rest_port}")
    return {
        "haproxy": {
            "host": t.haproxy_host, "maxconn": t.haproxy_maxconn, "pidfile": t.haproxy_pidfile,
            "stats_socket": t.haproxy_stats_socket, "stats_port": t.haproxy_stats_port,
            "state_file": t.haproxy_state_file,
        },  # fmt: skip
        "postgres_frontends": [
            {"name": "postgres_primary", "port": t.haproxy_primary_port, "balance": "first",
             "check": checks["pg_primary"],
             "comment": "Writes: the one node whose Patroni answers /primary (the leader)."},
            {"name": "postgres_replicas", "port": t.haproxy_replicas_port, "balance": "roundrobin",
             "check": checks["pg_replica"],
             "comment": "Reads: streaming replicas within the lag bound, round robin."},
        ],  # fmt: skip
        "postgres_nodes": [{"name": n.name, "host": n.host, "pg_port": t.pg_port} for n in t.postgres],
        "mirror_frontend": {"name": "mirror", "port": t.haproxy_mirror_port, "check": checks["mirror_ready"]},
        "mirror_nodes": [{"name": m.name, "host": m.host, "port": m.port} for m in t.mirrors],
    }


def render_etcd(t: Topology, member: Node) -> str:
    return render_template("etcd.yml.j2", etcd_context(t, member))


def render_patroni(t: Topology, node: Node, health: Mapping[str, Any]) -> str:
    return render_template("patroni.yml.j2", patroni_context(t, node, health))


def render_pgbackrest(t: Topology, node: Node, health: Mapping[str, Any]) -> str:
    if t.backup is None:
        raise ValueError("the topology has no backup settings")
    return render_template("pgbackrest.conf.j2", patroni_context(t, node, health))


def render_haproxy(t: Topology, health: Mapping[str, Any]) -> str:
    return render_template("haproxy.cfg.j2", haproxy_context(t, health))
