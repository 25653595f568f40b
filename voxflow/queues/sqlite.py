"""The embedded `TaskQueue`: one SQLite file (WAL), safe across processes.

One row per task, keyed by (run, stage, index). `due` orders delivery: 0 for pending tasks,
the lease expiry for leased ones, +inf for done and dead ones, so "what can be delivered now"
is one range scan of the (kind, due) index. A pull for some runs (or skipping some) scans
the (kind, run, due) index once per run that has open tasks (known from the counters), so
an ended run's backlog ahead of it costs nothing. Per-stage counters are kept in the same
transactions, so progress never scans the task table.

Runs carry their state (active or how they ended), the driver's last heartbeat and their
identity (`meta`) in their `runs` row: `run_state` is one primary-key read. Files written
before these columns existed get them on first open (a run registered then reads as active,
its heartbeat its registration time); a read-only open reads such a file as it is.
Nothing expires here, so `heartbeat` never names a stage to republish.
"""
from __future__ import annotations

import errno
import json
import random
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Collection, Iterable, Optional

import numpy as np

from . import (ACTIVE, DEAD, DONE, LEASED, PENDING, UNPUBLISHED, DeadLetter, Lease, RunState,
               StageStats, check_end_state, writes)

NEVER = 1e300
BUSY_SECONDS = 60.0
_STATE_COLUMN = {PENDING: "pending", LEASED: "leased", DONE: "done", DEAD: "dead"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
  run TEXT NOT NULL, stage TEXT NOT NULL, idx INTEGER NOT NULL, kind TEXT NOT NULL,
  body TEXT NOT NULL, state INTEGER NOT NULL DEFAULT 0, due REAL NOT NULL DEFAULT 0,
  attempts INTEGER NOT NULL DEFAULT 0, token TEXT, worker TEXT, error TEXT,
  PRIMARY KEY (run, stage, idx)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_due ON tasks (kind, due);
CREATE INDEX IF NOT EXISTS tasks_run_due ON tasks (kind, run, due);
CREATE TABLE IF NOT EXISTS counts (
  run TEXT NOT NULL, stage TEXT NOT NULL, kind TEXT NOT NULL,
  pending INTEGER NOT NULL DEFAULT 0, leased INTEGER NOT NULL DEFAULT 0,
  done INTEGER NOT NULL DEFAULT 0, dead INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (run, stage)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (
  run TEXT NOT NULL, worker TEXT NOT NULL, started REAL NOT NULL, record TEXT NOT NULL,
  PRIMARY KEY (run, worker, started)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs (
  run TEXT PRIMARY KEY, params TEXT NOT NULL, max_attempts INTEGER NOT NULL,
  created REAL NOT NULL) WITHOUT ROWID;
"""
# Columns `runs` gained later (added to older files on open): name -> (declaration, what a
# run registered before they existed reads as).
RUN_COLUMNS = {"state": ("TEXT NOT NULL DEFAULT 'active'", "'active'"),
               "heartbeat": ("REAL NOT NULL DEFAULT 0", "created"),
               "meta": ("TEXT NOT NULL DEFAULT '{}'", "'{}'")}
# ... and `counts`: done tasks acked as skipped (0 in files from before)
COUNT_COLUMNS = {"skipped": ("INTEGER NOT NULL DEFAULT 0", "0")}


class SQLiteQueue:
    """`TaskQueue` over one SQLite file; open one per process (or thread group)."""

    def __init__(self, url: str, lease_seconds: float = 60.0, max_attempts: int = 3,
                 readonly: bool = False, retention_seconds: Optional[int] = None):
        """`retention_seconds` is Pub/Sub's; accepted so one set of options opens either
        backend (nothing expires here). `readonly`: open an existing file, change nothing."""
        self.url = url
        if not url.startswith("sqlite:///"):
            raise ValueError(f"expected sqlite:///absolute/path/queue.db, got {url!r}")
        self.path = Path(url[len("sqlite://"):])
        self.readonly = readonly
        self.lease_seconds = lease_seconds
        self.default_max_attempts = max_attempts
        self._max_attempts: dict[str, int] = {}
        self._lock = threading.RLock()
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(errno.ENOENT, f"no queue file for {url}",
                                        str(self.path))
            self._db = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True,
                                       timeout=BUSY_SECONDS, isolation_level=None,
                                       check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode = WAL")      # waits on `timeout` if busy
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA busy_timeout = 0")        # writes retry in _begin
            with self._write() as db:
                for stmt in filter(str.strip, SCHEMA.split(";")):
                    db.execute(stmt)
                for name, (declaration, before) in self._missing_run_columns(db).items():
                    db.execute(f"ALTER TABLE runs ADD COLUMN {name} {declaration}")
                    db.execute(f"UPDATE runs SET {name} = {before}")
                for name, (declaration, _) in self._missing_columns(db, "counts",
                                                                     COUNT_COLUMNS).items():
                    db.execute(f"ALTER TABLE counts ADD COLUMN {name} {declaration}")
        missing = self._missing_run_columns(self._db)       # read-only: read what is there
        self._run_state_columns = ", ".join(missing[name][1] if name in missing else name
                                            for name in RUN_COLUMNS)
        old = self._missing_columns(self._db, "counts", COUNT_COLUMNS)
        self._skipped_column = old["skipped"][1] if "skipped" in old else "skipped"

    # -- transactions --------------------------------------------------------------------
    class _Tx:
        def __init__(self, q: "SQLiteQueue"):
            self.q = q

        def __enter__(self):
            self.q._lock.acquire()
            try:
                self.q._begin()
            except BaseException:
                self.q._lock.release()
                raise
            return self.q._db

        def __exit__(self, exc_type, *_):
            try:
                self.q._db.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.q._lock.release()

    def _begin(self) -> None:
        """BEGIN IMMEDIATE, retrying every ~0.2-1 ms while another process writes.

        SQLite's own busy handler sleeps up to 100 ms between tries, which starves some
        processes and caps throughput; short jittered retries share the lock fairly.
        """
        deadline = time.monotonic() + BUSY_SECONDS
        while True:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.0002, 0.001))

    def _write(self) -> "_Tx":
        return SQLiteQueue._Tx(self)

    @staticmethod
    def _missing_run_columns(db) -> dict[str, tuple[str, str]]:
        return SQLiteQueue._missing_columns(db, "runs", RUN_COLUMNS)

    @staticmethod
    def _missing_columns(db, table: str, columns: dict) -> dict[str, tuple[str, str]]:
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        return {k: v for k, v in columns.items() if k not in present}

    @staticmethod
    def _count(db, run: str, stage: str, **delta: int) -> None:
        sets = ", ".join(f"{k} = {k} + ?" for k in delta)
        db.execute(f"UPDATE counts SET {sets} WHERE run = ? AND stage = ?",
                   (*delta.values(), run, stage))

    def _attempt_limit(self, db, run: str) -> int:
        if run not in self._max_attempts:
            row = db.execute("SELECT max_attempts FROM runs WHERE run = ?", (run,)).fetchone()
            if row is None:
                return self.default_max_attempts
            self._max_attempts[run] = row[0]
        return self._max_attempts[run]

    # -- runs ----------------------------------------------------------------------------
    @writes
    def register_run(self, run: str, params: str, max_attempts: Optional[int] = None,
                     meta: Optional[dict] = None) -> None:
        """Store the run's parameters (what workers build the run's plan from) and identity;
        the run is active, its heartbeat now."""
        now = time.time()
        with self._write() as db:
            db.execute("INSERT INTO runs (run, params, max_attempts, created, state, heartbeat, "
                       "meta) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run) DO UPDATE SET "
                       "params = excluded.params, max_attempts = excluded.max_attempts, "
                       "state = excluded.state, heartbeat = excluded.heartbeat, "
                       "meta = excluded.meta",
                       (run, params, max_attempts or self.default_max_attempts, now, ACTIVE,
                        now, json.dumps(meta or {})))
        self._max_attempts.pop(run, None)

    @writes
    def heartbeat(self, run: str) -> list[str]:
        """The driver is alive: the run is active again. Nothing here expires: returns []."""
        self._update_run(run, state=ACTIVE, heartbeat=time.time())
        return []

    @writes
    def end_run(self, run: str, state: str) -> None:
        self._update_run(run, state=check_end_state(state))

    def _update_run(self, run: str, **values) -> None:
        with self._write() as db:
            updated = db.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)} "
                                 "WHERE run = ?", (*values.values(), run)).rowcount
        if not updated:
            raise KeyError(f"run {run!r} is not registered in {self.url}")

    def run_state(self, run: str) -> Optional[RunState]:
        with self._lock:
            row = self._db.execute(f"SELECT {self._run_state_columns} FROM runs WHERE run = ?",
                                   (run,)).fetchone()
        return RunState(row[0], row[1], json.loads(row[2])) if row else None

    @writes
    def record_session(self, run: str, session: dict) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?)",
                       (run, session["worker"], session["started"], json.dumps(session)))

    def sessions(self, run: str) -> list[dict]:
        with self._lock:
            try:
                rows = self._db.execute("SELECT record FROM sessions WHERE run = ? ORDER BY "
                                        "started", (run,)).fetchall()
            except sqlite3.OperationalError:        # a read-only file from before sessions
                return []
        return [json.loads(r[0]) for r in rows]

    def run_params(self, run: str) -> str:
        with self._lock:
            row = self._db.execute("SELECT params FROM runs WHERE run = ?", (run,)).fetchone()
        if row is None:
            raise KeyError(f"run {run!r} is not registered in {self.url}")
        return row[0]

    @writes
    def forget_run(self, run: str) -> int:
        """Delete the run's tasks (done records included); returns how many there were."""
        with self._write() as db:
            n = db.execute("DELETE FROM tasks WHERE run = ?", (run,)).rowcount
            db.execute("DELETE FROM counts WHERE run = ?", (run,))
        return n

    @writes
    def finish(self, run: str) -> None:
        """Nothing to free: the records stay for status and resume."""

    def runs(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT run FROM runs ORDER BY created")]

    # -- publishing ----------------------------------------------------------------------
    @writes
    def publish(self, run: str, stage: str, kind: str,
                messages: Iterable[tuple[int, str]], batch: int = 20_000) -> int:
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO counts (run, stage, kind) VALUES (?, ?, ?)",
                       (run, stage, kind))
        added = 0
        rows: list[tuple] = []
        for index, body in messages:
            rows.append((run, stage, index, kind, body))
            if len(rows) >= batch:
                added += self._insert(run, stage, rows)
                rows = []
        if rows:
            added += self._insert(run, stage, rows)
        return added

    def _insert(self, run: str, stage: str, rows: list[tuple]) -> int:
        with self._write() as db:
            cur = db.executemany("INSERT OR IGNORE INTO tasks (run, stage, idx, kind, body) "
                                 "VALUES (?, ?, ?, ?, ?)", rows)
            added = cur.rowcount
            self._count(db, run, stage, pending=added)
        return added

    # -- leasing -------------------------------------------------------------------------
    def _kinds(self, db) -> list[str]:
        return [r[0] for r in db.execute("SELECT DISTINCT kind FROM counts")]

    def _scopes(self, db, kinds: Optional[Iterable[str]], runs: Optional[Collection[str]],
                skip_runs: Collection[str]) -> Iterable[tuple[str, ...]]:
        """What to scan for deliverable tasks: (kind,) for the (kind, due) index, or, when
        runs are chosen, (kind, run) per run with open tasks for the (kind, run, due) one."""
        kinds = list(kinds) if kinds else self._kinds(db)
        if runs is None and not skip_runs:
            return [(kind,) for kind in kinds]
        return [(kind, run) for kind in kinds for (run,) in db.execute(
                    "SELECT DISTINCT run FROM counts WHERE kind = ? AND pending + leased > 0",
                    (kind,))
                if (runs is None or run in runs) and run not in skip_runs]

    @writes
    def pull(self, kinds: Optional[Iterable[str]] = None, n: int = 1, worker: str = "",
             lease_seconds: Optional[float] = None, runs: Optional[Collection[str]] = None,
             skip_runs: Collection[str] = ()) -> list[Lease]:
        """Lease up to `n` deliverable messages of the given kinds (all kinds if None), of
        `runs` (all if None) and not of `skip_runs`."""
        lease_seconds = lease_seconds or self.lease_seconds
        out: list[Lease] = []
        with self._write() as db:
            now = time.time()
            for scope in self._scopes(db, kinds, runs, skip_runs):
                where = "kind = ? AND run = ?" if len(scope) == 2 else "kind = ?"
                while len(out) < n:
                    # Every row read is leased or dead-lettered below, so it leaves the
                    # range: the next query reads only rows not yet seen.
                    rows = db.execute("SELECT run, stage, idx, body, state, attempts FROM tasks "
                                      f"WHERE {where} AND due < ? ORDER BY due LIMIT ?",
                                      (*scope, now, n - len(out))).fetchall()
                    if not rows:
                        break
                    for run, stage, idx, body, state, attempts in rows:
                        lease = self._lease_row(db, now, lease_seconds, worker, run, stage, idx,
                                                body, state, attempts)
                        if lease:
                            out.append(lease)
                if len(out) >= n:
                    break
        return out

    def _lease_row(self, db, now, lease_seconds, worker, run, stage, idx, body, state,
                   attempts) -> Optional[Lease]:
        key = (run, stage, idx)
        if state == LEASED and attempts >= self._attempt_limit(db, run):
            db.execute("UPDATE tasks SET state = ?, due = ?, token = NULL, error = ? "
                       "WHERE run = ? AND stage = ? AND idx = ?",
                       (DEAD, NEVER, f"lease expired {attempts} times: the worker was lost "
                        "each time", *key))
            self._count(db, run, stage, leased=-1, dead=1)
            return None
        token = secrets.token_hex(8)
        db.execute("UPDATE tasks SET state = ?, due = ?, attempts = ?, token = ?, worker = ? "
                   "WHERE run = ? AND stage = ? AND idx = ?",
                   (LEASED, now + lease_seconds, attempts + 1, token, worker, *key))
        if state == PENDING:
            self._count(db, run, stage, pending=-1, leased=1)
        return Lease(run, stage, idx, body, attempts + 1, token)

    @writes
    def extend(self, lease: Lease, seconds: Optional[float] = None) -> bool:
        """Push the lease's expiry out; False if the lease was lost (expired and retaken)."""
        with self._write() as db:
            cur = db.execute("UPDATE tasks SET due = ? WHERE run = ? AND stage = ? AND idx = ? "
                             "AND token = ? AND state = ?",
                             (time.time() + (seconds or self.lease_seconds), lease.run,
                              lease.stage, lease.index, lease.token, LEASED))
            return cur.rowcount == 1

    @writes
    def ack(self, lease: Lease, skipped: bool = False) -> None:
        """Record the task done (its writes are complete). Idempotent. `skipped`: it did
        not run its operation (counted apart too)."""
        self.ack_many([lease], skipped=skipped)

    @writes
    def ack_many(self, leases: Iterable[Lease], skipped: bool = False) -> None:
        extra = {"skipped": 1} if skipped else {}
        with self._write() as db:
            for lease in leases:
                key = (lease.run, lease.stage, lease.index)
                row = db.execute("SELECT state FROM tasks WHERE run = ? AND stage = ? AND "
                                 "idx = ?", key).fetchone()
                if row is None or row[0] == DONE:
                    continue
                db.execute("UPDATE tasks SET state = ?, due = ?, token = NULL, error = NULL "
                           "WHERE run = ? AND stage = ? AND idx = ?", (DONE, NEVER, *key))
                self._count(db, lease.run, lease.stage,
                            **{_STATE_COLUMN[row[0]]: -1, "done": 1, **extra})

    def _settle(self, lease: Lease, error: Optional[str], how: str) -> None:
        with self._write() as db:
            key = (lease.run, lease.stage, lease.index)
            row = db.execute("SELECT attempts FROM tasks WHERE run = ? AND stage = ? AND idx = ? "
                             "AND token = ? AND state = ?", (*key, lease.token, LEASED)).fetchone()
            if row is None:
                return                                  # lease lost: someone else has it
            attempts = row[0]
            if how == "release":
                state, attempts = PENDING, attempts - 1
            elif attempts >= self._attempt_limit(db, lease.run):
                state = DEAD
            else:
                state = PENDING
            db.execute("UPDATE tasks SET state = ?, due = ?, attempts = ?, token = NULL, "
                       "error = COALESCE(?, error) WHERE run = ? AND stage = ? AND idx = ?",
                       (state, 0 if state == PENDING else NEVER, attempts, error, *key))
            self._count(db, lease.run, lease.stage, leased=-1, **{_STATE_COLUMN[state]: 1})

    @writes
    def nack(self, lease: Lease, error: str) -> None:
        """The task failed: retry it, or dead-letter it once it has had max_attempts."""
        self._settle(lease, error, "nack")

    @writes
    def release(self, lease: Lease) -> None:
        """Give the task back at once (preemption); not counted as an attempt."""
        self._settle(lease, None, "release")

    # -- inspection ----------------------------------------------------------------------
    def stats(self, run: str) -> dict[str, StageStats]:
        with self._lock:
            rows = self._db.execute("SELECT stage, pending, leased, done, dead, "
                                    f"{self._skipped_column} FROM counts WHERE run = ?",
                                    (run,)).fetchall()
        return {stage: StageStats(p, l, d, x, k) for stage, p, l, d, x, k in rows}

    def dead_letters(self, run: str, limit: int = 100) -> list[DeadLetter]:
        with self._lock:
            rows = self._db.execute("SELECT run, stage, idx, attempts, COALESCE(error, '') "
                                    "FROM tasks WHERE run = ? AND state = ? ORDER BY stage, idx "
                                    "LIMIT ?", (run, DEAD, limit)).fetchall()
        return [DeadLetter(*r) for r in rows]

    @writes
    def retry_dead(self, run: str, stage: Optional[str] = None,
                   index: Optional[int] = None) -> int:
        """Give the run's dead tasks (of `stage`, or the one task `index` of it) a fresh set
        of attempts."""
        where, args = "run = ? AND state = ?", [run, DEAD]
        if stage is not None:
            where, args = where + " AND stage = ?", args + [stage]
            if index is not None:
                where, args = where + " AND idx = ?", args + [index]
        with self._write() as db:
            per_stage = db.execute(f"SELECT stage, COUNT(*) FROM tasks WHERE {where} "
                                   "GROUP BY stage", args).fetchall()
            db.execute(f"UPDATE tasks SET state = ?, due = 0, attempts = 0 WHERE {where}",
                       [PENDING, *args])
            for name, n in per_stage:
                self._count(db, run, name, dead=-n, pending=n)
        return sum(n for _, n in per_stage)

    def task_states(self, run: str, stage: str, size: int) -> np.ndarray:
        out = np.full(size, UNPUBLISHED, np.uint8)
        with self._lock:
            rows = self._db.execute("SELECT idx, state FROM tasks WHERE run = ? AND stage = ? "
                                    "AND idx < ?", (run, stage, size)).fetchall()
        if rows:
            idx, state = np.array(rows, np.int64).T
            out[idx] = state
        return out

    def busy_workers(self, kind: Optional[str] = None, run: Optional[str] = None) -> set[str]:
        """Workers holding an unexpired lease (of `kind`, of `run`)."""
        scope, args = ("AND run = ? ", [run]) if run else ("", [])
        with self._lock:
            now = time.time()
            kinds = [kind] if kind else self._kinds(self._db)
            busy: set[str] = set()
            for k in kinds:
                busy.update(r[0] for r in self._db.execute(
                    f"SELECT DISTINCT worker FROM tasks WHERE kind = ? {scope}AND due >= ? "
                    "AND due < ?", (k, *args, now, NEVER)))
        return busy

    def close(self) -> None:
        with self._lock:
            self._db.close()
