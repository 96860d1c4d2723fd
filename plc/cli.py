"""The `plc` command line: one entry point, one module per subcommand.

Each subcommand module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed arguments and returning the exit code.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    from . import serve_cmd
    from .cluster import cluster_cmd
    from .store import migrate_cmd
    from .sync import audit_cmd, sync_cmd
    from .tools import generate, verify

    parser = argparse.ArgumentParser(prog="plc", description="A validating mirror of the did:plc directory.")
    parser.add_argument("--version", action="version", version=f"plc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    generate.register(sub)
    verify.register(sub)
    migrate_cmd.register(sub)
    sync_cmd.register(sub)
    audit_cmd.register(sub)
    serve_cmd.register(sub)
    cluster_cmd.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("plc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
