"""One prediction log in PostgreSQL (``serve.log_url``), against a real
cluster (``pg_cluster``: the machine's initdb and pg_ctl on a loopback port):

- `shrinkflow serve`, started as a user starts it, logs to PostgreSQL; when
  the database is stopped mid-serve it answers 503 (never an unlogged 200),
  and when it comes back it answers again, with every successful response in
  the log; a restart between two requests costs no 503 at all;
- the monitor reads the PostgreSQL log through serve.log_url: the same window
  and re-compression corpus as on SQLite with the same rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

from shrinkflow.predlog import Prediction, prediction_log, utc_now
from tests.conftest import PROJECT_ROOT, pg_schema_url
from tests.test_serving import Server, free_port

# A real server per module: in the full suite (CI), not in the quick `-m "not slow"` run.
pytestmark = pytest.mark.slow


def with_log_url(root: Path, url: str) -> Path:
    """A params file for the project at ``root`` whose serve.log_url is
    ``url`` (and serve.reload_poll_s slow: nothing is promoted here)."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["serve"].update({"log_url": url, "reload_poll_s": 5.0})
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_teacher_dir, small_splits, pg_cluster) -> Path:
    """A project the server and the monitor can run in (the tiny teacher in
    production, the reference and train splits), its log in PostgreSQL."""
    from tests.test_monitor_robust import monitor_project

    root = monitor_project(tmp_path_factory.mktemp("serve-pg") / "project", tiny_teacher_dir, small_splits)
    with_log_url(root, pg_schema_url(pg_cluster))
    return root


def params_of(root: Path):
    from shrinkflow.config import load_params

    return load_params(root / "params.yaml")


def test_serve_answers_503_while_postgresql_is_down_and_logs_every_answer(project, pg_cluster):
    """Three clients post /predict without pause while PostgreSQL is stopped
    (fast shutdown: every connection cut) and started again: each answer is
    200 or 503 log_unavailable, 503s while it is down, 200s once it is back,
    and every prediction answered 200 is in the log (a 503 may have been
    logged when the connection died after the commit: at most one row per
    503). Feedback is 503 while it is down too, and a second replica started
    then refuses to start (exit 3, naming the log). Then a restart between two
    requests: the first request after it is answered 200 (the connection the
    server cut is replaced, not reported)."""
    params = params_of(project)
    srv = Server(project, free_port(), token=None)
    ok_ids: list[str] = []
    statuses: Counter = Counter()
    errors: Counter = Counter()
    phase = {"name": "up"}
    by_phase: dict[str, Counter] = {"up": Counter(), "down": Counter(), "back": Counter()}
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(timeout=30) as c:
            n = 0
            while not stop.is_set():
                name = phase["name"]
                r = c.post(f"{srv.url}/predict", json={"texts": [f"client {i} says {n}: a fine film"]})
                n += 1
                statuses[r.status_code] += 1
                by_phase[name][r.status_code] += 1
                if r.status_code == 200:
                    ok_ids.extend(p["prediction_id"] for p in r.json()["predictions"])
                else:
                    errors[r.json().get("error")] += 1
                    time.sleep(0.02)

    def wait_for(condition, what: str, timeout_s: float = 30) -> None:
        deadline = time.time() + timeout_s
        while not condition():
            assert time.time() < deadline, f"{what}: {by_phase}"
            time.sleep(0.02)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: by_phase["up"][200] >= 10, "answers before the stop")
        pg_cluster.stop("fast")
        phase["name"] = "down"
        wait_for(lambda: by_phase["down"][503] >= 5, "503s while PostgreSQL is down")
        # A second replica started now refuses to start: exit 3, naming the log.
        late = subprocess.run([sys.executable, "-m", "flows.cli", "serve", "--port", str(free_port())],
                              cwd=project, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
                              capture_output=True, text=True, timeout=120)
        assert late.returncode == 3, late.stdout + late.stderr
        assert "cannot serve: cannot migrate the schema in the prediction log" in late.stdout + late.stderr
        assert params.serve.log_url.split("?")[0] in late.stdout + late.stderr
        r = httpx.post(f"{srv.url}/feedback", json={"prediction_id": ok_ids[0], "label": "positive"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"] == "log_unavailable", r.text
        assert params.serve.log_url.split("?")[0] in r.json()["detail"]
        pg_cluster.start()
        phase["name"] = "back"
        wait_for(lambda: by_phase["back"][200] >= 10, "answers once PostgreSQL is back")
        stop.set()
        for t in threads:
            t.join(timeout=60)
        # A restart with no request in between: no 503 for it.
        pg_cluster.stop("fast")
        pg_cluster.start()
        r = httpx.post(f"{srv.url}/predict", json={"texts": ["after a quiet restart"]}, timeout=30)
        assert r.status_code == 200, r.text
        ok_ids.append(r.json()["predictions"][0]["prediction_id"])
        r = httpx.post(f"{srv.url}/feedback", json={"prediction_id": ok_ids[0], "label": "positive"}, timeout=30)
        assert r.status_code == 200 and r.json()["replaced"] is False, r.text
    finally:
        stop.set()
        pg_cluster.start()   # for the module's other tests, whatever happened here
        srv.stop()
    assert set(statuses) <= {200, 503}, statuses
    assert set(errors) == {"log_unavailable"}, errors
    log = prediction_log(project, params.serve)
    logged = set(log.window()["prediction_id"])
    log.close()
    missing = set(ok_ids) - logged
    assert not missing, f"{len(missing)} answered predictions are not in the log"
    assert len(logged - set(ok_ids)) <= statuses[503]
    print(f"\nPostgreSQL stopped mid-serve: {dict(statuses)}; by phase {by_phase}; "
          f"{len(ok_ids)} answered, {len(logged)} logged")


def test_the_monitor_reads_a_postgresql_log(project, pg_cluster, tmp_path):
    """Rows logged to PostgreSQL through the factory, as the server logs
    them: the monitor's two reads (monitoring.run.read_window, the window;
    read_recompress_corpus, the re-compression's texts up to its end) go
    through serve.log_url and give exactly what they give on a SQLite log of
    the same rows, so everything the monitor builds on them is the same
    (bench/serving_replicas.py runs its reports and verdict on a window two
    replicas logged)."""
    import pandas as pd

    from monitoring.run import read_recompress_corpus, read_window
    from shrinkflow.config import ServeParams, load_params
    from shrinkflow.paths import split_path
    from shrinkflow.splits import read_parquet

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["serve"]["log_url"] = pg_schema_url(pg_cluster)      # a schema of its own: the serving test's rows apart
    raw["monitor"].update({"window_last_n": 10, "recompress_last_n": 30})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(path)
    texts = read_parquet(project / split_path("reference"))["text"].tolist()[:40]
    preds = [Prediction(f"{uuid.uuid4().hex}-{i}", f"2026-01-01T00:00:{i:02d}.000000+00:00", "v0001", text,
                        [0.9 - 0.02 * i, 0.1 + 0.02 * i], int(i % 3 == 0), 1.0 + i, tokens_seen=5 + i,
                        truncated=i % 5 == 0, labels=("negative", "positive") if i % 2 else None)
             for i, text in enumerate(texts)]
    sqlite_params = ServeParams(log_path=str(tmp_path / "same.db"))
    for serve in (params.serve, sqlite_params):
        log = prediction_log(project, serve).open()
        log.append(preds[:25])
        log.append(preds[25:])
        for p in preds[::4]:
            log.add_feedback(p.prediction_id, "positive", ts="2026-01-02T00:00:00.000000+00:00",
                             labels=("negative", "positive"))
        log.close()
    window = read_window(project, params)
    on_sqlite = read_window(project, params.model_copy(update={"serve": sqlite_params}))
    pd.testing.assert_frame_equal(window, on_sqlite, check_exact=True)
    assert window["prediction_id"].tolist() == [p.prediction_id for p in preds[-10:]]
    assert window["feedback_label"].notna().sum() == 2     # rows 32 and 36 of 30..39 got feedback
    corpus = read_recompress_corpus(project, params, window)
    assert corpus == [p.text for p in preds[-30:]]
    assert corpus == read_recompress_corpus(project, params.model_copy(update={"serve": sqlite_params}), on_sqlite)


def test_a_replica_killed_mid_burst_and_a_crashed_postgresql_lose_no_answered_prediction(project, pg_cluster):
    """The kills of issue 18's reliability list that touch the shared log:
    a replica SIGKILLed while three clients post to it, then PostgreSQL
    crashed (``pg_ctl stop -m immediate``: no shutdown checkpoint, recovery
    from the WAL at the next start) and started again. Every prediction
    either replica answered 200 is in the log afterwards; a replica started
    after the crash serves and logs again."""
    import signal

    params = params_of(project)
    ok_ids: list[str] = []
    failures: Counter = Counter()

    def burst(srv: Server, stop: threading.Event) -> list[threading.Thread]:
        def client(i: int) -> None:
            with httpx.Client(timeout=10) as c:
                n = 0
                while not stop.is_set():
                    try:
                        r = c.post(f"{srv.url}/predict", json={"texts": [f"kill test {i}/{n}: a dull film"]})
                    except httpx.HTTPError as exc:   # the replica is gone
                        failures[type(exc).__name__] += 1
                        return
                    n += 1
                    if r.status_code == 200:
                        ok_ids.extend(p["prediction_id"] for p in r.json()["predictions"])
                    else:
                        failures[r.status_code] += 1
        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        return threads

    srv = Server(project, free_port(), token=None)
    stop = threading.Event()
    threads = burst(srv, stop)
    try:
        deadline = time.time() + 30
        while len(ok_ids) < 30:
            assert time.time() < deadline, f"no answers: {failures}"
            time.sleep(0.02)
        assert srv.stop(signal.SIGKILL) == -signal.SIGKILL
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        srv.stop()
    answered_before_crash = list(ok_ids)
    assert set(failures) <= {"ConnectError", "RemoteProtocolError", "ReadError"}, failures

    pg_cluster.stop("immediate")
    pg_cluster.start()
    srv = Server(project, free_port(), token=None)
    try:
        r = httpx.post(f"{srv.url}/predict", json={"texts": ["after the crash"]}, timeout=30)
        assert r.status_code == 200, r.text
        ok_ids.append(r.json()["predictions"][0]["prediction_id"])
    finally:
        srv.stop()
    log = prediction_log(project, params.serve)
    logged = set(log.window(last=100_000)["prediction_id"])
    log.close()
    missing = set(ok_ids) - logged
    assert not missing, f"{len(missing)} of {len(ok_ids)} answered predictions are not in the log"
    print(f"\nSIGKILL mid-burst after {len(answered_before_crash)} answers ({dict(failures)} client errors), "
          f"PostgreSQL crashed and restarted: all {len(ok_ids)} answered predictions logged")
