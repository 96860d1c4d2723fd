"""Settings: the only module that reads the environment.

Every setting has a command-line flag and an environment variable; the flag wins, then the
environment, then the default. `SETTINGS` feeds the CLI parsers and the docs.
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

SETTINGS = (DATABASE_URL, DATA_DIR, UPSTREAM)


def add_argument(parser: argparse.ArgumentParser, setting: Setting) -> None:
    """Add the setting's flag; its default comes from the environment, then the setting."""
    default = os.environ.get(setting.env) or setting.default
    shown = "none" if setting.default is None else setting.default
    parser.add_argument(
        setting.flag,
        dest=setting.name,
        default=default,
        metavar=setting.env,
        help=f"{setting.help} [env {setting.env}; default: {shown}]",
    )
