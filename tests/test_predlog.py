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
