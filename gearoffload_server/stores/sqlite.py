"""The embedded default store: one SQLite file in WAL mode, written by group commit.

The file is held with an exclusive lock for the server's lifetime, so a second server
pointed at the same file refuses to start instead of replaying someone else's jobs.
Writes happen only in ``write()``, which the I/O shell runs in a thread.
"""

from __future__ import annotations

import itertools
import sqlite3

from . import Batch, QueueStore, ResultRow, StoredJob, StoreError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gearoffload_jobs (
    id INTEGER PRIMARY KEY,      -- per job, never (function, unique): docs/protocol.md Q11
    function BLOB NOT NULL,
    unique_key BLOB NOT NULL,
    priority INTEGER NOT NULL,   -- 0 high, 1 normal, 2 low
    data BLOB NOT NULL,
    due INTEGER NOT NULL,        -- epoch time of SUBMIT_JOB_EPOCH jobs, else 0
    reducer BLOB,                -- reduce jobs only
    dead INTEGER NOT NULL DEFAULT 0  -- 1: a dead letter (its retries used up)
)
"""
#: Columns added since the first release (``ALTER TABLE`` on an older file at start-up):
#: the job's handle, kept across restarts, and what a dead letter needs to be shown.
_ADDED_COLUMNS = (
    ("handle", "BLOB"),                             # NULL: saved by an older version
    ("died", "REAL NOT NULL DEFAULT 0"),            # dead letters: epoch seconds
    ("attempts", "INTEGER NOT NULL DEFAULT 0"),     # dead letters: attempts in all
    ("failures", "INTEGER NOT NULL DEFAULT 0"),     # dead letters: failed attempts
    ("error", "BLOB"),                              # dead letters: the last error
)
#: Key/value facts about the server: ``last_handle``, the highest handle number issued.
_META_SCHEMA = """
CREATE TABLE IF NOT EXISTS gearoffload_meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
)
"""
#: Kept results of background jobs (--result-ttl, state.KeptResults). Appended by id and
#: deleted by id: no index on the unique (only the server's memory looks one up), so that
#: keeping a result costs one append (about half the CPU of an indexed insert).
_RESULTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS gearoffload_results (
    id INTEGER PRIMARY KEY,      -- one per kept result, growing
    unique_key BLOB NOT NULL,
    state BLOB NOT NULL,         -- done, failed, dead
    numerator INTEGER NOT NULL,
    denominator INTEGER NOT NULL,
    expires REAL NOT NULL,       -- wall-clock time (time.time())
    data BLOB,                   -- NULL: too large to keep, see too_large
    too_large INTEGER NOT NULL DEFAULT 0  -- the size in bytes of a result not kept
)
"""


class SqliteStore(QueueStore):
    def __init__(self, path: str, synchronous: str = "full", max_size: int = 0) -> None:
        super().__init__()
        self.path = path
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                 timeout=0.2)
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode}, not wal")
            db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            if max_size:
                page = db.execute("PRAGMA page_size").fetchone()[0]
                db.execute(f"PRAGMA max_page_count={max(max_size // page, 16)}")
            # One transaction, which also takes the exclusive lock now, not at the first
            # job: the start writes once (tests/test_store.py makes the files immutable
            # as soon as the WAL file appears).
            db.execute("BEGIN IMMEDIATE")
            db.execute(_SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(gearoffload_jobs)")}
            for name, kind in _ADDED_COLUMNS:
                if name not in have:
                    db.execute(f"ALTER TABLE gearoffload_jobs ADD COLUMN {name} {kind}")
            db.execute(_RESULTS_SCHEMA)
            db.execute(_META_SCHEMA)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            hint = (" (is another server using it? give each server its own --queue)"
                    if "locked" in str(exc) else "")
            raise StoreError(f"cannot open queue database {path}: {exc}{hint}") from None
        self.db = db

    def describe(self) -> str:
        return f"sqlite {self.path}"

    def load(self) -> list[StoredJob]:
        rows = [StoredJob(i, f, u, p, d, w, r, h or b"", dead, died, n, fails, e or b"")
                for i, f, u, p, d, w, r, h, dead, died, n, fails, e in self.db.execute(
                    "SELECT id, function, unique_key, priority, data, due, reducer, handle, "
                    "dead, died, attempts, failures, error FROM gearoffload_jobs "
                    "ORDER BY id")]
        mark = self.db.execute(
            "SELECT value FROM gearoffload_meta WHERE key = 'last_handle'").fetchone()
        self.last_handle = mark[0] if mark else 0
        self._ids = itertools.count(rows[-1].id + 1 if rows else 1)
        return rows

    def load_results(self, now: float) -> list[ResultRow]:
        try:
            rows = [ResultRow(i, bytes(u), bytes(s), n, d, e,
                              None if data is None else bytes(data), t)
                    for i, u, s, n, d, e, data, t in self.db.execute(
                        "SELECT id, unique_key, state, numerator, denominator, expires, "
                        "data, too_large FROM gearoffload_results ORDER BY id")]
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read kept results from {self.path}: {exc}") from None
        self._result_ids = itertools.count(rows[-1].id + 1 if rows else 1)
        return rows

    def write(self, batch: Batch) -> None:
        db = self.db
        try:
            db.execute("BEGIN")
            if batch.result_puts:
                db.executemany(
                    "INSERT INTO gearoffload_results (id, unique_key, state, numerator, "
                    "denominator, expires, data, too_large) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    batch.result_puts)
            if batch.result_drops:
                db.executemany("DELETE FROM gearoffload_results WHERE id = ?",
                               [(i,) for i in batch.result_drops])
            if batch.saves:
                db.executemany(
                    "INSERT INTO gearoffload_jobs (id, function, unique_key, priority, data, "
                    "due, reducer, handle) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", batch.saves)
            if batch.marks:
                db.executemany("UPDATE gearoffload_jobs SET dead = ?, died = ?, attempts = ?, "
                               "failures = ?, error = ? WHERE id = ?", batch.marks)
            if batch.deletes:
                db.executemany("DELETE FROM gearoffload_jobs WHERE id = ?",
                               [(i,) for i in batch.deletes])
            if batch.last_handle:
                db.execute("INSERT OR REPLACE INTO gearoffload_meta (key, value) "
                           "VALUES ('last_handle', ?)", (batch.last_handle,))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise StoreError(f"queue database {self.path}: {exc}") from None

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass
