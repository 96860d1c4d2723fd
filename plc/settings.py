"""Settings: the only module that reads the environment.

Every setting has a command-line flag and an environment variable; the flag wins, then the
environment, then the default. `SETTINGS` feeds the CLI parsers and the docs
(`markdown_table()` is the table in docs/configuration.md; a test keeps the two equal).

A setting's `kind` says how its value is read: "text" (as given), "port" (an integer
0–65535), "seconds" (a finite number >= 0) or "flag" (a boolean: the flag takes no value;
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
    kind: str = "text"  # "text", "port", "seconds" or "flag" (see the module docstring)


DATABASE_URL = Setting(
    "database_url",
    "--database-url",
    "PLC_DATABASE_URL",
    None,
    "PostgreSQL URL (libpq form). Absent: a private PostgreSQL in the data directory, "
    "started and stopped by the program itself.",
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

SETTINGS = (DATABASE_URL, DATA_DIR, UPSTREAM, HOST, PORT, NO_INGEST, READY_MAX_LAG)

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
        type={"port": port_number, "seconds": seconds}.get(setting.kind, str),
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
