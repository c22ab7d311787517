"""The serving app itself, built with ``create_app`` and run by a real uvicorn
(in this process, on a free loopback port, with the HTTP edge), a tiny real
model deployed into a temporary registry, a real SQLite log:

- /openapi.json documents the /predict and /feedback request bodies;
- /docs renders Swagger UI in headless Chromium from assets the server holds
  (no CDN), and /reports/ serves the monitoring index and a report page;
- /metadata hashes the model once per loaded version, not per request;
- a batching loop that dies (cancelled, or raising) makes /predict answer 503
  at once, the request waiting in it included, and /health say so.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from shrinkflow.config import Candidate, ServeParams
from shrinkflow.files import write_json
from shrinkflow.predlog import PredictionLog
from shrinkflow.registry import Registry
from tests.test_serving import PASS, free_port, record
from tests.conftest import chromium_dom


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory, tiny_teacher_dir) -> Path:
    from shrinkflow.compress import apply_recipe

    return apply_recipe(tiny_teacher_dir, Candidate(name="fp32"), tmp_path_factory.mktemp("app-fp32") / "fp32",
                        progress=False)


class CountingRegistry(Registry):
    """A Registry that counts how often it hashes a version's files."""

    def __init__(self, root):
        super().__init__(root)
        self.verified = 0

    def verify(self, version):
        self.verified += 1
        return super().verify(version)


def deployed(root: Path, model_dir: Path) -> CountingRegistry:
    reg = CountingRegistry(root / "registry")
    reg.promote(model_dir, PASS, record("fp32"))
    return reg


class Running:
    """``app`` under uvicorn with the HTTP edge, on a thread of this process."""

    def __init__(self, app):
        import uvicorn

        from shrinkflow.httpedge import PROTOCOL

        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    http=PROTOCOL, ws="none"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def state(self):
        return self.app.state.serving

    def call_in_loop(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the server's event loop."""
        self.state.batcher._task.get_loop().call_soon_threadsafe(fn, *args)


@contextmanager
def running(app):
    srv = Running(app)
    srv.thread.start()
    deadline = time.time() + 60
    while not srv.server.started:
        assert srv.thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield srv
    finally:
        srv.server.should_exit = True
        srv.thread.join(timeout=60)


def make(root: Path, model_dir: Path, reports_dir: Path | None = None, **serve):
    from shrinkflow.serving import create_app

    params = ServeParams(threads=1, **serve)
    reg = deployed(root, model_dir)
    return create_app(reg, PredictionLog(root / "predictions.db"), params, reports_dir=reports_dir), reg




def test_monitoring_does_not_import_the_server():
    """The monitor reads a version's labels from shrinkflow.status, not from
    the serving package (monitoring imports no layer above the library)."""
    import ast

    from tests.conftest import PROJECT_ROOT

    for path in sorted((PROJECT_ROOT / "monitoring").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names] \
                if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "shrinkflow.serving" or n.startswith("shrinkflow.serving.") for n in names), path


# ------------------------------------------------------------------ docs

def test_openapi_documents_the_request_and_response_bodies(tmp_path, fp32_dir):
    app, _ = make(tmp_path, fp32_dir, max_texts_per_request=8)
    with running(app) as srv:
        doc = httpx.get(f"{srv.url}/openapi.json").json()
    predict = doc["paths"]["/predict"]["post"]
    body = predict["requestBody"]["content"]["application/json"]["schema"]
    assert predict["requestBody"]["required"] is True
    assert body["properties"]["texts"]["type"] == "array" and body["properties"]["texts"]["minItems"] == 1
    assert body["properties"]["texts"]["items"] == {"type": "string"}
    assert body["required"] == ["texts"] and body["additionalProperties"] is False
    feedback = doc["paths"]["/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(feedback["properties"]) == {"prediction_id", "label"}
    assert feedback["required"] == ["prediction_id", "label"] and feedback["additionalProperties"] is False
    assert {"type": "integer"} in feedback["properties"]["label"]["anyOf"]
    # the answers too, and the one error shape
    ok = predict["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/PredictResponse"}
    assert {"model_version", "predictions"} <= set(doc["components"]["schemas"]["PredictResponse"]["properties"])
    assert predict["responses"]["413"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/ErrorBody"}
    # /metadata: the typed status report and how the version is served
    meta = doc["paths"]["/metadata"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert meta == {"$ref": "#/components/schemas/Metadata"}
    schemas = doc["components"]["schemas"]
    assert set(schemas["Metadata"]["properties"]) == {"deployed", "message", "teacher", "versions", "serving"}
    assert {"version", "integrity", "metrics", "gates", "labels"} <= set(schemas["DeployedVersion"]["properties"])
    assert set(schemas["ServedAs"]["properties"]) == {"per_row", "per_row_decided_by", "batching", "truncation"}


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory, fp32_dir):
    """An app without a token, with a monitoring reports directory of one run
    (its index written by monitoring.index, its report a page whose text a
    script writes)."""
    from monitoring.index import write_index

    root = tmp_path_factory.mktemp("docs-app")
    run = root / "reports" / "20260102T000000_000000Z"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"created": "2026-01-02T00:00:00Z", "model_version": "v0001",
                                                  "window": {"rows": 321}}))
    (run / "decision.json").write_text(json.dumps({"action": "ok", "reasons": ["nothing drifted"]}))
    (run / "report.html").write_text("<html><body><div id=out></div><script>document.getElementById('out')"
                                     ".textContent = 'drift figures drawn by script: ' + (6 * 7);</script>"
                                     "</body></html>")
    write_index(root / "reports")
    app, _ = make(root, fp32_dir, reports_dir=root / "reports")
    with running(app) as srv:
        yield srv


def test_docs_render_in_headless_chromium_without_a_network(docs_server):
    """/docs was a blank page offline: Swagger UI came from a CDN. Its
    scripts are now served by the app, and the rendered page lists the
    operations with their summaries."""
    page = httpx.get(f"{docs_server.url}/docs").text
    scripts = [s.split('"')[1] for s in page.split("<script src=")[1:]]
    assert scripts and all(s.startswith("/") for s in scripts), scripts   # no http(s):// asset
    for asset in scripts:
        assert httpx.get(f"{docs_server.url}{asset}").status_code == 200
    dom = chromium_dom(f"{docs_server.url}/docs")
    assert 'class="swagger-ui' in dom
    assert 'data-path="/predict"' in dom and 'data-path="/feedback"' in dom
    assert "Label texts with the production model" in dom


def test_reports_index_and_a_report_render_in_headless_chromium(docs_server):
    index = chromium_dom(f"{docs_server.url}/reports/")
    assert "1 run(s)" in index and 'href="20260102T000000_000000Z/report.html"' in index
    assert ">ok</b>" in index and "321" in index
    report = chromium_dom(f"{docs_server.url}/reports/20260102T000000_000000Z/report.html")
    assert "drift figures drawn by script: 42" in report


# ------------------------------------------------------------------ /metadata

def test_metadata_hashes_the_model_once_per_loaded_version(tmp_path, fp32_dir):
    """Before: every GET /metadata hashed every file of the served version."""
    app, reg = make(tmp_path, fp32_dir, reload_poll_s=0.1)
    with running(app) as srv:
        assert reg.verified == 1                          # Registry.load, at startup
        for _ in range(3):
            meta = httpx.get(f"{srv.url}/metadata").json()
            assert meta["deployed"]["version"] == "v0001" and meta["deployed"]["integrity"] == "verified"
        assert reg.verified == 1
        # a new version: hashed once when loaded, then not again
        reg.promote(fp32_dir, PASS, record("fp32"))
        deadline = time.time() + 20
        while httpx.get(f"{srv.url}/health").json()["model_version"] != "v0002":
            assert time.time() < deadline, "v0002 was not loaded"
            time.sleep(0.1)
        verified = reg.verified
        for _ in range(3):
            assert httpx.get(f"{srv.url}/metadata").json()["deployed"]["version"] == "v0002"
        assert reg.verified == verified


def wait_for(check, what: str, timeout_s: float = 20.0):
    deadline = time.time() + timeout_s
    while not (got := check()):
        assert time.time() < deadline, what
        time.sleep(0.05)
    return got


def test_a_half_written_aliases_file_neither_stops_hot_reload_nor_sticks(tmp_path, fp32_dir):
    """Before: aliases.json caught half-written (a hand edit; here, not JSON
    yet) raised out of the reload poll and ended hot reload for good, with
    nothing in /health. Now /health reports it while it lasts, and the next
    production version is still picked up."""
    app, reg = make(tmp_path, fp32_dir, reload_poll_s=0.1)
    aliases = reg.root / "aliases.json"
    with running(app) as srv:
        aliases.write_text('{"produc')
        refused = wait_for(lambda: httpx.get(f"{srv.url}/health").json()["refused"], "the bad file was not reported")
        assert refused["version"] is None and "char" in refused["reason"]
        assert httpx.get(f"{srv.url}/health").json()["model_version"] == "v0001"
        write_json(aliases, {"production": "v0001"})                    # the edit is finished
        wait_for(lambda: httpx.get(f"{srv.url}/health").json()["refused"] is None, "the report stuck")
        new = reg.promote(fp32_dir, PASS, record("fp32")).version
        health = wait_for(lambda: (h := httpx.get(f"{srv.url}/health").json())["model_version"] == new and h,
                          f"{new} was not loaded")
        assert health["status"] == "ok" and health["refused"] is None


def test_a_registry_moved_away_under_the_server_is_reported_not_a_500(tmp_path, fp32_dir):
    """A helper's finding: with the served version's manifest, or the whole
    registry, moved away, /metadata answered a plain-text 500 and /health
    said ok with nothing refused. Now /metadata answers the JSON error (503)
    and /health names the problem, while /predict keeps answering with the
    version loaded; put back, both recover."""
    app, reg = make(tmp_path, fp32_dir, reload_poll_s=0.1)
    moved = tmp_path / "registry-moved"
    with running(app) as srv:
        assert httpx.get(f"{srv.url}/metadata").status_code == 200
        reg.root.rename(moved)
        refused = wait_for(lambda: httpx.get(f"{srv.url}/health").json()["refused"], "the move was not reported")
        assert refused["version"] is None and "no production alias" in refused["reason"], refused
        answer = httpx.get(f"{srv.url}/metadata")
        assert answer.status_code == 503 and answer.headers["content-type"] == "application/json", answer.text
        assert answer.json()["error"] == "registry_unavailable" and "v0001" in answer.json()["detail"]
        assert httpx.post(f"{srv.url}/predict", json={"texts": ["a fine film"]}).status_code == 200
        moved.rename(reg.root)
        wait_for(lambda: httpx.get(f"{srv.url}/health").json()["refused"] is None, "the report stuck")
        assert httpx.get(f"{srv.url}/metadata").json()["deployed"]["version"] == "v0001"


# ------------------------------------------------------------------ a dead batching loop

def _cancel(srv):
    srv.call_in_loop(srv.state.batcher._task.cancel)


def _raise(srv):
    # Not a request: the loop's own code fails on it (AttributeError)
    srv.call_in_loop(srv.state.batcher.queue.put_nowait, None)


@pytest.mark.parametrize("kill, reason", [(_cancel, "cancelled"), (_raise, "AttributeError")],
                         ids=["cancelled", "raising"])
def test_a_dead_batching_loop_gives_503_at_once_and_health_says_so(tmp_path, fp32_dir, kill, reason):
    """Before: submit awaited its future with no end, so once the loop died
    every /predict hung. A request gathered into a batch (max_wait_ms 1 s
    here) when the loop dies gets 503 at once, and so does every later one;
    /health answers 503 with the reason; nothing is logged."""
    app, _ = make(tmp_path, fp32_dir, batching=True, max_batch_size=64, max_wait_ms=1000.0)
    with running(app) as srv:
        assert httpx.post(f"{srv.url}/predict", json={"texts": ["fine"]}, timeout=30).status_code == 200
        logged = PredictionLog(tmp_path / "predictions.db").count()
        waiting: dict = {}

        def post():
            try:
                waiting["response"] = httpx.post(f"{srv.url}/predict", json={"texts": ["waiting"]}, timeout=10)
            except httpx.TimeoutException:
                waiting["response"] = None
            waiting["at"] = time.perf_counter()

        t = threading.Thread(target=post)
        t.start()
        deadline = time.time() + 10
        while not srv.state.batcher._gathering:            # gathered, waiting for more (up to 1 s)
            assert time.time() < deadline
            time.sleep(0.01)
        killed = time.perf_counter()
        kill(srv)
        t.join(timeout=30)
        r = waiting["response"]
        assert r is not None, "the request waiting in the batch hung"
        assert r.status_code == 503 and r.json()["error"] == "batcher_stopped", r.text
        assert waiting["at"] - killed < 2.0                # at once: before, it waited forever
        assert reason in r.json()["detail"]
        t0 = time.perf_counter()
        r = httpx.post(f"{srv.url}/predict", json={"texts": ["after"]}, timeout=10)
        assert r.status_code == 503 and r.json()["error"] == "batcher_stopped" and reason in r.json()["detail"]
        assert time.perf_counter() - t0 < 2.0
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        assert reason in health.json()["problem"] and health.json()["model_version"] == "v0001"
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'shrinkflow_errors_total{endpoint="/predict",kind="batcher_stopped"} 2.0' in metrics
    assert PredictionLog(tmp_path / "predictions.db").count() == logged
