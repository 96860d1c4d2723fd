"""Config rendering for the HA cluster: (topology, health) → config text. Pure: no I/O except
reading the templates and ha/health.json, which callers may also pass in as text.

The templates in ha/templates/ are written in the subset of Jinja2 that this module renders,
so Ansible's `template` module renders the same files:

- ``{{ name }}`` and ``{{ name.attr.attr }}`` (dict keys or attributes); booleans render as
  ``true``/``false`` (YAML), everything else with ``str()``;
- ``{% for x in name.attr %}`` … ``{% endfor %}`` (nestable);
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


@dataclass(frozen=True)
class User:
    name: str
    password: str
    database: str = ""


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
    pg_port: int = 5432
    rest_port: int = 8008
    haproxy_primary_port: int = 5432
    haproxy_replicas_port: int = 5433
    haproxy_mirror_port: int = 2582
    haproxy_stats_port: int = 7000
    haproxy_maxconn: int = 500
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
        names = [n.name for n in (*self.etcd, *self.postgres, *self.mirrors)]
        if len(set(names)) != len(names):
            raise ValueError("node names must be unique")


# ---------------------------------------------------------------------------- the renderer

_TOKEN = re.compile(r"{{(.*?)}}|{%(.*?)%}\n?", re.S)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_FOR = re.compile(r"^for\s+([A-Za-z_][A-Za-z0-9_]*)\s+in\s+(\S+)$")


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
    """Nodes: str (literal), ("var", expr), ("for", var, expr, body)."""
    root: list[Any] = []
    stack: list[tuple[list[Any], str, str]] = []
    out = root
    pos = 0
    for m in _TOKEN.finditer(text):
        out.append(text[pos : m.start()])
        pos = m.end()
        if m.group(1) is not None:
            out.append(("var", m.group(1)))
            continue
        tag = m.group(2).strip()
        fm = _FOR.match(tag)
        if fm:
            body: list[Any] = []
            out.append(("for", fm.group(1), fm.group(2), body))
            stack.append((out, fm.group(1), fm.group(2)))
            out = body
        elif tag == "endfor":
            if not stack:
                raise TemplateError("endfor without for")
            out = stack.pop()[0]
        else:
            raise TemplateError(f"unsupported tag {{% {tag} %}}: only for/endfor")
    if stack:
        raise TemplateError("for without endfor")
    out.append(text[pos:])
    return root


def _emit(nodes: list[Any], ctx: Mapping[str, Any], parts: list[str]) -> None:
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif node[0] == "var":
            parts.append(_fmt(_lookup(node[1], ctx)))
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
    return {
        "client_port": t.etcd_client_port,
        "peer_port": t.etcd_peer_port,
        "token": t.etcd_token,
        "initial_cluster": ",".join(f"{m.name}=http://{m.host}:{t.etcd_peer_port}" for m in t.etcd),
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
    return {"node": node, "patroni": patroni, "etcd": _etcd(t), "users": _users(t)}


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


def render_haproxy(t: Topology, health: Mapping[str, Any]) -> str:
    return render_template("haproxy.cfg.j2", haproxy_context(t, health))
