"""The registry's SQLite index: models, their files, and blobs an import has not yet committed.

WAL mode lets `models list` read while another process imports; every write is one
`BEGIN IMMEDIATE` transaction (the write lock is taken up front, so two writers never deadlock
upgrading read locks), and `busy_timeout` makes a writer wait for the lock instead of failing.

The `pending` table closes the one race in a shared blob store: process A has written blob b for
an import it has not committed yet, while process B removes the last model that referenced b and
garbage-collects it. Importers record (committed) the digests they are about to write before
writing them, and garbage collection, which holds the write lock while it deletes, skips pending
digests. Rows left by a crashed importer are recognised by a dead pid on this host and dropped.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 60_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL,
    tag          TEXT NOT NULL,
    created      REAL NOT NULL,          -- unix time of the import
    architecture TEXT,                   -- config.json architectures[0]
    model_type   TEXT,
    parameters   INTEGER,                -- counted from the safetensors headers
    size         INTEGER NOT NULL,       -- bytes, all files
    source_run   TEXT,
    eval_score   REAL,
    metadata     TEXT NOT NULL DEFAULT '{}',
    UNIQUE (name, tag)
);
CREATE TABLE IF NOT EXISTS files (
    model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    path     TEXT NOT NULL,              -- relative, '/'-separated
    digest   TEXT NOT NULL,              -- sha256 hex of the content = blob name
    size     INTEGER NOT NULL,
    PRIMARY KEY (model_id, path)
);
CREATE INDEX IF NOT EXISTS files_digest ON files(digest);
CREATE TABLE IF NOT EXISTS pending (
    token   TEXT NOT NULL,               -- one per import in progress
    digest  TEXT NOT NULL,
    pid     INTEGER NOT NULL,
    host    TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS pending_digest ON pending(digest);
"""


def connect(db_path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit, see `transaction`)."""
    conn = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
        _create_schema(conn)
    return conn


def _create_schema(conn: sqlite3.Connection) -> None:
    # Switching to WAL takes an exclusive lock that the busy handler does not always wait for when
    # several processes open a fresh database at once; retry briefly instead of failing an import.
    for attempt in range(100):
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == 99:
                raise
            time.sleep(0.05)
    with transaction(conn):
        # executescript() would COMMIT first; run the statements one by one inside the transaction.
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextlib.contextmanager
def opened(db_path: Path) -> Iterator[sqlite3.Connection]:
    conn = connect(db_path)
    try:
        yield conn
    finally:
        conn.close()


def add_pending(conn: sqlite3.Connection, token: str, digests: list[str]) -> None:
    now, pid, host = time.time(), os.getpid(), socket.gethostname()
    with transaction(conn):
        conn.executemany("INSERT INTO pending (token, digest, pid, host, created) VALUES (?, ?, ?, ?, ?)",
                         [(token, d, pid, host, now) for d in digests])


def drop_pending(conn: sqlite3.Connection, token: str) -> None:
    """Inside the caller's transaction."""
    conn.execute("DELETE FROM pending WHERE token = ?", (token,))


def drop_dead_pending(conn: sqlite3.Connection) -> None:
    """Inside the caller's transaction: forget pending rows of importers that died on this host."""
    host = socket.gethostname()
    for (pid,) in conn.execute("SELECT DISTINCT pid FROM pending WHERE host = ?", (host,)).fetchall():
        if not pid_alive(pid):
            conn.execute("DELETE FROM pending WHERE host = ? AND pid = ?", (host, pid))


def unreferenced(conn: sqlite3.Connection, digests: set[str]) -> set[str]:
    """Of `digests`, those no model file and no pending import refers to."""
    used = set()
    for d in digests:
        row = conn.execute(
            "SELECT 1 FROM files WHERE digest = ? UNION ALL SELECT 1 FROM pending WHERE digest = ? LIMIT 1",
            (d, d)).fetchone()
        if row:
            used.add(d)
    return digests - used


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (owned by us or not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
