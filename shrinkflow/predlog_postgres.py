"""The prediction log in PostgreSQL: one log for every serving replica.

``PostgresPredictionLog`` has the SQLite ``PredictionLog``'s methods and
promises (``shrinkflow.predlog``): constructing it touches nothing;
``open()`` creates or migrates the schema, through the same three steps,
versioned in a one-row table (``prediction_log_schema``, the equivalent of
SQLite's ``PRAGMA user_version``); ``append(rows)`` is one transaction;
``add_feedback`` resolves a label name against the row's own names;
``window(...)`` returns the same DataFrame. Every failure comes out as
``PredictionLogError`` naming the URL, with ``unavailable`` True when the
server is down or unreachable, which is what makes the server answer 503
rather than answer without logging.

The same SQL types as SQLite's, so that the reader gives identical values:
timestamps are the ISO 8601 text the server writes (compared in the "C"
collation, so order and ranges are the same as SQLite's byte order),
probabilities and label names JSON text, ``truncated`` 0/1. PostgreSQL text
cannot hold NUL (U+0000): a NUL in a logged text is stored as U+FFFD, the
one way a row here can differ from SQLite's.

The password is never in the URL (params validation refuses one there):
libpq reads it from ``PGPASSWORD`` or a passfile (``PGPASSFILE``,
``~/.pgpass``), or the URL's ``password_env=NAME`` names the environment
variable that holds it (read at each connection, never stored).

Connections: one per thread, kept open between calls and replaced when the
server drops it. A kept connection the server closed while it was idle (a
restart) fails at ``BEGIN``, before any row is sent: that call reconnects
and runs once more, so a restart costs no extra 503 once the server is back.
"""

from __future__ import annotations

import json
import math
import os
import threading
from datetime import datetime
from typing import Iterable, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from shrinkflow.predlog import (COLUMNS, SCHEMA_VERSION, Prediction, PredictionLogError, StoredFeedback,
                                feedback_class_id, utc_now, window_frame, window_query)

PASSWORD_ENV_PARAM = "password_env"
VERSION_TABLE = "prediction_log_schema"
# pg_advisory_xact_lock key: replicas starting together migrate one at a time.
_MIGRATION_LOCK = 0x5348_524B_4C4F47   # "SHRKLOG"

# The SQLite log's three migrations, step for step, in PostgreSQL's
# dialect. seq (insertion order) is the tie-breaker SQLite's rowid is.
# Never edit one that has shipped: add the next (and the SQLite one).
PG_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE predictions (
        seq            BIGINT GENERATED ALWAYS AS IDENTITY,
        prediction_id  TEXT PRIMARY KEY,
        ts             TEXT COLLATE "C" NOT NULL,   -- UTC, ISO 8601
        model_version  TEXT NOT NULL,
        text           TEXT NOT NULL,
        probabilities  TEXT NOT NULL,               -- JSON list, one per label
        label          INTEGER NOT NULL,
        latency_ms     DOUBLE PRECISION NOT NULL,
        feedback_label INTEGER,
        feedback_ts    TEXT
    );
    CREATE INDEX predictions_ts ON predictions (ts, seq);
    """,
    """
    ALTER TABLE predictions ADD COLUMN tokens_seen INTEGER;
    ALTER TABLE predictions ADD COLUMN truncated INTEGER;
    """,
    """
    ALTER TABLE predictions ADD COLUMN labels TEXT;
    """,
)


def split_password_env(url: str) -> tuple[str, str | None]:
    """``url`` without shrinkflow's own ``password_env`` query parameter
    (libpq would refuse it), and that parameter's value (None when absent)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    names = [v for k, v in query if k == PASSWORD_ENV_PARAM]
    rest = [(k, v) for k, v in query if k != PASSWORD_ENV_PARAM]
    return urlunsplit(parts._replace(query=urlencode(rest))), (names[-1] if names else None)


def redacted(url: str) -> str:
    """``url`` with any password in it replaced by ``***`` (for messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


class PostgresPredictionLog:
    """The prediction log in the PostgreSQL database ``url`` names
    (``postgresql://USER@HOST:PORT/DB``, libpq's URL: query parameters such
    as ``sslmode`` or ``options=-csearch_path%3Dschema`` pass through).

    ``timeout_s``: how long a statement waits for a lock (lock_timeout; the
    feedback of one row waits for another writer of that row) and, at least
    2 s, how long connecting may take (connect_timeout). Every method raises
    ``PredictionLogError`` for any database failure; ``add_feedback`` also
    raises ``KeyError`` for an unknown prediction id and ``ValueError`` for
    a label name the row does not have.
    """

    def __init__(self, url: str, timeout_s: float = 5.0):
        # Touches nothing: no connection until the first call.
        self._conninfo, self.password_env = split_password_env(url)
        self.url = redacted(url)
        self.path = None
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._open_connections: set = set()
        self._lock = threading.Lock()

    @property
    def location(self) -> str:
        """Where the log is, for messages: its URL (no password)."""
        return self.url

    # ---------------------------------------------------------- plumbing
    def _error(self, what: str, exc: BaseException) -> PredictionLogError:
        import psycopg

        reason = " ".join(str(exc).split()) or type(exc).__name__
        unavailable = isinstance(exc, psycopg.OperationalError)
        sqlstate = getattr(exc, "sqlstate", None) or ""
        if sqlstate == "55P03":
            reason += f" (another connection holds the lock; waited {self.timeout_s:g} s)"
        elif unavailable and (sqlstate.startswith("28") or "password" in reason.lower()
                              or "authentication" in reason.lower()):
            # 28xxx: invalid authorization; "fe_sendauth: no password
            # supplied" is libpq's own, with no SQLSTATE
            reason += (" (the database refused the credentials: give the password in this process's environment, "
                       "PGPASSWORD or a PGPASSFILE, or the variable the URL's password_env names; a Prefect worker "
                       "passes its own environment to every flow run: docs/serving.md)")
        elif unavailable:
            reason += " (the database is down or unreachable)"
        return PredictionLogError(f"cannot {what} in the prediction log {self.url}: {reason}", cause=exc,
                                  unavailable=unavailable)

    def _connect(self, what: str):
        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        try:
            given = conninfo_to_dict(self._conninfo)
        except psycopg.Error as exc:
            raise PredictionLogError(f"cannot {what} in the prediction log {self.url}: not a PostgreSQL URL: "
                                     f"{exc}", cause=exc, unavailable=False) from exc
        extra = {"connect_timeout": str(max(2, math.ceil(self.timeout_s))), "application_name": "shrinkflow"}
        extra = {k: v for k, v in extra.items() if k not in given}
        if self.password_env is not None:
            password = os.environ.get(self.password_env)
            if password is None:
                raise PredictionLogError(
                    f"cannot {what} in the prediction log {self.url}: the environment variable "
                    f"{self.password_env} that its password_env names is not set", unavailable=True)
            extra["password"] = password
        try:
            con = psycopg.connect(make_conninfo(self._conninfo, **extra), autocommit=True)
        except psycopg.Error as exc:
            raise self._error(what, exc) from exc
        try:
            con.execute("SELECT set_config('lock_timeout', %s, false)", (f"{max(1, int(self.timeout_s * 1000))}ms",))
        except psycopg.Error as exc:
            con.close()
            raise self._error(what, exc) from exc
        with self._lock:
            self._open_connections.add(con)
        return con

    def _connection(self, what: str):
        """This thread's connection and whether it was kept from before."""
        con = getattr(self._local, "con", None)
        if con is not None and not con.closed and not con.broken:
            return con, True
        self._local.con = self._connect(what)
        return self._local.con, False

    def _discard(self, con) -> None:
        if getattr(self._local, "con", None) is con:
            self._local.con = None
        with self._lock:
            self._open_connections.discard(con)
        try:
            con.close()
        except Exception:  # noqa: BLE001 - it is being thrown away
            pass

    def _run(self, what: str, fn):
        """``fn(connection)`` in one transaction, committed, or rolled back
        on any error; psycopg errors come out as PredictionLogError."""
        import psycopg

        for attempt in (0, 1):
            con, kept = self._connection(what)
            try:
                con.execute("BEGIN")
            except psycopg.Error as exc:
                self._discard(con)
                if kept and attempt == 0 and isinstance(exc, psycopg.OperationalError):
                    continue   # dropped while idle (a restart): nothing was sent; once more, afresh
                raise self._error(what, exc) from exc
            try:
                out = fn(con)
                con.execute("COMMIT")
                return out
            except BaseException as exc:
                if con.broken or con.closed or isinstance(exc, psycopg.OperationalError):
                    self._discard(con)
                else:
                    try:
                        con.execute("ROLLBACK")
                    except psycopg.Error:
                        self._discard(con)   # the error being raised is the one to report
                if isinstance(exc, psycopg.Error):
                    raise self._error(what, exc) from exc
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close every connection this log opened (any thread's); a later
        call connects again."""
        with self._lock:
            cons, self._open_connections = list(self._open_connections), set()
        for con in cons:
            try:
                con.close()
            except Exception:  # noqa: BLE001 - closing anyway
                pass

    # ------------------------------------------------------------ schema
    @staticmethod
    def _version(con) -> int:
        if con.execute("SELECT to_regclass(%s)", (VERSION_TABLE,)).fetchone()[0] is None:
            return 0
        row = con.execute(f"SELECT version FROM {VERSION_TABLE}").fetchone()
        return 0 if row is None else int(row[0])

    def open(self) -> "PostgresPredictionLog":
        """Create the schema or migrate it to SCHEMA_VERSION, one
        transaction per step (replicas starting together take turns: an
        advisory lock). Refuses a schema written by a newer shrinkflow.
        Raises PredictionLogError (the server down or unreachable, no
        password, no right to create tables)."""

        def step(con):
            con.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            version = self._version(con)
            if version >= SCHEMA_VERSION:
                return version
            target = version + 1
            for statement in PG_MIGRATIONS[target - 1].split(";"):
                if statement.strip():
                    con.execute(statement)
            if version == 0:
                con.execute(f"CREATE TABLE {VERSION_TABLE} (version INTEGER NOT NULL)")
                con.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES (%s)", (target,))
            else:
                con.execute(f"UPDATE {VERSION_TABLE} SET version = %s", (target,))
            return target

        while True:
            version = self._run("migrate the schema", step)
            if version > SCHEMA_VERSION:
                raise PredictionLogError(f"{self.url} has schema version {version}, newer than this "
                                         f"shrinkflow's {SCHEMA_VERSION}: upgrade shrinkflow", unavailable=False)
            if version == SCHEMA_VERSION:
                return self

    def schema_version(self) -> int:
        """The schema version stored in the database (0: no schema yet)."""
        return self._run("read the schema version", self._version)

    # ------------------------------------------------------------- rows
    def append(self, rows: Iterable[Prediction]) -> int:
        """Insert every row in one transaction: all of them or none."""
        values = [(r.prediction_id, r.ts, r.model_version, r.text.replace("\x00", "\ufffd"),
                   json.dumps([float(p) for p in r.probabilities]), int(r.label), float(r.latency_ms),
                   None if r.tokens_seen is None else int(r.tokens_seen),
                   None if r.truncated is None else int(bool(r.truncated)),
                   None if r.labels is None else json.dumps([str(x) for x in r.labels])) for r in rows]

        def insert(con):
            with con.cursor() as cur:
                cur.executemany("INSERT INTO predictions (prediction_id, ts, model_version, text, probabilities, "
                                "label, latency_ms, tokens_seen, truncated, labels) "
                                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", values)

        if values:
            self._run(f"write {len(values)} prediction(s)", insert)
        return len(values)

    def add_feedback(self, prediction_id: str, label: int | str, ts: str | None = None,
                     labels: Sequence[str] | None = None) -> bool:
        """Store the true label of a prediction, as ``PredictionLog.add_feedback``
        does: a class id, or a name resolved against the row's own label
        names (else ``labels``). Returns True when it replaced an earlier
        label. Raises KeyError (unknown id), ValueError (a label the row's
        version does not have, an ambiguous id), PredictionLogError."""
        return self.store_feedback(prediction_id, label, ts, labels).replaced

    def store_feedback(self, prediction_id: str, label: int | str, ts: str | None = None,
                       labels: Sequence[str] | None = None) -> StoredFeedback:
        """``add_feedback``, returning what was stored, as
        ``PredictionLog.store_feedback``."""

        def update(con):
            row = con.execute("SELECT feedback_label, labels FROM predictions WHERE prediction_id = %s FOR UPDATE",
                              (prediction_id,)).fetchone()
            if row is None:
                raise KeyError(prediction_id)
            class_id = feedback_class_id(prediction_id, label, row[1], labels)
            con.execute("UPDATE predictions SET feedback_label = %s, feedback_ts = %s WHERE prediction_id = %s",
                        (int(class_id), ts or utc_now(), prediction_id))
            return StoredFeedback.of(row[0] is not None, class_id, row[1], labels)

        return self._run("write feedback", update)

    def count(self) -> int:
        """Rows in the log."""
        return self._run("count the predictions",
                         lambda con: con.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])

    def window(self, last: int | None = None, since: str | datetime | None = None,
               until: str | datetime | None = None, with_feedback: bool | None = None):
        """The same window, with the same filters and the same DataFrame, as
        ``PredictionLog.window`` (oldest first; ``last`` after the other
        filters; columns a not yet migrated schema lacks as None; an empty
        frame when there is no schema yet). Raises PredictionLogError and
        ValueError (``last`` < 0)."""
        import pandas as pd

        sql, args = window_query("%s", "seq", last, since, until, with_feedback)

        def read(con):
            have = {r[0] for r in con.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'predictions'").fetchall()}
            if not have:
                return None
            columns = ", ".join(c if c in have else f"NULL AS {c}" for c in COLUMNS)
            return con.execute(sql.format(columns=columns), args).fetchall()

        rows = self._run("read a window", read)
        if rows is None:
            return pd.DataFrame(columns=list(COLUMNS))
        return window_frame(rows)
