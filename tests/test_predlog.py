"""The prediction log on 3-row windows: one transaction per append, a typed
window reader, feedback, and a versioned schema; the contract tests run on
both backends, SQLite and a real PostgreSQL cluster (``pg_cluster``), and
the PostgreSQL log's own cases (migrations, two writing processes, a dead
server, the password's sources, the same DataFrame as SQLite's) follow
the SQLite ones."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from shrinkflow.predlog import COLUMNS, SCHEMA_VERSION, Prediction, PredictionLog, PredictionLogError
from tests.conftest import pg_schema_url


def row(i: int, ts: str, version: str = "v0001") -> Prediction:
    return Prediction(prediction_id=f"p{i}", ts=ts, model_version=version, text=f"text {i}",
                      probabilities=(0.25, 0.75), label=1, latency_ms=1.5 + i)


@pytest.fixture(params=["sqlite", "postgresql"])
def new_log(request, tmp_path):
    """``new_log(timeout_s=5.0)``: an unopened log on one fresh database of
    the backend (a SQLite file; a new schema of the module's PostgreSQL
    cluster). Every call gives another handle on the same database."""
    logs = []
    if request.param == "sqlite":
        def make(timeout_s: float = 5.0):
            return PredictionLog(tmp_path / "log.db", timeout_s=timeout_s)
    else:
        from shrinkflow.predlog_postgres import PostgresPredictionLog

        url = pg_schema_url(request.getfixturevalue("pg_cluster"))

        def make(timeout_s: float = 5.0):
            logs.append(PostgresPredictionLog(url, timeout_s=timeout_s))
            return logs[-1]
    yield make
    for log in logs:
        log.close()


def test_constructor_touches_nothing(tmp_path):
    log = PredictionLog(tmp_path / "sub" / "log.db")
    assert not (tmp_path / "sub").exists()
    assert log.window(last=3).empty and list(log.window().columns) == list(COLUMNS)


def test_append_window_and_feedback_on_three_rows(new_log):
    log = new_log().open()
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


def test_append_is_one_transaction(new_log):
    log = new_log().open()
    log.append([row(1, "2026-01-01T00:00:01")])
    with pytest.raises(PredictionLogError, match="cannot write 2 prediction"):
        log.append([row(2, "2026-01-01T00:00:02"), row(1, "2026-01-01T00:00:03")])  # duplicate id
    assert log.count() == 1  # p2 was rolled back with the failed batch


def test_concurrent_writers_lose_nothing(new_log):
    log = new_log(timeout_s=30).open()

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


def test_open_is_idempotent_and_keeps_rows(new_log):
    log = new_log().open()
    log.append([row(1, "2026-01-01T00:00:01")])
    new_log().open()
    assert log.count() == 1 and log.schema_version() == SCHEMA_VERSION


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


def test_rows_carry_their_label_names_and_feedback_by_name_uses_them(new_log):
    """Schema 3: each row stores the answering version's label names, so a
    name is resolved against them, not against whatever is served later."""
    log = new_log().open()
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
    with pytest.raises(ValueError, match=r"unknown label 'outage': the label must be one of "
                                         r"\['billing', 'bug', 'sales'\] or its index"):
        log.add_feedback("p1", "outage")
    assert log.window()["feedback_label"].tolist() == [2, 3]   # nothing written


def test_feedback_by_id_where_the_label_names_are_integers_is_refused_as_ambiguous(new_log):
    """A newcomer's finding: a task labelled 1, 2, 3 took {"label": 1} as
    the index of "2" and stored it silently. An id is refused there (send
    the name, a string), unless the names are 0..N-1 in order, where id and
    name agree; names and ids of the answering version, not the served one."""
    log = new_log().open()
    log.append([Prediction("a", "2026-01-01T00:00:01", "v0001", "x", (0.2, 0.3, 0.5), 2, 1.0, labels=("1", "2", "3")),
                Prediction("b", "2026-01-01T00:00:02", "v0002", "y", (0.2, 0.3, 0.5), 2, 1.0, labels=("0", "1", "2")),
                Prediction("c", "2026-01-01T00:00:03", "v0003", "z", (0.6, 0.4), 0, 1.0, labels=("no", "yes"))])
    served = ("billing", "bug", "sales")
    with pytest.raises(ValueError, match=r"label 1 is ambiguous: the labels \['1', '2', '3'\].*send the label's name"):
        log.store_feedback("a", 1, labels=served)
    assert log.window(with_feedback=True).empty   # nothing written
    # out of range as an index, yet a class's name: the answer says how to send it
    with pytest.raises(ValueError, match=r"label index must be in 0\.\.2 .*send it as a string \(\"3\"\)"):
        log.store_feedback("a", 3, labels=served)
    stored = log.store_feedback("a", "1", labels=served)
    assert (stored.replaced, stored.class_id, stored.label) == (False, 0, "1")
    assert log.store_feedback("b", 1, labels=served).label == "1"     # 0..N-1: the id is the name
    assert log.store_feedback("c", 1, labels=served).label == "yes"   # the answering version's names
    with pytest.raises(ValueError, match=r"label index must be in 0\.\.1 \(the labels are \['no', 'yes'\]\)"):
        log.store_feedback("c", 2, labels=served)
    with pytest.raises(ValueError, match=r"unknown label 'bug'"):
        log.store_feedback("c", "bug", labels=served)
    assert log.store_feedback("c", " yes\t", labels=served).label == "yes"   # names are stripped, as the data's
    fb = log.window(with_feedback=True)
    assert dict(zip(fb["prediction_id"], fb["feedback_label"])) == {"a": 0, "b": 1, "c": 1}


# ------------------------------------------------- serve.log_url, the factory

def test_the_factory_builds_the_log_serve_params_name(tmp_path):
    """No log_url: SQLite at log_path, exactly as before; sqlite:///PATH:
    SQLite there (relative to the project, or absolute); postgresql://: the
    PostgreSQL log, constructed without connecting (nothing listens on
    port 1). A password in the URL is refused at params validation."""
    from pydantic import ValidationError

    from shrinkflow.config import ServeParams
    from shrinkflow.predlog import log_label, prediction_log
    from shrinkflow.predlog_postgres import PostgresPredictionLog

    default = prediction_log(tmp_path, ServeParams())
    assert type(default) is PredictionLog and default.path == tmp_path / ".shrinkflow" / "predictions.db"
    assert default.timeout_s == 5.0 and log_label(ServeParams()) == ".shrinkflow/predictions.db"
    rel = prediction_log(tmp_path, ServeParams(log_url="sqlite:///logs/p.db"), timeout_s=2.0)
    assert type(rel) is PredictionLog and rel.path == tmp_path / "logs" / "p.db" and rel.timeout_s == 2.0
    absolute = prediction_log(tmp_path, ServeParams(log_url=f"sqlite:///{tmp_path}/abs.db"))
    assert absolute.path == tmp_path / "abs.db"
    url = "postgresql://shrinkflow@127.0.0.1:1/shrinkflow?password_env=SOME_VAR"
    pg = prediction_log(tmp_path, ServeParams(log_url=url))
    assert type(pg) is PostgresPredictionLog and pg.password_env == "SOME_VAR"
    assert pg.location == url and log_label(ServeParams(log_url=url)) == url
    for bad, why in (("postgresql://u:hunter2@127.0.0.1/db", "holds a password"),
                     ("postgresql://u@127.0.0.1/db?password=hunter2", "holds a password"),
                     ("mysql://u@127.0.0.1/db", "must be sqlite:///PATH or postgresql://"),
                     ("sqlite:///", "needs a path")):
        with pytest.raises(ValidationError, match=why) as err:
            ServeParams(log_url=bad)
        assert "hunter2" not in str(err.value).split("input_value")[0]


def test_a_postgresql_log_that_is_down_raises_prediction_log_error_from_every_method():
    """Nothing listens at the URL: every method fails at once with a
    PredictionLogError naming the URL and saying the database is down
    (``unavailable``: the server's 503), never a bare psycopg error."""
    import psycopg

    from tests.netports import free_port
    from shrinkflow.predlog_postgres import PostgresPredictionLog

    url = f"postgresql://shrinkflow@127.0.0.1:{free_port()}/shrinkflow"
    log = PostgresPredictionLog(url, timeout_s=2)
    calls = {"open": log.open, "append": lambda: log.append([row(1, "2026-01-01T00:00:01")]),
             "add_feedback": lambda: log.add_feedback("p1", 0), "window": lambda: log.window(last=5),
             "count": log.count, "schema_version": log.schema_version}
    for name, call in calls.items():
        with pytest.raises(PredictionLogError) as err:
            call()
        assert type(err.value) is PredictionLogError and isinstance(err.value.cause, psycopg.OperationalError), name
        assert err.value.unavailable is True and err.value.locked is False and err.value.path is None
        assert f"in the prediction log {url}: " in str(err.value) and "down or unreachable" in str(err.value)


# ------------------------------------------------------- PostgreSQL only

def _pg(url: str, timeout_s: float = 5.0):
    from shrinkflow.predlog_postgres import PostgresPredictionLog

    return PostgresPredictionLog(url, timeout_s=timeout_s)


def test_postgresql_reads_back_the_same_dataframe_as_sqlite(pg_cluster, tmp_path):
    """The same rows and feedback through both logs: every window (last,
    since, until, with_feedback, combined; ties on ts in insertion order)
    is the same DataFrame, value for value and type for type."""
    import pandas as pd

    from datetime import datetime, timezone

    sqlite_log = PredictionLog(tmp_path / "log.db").open()
    pg_log = _pg(pg_schema_url(pg_cluster)).open()
    three = ("billing", "bug", "sales")
    rows = [
        Prediction("a", "2026-01-01T00:00:01.000000+00:00", "v0001", "plain text", (0.25, 0.75), 1, 1.5),
        Prediction("b", "2026-01-01T00:00:02.000000+00:00", "v0001", "émoji 🎬 and ünïcode", (0.1 + 0.2, 0.7), 0,
                   0.001, tokens_seen=7, truncated=False, labels=("negative", "positive")),
        Prediction("c", "2026-01-01T00:00:02.000000+00:00", "v0002", "same ts, logged after b",
                   (0.7, 0.2, 0.1), 0, 3.25, tokens_seen=64, truncated=True, labels=three),
        Prediction("d", "2026-01-01T00:00:03.500000+00:00", "v0002", "  spaces\tand\nlines ", (1.0, 0.0, 0.0), 0,
                   12.0, tokens_seen=5, truncated=False, labels=three),
    ]
    for log in (sqlite_log, pg_log):
        assert log.append(rows[:1]) == 1 and log.append(rows[1:]) == 3
        assert log.add_feedback("a", 0, ts="2026-01-01T00:01:00.000000+00:00") is False
        assert log.add_feedback("c", "sales", ts="2026-01-01T00:01:01.000000+00:00") is False
        assert log.add_feedback("c", 1, ts="2026-01-01T00:01:02.000000+00:00") is True
        assert log.count() == 4 and log.schema_version() == SCHEMA_VERSION
    queries = [{}, {"last": 2}, {"last": 0}, {"last": 10}, {"since": "2026-01-01T00:00:02"},
               {"until": "2026-01-01T00:00:02.000000+00:00"}, {"with_feedback": True}, {"with_feedback": False},
               {"since": datetime(2026, 1, 1, 0, 0, 2, tzinfo=timezone.utc), "with_feedback": False, "last": 1},
               {"since": "2026-01-01T00:00:01.5", "until": "2026-01-01T00:00:03"}]
    for q in queries:
        expected, got = sqlite_log.window(**q), pg_log.window(**q)
        pd.testing.assert_frame_equal(got, expected, check_exact=True, obj=str(q))
        for column in ("text", "probabilities", "labels", "truncated", "tokens_seen"):   # the Python values too
            assert [type(v) for v in got[column]] == [type(v) for v in expected[column]], (q, column)
    whole = pg_log.window()
    assert whole["prediction_id"].tolist() == ["a", "b", "c", "d"]     # b and c tie on ts: insertion order
    assert whole["feedback_label"].isna().tolist() == [False, True, False, True]
    assert whole["feedback_label"].tolist()[::2] == [0, 1] and whole["labels"].tolist()[2] == list(three)
    assert whole["text"].tolist()[1] == "émoji 🎬 and ünïcode" and whole["probabilities"].tolist()[1] == [0.1 + 0.2, 0.7]
    pg_log.close()


def test_the_cluster_helper_reuses_its_cluster_and_keeps_the_password_out_of_urls(pg_cluster):
    """shrinkflow.pgcluster: init() on an existing cluster reuses it; the URL
    names no password; the passfile is readable by its owner only (libpq
    ignores one that is not); it listens on loopback."""
    import stat

    assert pg_cluster.initialized() and pg_cluster.init() is False and pg_cluster.running()
    url = pg_cluster.url("shrinkflow")
    assert url == f"postgresql://shrinkflow@127.0.0.1:{pg_cluster.port}/shrinkflow"
    assert stat.S_IMODE(pg_cluster.passfile.stat().st_mode) == 0o600
    assert pg_cluster.env() == {"PGPASSFILE": str(pg_cluster.passfile)}
    conf = (pg_cluster.data_dir / "postgresql.conf").read_text()
    assert "listen_addresses = '127.0.0.1'" in conf and "unix_socket_directories = ''" in conf


def test_postgresql_stores_a_nul_as_the_replacement_character(pg_cluster):
    """PostgreSQL text cannot hold U+0000: the row is logged, with U+FFFD in
    its place, rather than the request failing."""
    log = _pg(pg_schema_url(pg_cluster)).open()
    log.append([Prediction("n", "2026-01-01T00:00:01", "v1", "a\x00b", (0.5, 0.5), 0, 1.0)])
    assert log.window()["text"].tolist() == ["a\ufffdb"]
    log.close()


def test_postgresql_migrates_an_older_schema_and_reads_it_meanwhile(pg_cluster):
    """A schema-1 log (as the first PostgreSQL step made it, never
    migrated): the window reads it (newer columns as unknown), open()
    migrates it step by step to SCHEMA_VERSION keeping every row, the same
    steps as SQLite's, and refuses a schema newer than this shrinkflow's."""
    import psycopg

    from shrinkflow.predlog import _MIGRATIONS
    from shrinkflow.predlog_postgres import PG_MIGRATIONS, VERSION_TABLE

    assert len(PG_MIGRATIONS) == len(_MIGRATIONS) == SCHEMA_VERSION
    url = pg_schema_url(pg_cluster)
    with psycopg.connect(url, autocommit=True) as con:
        con.execute("""CREATE TABLE predictions (seq BIGINT GENERATED ALWAYS AS IDENTITY,
            prediction_id TEXT PRIMARY KEY, ts TEXT COLLATE "C" NOT NULL, model_version TEXT NOT NULL,
            text TEXT NOT NULL, probabilities TEXT NOT NULL, label INTEGER NOT NULL,
            latency_ms DOUBLE PRECISION NOT NULL, feedback_label INTEGER, feedback_ts TEXT)""")
        con.execute(f"CREATE TABLE {VERSION_TABLE} (version INTEGER NOT NULL)")
        con.execute(f"INSERT INTO {VERSION_TABLE} VALUES (1)")
        con.execute("INSERT INTO predictions (prediction_id, ts, model_version, text, probabilities, label, "
                    "latency_ms) VALUES ('a', '2026-01-01T00:00:01', 'v1', 'ok', 'not json', 1, 1.0), "
                    "('b', '2026-01-01T00:00:02', 'v1', 'fine', '[0.4, 0.6]', 1, 2.0)")
    log = _pg(url)
    assert log.schema_version() == 1
    df = log.window(last=10)
    assert df["prediction_id"].tolist() == ["a", "b"] and df["probabilities"].tolist() == [[], [0.4, 0.6]]
    assert df["tokens_seen"].tolist() == [None, None] and df["labels"].tolist() == [[], []]
    assert log.open() is log and log.schema_version() == SCHEMA_VERSION and log.count() == 2
    log.append([row(3, "2026-01-01T00:00:03")])
    assert log.window()["truncated"].tolist() == [None, None, None]
    assert log.add_feedback("a", "positive", labels=("negative", "positive")) is False
    assert log.window()["feedback_label"].tolist()[0] == 1
    with psycopg.connect(url, autocommit=True) as con:
        con.execute(f"UPDATE {VERSION_TABLE} SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(PredictionLogError, match="newer than this shrinkflow"):
        _pg(url).open()
    log.close()


WRITER = """
import sys
from shrinkflow.predlog import Prediction
from shrinkflow.predlog_postgres import PostgresPredictionLog
url, name = sys.argv[1], sys.argv[2]
print("ready", flush=True)
sys.stdin.readline()   # go: both processes open (migrate) and write at once
log = PostgresPredictionLog(url, timeout_s=30).open()
for b in range(10):
    log.append([Prediction(f"{name}-{b}-{k}", f"2026-01-01T00:00:{b:02d}", "v1", f"{name} {b} {k}", (0.5, 0.5),
                           0, 1.0) for k in range(10)])
print("done", flush=True)
"""


def test_postgresql_two_processes_migrate_and_write_at_once_and_lose_nothing(pg_cluster):
    """Two replicas' logs in two processes, started on a fresh schema at the
    same moment: both open() it (one migrates, the other waits its turn),
    then both append 100 rows in batches of 10 at once: all 200 are there."""
    import os
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT

    url = pg_schema_url(pg_cluster)
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, name], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name in ("r1", "r2")]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0 and out.strip() == "done", err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    log = _pg(url)
    df = log.window()
    assert log.count() == 200 and df["prediction_id"].nunique() == 200 and log.schema_version() == SCHEMA_VERSION
    assert {i.split("-")[0] for i in df["prediction_id"]} == {"r1", "r2"}
    log.close()


def test_postgresql_password_from_the_variable_password_env_names(pg_cluster, monkeypatch):
    """Without PGPASSFILE the server refuses the connection; with
    ?password_env=VAR the password comes from VAR (read at connect time,
    never stored in the URL or the log object); VAR unset is named."""
    url = pg_schema_url(pg_cluster)
    password = pg_cluster.passfile.read_text().strip().split(":", 4)[4]
    monkeypatch.setenv("PGPASSFILE", str(pg_cluster.root / "no-such-passfile"))
    monkeypatch.delenv("PGPASSWORD", raising=False)
    with pytest.raises(PredictionLogError, match="password") as err:
        _pg(url).open()
    assert err.value.unavailable is True
    # said as what it is, not "down or unreachable" (a helper's finding)
    assert "the database refused the credentials" in str(err.value) and "down or unreachable" not in str(err.value)
    monkeypatch.setenv("PGPASSWORD", "wrong")               # the server's own refusal, SQLSTATE 28P01
    with pytest.raises(PredictionLogError, match="the database refused the credentials"):
        _pg(url).open()
    monkeypatch.delenv("PGPASSWORD")
    via_env = f"{url}&password_env=SHRINKFLOW_TEST_LOG_PASSWORD"
    monkeypatch.delenv("SHRINKFLOW_TEST_LOG_PASSWORD", raising=False)
    with pytest.raises(PredictionLogError, match="SHRINKFLOW_TEST_LOG_PASSWORD that its password_env names is not set"):
        _pg(via_env).open()
    monkeypatch.setenv("SHRINKFLOW_TEST_LOG_PASSWORD", password)
    log = _pg(via_env).open()
    assert log.count() == 0 and password not in repr(vars(log))
    log.close()


@pytest.mark.parametrize("names, label, stored", [
    (["1", "2", "3"], 1, "ambiguous"), (["1", "2", "3"], "1", 0), (["1", "2", "3"], " 3 ", 2),
    (["0", "1", "2"], 1, 1), (["0", "1", "2"], "2", 2), (["01", "1"], 0, "ambiguous"),
    (["-1", "0", "1"], 2, "ambiguous"), (["neg", "pos"], 1, 1), (["neg", "pos"], "pos", 1),
    (["neg", "pos"], 2, "index must be in 0..1"), (["neg", "pos"], -1, "index must be in 0..1"),
    (["neg", "pos"], "Pos", "unknown label"), (["neg", "pos"], "", "unknown label"),
    (["a b", "c"], "a  b", "unknown label"), (["x", "2"], 1, "ambiguous"), (["x", "y"], "1", "unknown label"),
])
def test_feedback_labels_of_every_kind_resolve_or_are_refused_naming_the_labels(names, label, stored):
    """The kind of bad feedback label, as a table: integer-looking names in
    and out of 0..N-1 order, ids out of range, names up to case and inner
    whitespace; every refusal is a FeedbackLabelError carrying the names."""
    from shrinkflow.predlog import FeedbackLabelError, feedback_class_id

    if isinstance(stored, int):
        assert feedback_class_id("p", label, json.dumps(names), None) == stored
    else:
        with pytest.raises(FeedbackLabelError, match=stored) as info:
            feedback_class_id("p", label, json.dumps(names), None)
        assert info.value.labels == names
