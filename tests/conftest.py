"""Shared pytest fixtures: where the shared test vectors live, and PostgreSQL.

The vectors are read in place from ../shared/vectors relative to the repository root; they are
never copied or edited. Helpers that build signed operations live in tests/plcdata.py.
PostgreSQL: `pg_server` is one embedded server for the whole session; `pg_database` /
`pg_dsn` give each test its own fresh database on it (helpers in tests/pg.py). The local HA
cluster: `cluster_session`, `cluster_upstream`, `local_cluster` (tests/cluster_fixtures.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from plc.store.embedded import EmbeddedPostgres, EmbeddedPostgresError

import pg

# The local HA cluster's fixtures, defined here once so that the session cluster and its fake
# upstream really are one per session: a test module that imported them itself would get its
# own "session" cluster on the same fixed addresses as the others'.
from cluster_fixtures import cluster_session, cluster_upstream, local_cluster  # noqa: E402, F401

VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "vectors"


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    """The shared vectors directory (/work/shared/vectors in the standard layout)."""
    if not VECTORS.is_dir():
        pytest.fail(f"shared test vectors not found at {VECTORS}")
    return VECTORS


# ---- PostgreSQL: one embedded server per session, a fresh database per test (tests/pg.py) ----


@pytest.fixture(scope="session")
def pg_base() -> Iterator[Path]:
    """A session directory under /tmp that the `postgres` OS user can enter; removed at the end."""
    base = pg.traversable_tmpdir()
    try:
        yield base
    finally:
        pg.remove_tree(base)


@pytest.fixture(scope="session")
def pg_server(pg_base: Path) -> Iterator[EmbeddedPostgres]:
    """The session's embedded PostgreSQL (fsync off). Fails, never skips, without PostgreSQL."""
    server = pg.session_server(pg_base)
    error = None
    try:
        server.start()
    except EmbeddedPostgresError as exc:
        error = str(exc)
    if error is not None:
        pytest.fail(f"cannot start the test PostgreSQL: {error}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_database(pg_server: EmbeddedPostgres) -> Iterator[pg.TestDatabase]:
    """This test's own empty database (name, dsn, connect_kwargs), dropped afterwards."""
    db = pg.create_database(pg_server)
    try:
        yield db
    finally:
        pg.drop_database(pg_server, db)


@pytest.fixture
def pg_dsn(pg_database: pg.TestDatabase) -> str:
    """libpq URL of this test's own database (asyncpg.connect(dsn) accepts it)."""
    return pg_database.dsn
