"""What the benchmarks say about the machine they ran on (shared by the bench scripts)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _proc_field(path: str, name: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _proc_field("/proc/cpuinfo", "model name") or "unknown CPU"


def ram() -> str:
    total = _proc_field("/proc/meminfo", "MemTotal")  # "24576000 kB"
    return f"{int(total.split()[0]) / 1024 / 1024:.1f} GiB" if total else "?"


def describe() -> str:
    """One line: CPUs, CPU model, kernel, Python."""
    return f"{os.cpu_count()} CPUs ({cpu_model()}), Linux {platform.release()}, Python {platform.python_version()}"
