"""Settings: the only module that reads the environment.

Every setting has a command-line flag and an environment variable; the flag wins, then the
environment, then the default. `SETTINGS` feeds the CLI parsers and the docs
(`markdown_table()` is the table in docs/configuration.md; a test keeps the two equal).

A setting's `kind` says how its value is read: "text" (as given), "port" (an integer
0–65535), "seconds" (a finite number >= 0), "bytes" (an integer >= 1), "rate" (`N/SECONDS`,
or 0/off for no limit) "count" (an integer >= 0), "workers" (the same or `auto` = the CPU cores) "choice" (one of the setting's `choices`, any case) or "flag" (a boolean: the flag takes no value;
the environment variable is one of 1/true/yes/on or 0/false/no/off, any case, empty meaning
unset).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str  # attribute name on the parsed arguments
    flag: str
    env: str
    default: str | None
    help: str
    # "text", "port", "seconds", "bytes", "rate", "count", "workers", "choice" or "flag" (module docstring)
    kind: str = "text"
    choices: tuple[str, ...] = ()  # the values a "choice" setting takes


DATABASE_URL = Setting(
    "database_url",
    "--database-url",
    "PLC_DATABASE_URL",
    None,
    "PostgreSQL URL (libpq form). Absent: a private PostgreSQL in the data directory, "
    "started and stopped by the program itself.",
)
READ_DATABASE_URL = Setting(
    "read_database_url",
    "--read-database-url",
    "PLC_READ_DATABASE_URL",
    None,
    "PostgreSQL URL for reads, e.g. HAProxy's replicas port (replicas within a lag bound). The "
    "read routes, /export, /export/stream and the cache's change feed use it, and fall back to "
    "--database-url when it cannot be reached. Absent: every read goes to --database-url.",
)
DATA_DIR = Setting(
    "data_dir",
    "--data-dir",
    "PLC_DATA_DIR",
    "data",
    "Directory for the program's own files (the embedded PostgreSQL lives in <data-dir>/postgres).",
)

UPSTREAM = Setting(
    "upstream",
    "--upstream",
    "PLC_UPSTREAM",
    "https://plc.directory",
    "Base URL of the PLC directory to mirror (its /export and /export/stream are followed).",
)

UPSTREAM_MODE = Setting(
    "upstream_mode",
    "--upstream-mode",
    "PLC_UPSTREAM_MODE",
    "auto",
    "How the upstream is followed: `sequenced` (/export?after=<seq> pages and /export/stream), "
    "`legacy` (timestamp pages, for a directory without seq; ops stored without seq) or `auto` "
    "(the mode of the stored cursor, else asked of the upstream's first /export page).",
    kind="choice",
    choices=("auto", "sequenced", "legacy"),
)

LOG_FORMAT = Setting(
    "log_format",
    "--log-format",
    "PLC_LOG_FORMAT",
    "text",
    "Format of the log lines on stderr: `text`, or `json` (one object per line: ts, level, logger, "
    "msg and any extra fields such as exc).",
    kind="choice",
    choices=("text", "json"),
)

HOST = Setting(
    "host",
    "--host",
    "PLC_HOST",
    "127.0.0.1",
    "Address `plc serve` listens on (0.0.0.0 or :: for every interface).",
)
PORT = Setting(
    "port",
    "--port",
    "PLC_PORT",
    "2582",
    "TCP port `plc serve` listens on.",
    kind="port",
)
NO_INGEST = Setting(
    "no_ingest",
    "--no-ingest",
    "PLC_NO_INGEST",
    None,
    "`plc serve` only serves what the database holds and never contacts the upstream.",
    kind="flag",
)

READY_MAX_LAG = Setting(
    "ready_max_lag",
    "--ready-max-lag",
    "PLC_READY_MAX_LAG",
    "300",
    "Largest lag behind the upstream (seconds since the createdAt of the newest op ingested) at "
    "which `GET /-/ready` still answers 200. Ignored with --no-ingest.",
    kind="seconds",
)

INGEST_WORKERS = Setting(
    "ingest_workers",
    "--ingest-workers",
    "PLC_INGEST_WORKERS",
    "auto",
    "Processes that validate upstream ops while the main process fetches and commits (a DID's ops "
    "always go to the same one). `auto`: one per CPU core; 0: validate in the main process.",
    kind="workers",
)

NODE_NAME = Setting(
    "node_name",
    "--node-name",
    "PLC_NODE_NAME",
    None,
    "This node's name in the ingest-leader record (plc_ingest_leader.node), /-/status and logs. "
    "Absent: <hostname>:<port>.",
)

DOC_CACHE_SIZE = Setting(
    "doc_cache_size",
    "--doc-cache-size",
    "PLC_DOC_CACHE_SIZE",
    "20000",
    "DIDs whose ops and rendered replies `plc serve` keeps in memory (least recently used dropped "
    "first; 0: no cache). Dropped at once when this node stores an op of the DID, within 0.05 s "
    "when another node does.",
    kind="count",
)

FORWARD_UPSTREAM = Setting(
    "forward_upstream",
    "--forward-upstream",
    "PLC_FORWARD_UPSTREAM",
    None,
    "Where `POST /:did` is forwarded after local validation: a base URL, or several separated by "
    "commas (all get the op at once; the first one's answer is relayed). Absent: the --upstream. "
    "`off`: POST answers 501.",
)
FORWARD_RETRY_BUDGET = Setting(
    "forward_retry_budget",
    "--forward-retry-budget",
    "PLC_FORWARD_RETRY_BUDGET",
    "30",
    "Seconds a forwarded op may spend in retries (connection failures, 502/503/504, 429 with its "
    "Retry-After) before the upstream's last answer, or a 502/504, is relayed.",
    kind="seconds",
)
FORWARD_PENDING_WINDOW = Setting(
    "forward_pending_window",
    "--forward-pending-window",
    "PLC_FORWARD_PENDING_WINDOW",
    "600",
    "Seconds an op accepted upstream is served from this node before the ingest brings it back; "
    "after that it is recorded as an `unpublished` divergence and dropped.",
    kind="seconds",
)
FORWARD_IP_RATE = Setting(
    "forward_ip_rate",
    "--forward-ip-rate",
    "PLC_FORWARD_IP_RATE",
    "60/3600",
    "Submissions allowed per client (IPv4 address or IPv6 /64) as N/SECONDS (a token bucket of N); "
    "0 or off: no limit.",
    kind="rate",
)
FORWARD_DID_RATE = Setting(
    "forward_did_rate",
    "--forward-did-rate",
    "PLC_FORWARD_DID_RATE",
    "10/3600",
    "Forwarded submissions allowed per DID as N/SECONDS (a token bucket of N); 0 or off: no limit.",
    kind="rate",
)
FORWARD_MAX_BODY = Setting(
    "forward_max_body",
    "--forward-max-body",
    "PLC_FORWARD_MAX_BODY",
    "65536",
    "Largest `POST /:did` body read, in bytes (a larger one gets 413).",
    kind="bytes",
)
TRUSTED_PROXIES = Setting(
    "trusted_proxies",
    "--trusted-proxies",
    "PLC_TRUSTED_PROXIES",
    None,
    "Comma-separated addresses or networks of reverse proxies whose X-Forwarded-For is believed "
    "when limiting submissions per client. Absent: the peer address is the client.",
)
FORWARD_SETTINGS = (
    FORWARD_UPSTREAM,
    FORWARD_RETRY_BUDGET,
    FORWARD_PENDING_WINDOW,
    FORWARD_IP_RATE,
    FORWARD_DID_RATE,
    FORWARD_MAX_BODY,
    TRUSTED_PROXIES,
)

IDENTITY_NAMESERVERS = Setting(
    "identity_nameservers",
    "--identity-nameservers",
    "PLC_IDENTITY_NAMESERVERS",
    None,
    "DNS servers for handle resolution (_atproto TXT records), comma-separated, each ip, ip:port "
    "or [ipv6]:port. Absent: the system's resolvers (/etc/resolv.conf).",
)
IDENTITY_DNS_TIMEOUT = Setting(
    "identity_dns_timeout",
    "--identity-dns-timeout",
    "PLC_IDENTITY_DNS_TIMEOUT",
    "3",
    "Seconds one DNS lookup of a handle may take (all servers and retries included).",
    kind="seconds",
)
IDENTITY_HTTP_TIMEOUT = Setting(
    "identity_http_timeout",
    "--identity-http-timeout",
    "PLC_IDENTITY_HTTP_TIMEOUT",
    "5",
    "Seconds one HTTPS request for a handle's /.well-known/atproto-did or a did:web document "
    "may take, from connecting to the last byte of the body.",
    kind="seconds",
)
IDENTITY_CACHE_TTL = Setting(
    "identity_cache_ttl",
    "--identity-cache-ttl",
    "PLC_IDENTITY_CACHE_TTL",
    "300",
    "Seconds a resolved handle or DID document is cached (0: no cache).",
    kind="seconds",
)
IDENTITY_NEGATIVE_TTL = Setting(
    "identity_negative_ttl",
    "--identity-negative-ttl",
    "PLC_IDENTITY_NEGATIVE_TTL",
    "60",
    "Seconds a failed handle or DID resolution is cached (0: no negative cache).",
    kind="seconds",
)
# The identity resolver's settings (plc.identity.resolver.config_from_args reads them). Not in
# SETTINGS yet: `plc serve` does not take them yet (docs/identity.md, "Wiring").
IDENTITY_SETTINGS = (
    IDENTITY_NAMESERVERS,
    IDENTITY_DNS_TIMEOUT,
    IDENTITY_HTTP_TIMEOUT,
    IDENTITY_CACHE_TTL,
    IDENTITY_NEGATIVE_TTL,
)

SETTINGS = (
    DATABASE_URL, READ_DATABASE_URL, DATA_DIR, UPSTREAM, UPSTREAM_MODE, LOG_FORMAT, HOST, PORT, NO_INGEST,
    READY_MAX_LAG, INGEST_WORKERS, NODE_NAME, DOC_CACHE_SIZE, *FORWARD_SETTINGS, *IDENTITY_SETTINGS,
)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class SettingError(ValueError):
    """A setting's value (from its environment variable) cannot be read; the message says why."""


def port_number(text: str) -> int:
    """A TCP port from its text (argparse `type=` for "port" settings)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {value}")
    return value


def seconds(text: str) -> float:
    """A number of seconds >= 0 from its text (argparse `type=` for "seconds" settings)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be a finite number >= 0, not {text!r}")
    return value


def whole_number(text: str, minimum: int, what: str = "whole number") -> int:
    """An integer >= `minimum` from its text, or argparse.ArgumentTypeError saying why not."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a {what}: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
    return value


def byte_count(text: str) -> int:
    """An integer >= 1 from its text (argparse `type=` for "bytes" settings)."""
    return whole_number(text, 1, "number of bytes")


def rate_text(text: str) -> str:
    """A rate `N/SECONDS` (or 0/off), checked and kept as text (argparse `type=` for "rate")."""
    from plc.forward.limits import parse_rate

    try:
        parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def flag_value(args: argparse.Namespace, setting: Setting) -> bool:
    """The boolean value of a "flag" setting on parsed arguments; raises SettingError when its
    environment variable holds something that is neither true nor false."""
    value = getattr(args, setting.name)
    if isinstance(value, bool):
        return value
    raise SettingError(
        f"{setting.env} must be one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}, not {value!r}"
    )


def _env_flag(text: str | None) -> bool | str:
    """An environment variable's text as a boolean; unrecognised text is kept as is (and
    refused by `flag_value`, so only the command that reads the setting fails)."""
    if text is None or text.strip() == "":
        return False
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    return text


def shown_default(setting: Setting) -> str:
    if setting.kind == "flag":
        return "off"
    return "none" if setting.default is None else setting.default


def count_or_auto(text: str) -> int:
    """A "workers" setting: an integer >= 0, or `auto` for the number of CPU cores."""
    if text.strip().lower() == "auto":
        return os.cpu_count() or 1
    return count(text)


def count(text: str) -> int:
    """A "count" setting: an integer >= 0."""
    return whole_number(text, 0)


def choice_of(setting: Setting):  # noqa: ANN201 - an argparse `type=`
    """The argparse `type=` of a "choice" setting: one of its `choices` (any case)."""

    def read(text: str) -> str:
        value = text.strip().lower()
        if value not in setting.choices:
            raise argparse.ArgumentTypeError(
                f"must be one of {', '.join(setting.choices)}, not {text!r} ({setting.env})"
            )
        return value

    read.__name__ = setting.name
    return read


def add_argument(parser: argparse.ArgumentParser, setting: Setting) -> None:
    """Add the setting's flag; its default comes from the environment, then the setting."""
    shown = shown_default(setting)
    if setting.kind == "flag":
        parser.add_argument(
            setting.flag,
            dest=setting.name,
            action="store_true",
            default=_env_flag(os.environ.get(setting.env)),
            help=f"{setting.help} [env {setting.env}=1; default: {shown}]",
        )
        return
    default = os.environ.get(setting.env) or setting.default
    parser.add_argument(
        setting.flag,
        dest=setting.name,
        default=default,
        metavar=setting.env,
        type={"port": port_number, "seconds": seconds, "bytes": byte_count, "rate": rate_text,
               "count": count, "workers": count_or_auto, "choice": choice_of(setting)}.get(
            setting.kind, str
        ),
        help=f"{setting.help} [env {setting.env}; default: {shown}]",
    )


def _md(text: str) -> str:
    """Text safe in a Markdown table cell."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def markdown_table() -> str:
    """The settings as the Markdown table in docs/configuration.md (one row per setting)."""
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = "off" if s.kind == "flag" else ("none" if s.default is None else f"`{s.default}`")
        rows.append(f"| `{s.flag}` | `{s.env}` | {default} | {_md(s.help)} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
