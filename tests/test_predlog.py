"""The prediction log on 3-row windows: one transaction per append, a typed
window reader, feedback, and a versioned schema."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from shrinkflow.predlog import COLUMNS, SCHEMA_VERSION, Prediction, PredictionLog, PredictionLogError


def row(i: int, ts: str, version: str = "v0001") -> Prediction:
    return Prediction(prediction_id=f"p{i}", ts=ts, model_version=version, text=f"text {i}",
                      probabilities=(0.25, 0.75), label=1, latency_ms=1.5 + i)


def test_constructor_touches_nothing(tmp_path):
    log = PredictionLog(tmp_path / "sub" / "log.db")
    assert not (tmp_path / "sub").exists()
    assert log.window(last=3).empty and list(log.window().columns) == list(COLUMNS)


def test_append_window_and_feedback_on_three_rows(tmp_path):
    log = PredictionLog(tmp_path / "log.db").open()
    assert log.schema_version() == SCHEMA_VERSION
    assert log.append([row(1, "2026-01-01T00:00:01"), row(2, "2026-01-01T00:00:02"),
                       row(3, "2026-01-01T00:00:03", "v0002")]) == 3
    df = log.window(last=2)
    assert df["prediction_id"].tolist() == ["p2", "p3"]  # newest two, oldest first
    assert df["probabilities"].tolist() == [[0.25, 0.75], [0.25, 0.75]]
    assert log.window(since="2026-01-01T00:00:02")["prediction_id"].tolist() == ["p2", "p3"]
    assert log.window(until="2026-01-01T00:00:02")["prediction_id"].tolist() == ["p1"]
    assert log.add_feedback("p2", 0) is False
    assert log.add_feedback("p2", 1) is True  # a second label replaces the first, and says so
    labelled = log.window(with_feedback=True)
    assert labelled["prediction_id"].tolist() == ["p2"] and labelled["feedback_label"].tolist() == [1]
    assert log.window(with_feedback=False)["prediction_id"].tolist() == ["p1", "p3"]
    with pytest.raises(KeyError):
        log.add_feedback("nope", 1)


def test_append_is_one_transaction(tmp_path):
    log = PredictionLog(tmp_path / "log.db").open()
    log.append([row(1, "2026-01-01T00:00:01")])
    with pytest.raises(PredictionLogError, match="cannot write 2 prediction"):
        log.append([row(2, "2026-01-01T00:00:02"), row(1, "2026-01-01T00:00:03")])  # duplicate id
    assert log.count() == 1  # p2 was rolled back with the failed batch


def test_concurrent_writers_lose_nothing(tmp_path):
    log = PredictionLog(tmp_path / "log.db", timeout_s=30).open()

    def writer(w):
        for b in range(10):
            log.append([row(w * 1000 + b * 10 + k, f"2026-01-01T00:00:{b:02d}") for k in range(10)])

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.count() == 600


def test_wal_mode_and_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "log.db"
    PredictionLog(path).open()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(PredictionLogError, match="newer than this shrinkflow"):
        PredictionLog(path).open()


def test_open_is_idempotent_and_keeps_rows(tmp_path):
    log = PredictionLog(tmp_path / "log.db").open()
    log.append([row(1, "2026-01-01T00:00:01")])
    PredictionLog(tmp_path / "log.db").open()
    assert log.count() == 1


# ----------------------------------------------------------- under faults

HOLDER = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("PRAGMA locking_mode=EXCLUSIVE")
con.execute("BEGIN EXCLUSIVE")
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


class Holder:
    """Another process holding the log as the issue did:
    ``PRAGMA locking_mode=EXCLUSIVE; BEGIN EXCLUSIVE``, until release()."""

    def __init__(self, path):
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def release(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture
def locked_log(tmp_path):
    """A log with one row (p1), held by another process."""
    path = tmp_path / "log.db"
    PredictionLog(path).open().append([row(1, "2026-01-01T00:00:01")])
    holder = Holder(path)
    yield path, holder
    holder.release()


@pytest.mark.parametrize("call", ["open", "append", "add_feedback", "window", "count", "schema_version"])
def test_every_method_on_a_locked_log_raises_prediction_log_error(locked_log, call):
    import time

    locked_log, _ = locked_log
    log = PredictionLog(locked_log, timeout_s=0.3)
    calls = {"open": log.open, "append": lambda: log.append([row(2, "2026-01-01T00:00:02")]),
             "add_feedback": lambda: log.add_feedback("p1", 0), "window": lambda: log.window(last=5),
             "count": log.count, "schema_version": log.schema_version}
    start = time.monotonic()
    with pytest.raises(PredictionLogError) as err:
        calls[call]()
    # a PredictionLogError (the server's 503), never a bare sqlite3 error
    assert type(err.value) is PredictionLogError and isinstance(err.value.cause, sqlite3.OperationalError)
    assert err.value.locked is True and err.value.path == locked_log
    assert str(locked_log) in str(err.value) and "database is locked" in str(err.value)
    assert "another connection or process holds it; waited 0.3 s" in str(err.value)
    assert time.monotonic() - start >= 0.3  # it waited its busy timeout first


def test_a_failed_write_on_a_locked_log_loses_nothing_once_released(locked_log):
    path, holder = locked_log
    log = PredictionLog(path, timeout_s=0.2)
    with pytest.raises(PredictionLogError, match="database is locked"):
        log.append([row(2, "2026-01-01T00:00:02")])
    holder.release()
    assert log.count() == 1  # p2 was refused whole; p1 is still there
    assert log.append([row(2, "2026-01-01T00:00:02")]) == 1 and log.count() == 2
    assert log.add_feedback("p1", 0) is False


class FullLog(PredictionLog):
    """A log whose database may not grow past ``pages`` pages: a real
    SQLITE_FULL (SQLite's own max_page_count), no mock."""

    pages = 0

    def _connect(self):
        con = super()._connect()
        if self.pages:
            con.execute(f"PRAGMA max_page_count = {self.pages}")
        return con


def test_a_full_disk_reports_its_first_cause_not_the_failed_rollback(tmp_path):
    log = FullLog(tmp_path / "log.db").open()
    log.append([row(1, "2026-01-01T00:00:01")])
    con = sqlite3.connect(tmp_path / "log.db")
    log.pages = con.execute("PRAGMA page_count").fetchone()[0] + 1  # room for almost nothing more
    con.close()
    big = [Prediction(f"big{i}", "2026-01-01T00:00:02", "v0001", "x" * 4000, (0.5, 0.5), 0, 1.0)
           for i in range(20)]
    with pytest.raises(PredictionLogError) as err:
        log.append(big)
    msg = str(err.value)
    assert "database or disk is full" in msg and "cannot rollback" not in msg, msg
    assert msg.startswith(f"cannot write 20 prediction(s) in the prediction log {tmp_path / 'log.db'}: ")
    assert err.value.cause.sqlite_errorname == "SQLITE_FULL" and err.value.locked is False
    log.pages = 0
    assert log.count() == 1  # nothing half-written, nothing lost
    assert log.add_feedback("p1", 0) is False


def test_sqlite_errors_never_escape_as_sqlite3_errors(tmp_path):
    not_a_db = tmp_path / "not.db"
    not_a_db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(PredictionLogError, match=f"prediction log {not_a_db}: file is not a database"):
        PredictionLog(not_a_db).open()
    with pytest.raises(PredictionLogError, match="file is not a database"):
        PredictionLog(not_a_db).window(last=3)
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(PredictionLogError, match="unable to open database file"):
        PredictionLog(tmp_path / "dir.db").count()
    with pytest.raises(ValueError, match="last must be >= 0"):
        PredictionLog(not_a_db).window(last=-1)


def test_window_reads_what_other_writers_and_older_schemas_left(tmp_path):
    """A schema-1 log (never migrated) and values no shrinkflow writes: the
    window reads them all, unknowns as None or []."""
    path = tmp_path / "v1.db"
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE predictions (prediction_id TEXT PRIMARY KEY, ts TEXT NOT NULL, model_version TEXT NOT NULL,
            text TEXT NOT NULL, probabilities TEXT NOT NULL, label INTEGER NOT NULL, latency_ms REAL NOT NULL,
            feedback_label INTEGER, feedback_ts TEXT);
        PRAGMA user_version = 1;""")
    con.execute("INSERT INTO predictions VALUES ('a', '2026-01-01T00:00:01', 'v1', CAST(X'6F6BFF21' AS TEXT), "
                "'not json', 1, 1.0, NULL, NULL)")
    con.execute("INSERT INTO predictions VALUES ('b', '2026-01-01T00:00:02', 'v1', '', '[0.4, 0.6]', 1, 1.0, 0, "
                "'2026-01-01T00:00:03')")
    con.execute("INSERT INTO predictions VALUES ('c', '2026-01-01T00:00:03', 'v1', 'x', '{\"p\": 1}', 0, 1.0, "
                "NULL, NULL)")
    con.commit()
    con.close()
    df = PredictionLog(path).window(last=10)
    assert df["prediction_id"].tolist() == ["a", "b", "c"]
    assert df["text"].tolist() == ["ok\ufffd!", "", "x"]  # invalid UTF-8 replaced, not an error
    assert df["probabilities"].tolist() == [[], [0.4, 0.6], []]
    assert df["tokens_seen"].tolist() == [None, None, None] and df["truncated"].tolist() == [None, None, None]
    assert df["labels"].tolist() == [[], [], []]  # no label names before schema 3
    # opening it migrates it, keeping the rows; old rows stay unknown
    log = PredictionLog(path).open()
    assert log.schema_version() == SCHEMA_VERSION and log.count() == 3
    assert log.window()["truncated"].isna().all()
    assert log.window()["labels"].tolist() == [[], [], []]
    # feedback by name on a row logged before schema 3: resolved against the names the server passes
    assert log.add_feedback("a", "positive", labels=("negative", "positive")) is False
    assert log.window()["feedback_label"].tolist()[0] == 1


def test_rows_carry_their_label_names_and_feedback_by_name_uses_them(tmp_path):
    """Schema 3: each row stores the answering version's label names, so a
    name is resolved against them, not against whatever is served later."""
    log = PredictionLog(tmp_path / "log.db").open()
    three = ("billing", "bug", "sales")
    log.append([Prediction("p1", "2026-01-01T00:00:01", "v0001", "refund please", (0.7, 0.2, 0.1), 0, 1.0,
                           labels=three),
                Prediction("p2", "2026-01-01T00:00:02", "v0002", "it crashes", (0.1, 0.1, 0.1, 0.7), 3, 1.0,
                           labels=("billing", "bug", "outage", "sales"))])
    df = log.window()
    assert df["labels"].tolist() == [list(three), ["billing", "bug", "outage", "sales"]]
    assert log.add_feedback("p1", "sales") is False
    assert log.add_feedback("p2", "sales", labels=three) is False   # the row's own names win
    assert log.window()["feedback_label"].tolist() == [2, 3]
    with pytest.raises(ValueError, match=r"'outage' is not one of the labels \['billing', 'bug', 'sales'\]"):
        log.add_feedback("p1", "outage")
    assert log.window()["feedback_label"].tolist() == [2, 3]   # nothing written
