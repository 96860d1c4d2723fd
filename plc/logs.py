"""Log lines on stderr for the long-running commands (`plc serve`, `plc sync`, `plc audit`).

`configure(fmt, level, prog)` replaces `logging.basicConfig`: one stderr handler on the root
logger at `level`, formatted as

- ``text``: ``<prog>: <LEVEL> <logger>: <message>`` (what the commands always printed), except
  for the command's own logger (`COMMAND_LOGGER`, see below): ``<prog>: <message>`` for
  progress lines and ``<prog>: error: <message>`` for errors;
- ``json``: one JSON object per line: ``ts`` (ISO-8601 UTC, milliseconds, ``Z``), ``level``,
  ``logger``, ``msg``, then every extra field given with ``extra={...}``, and ``exc`` (the
  formatted traceback) when there is one. Values that are not JSON are written as their str().

`COMMAND_LOGGER` ("plc.command") is where a command's own progress and error lines go; it is
set to INFO by `configure`, so those lines show whatever `level` the rest of the logging has.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from typing import Any

import orjson

TEXT = "text"
JSON = "json"
FORMATS = (TEXT, JSON)
COMMAND_LOGGER = "plc.command"

# every attribute a plain LogRecord has: the rest came from `extra=`
_STANDARD = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {
    "message", "asctime", "taskName",
}


def iso_ms(created: float) -> str:
    """A record time as ISO-8601 UTC with milliseconds: ``2026-01-02T03:04:05.678Z``."""
    dt = datetime.fromtimestamp(created, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": iso_ms(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in obj and not key.startswith("_"):
                obj[key] = value
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            obj["exc"] = record.exc_text
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(obj, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


class TextFormatter(logging.Formatter):
    """``<prog>: <LEVEL> <logger>: <message>``; the command's own lines without level and name."""

    def __init__(self, prog: str):
        super().__init__(f"{prog}: %(levelname)s %(name)s: %(message)s")
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        if record.name == COMMAND_LOGGER:
            text = record.getMessage()
            if record.levelno >= logging.ERROR:
                text = f"error: {text}"
            if record.exc_info:
                text += "\n" + self.formatException(record.exc_info)
            return f"{self.prog}: {text}"
        return super().format(record)


def configure(fmt: str = TEXT, level: int = logging.WARNING, prog: str = "plc") -> logging.Logger:
    """Send log records at ``level`` and above (and the command's own lines) to stderr in
    ``fmt`` (`text` or `json`); returns the command's logger. Replaces earlier handlers, so
    calling it twice is harmless."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == JSON else TextFormatter(prog))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    command = logging.getLogger(COMMAND_LOGGER)
    command.setLevel(logging.INFO)
    return command


def command_logger() -> logging.Logger:
    return logging.getLogger(COMMAND_LOGGER)


__all__ = ["COMMAND_LOGGER", "FORMATS", "JSON", "TEXT", "JsonFormatter", "TextFormatter", "command_logger",
           "configure", "iso_ms"]
