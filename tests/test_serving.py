"""`shrinkflow serve`: a real uvicorn server on a free loopback port, started
as a user starts it, with a tiny real model deployed into a temporary
registry. Nothing is mocked: requests go over TCP, predictions into SQLite."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from shrinkflow.config import Candidate, Gates, QuantizeStep
from shrinkflow.files import atomic_write_text
from shrinkflow.gates import evaluate_gates
from shrinkflow.predlog import PredictionLog
from shrinkflow.registry import Registry
from tests.conftest import PROJECT_ROOT, cmdline_of
from tests.netports import free_port
from tests.registry_outputs import deploy_record

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PASS = evaluate_gates("c", {"accuracy": 0.85, "latency_ms_p95_b1": 1.0, "size_mb": 1.0},
                      {"accuracy": 0.85, "latency_ms_p95_b1": 10.0, "size_mb": 90.0}, Gates())


def record(name: str) -> dict:
    """What the deploy stage records for a candidate (figures from a real run):
    /metadata renders it as a typed version manifest."""
    return deploy_record(name)


@pytest.fixture(scope="module")
def candidates(tmp_path_factory, tiny_teacher_dir):
    from shrinkflow.compress import apply_recipe

    out = tmp_path_factory.mktemp("serve-cands")
    return {"int8": apply_recipe(tiny_teacher_dir, Candidate(name="int8", recipe=(QuantizeStep(),)), out / "int8",
                                 progress=False),
            "fp32": apply_recipe(tiny_teacher_dir, Candidate(name="fp32"), out / "fp32", progress=False)}


class Server:
    """`shrinkflow serve` in ``root``, as a user starts it. ``output``: a file
    for the server's stdout and stderr (else a pipe), for tests that read what
    it logged; ``env``: extra environment; ``new_session``: in a process
    group of its own (stopped whole with conftest.terminate_group);
    ``args``: more `shrinkflow serve` options."""

    def __init__(self, root: Path, port: int, token: str | None = TOKEN, output: Path | None = None,
                 env: dict | None = None, new_session: bool = False, start_timeout_s: float = 60,
                 args: tuple[str, ...] = ()):
        self.root, self.port, self.output = root, port, output
        self.url = f"http://127.0.0.1:{port}"
        full = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **(env or {})}
        full.pop("SHRINKFLOW_API_TOKEN", None)
        if token:
            full["SHRINKFLOW_API_TOKEN"] = token
        out = open(output, "w") if output else subprocess.PIPE
        self.proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", str(port), *args],
                                     cwd=root,
                                     env=full, stdout=out, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=new_session)
        if output:
            out.close()
        deadline = time.time() + start_timeout_s
        while time.time() < deadline:
            assert self.proc.poll() is None, self.output_text()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("server did not start")

    def output_text(self) -> str:
        """What the server printed so far (all of it once it has exited, when
        its output is a pipe)."""
        if self.output:
            return Path(self.output).read_text(errors="replace")
        return self.proc.stdout.read() if self.proc.poll() is not None else ""

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def project(tmp_path_factory, candidates):
    root = tmp_path_factory.mktemp("serve") / "project"
    root.mkdir()
    shutil.copy(PROJECT_ROOT / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["serve"].update({"batching": True, "reload_poll_s": 0.2, "max_texts_per_request": 8, "max_chars_per_text": 200,
                            "max_body_bytes": 4096, "threads": 1})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    Registry(root / "registry").promote(candidates["int8"], PASS, record("int8"))
    return root


@pytest.fixture(scope="module")
def server(project):
    srv = Server(project, free_port())
    yield srv
    srv.stop()


def log_of(project: Path) -> PredictionLog:
    return PredictionLog(project / ".shrinkflow" / "predictions.db")


def test_predict_then_feedback_round_trip(server, project):
    r = httpx.post(f"{server.url}/predict", json={"texts": ["a wonderful film", "dull"]}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "v0001" and len(body["predictions"]) == 2
    p = body["predictions"][0]
    assert p["label"] in ("negative", "positive") and abs(sum(p["probabilities"].values()) - 1) < 1e-5
    # what the model read: [CLS] a wonderful film [SEP], nothing cut
    assert (p["truncated"], p["tokens_seen"]) == (False, 5)
    assert (body["predictions"][1]["truncated"], body["predictions"][1]["tokens_seen"]) == (False, 3)
    f = httpx.post(f"{server.url}/feedback", json={"prediction_id": p["prediction_id"], "label": "positive"},
                   headers=AUTH)
    assert f.status_code == 200 and f.json()["replaced"] is False
    f = httpx.post(f"{server.url}/feedback", json={"prediction_id": p["prediction_id"], "label": 0}, headers=AUTH)
    assert f.json() == {"prediction_id": p["prediction_id"], "label": "negative", "replaced": True}
    row = log_of(project).window(with_feedback=True)
    row = row[row["prediction_id"] == p["prediction_id"]].iloc[0]
    assert row["text"] == "a wonderful film" and row["model_version"] == "v0001"
    assert row["feedback_label"] == 0 and row["label"] == p["label_id"]
    assert row["tokens_seen"] == 5 and row["truncated"] == 0
    assert httpx.post(f"{server.url}/feedback", json={"prediction_id": "nope", "label": 1},
                      headers=AUTH).status_code == 404


@pytest.mark.parametrize("content, headers, status, kind", [
    (json.dumps({"texts": []}), {}, 422, "invalid_request"),
    (json.dumps({"texts": "not a list"}), {}, 422, "invalid_request"),
    (json.dumps({"texts": [1, 2]}), {}, 422, "invalid_request"),
    (json.dumps({"texts": ["ok"], "extra": 1}), {}, 422, "invalid_request"),
    (json.dumps({"texts": ["t"] * 9}), {}, 413, "too_many_texts"),
    (json.dumps({"texts": ["x" * 201]}), {}, 413, "text_too_long"),
    (json.dumps({"texts": ["x" * 5000]}), {}, 413, "body_too_large"),
    (b'{"texts": ["\xff\xfe"]}', {}, 400, "not_utf8"),
    (b'{"texts": ["\xed\xa0\x80"]}', {}, 400, "not_utf8"),        # a surrogate encoded as UTF-8 bytes
    ("{not json", {}, 400, "not_json"),
    ("[1, 2]", {}, 422, "invalid_request"),
    # issue 14: what the body parser raises is a 4xx, never a 500
    # (the 10 KB bodies, over this server's 4 KB limit, are in test_serving_hostile.py)
    ('{"texts": ' + "[" * 2000 + "]" * 2000 + "}", {}, 400, "not_json"),   # RecursionError in the decoder
    ('{"texts": [NaN]}', {}, 400, "not_json"),
    ('{"texts": ["a"], "x": -Infinity}', {}, 400, "not_json"),
    ('{"texts": ["a"], "texts": ["b"]}', {}, 422, "invalid_request"),    # duplicate key: which one?
    ('{"texts": [1e999]}', {}, 422, "invalid_request"),
    ('{"\\ud800": 1}', {}, 422, "invalid_request"),                      # a lone surrogate in a key name
    # texts that must not reach the model
    ('{"texts": ["ok\\ud800bad"]}', {}, 422, "invalid_text"),
    ('{"texts": ["fine", "\\udc80"]}', {}, 422, "invalid_text"),
    ('{"texts": [""]}', {}, 422, "invalid_text"),
    ('{"texts": [" \\t\\n "]}', {}, 422, "invalid_text"),
    ('{"texts": ["\\u0000\\u200b"]}', {}, 422, "invalid_text"),      # nothing the tokenizer keeps
])
def test_bad_input_gets_a_clear_4xx_and_the_server_survives(server, content, headers, status, kind):
    before = log_of(server.root).count()
    r = httpx.post(f"{server.url}/predict", content=content, headers={**AUTH, "Content-Type": "application/json",
                                                                       **headers})
    assert r.status_code == status, r.text
    assert r.json()["error"] == kind and r.json()["detail"]
    assert log_of(server.root).count() == before
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_token_is_required_except_for_health_and_refusals_are_not_logged(server):
    before = log_of(server.root).count()
    assert httpx.post(f"{server.url}/predict", json={"texts": ["x"]}).status_code == 401
    assert httpx.post(f"{server.url}/predict", json={"texts": ["x"]},
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{server.url}/metadata").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert log_of(server.root).count() == before


def test_metadata_metrics_and_docs(server):
    # this test's own prediction, so the counters below exist whatever ran before
    assert httpx.post(f"{server.url}/predict", json={"texts": ["for the counters"]}, headers=AUTH).status_code == 200
    meta = httpx.get(f"{server.url}/metadata", headers=AUTH).json()
    assert meta["deployed"]["version"] == "v0001" and meta["deployed"]["integrity"] == "verified"
    # v0001 is dynamic int8 deployed without a `serving` entry: its graph
    # makes it batch-dependent, so each text is its own model call
    serving = {"per_row": True, "per_row_decided_by": "model graph", "batching": "each text alone (the model's answers change with batching)",
               "truncation": "head"}
    assert meta["serving"] == serving
    assert httpx.get(f"{server.url}/health").json()["serving"] == serving
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    assert 'shrinkflow_requests_total{endpoint="/predict",status="200"}' in text
    assert "shrinkflow_batch_size_bucket" in text and 'shrinkflow_model_version_info{version="v0001"} 1.0' in text
    # /docs loads Swagger UI from this server (under the token rule), not from
    # a CDN; test_serving_app.py renders it in Chromium
    page = httpx.get(f"{server.url}/docs", headers=AUTH)
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assets = [a.split('"')[0] for a in page.text.split('src="')[1:] + page.text.split('href="')[1:]]
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets) and all(a.startswith("/") for a in assets)
    for asset in assets:
        assert httpx.get(f"{server.url}{asset}", headers=AUTH).status_code == 200, asset
        assert httpx.get(f"{server.url}{asset}").status_code == 401, asset
    assert httpx.get(f"{server.url}/openapi.json").status_code == 401
    assert "PredictRequest" in httpx.get(f"{server.url}/openapi.json", headers=AUTH).text


LONG = ("the film drags on and on with little plot and less charm, yet the actors try hard and the music is "
        "lovely in places, though the ending is muddled and every joke falls flat")


def test_each_prediction_says_what_the_model_read(server, project):
    """Issue 14 item 3: a text over max_seq_len (32 for the tiny model) is cut
    to 32 tokens and says so; a short one is not; the log records both."""
    r = httpx.post(f"{server.url}/predict", json={"texts": [LONG, "dull"]}, headers=AUTH)
    assert r.status_code == 200, r.text
    long_, short = r.json()["predictions"]
    assert (long_["truncated"], long_["tokens_seen"]) == (True, 32)
    assert (short["truncated"], short["tokens_seen"]) == (False, 3)
    rows = log_of(project).window().set_index("prediction_id")
    assert (rows.loc[long_["prediction_id"], "truncated"], rows.loc[long_["prediction_id"], "tokens_seen"]) == (1, 32)
    assert (rows.loc[short["prediction_id"], "truncated"], rows.loc[short["prediction_id"], "tokens_seen"]) == (0, 3)


def test_per_row_is_decided_per_version_from_the_manifest_else_the_graph(tmp_path, candidates):
    """The registry manifest's serving.per_row (recorded by validate) decides;
    a version deployed without it is per row when its graph is batch-dependent
    (dynamic int8) and batched otherwise; the server can force either."""
    from shrinkflow.serving import ModelHolder

    reg = Registry(tmp_path / "registry")
    decided = {}
    for name, serving in (("int8", None), ("fp32", None), ("int8", {"per_row": False}), ("fp32", {"per_row": True})):
        rec = record(name) if serving is None else {**record(name), "serving": {**serving, "label_flips": 0}}
        version = reg.promote(candidates[name], PASS, rec).version
        m = ModelHolder(reg, 1)._load(version)
        decided[(name, None if serving is None else serving["per_row"])] = (m.per_row, m.per_row_source, m.specials)
    assert decided == {("int8", None): (True, "model graph", 2), ("fp32", None): (False, "model graph", 2),
                       ("int8", False): (False, "manifest", 2), ("fp32", True): (True, "manifest", 2)}
    forced = ModelHolder(reg, 1, per_row=False)._load("v0001")
    assert (forced.per_row, forced.per_row_source) == (False, "server")


def burst(url: str, n: int, threads: int, results: list, stop_after: float | None = None):
    def worker(k):
        with httpx.Client(timeout=30) as c:
            for i in range(k, n, threads):
                try:
                    r = c.post(f"{url}/predict", json={"texts": [f"burst text {i}"]}, headers=AUTH)
                    results.append((r.status_code, r.json().get("model_version") if r.status_code == 200 else None))
                except httpx.HTTPError:
                    results.append((None, None))
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    return ts


def test_a_concurrent_burst_logs_exactly_one_row_per_answer(server):
    before = log_of(server.root).count()
    results: list = []
    for t in burst(server.url, 300, 30, results):
        t.join()
    assert [s for s, _ in results].count(200) == 300
    assert log_of(server.root).count() - before == 300
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    # micro-batching gathered concurrent requests: some model call had > 1 text
    big = [line for line in text.splitlines() if line.startswith('shrinkflow_batch_size_bucket{le="1.0"}')]
    total = [line for line in text.splitlines() if line.startswith("shrinkflow_batch_size_count")]
    assert float(big[0].split()[-1]) < float(total[0].split()[-1])


def wait_for_version(url: str, version: str, timeout_s: float = 10.0) -> bool:
    """Whether the server serves ``version`` within ``timeout_s``."""
    deadline = time.time() + timeout_s
    while httpx.get(f"{url}/health").json()["model_version"] != version:
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_hot_reload_rollback_and_a_corrupted_version(server, project, candidates):
    reg = Registry(project / "registry")
    aliases = project / "registry" / "aliases.json"
    saved = aliases.read_text()
    old = reg.alias()
    try:
        # A burst from 4 clients, each sending one request after the other,
        # until 20 answers came from the new version (30 s at most).
        answers: dict[int, list] = {k: [] for k in range(4)}
        done = threading.Event()

        def client(k):
            with httpx.Client(timeout=30) as c:
                while not done.is_set():
                    try:
                        r = c.post(f"{server.url}/predict", json={"texts": [f"burst {k}"]}, headers=AUTH)
                        answers[k].append((r.status_code, r.json().get("model_version")))
                    except httpx.HTTPError as exc:
                        answers[k].append((None, repr(exc)))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)
            new = reg.promote(candidates["fp32"], PASS, record("fp32")).version   # while requests are in flight
            deadline = time.time() + 30
            while sum(v == new for a in list(answers.values()) for _, v in a) < 20 and time.time() < deadline:
                time.sleep(0.05)
        finally:
            done.set()
            for t in threads:
                t.join()
        every = [a for k in answers for a in answers[k]]
        assert all(s == 200 for s, _ in every), every
        # both versions answered during the burst, and no client went back to
        # the old one once the new one had answered it
        assert {v for _, v in every} == {old, new}
        for k, got in answers.items():
            versions = [v for _, v in got]
            assert versions == sorted(versions, key=lambda v: v == new), (k, versions)
        assert wait_for_version(server.url, new)
        r = httpx.post(f"{server.url}/predict", json={"texts": ["after"]}, headers=AUTH)
        assert r.json()["model_version"] == new
        # rollback through the CLI: the server follows
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
        out = subprocess.run([sys.executable, "-m", "flows.cli", "rollback"], cwd=project, env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and f"{new} -> {old}" in out.stdout
        assert wait_for_version(server.url, old)
        assert httpx.post(f"{server.url}/predict", json={"texts": ["x"]}, headers=AUTH).json()["model_version"] == old
        # a corrupted version made production by hand is refused; the old one keeps serving
        (reg.path(new) / "model" / "model.onnx").write_bytes(b"rot")
        aliases.write_text(json.dumps({"production": new}))
        deadline = time.time() + 10
        health = {}
        while not (health.get("refused") or {}).get("version") and time.time() < deadline:
            time.sleep(0.1)
            health = httpx.get(f"{server.url}/health").json()
        assert health["refused"]["version"] == new and "model.onnx" in health["refused"]["reason"]
        assert health["model_version"] == old
        assert httpx.post(f"{server.url}/predict", json={"texts": ["x"]}, headers=AUTH).json()["model_version"] == old
    finally:
        # the module's other tests expect the server on the version it started with
        aliases.write_text(saved)
        wait_for_version(server.url, old)


@pytest.mark.slow  # ~5 s: the quick run stays under 3 minutes; the full suite runs it
def test_sigterm_during_a_burst_loses_no_answered_prediction(project):
    srv = Server(project, free_port())
    before = log_of(project).count()
    results: list = []
    threads = burst(srv.url, 400, 20, results)
    # SIGTERM mid-burst, once answers flow: a fixed 0.5 s could pass on a loaded box before any
    # of the 20 clients (each building an httpx.Client) got an answer, and `ok > 0` failed
    deadline = time.time() + 60
    while not any(s == 200 for s, _ in list(results)) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    code = srv.stop(signal.SIGTERM)
    for t in threads:
        t.join()
    ok = [s for s, _ in results].count(200)
    # uvicorn shuts down gracefully, then re-raises SIGTERM: exit by signal 15
    assert ok > 0 and code in (0, -signal.SIGTERM)
    assert log_of(project).count() - before == ok


def test_serve_refuses_to_start_without_a_sound_production_version(tmp_path, candidates):
    shutil.copy(PROJECT_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(PROJECT_ROOT / "params.yaml", tmp_path / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}

    def serve():
        return subprocess.run([sys.executable, "-m", "flows.cli", "serve", "--port", str(free_port())],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    out = serve()
    assert out.returncode == 4 and "nothing is in production" in out.stderr  # ExitCode.NOTHING
    reg = Registry(tmp_path / "registry")
    reg.promote(candidates["int8"], PASS, record("int8"))
    (reg.path("v0001") / "model" / "model.onnx").write_bytes(b"rot")
    out = serve()
    assert out.returncode == 3 and "model.onnx" in out.stderr


@pytest.mark.slow  # ~6 s: the quick run stays under 3 minutes; the full suite runs it
def test_serve_refuses_to_start_on_a_log_another_process_holds_locked(tmp_path, candidates):
    """Before: "serving v0001 ..." then a traceback from inside uvicorn's startup."""
    import sqlite3

    shutil.copy(PROJECT_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(PROJECT_ROOT / "params.yaml", tmp_path / "params.yaml")
    Registry(tmp_path / "registry").promote(candidates["int8"], PASS, record("int8"))
    PredictionLog(tmp_path / ".shrinkflow" / "predictions.db").open()
    con = sqlite3.connect(tmp_path / ".shrinkflow" / "predictions.db", isolation_level=None)
    con.execute("PRAGMA locking_mode=EXCLUSIVE")
    con.execute("BEGIN EXCLUSIVE")
    try:
        out = subprocess.run([sys.executable, "-m", "flows.cli", "serve", "--port", str(free_port())], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, capture_output=True, text=True,
                             timeout=60)
    finally:
        con.execute("ROLLBACK")
        con.close()
    assert out.returncode == 3, out.stdout + out.stderr
    assert "error: cannot serve:" in out.stderr and "locked" in out.stderr and "Traceback" not in out.stderr
    assert "serving v0001" not in out.stdout


@pytest.mark.slow  # ~6 s: the quick run stays under 3 minutes; the full suite runs it
def test_the_server_logs_each_hot_reload_and_each_refusal_once(tmp_path, candidates):
    """A newcomer's finding: production moved v0001 -> v0002 -> v0001 and the
    server's log said nothing; only /health showed it."""
    shutil.copy(PROJECT_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["serve"].update({"reload_poll_s": 0.2, "threads": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    reg = Registry(tmp_path / "registry")
    reg.promote(candidates["int8"], PASS, record("int8"))
    srv = Server(tmp_path, free_port(), token=None, output=tmp_path / "server.log")
    try:
        new = reg.promote(candidates["fp32"], PASS, record("fp32")).version
        assert wait_for_version(srv.url, new)
        aliases = tmp_path / "registry" / "aliases.json"
        good = aliases.read_text()
        # Swapped in whole (as the registry writes it): a plain write_text
        # truncates first, and a poll between truncate and write read an
        # empty file, a second unreadable state with its own refusal (seen
        # once in a full suite).
        atomic_write_text(aliases, "{")              # half-written: refused, and said once
        time.sleep(1.5)
        atomic_write_text(aliases, good)
        assert httpx.get(f"{srv.url}/health").json()["model_version"] == new
    finally:
        srv.stop()
    out = srv.output_text()
    assert f"INFO shrinkflow.serve: now serving {new} (production moved)" in out, out
    refusals = [line for line in out.splitlines() if "cannot read the production alias: " in line]
    assert len(refusals) == 1 and refusals[0].endswith(f"still serving {new}"), out
    assert refusals[0].count("still serving") == 1 and "not valid JSON" in refusals[0], out


@pytest.mark.slow  # 4-7 s in the quick suite, which must stay under 3 minutes (184 s with it)
def test_serve_on_a_port_in_use_refuses_in_one_line_and_port_0_picks_a_free_one(server, project):
    """A newcomer's findings: on a port in use serve printed "serving ..."
    then uvicorn's raw errno and exited; `--port 0` bound serve.port (8000)."""
    import re

    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    taken = subprocess.run([sys.executable, "-m", "flows.cli", "serve", "--port", str(server.port)], cwd=project,
                           env=env, capture_output=True, text=True, timeout=60)
    assert taken.returncode == 3, taken.stdout + taken.stderr
    assert f"error: cannot serve: 127.0.0.1:{server.port} is already in use" in taken.stderr
    assert "serving v0" not in taken.stdout and "Errno" not in taken.stderr

    from shrinkflow.ports import port_is_free

    for workers in ("1", "2"):
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", "0", "--workers", workers],
                                cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            line = proc.stdout.readline()
            port = int(re.search(r"on http://127\.0\.0\.1:(\d+) ", line).group(1))
            assert port not in (0, 8000), line
            # Held from the moment it is printed (bound and listening, then
            # handed to uvicorn): no other process can take it before uvicorn
            # serves on it, as it could when serve picked a port and let go.
            assert not port_is_free("127.0.0.1", port), line
            _answers_on(proc, port)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def _answers_on(proc, port: int) -> None:
    """Wait until `shrinkflow serve` answers /health on ``port`` (60 s)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()["model_version"]
            return
        except httpx.HTTPError:
            assert proc.poll() is None
            time.sleep(0.2)
    raise AssertionError("the server on the printed port did not answer")


@pytest.mark.slow  # 4-7 s in the quick suite, which must stay under 3 minutes (184 s with it)
def test_a_locked_log_gives_503_not_an_unlogged_answer(server, project):
    """The database is held by another writer past the busy timeout: the
    server answers 503 rather than answer without logging, and recovers."""
    import sqlite3

    con = sqlite3.connect(project / ".shrinkflow" / "predictions.db", isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    try:
        before = log_of(project).window(last=0)  # readers still work in WAL mode
        r = httpx.post(f"{server.url}/predict", json={"texts": ["while locked"]}, headers=AUTH, timeout=30)
    finally:
        con.execute("ROLLBACK")
        con.close()
    assert r.status_code == 503 and r.json()["error"] == "log_unavailable", r.text
    assert before.empty
    assert "while locked" not in log_of(project).window()["text"].tolist()
    assert httpx.post(f"{server.url}/predict", json={"texts": ["after"]}, headers=AUTH).status_code == 200


@pytest.mark.slow  # ~5 s; test_a_locked_log_gives_503_not_an_unlogged_answer stays in the quick run
def test_an_exclusively_locked_log_gives_503_on_every_endpoint(server, project):
    """Issue 14: another process holds the log with `PRAGMA
    locking_mode=EXCLUSIVE; BEGIN EXCLUSIVE` (no reader or writer gets in).
    /predict and /feedback both answer 503 with the reason (/feedback
    answered 500), and both work again once the lock is gone."""
    import sqlite3

    first = httpx.post(f"{server.url}/predict", json={"texts": ["before the lock"]}, headers=AUTH)
    pid = first.json()["predictions"][0]["prediction_id"]
    before = log_of(project).count()
    con = sqlite3.connect(project / ".shrinkflow" / "predictions.db", isolation_level=None)
    con.execute("PRAGMA locking_mode=EXCLUSIVE")
    con.execute("BEGIN EXCLUSIVE")
    answers = {}

    def call(name, path, body):
        answers[name] = httpx.post(f"{server.url}{path}", json=body, headers=AUTH, timeout=60)

    try:
        ts = [threading.Thread(target=call, args=("predict", "/predict", {"texts": ["while locked"]})),
              threading.Thread(target=call, args=("feedback", "/feedback", {"prediction_id": pid, "label": 1}))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        con.execute("ROLLBACK")
        con.close()   # ends the exclusive locking mode
    for name in ("predict", "feedback"):
        r = answers[name]
        assert r.status_code == 503 and r.json()["error"] == "log_unavailable", (name, r.text)
        assert "locked" in r.json()["detail"], (name, r.text)
    assert log_of(project).count() == before
    assert httpx.post(f"{server.url}/predict", json={"texts": ["after"]}, headers=AUTH).status_code == 200
    after = httpx.post(f"{server.url}/feedback", json={"prediction_id": pid, "label": 1}, headers=AUTH)
    assert after.status_code == 200 and after.json()["replaced"] is False


@pytest.mark.slow  # ~6 s: the quick run stays under 3 minutes; the full suite runs it
def test_several_workers_serve_and_log(project):
    """--workers N: each uvicorn worker builds its app from the project."""
    port = free_port()
    env = {**os.environ, "SHRINKFLOW_API_TOKEN": TOKEN, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", str(port), "--workers", "2"],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        before = log_of(project).count()
        codes = [httpx.post(f"{url}/predict", json={"texts": [f"w{i}"]}, headers=AUTH).status_code for i in range(20)]
        assert codes == [200] * 20
        assert log_of(project).count() - before == 20
        # /metrics answers for the server, whichever worker takes the scrape
        # (each worker's own counts went up and down between scrapes: a
        # helper's finding)
        import re

        scraped = []
        for _ in range(8):
            text = httpx.get(f"{url}/metrics", headers=AUTH).text
            found = re.search(r'^shrinkflow_requests_total\{endpoint="/predict",status="200"\} (\S+)$', text, re.M)
            assert found, text
            scraped.append(float(found.group(1)))
            assert re.search(r'^shrinkflow_model_version_info\{version="v\d{4}"\} 1\.0$', text, re.M), text
        assert scraped == [20.0] * 8, scraped
        # the HTTP edge's limits hold in every worker (serve.max_headers: 100)
        many = {f"x-h{i}": "1" for i in range(101)}
        assert httpx.post(f"{url}/predict", json={"texts": ["h"]}, headers={**AUTH, **many}).status_code == 431
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    # docs/exit-codes.md: SIGTERM, a graceful shutdown, then the shell's 143
    # (it exited 0 with workers, a helper's finding)
    assert proc.returncode == -signal.SIGTERM, proc.stdout.read()
    assert not list((project / ".shrinkflow").glob("metrics-*"))   # the workers' metric files went with them


@pytest.mark.slow  # ~10 s: two workers start, then stop by themselves
def test_workers_stop_when_their_serve_process_is_killed(project):
    """A helper's finding: `kill -9` of `serve --workers 2` left its workers
    serving the port, reparented, until killed by hand (a new serve on it:
    "already in use"). Each worker now stops, gracefully, once its parent is
    gone, and the port is free again."""
    import psutil

    from shrinkflow.ports import port_is_free

    port = free_port()
    env = {**os.environ, "SHRINKFLOW_API_TOKEN": TOKEN, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", str(port), "--workers", "2"],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    workers = []
    try:
        _answers_on(proc, port)
        assert httpx.post(f"{url}/predict", json={"texts": ["before"]}, headers=AUTH).status_code == 200
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "multiprocessing" in cmdline_of(c)]
        assert len(workers) >= 2, [cmdline_of(c) for c in psutil.Process(proc.pid).children(recursive=True)]
        proc.kill()
        proc.wait(timeout=60)
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, [(p.pid, cmdline_of(p)) for p in alive]
        deadline = time.time() + 10
        while not port_is_free("127.0.0.1", port):
            assert time.time() < deadline, f"port {port} still taken after the workers stopped"
            time.sleep(0.2)
    finally:
        for p in workers:
            if p.is_running():
                p.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


def test_an_unknown_path_or_method_gets_the_one_error_shape(server):
    """A newcomer's finding: GET /predict answered {"detail": "Method Not
    Allowed"}, unlike every other error."""
    r = httpx.get(f"{server.url}/predict", headers=AUTH)
    assert r.status_code == 405 and r.json() == {"error": "method_not_allowed", "detail": "Method Not Allowed"}
    assert "POST" in r.headers["allow"]
    r = httpx.get(f"{server.url}/nope", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    assert 'kind="method_not_allowed"' in text and 'kind="not_found"' in text


def test_reports_before_any_monitor_run_are_a_clear_404(server, project):
    assert not (project / "monitoring" / "reports").exists()
    r = httpx.get(f"{server.url}/reports/", headers=AUTH)
    assert r.status_code == 404 and "shrinkflow monitor" in r.json()["detail"]
    assert httpx.get(f"{server.url}/reports/").status_code == 401
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # and the server is fine
