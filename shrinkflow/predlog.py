"""The prediction log: every served prediction, durably, in SQLite (WAL) or,
for several serving replicas, in PostgreSQL (``shrinkflow.predlog_postgres``).

Shaped like the Registry: constructing a ``PredictionLog`` touches nothing on
disk; ``open()`` creates the database or migrates its schema; ``append(rows)``
is one transaction; ``window(...)`` is the one typed reader monitoring uses,
returning a pandas DataFrame. The server (long-running) and the monitor read
and write it concurrently, so the schema is versioned (``PRAGMA
user_version``) and every write is a short transaction in WAL mode.

``prediction_log(root, serve_params)`` is the one factory every entry point
(serving, the monitor, the bench scripts) builds the log with: no
``serve.log_url`` (or a ``sqlite:///`` one) gives this module's
``PredictionLog``; ``postgresql://...`` gives ``PostgresPredictionLog``,
with the same methods, schema steps, errors and DataFrame.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

SCHEMA_VERSION = 3
COLUMNS = ("prediction_id", "ts", "model_version", "text", "probabilities", "label", "latency_ms",
           "feedback_label", "feedback_ts", "tokens_seen", "truncated", "labels")

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
    # 2: what the model read. tokens_seen counts the tokens it was given
    # (special tokens included); truncated is 1 when the text was cut to the
    # model's max_seq_len. NULL on rows logged before version 2.
    """
    ALTER TABLE predictions ADD COLUMN tokens_seen INTEGER;
    ALTER TABLE predictions ADD COLUMN truncated INTEGER;
    """,
    # 3: any number of classes. labels is the JSON list of the answering
    # version's label names in class-id order: label, feedback_label and the
    # probabilities index into it, so a row stays readable after the task's
    # label set changes (a new class shifts every id after it). NULL on rows
    # logged before version 3 (the built-in ("negative", "positive") task).
    """
    ALTER TABLE predictions ADD COLUMN labels TEXT;
    """,
)


class PredictionLogError(RuntimeError):
    """The log cannot be written or read (disk full, locked, newer schema).

    Every SQLite failure of every ``PredictionLog`` method (connect, pragmas,
    reads, writes, migrations) comes out as this, never as ``sqlite3.Error``:
    the message names what was being done and the log's path, and carries the
    first cause (a ROLLBACK that fails after an error never replaces it).
    ``cause`` is that SQLite error (or None); ``locked`` says whether it was a
    lock held by another connection or process (SQLITE_BUSY or
    SQLITE_LOCKED), the one failure that waiting can cure.

    The PostgreSQL log raises it too (``path`` None, the message naming the
    URL, ``cause`` psycopg's error); ``unavailable`` says whether the
    failure is the database's as a whole (SQLite: sqlite3.OperationalError;
    PostgreSQL: the server down or unreachable), so that writing the same
    rows one by one cannot help.
    """

    def __init__(self, message: str, *, path: Path | str | None = None, cause: BaseException | None = None,
                 unavailable: bool | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.cause = cause
        self._unavailable = unavailable

    @property
    def unavailable(self) -> bool:
        if self._unavailable is not None:
            return self._unavailable
        return isinstance(self.cause, sqlite3.OperationalError)

    @property
    def locked(self) -> bool:
        code = getattr(self.cause, "sqlite_errorcode", None)
        # Extended result codes keep the primary code in the low byte.
        return code is not None and (code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


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
    tokens_seen: int | None = None      # tokens the model read, special tokens included
    truncated: bool | None = None       # the text was cut to the model's max_seq_len
    labels: Sequence[str] | None = None  # the answering version's label names, in class-id order


def _json_list(value) -> list | None:
    """A stored value (JSON text, bytes or an already parsed object) as a
    list, or None when it is not one."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    try:
        out = json.loads(value) if isinstance(value, str) else value
    except ValueError:
        return None
    return list(out) if isinstance(out, list) else None


def parse_probabilities(value) -> list:
    """The stored JSON list of probabilities, or [] when it is not one (the
    log may hold what another writer put there; the monitor treats [] as
    unknown rather than failing on the whole window)."""
    return _json_list(value) or []


def parse_labels(value) -> list[str]:
    """The stored JSON list of label names, or [] when there is none (a row
    logged before schema 3) or it is not a list of strings."""
    out = _json_list(value) or []
    return out if all(isinstance(x, str) for x in out) else []


@dataclass(frozen=True)
class StoredFeedback:
    """What ``store_feedback`` stored: ``replaced`` (an earlier label was
    there), ``class_id`` and ``label``, its name among the labels of the
    version that answered the prediction (None where they are unknown)."""

    replaced: bool
    class_id: int
    label: str | None

    @classmethod
    def of(cls, replaced: bool, class_id: int, stored_labels, labels: Sequence[str] | None) -> "StoredFeedback":
        names = feedback_names(stored_labels, labels)
        return cls(replaced, int(class_id), names[class_id] if 0 <= class_id < len(names) else None)


class FeedbackLabelError(ValueError):
    """A feedback label the answering version does not have, or an
    ambiguous id; ``labels``: that version's names, for the answer."""

    def __init__(self, message: str, labels: Sequence[str]):
        super().__init__(message)
        self.labels = list(labels)


def feedback_class_id(prediction_id: str, label: int | str, stored_labels, labels: Sequence[str] | None) -> int:
    """The class id ``add_feedback`` stores for ``label``, among the label
    names of the version that answered the prediction: the row's stored
    names (``stored_labels``, its JSON), else ``labels`` (a row logged
    before schema 3), else none known. A name is looked up among them; an
    id (an index into them) is checked against their number. Raises
    ValueError (the message lists them) for a name that is not one of them,
    an id out of range, and an id where the names themselves are integers
    other than 0..N-1 in order (labels 1, 2, 3: is 1 the name or the index?
    The name must be sent as a string; a newcomer's finding: 1 was stored
    as the class "2")."""
    names = feedback_names(stored_labels, labels)
    where = f"the labels {names} of the version that answered prediction {prediction_id}"
    if isinstance(label, str):
        if label not in names and label.strip() in names:
            label = label.strip()   # the data stage strips label names: " tech support " is "tech support"
        if label not in names:
            raise FeedbackLabelError(f"unknown label {label!r}: the label must be one of {names} or its index "
                                     f"(the labels of the version that answered prediction {prediction_id})", names)
        return names.index(label)
    if not names:
        return label
    if not 0 <= label < len(names):
        hint = (f"; to name the class {label}, send it as a string (\"{label}\")"
                if str(label) in names else "")   # integer names: 10 is a name, not an index of 4 classes
        raise FeedbackLabelError(f"label index must be in 0..{len(names) - 1} (the labels are {names}): {where}"
                                 f"{hint}", names)
    if names != [str(i) for i in range(len(names))] and any(_is_int(n) for n in names):
        raise FeedbackLabelError(f"label {label} is ambiguous: {where} are integers, so send the label's name as a "
                                 f"string (\"{label}\" for the class named {label}; {label} would be read as the "
                                 f"index of {names[label]!r})", names)
    return label


def feedback_names(stored_labels, labels: Sequence[str] | None) -> list[str]:
    """The label names feedback on a row is resolved against: the row's own
    (``stored_labels``, its JSON), else ``labels``, else []."""
    return parse_labels(stored_labels) or [str(x) for x in (labels or ())]


def _is_int(name: str) -> bool:
    try:
        int(name)
    except ValueError:
        return False
    return True


def window_frame(rows: list):
    """The window's rows (newest first, in COLUMNS order, as the database
    returned them) as the typed DataFrame both logs' ``window`` return:
    oldest first, ``probabilities`` and ``labels`` parsed to lists."""
    import pandas as pd

    df = pd.DataFrame.from_records(rows[::-1], columns=list(COLUMNS))
    df["probabilities"] = df["probabilities"].map(parse_probabilities)
    df["labels"] = df["labels"].map(parse_labels)
    return df


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def window_query(placeholder: str, insertion_order: str, last: int | None, since, until,
                 with_feedback: bool | None) -> tuple[str, list]:
    """The one window query both backends run: ``(sql, args)`` with a
    ``{columns}`` slot, newest first (``ts``, then ``insertion_order``: the
    column that breaks ties as insertion order), ``placeholder`` the driver's
    parameter marker ("?" for sqlite3, "%s" for psycopg). Filters as
    ``PredictionLog.window``. Raises ValueError when ``last`` < 0."""
    where, args = [], []
    if since is not None:
        where.append(f"ts >= {placeholder}")
        args.append(since.isoformat() if isinstance(since, datetime) else since)
    if until is not None:
        where.append(f"ts < {placeholder}")
        args.append(until.isoformat() if isinstance(until, datetime) else until)
    if with_feedback is not None:
        where.append("feedback_label IS NOT NULL" if with_feedback else "feedback_label IS NULL")
    sql = "SELECT {columns} FROM predictions"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY ts DESC, {insertion_order} DESC"
    if last is not None:
        if last < 0:
            raise ValueError("last must be >= 0")
        sql += f" LIMIT {int(last)}"
    return sql, args


class PredictionLog:
    """The prediction log at ``path`` (SQLite, WAL).

    ``timeout_s``: how long each statement waits for a lock another
    connection or process holds (SQLite's busy timeout) before it fails with
    ``PredictionLogError`` (``locked`` True). Every method raises
    ``PredictionLogError`` for any SQLite failure; ``add_feedback`` also
    raises ``KeyError`` for an unknown prediction id.
    """

    def __init__(self, path: Path | str, timeout_s: float = 5.0):
        # Touches nothing on disk: the server calls open() when it starts.
        self.path = Path(path)
        self.timeout_s = timeout_s

    @property
    def location(self) -> str:
        """Where the log is, for messages: its path."""
        return str(self.path)

    def close(self) -> None:
        """Nothing to release: every call opens and closes its own connection."""

    def _error(self, what: str, exc: BaseException) -> PredictionLogError:
        reason = str(exc)
        if getattr(exc, "sqlite_errorcode", None) is not None and \
                (exc.sqlite_errorcode & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            reason += f" (another connection or process holds it; waited {self.timeout_s:g} s)"
        return PredictionLogError(f"cannot {what} in the prediction log {self.path}: {reason}",
                                  path=self.path, cause=exc)

    def _connect(self) -> sqlite3.Connection:
        """A connection with this log's settings. Raises sqlite3.Error (the
        callers turn it into PredictionLogError)."""
        con = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        try:
            # Another writer may have stored bytes that are not UTF-8 in a
            # TEXT column; sqlite3 would raise on reading them, and one such
            # row would make the whole window unreadable.
            con.text_factory = lambda b: b.decode("utf-8", "replace")
            # FULL: every committed transaction is fsynced, so not even an OS
            # crash loses a logged prediction. The server writes in batches, so
            # the cost is one fsync per batch, not per request. (WAL is set
            # once, in open(): it is stored in the database file.)
            con.execute("PRAGMA synchronous=FULL")
        except BaseException:
            con.close()
            raise
        return con

    @contextmanager
    def _connection(self, what: str):
        """A connection for one read; SQLite errors come out as PredictionLogError."""
        try:
            con = self._connect()
        except sqlite3.Error as exc:
            raise self._error(what, exc) from exc
        try:
            yield con
        except sqlite3.Error as exc:
            raise self._error(what, exc) from exc
        finally:
            con.close()

    @contextmanager
    def _transaction(self, what: str):
        """One write transaction, taken at once (BEGIN IMMEDIATE) and rolled
        back on any error; SQLite errors come out as PredictionLogError, with
        the first cause: after SQLITE_FULL, for one, SQLite has already rolled
        the transaction back, and the ROLLBACK's own "no transaction is
        active" must not hide "database or disk is full"."""
        with self._connection(what) as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    try:
                        con.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # the error being raised is the one to report
                raise

    def open(self) -> "PredictionLog":
        """Create the database or migrate it to SCHEMA_VERSION, in WAL mode.
        Refuses a database written by a newer shrinkflow rather than guess its
        layout. Raises PredictionLogError."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PredictionLogError(f"cannot create the directory of the prediction log {self.path}: {exc}",
                                     path=self.path, cause=exc) from exc
        with self._connection("set WAL mode") as con:
            # Persistent (stored in the file): set once here, not on every
            # connection, where it needs a lock of its own and failed outside
            # any error handling when another process held the log.
            mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise PredictionLogError(f"cannot set WAL mode on the prediction log {self.path}: "
                                     f"SQLite kept journal_mode {mode!r}", path=self.path)
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise PredictionLogError(f"{self.path} has schema version {version}, newer than this "
                                     f"shrinkflow's {SCHEMA_VERSION}: upgrade shrinkflow", path=self.path)
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self._transaction(f"migrate the schema to version {target}") as con:
                for statement in _MIGRATIONS[target - 1].split(";"):
                    if statement.strip():
                        con.execute(statement)
                con.execute(f"PRAGMA user_version = {target}")
        return self

    def schema_version(self) -> int:
        """The schema version stored in the file (0: no file, or an empty one)."""
        if not self.path.is_file():
            return 0
        with self._connection("read the schema version") as con:
            return con.execute("PRAGMA user_version").fetchone()[0]

    def append(self, rows: Iterable[Prediction]) -> int:
        """Insert every row in one transaction: all of them or none."""
        values = [(r.prediction_id, r.ts, r.model_version, r.text, json.dumps([float(p) for p in r.probabilities]),
                   int(r.label), float(r.latency_ms), None if r.tokens_seen is None else int(r.tokens_seen),
                   None if r.truncated is None else int(bool(r.truncated)),
                   None if r.labels is None else json.dumps([str(x) for x in r.labels])) for r in rows]
        if values:
            with self._transaction(f"write {len(values)} prediction(s)") as con:
                con.executemany("INSERT INTO predictions (prediction_id, ts, model_version, text, probabilities, "
                                "label, latency_ms, tokens_seen, truncated, labels) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
        return len(values)

    def add_feedback(self, prediction_id: str, label: int | str, ts: str | None = None,
                     labels: Sequence[str] | None = None) -> bool:
        """Store the true label of a prediction: a class id (an index into the
        labels of the version that answered it) or a label name. A name is
        resolved against the row's own label names (schema 3), or against
        ``labels`` for a row logged before they were stored. Returns True
        when it replaced an earlier label. Raises KeyError for an unknown
        prediction id, ValueError for a label the row's version does not
        have or an ambiguous id (``feedback_class_id``; the message lists
        the labels)."""
        return self.store_feedback(prediction_id, label, ts, labels).replaced

    def store_feedback(self, prediction_id: str, label: int | str, ts: str | None = None,
                       labels: Sequence[str] | None = None) -> "StoredFeedback":
        """``add_feedback``, returning what was stored (``StoredFeedback``:
        whether it replaced a label, the class id, and its name among the
        labels of the version that answered, None when they are unknown)."""
        with self._transaction("write feedback") as con:
            row = con.execute("SELECT feedback_label, labels FROM predictions WHERE prediction_id = ?",
                              (prediction_id,)).fetchone()
            if row is None:
                raise KeyError(prediction_id)
            class_id = feedback_class_id(prediction_id, label, row[1], labels)
            con.execute("UPDATE predictions SET feedback_label = ?, feedback_ts = ? WHERE prediction_id = ?",
                        (int(class_id), ts or utc_now(), prediction_id))
        return StoredFeedback.of(row[0] is not None, class_id, row[1], labels)

    def count(self) -> int:
        """Rows in the log."""
        with self._connection("count the predictions") as con:
            return con.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]

    def window(self, last: int | None = None, since: str | datetime | None = None,
               until: str | datetime | None = None, with_feedback: bool | None = None):
        """A window of the log as a DataFrame (oldest first), with columns
        COLUMNS, ``probabilities`` parsed back to lists ([] where the
        stored value is not a JSON list) and ``labels`` to lists of names ([]
        on rows logged before schema 3). Columns a not yet migrated log lacks
        come back as None. Raises PredictionLogError (locked past
        ``timeout_s``, not a prediction log, unreadable) and ValueError
        (``last`` < 0).

        ``last``: the newest N rows; ``since``/``until``: a time range (UTC);
        ``with_feedback``: True only labelled rows, False only unlabelled,
        None both. Filters combine; ``last`` applies after the others.
        """
        import pandas as pd

        sql, args = window_query("?", "rowid", last, since, until, with_feedback)
        if not self.path.is_file():
            return pd.DataFrame(columns=list(COLUMNS))
        with self._connection("read a window") as con:
            # Rows fetched here, not through pandas.read_sql_query, which
            # wraps SQLite's errors in its own DatabaseError.
            # A log not yet migrated (a server of an older version still
            # writing it) lacks the newer columns: read them as unknown.
            have = {r[1] for r in con.execute("PRAGMA table_info(predictions)").fetchall()}
            columns = ", ".join(c if c in have else f"NULL AS {c}" for c in COLUMNS)
            rows = con.execute(sql.format(columns=columns), args).fetchall()
        return window_frame(rows)


SQLITE_SCHEME = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def sqlite_url_path(url: str) -> str:
    """The file a ``sqlite:///PATH`` URL names: PATH relative to the project
    (``sqlite:///.shrinkflow/p.db``), or absolute with a fourth slash
    (``sqlite:////var/lib/p.db``), as SQLAlchemy reads it. Raises
    ValueError for another URL or an empty path."""
    if not url.startswith(SQLITE_SCHEME) or not url[len(SQLITE_SCHEME):]:
        raise ValueError(f"not a sqlite:///PATH URL: {url!r}")
    return url[len(SQLITE_SCHEME):]


def log_label(serve) -> str:
    """How messages name the log ``serve`` (ServeParams) points at: the
    path as params.yaml gives it (relative to the project), or the
    PostgreSQL URL (which never holds a password)."""
    url = serve.log_url
    if url is None:
        return str(serve.log_path)
    return sqlite_url_path(url) if url.startswith(SQLITE_SCHEME) else url


def prediction_log(root: Path | str, serve, timeout_s: float = 5.0):
    """The prediction log ``serve`` (ServeParams) names, for the project at
    ``root``; constructing it touches nothing (call ``open()``).

    ``serve.log_url`` None: SQLite at ``root / serve.log_path`` (the
    default, exactly as before log_url existed); ``sqlite:///PATH``: SQLite
    at PATH (relative to ``root`` unless absolute); ``postgresql://...``: a
    ``PostgresPredictionLog`` (needs psycopg). ``timeout_s``: how long a
    call waits for a lock (SQLite's busy timeout; PostgreSQL's lock_timeout
    and, at least 2 s, its connect timeout). Raises ValueError for any
    other URL (params validation refuses those first)."""
    url = serve.log_url
    if url is None:
        return PredictionLog(Path(root) / serve.log_path, timeout_s=timeout_s)
    if url.startswith(SQLITE_SCHEME):
        return PredictionLog(Path(root) / sqlite_url_path(url), timeout_s=timeout_s)
    if url.startswith(POSTGRES_SCHEMES):
        from shrinkflow.predlog_postgres import PostgresPredictionLog

        return PostgresPredictionLog(url, timeout_s=timeout_s)
    raise ValueError(f"serve.log_url must be sqlite:///PATH or postgresql://..., not {url!r}")
