"""Shared pytest fixtures: where the shared test vectors live.

The vectors are read in place from ../shared/vectors relative to the repository root; they are
never copied or edited. Helpers that build signed operations live in tests/plcdata.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "vectors"


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    """The shared vectors directory (/work/shared/vectors in the standard layout)."""
    if not VECTORS.is_dir():
        pytest.fail(f"shared test vectors not found at {VECTORS}")
    return VECTORS
