"""The prediction log: every served prediction, durably, in SQLite (WAL).

Shaped like the Registry: constructing a ``PredictionLog`` touches nothing on
disk; ``open()`` creates the database or migrates its schema; ``append(rows)``
is one transaction; ``window(...)`` is the one typed reader monitoring uses,
returning a pandas DataFrame. The server (long-running) and the monitor read
and write it concurrently, so the schema is versioned (``PRAGMA
user_version``) and every write is a short transaction in WAL mode.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

SCHEMA_VERSION = 1
COLUMNS = ("prediction_id", "ts", "model_version", "text", "probabilities", "label", "latency_ms",
           "feedback_label", "feedback_ts")

# Each migration takes the schema from version i to i + 1. Never edit one
# that has shipped: add the next.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE predictions (
        prediction_id  TEXT PRIMARY KEY,
        ts             TEXT NOT NULL,      -- UTC, ISO 8601
        model_version  TEXT NOT NULL,
        text           TEXT NOT NULL,
        probabilities  TEXT NOT NULL,      -- JSON list, one per label
        label          INTEGER NOT NULL,
        latency_ms     REAL NOT NULL,
        feedback_label INTEGER,
        feedback_ts    TEXT
    );
    CREATE INDEX predictions_ts ON predictions (ts);
    """,
)


class PredictionLogError(RuntimeError):
    """The log cannot be written or read (disk full, locked, newer schema)."""


@dataclass(frozen=True)
class Prediction:
    """One served prediction, as the server hands it to the log."""
    prediction_id: str
    ts: str
    model_version: str
    text: str
    probabilities: Sequence[float]
    label: int
    latency_ms: float


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class PredictionLog:
    def __init__(self, path: Path | str, timeout_s: float = 5.0):
        # Touches nothing on disk: the server calls open() when it starts.
        self.path = Path(path)
        self.timeout_s = timeout_s

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        # FULL: every committed transaction is fsynced, so not even an OS crash
        # loses a logged prediction. The server writes in batches, so the cost
        # is one fsync per batch, not per request.
        con.execute("PRAGMA synchronous=FULL")
        return con

    @contextmanager
    def _connection(self):
        con = self._connect()
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def _transaction(self, what: str):
        """One write transaction, taken at once (BEGIN IMMEDIATE) and rolled
        back on any error; SQLite errors come out as PredictionLogError."""
        with self._connection() as con:
            try:
                con.execute("BEGIN IMMEDIATE")
                try:
                    yield con
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise PredictionLogError(f"cannot {what} in {self.path}: {exc}") from exc

    def open(self) -> "PredictionLog":
        """Create the database or migrate it to SCHEMA_VERSION. Refuses a
        database written by a newer shrinkflow rather than guess its layout."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise PredictionLogError(f"{self.path} has schema version {version}, newer than this "
                                     f"shrinkflow's {SCHEMA_VERSION}: upgrade shrinkflow")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self._transaction(f"migrate the schema to version {target}") as con:
                for statement in _MIGRATIONS[target - 1].split(";"):
                    if statement.strip():
                        con.execute(statement)
                con.execute(f"PRAGMA user_version = {target}")
        return self

    def schema_version(self) -> int:
        if not self.path.is_file():
            return 0
        with self._connection() as con:
            return con.execute("PRAGMA user_version").fetchone()[0]

    def append(self, rows: Iterable[Prediction]) -> int:
        """Insert every row in one transaction: all of them or none."""
        values = [(r.prediction_id, r.ts, r.model_version, r.text, json.dumps([float(p) for p in r.probabilities]),
                   int(r.label), float(r.latency_ms)) for r in rows]
        if values:
            with self._transaction(f"write {len(values)} prediction(s)") as con:
                con.executemany("INSERT INTO predictions (prediction_id, ts, model_version, text, probabilities, "
                                "label, latency_ms) VALUES (?, ?, ?, ?, ?, ?, ?)", values)
        return len(values)

    def add_feedback(self, prediction_id: str, label: int, ts: str | None = None) -> bool:
        """Store the true label of a prediction. Returns True when it replaced
        an earlier label. Raises KeyError for an unknown prediction id."""
        with self._transaction("write feedback") as con:
            row = con.execute("SELECT feedback_label FROM predictions WHERE prediction_id = ?",
                              (prediction_id,)).fetchone()
            if row is None:
                raise KeyError(prediction_id)
            con.execute("UPDATE predictions SET feedback_label = ?, feedback_ts = ? WHERE prediction_id = ?",
                        (int(label), ts or utc_now(), prediction_id))
        return row[0] is not None

    def count(self) -> int:
        with self._connection() as con:
            return con.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]

    def window(self, last: int | None = None, since: str | datetime | None = None,
               until: str | datetime | None = None, with_feedback: bool | None = None):
        """A window of the log as a DataFrame (oldest first), with columns
        COLUMNS and ``probabilities`` parsed back to lists.

        ``last``: the newest N rows; ``since``/``until``: a time range (UTC);
        ``with_feedback``: True only labelled rows, False only unlabelled,
        None both. Filters combine; ``last`` applies after the others.
        """
        import pandas as pd

        where, args = [], []
        if since is not None:
            where.append("ts >= ?")
            args.append(since.isoformat() if isinstance(since, datetime) else since)
        if until is not None:
            where.append("ts < ?")
            args.append(until.isoformat() if isinstance(until, datetime) else until)
        if with_feedback is not None:
            where.append("feedback_label IS NOT NULL" if with_feedback else "feedback_label IS NULL")
        sql = f"SELECT {', '.join(COLUMNS)} FROM predictions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY ts DESC, rowid DESC"
        if last is not None:
            if last < 0:
                raise ValueError("last must be >= 0")
            sql += f" LIMIT {int(last)}"
        if not self.path.is_file():
            return pd.DataFrame(columns=list(COLUMNS))
        with self._connection() as con:
            df = pd.read_sql_query(sql, con, params=args)
        df = df.iloc[::-1].reset_index(drop=True)
        df["probabilities"] = df["probabilities"].map(json.loads)
        return df
