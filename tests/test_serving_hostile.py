"""Issue 14, serving: hostile and broken input against a real `shrinkflow
serve` (uvicorn on loopback, a tiny real int8 model, real SQLite).

- one bad text never fails another request (checked before batching; a model
  call or a log group commit that still fails is retried request by request);
- whatever the body parser raises is a 4xx; generated bodies (hypothesis)
  never get a 5xx, alone or among good traffic, and rows logged == answers;
- a prediction never depends on what it was batched with (int8, per row);
- what the model did not read (head_tail truncation) is said and logged;
- the HTTP edge: header size and count limits (431), a request deadline (408),
  a client that leaves mid-body is no 500 and no traceback.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shrinkflow.predlog import Prediction, PredictionLog, utc_now
from shrinkflow.registry import Registry
from tests.conftest import PROJECT_ROOT
from tests.test_serving import PASS, Server, free_port, record

# serve.request_timeout_s for this module's server. Not 1 s: in a full suite on a loaded
# 2-core machine a good request among the generated bodies once got 408 at 1 s (its
# bytes were late, not missing); the default is 10 s.
TIMEOUT_S = 3.0
SHORT = "Entertaining despite its one joke premise."
LONG = ("A slow, meandering plot about a family reunion that drags through every scene, with endless dialogue "
        "about the weather and the neighbours, and a subplot about a lost dog that never goes anywhere at all.")
VERDICT = LONG + " I loved every minute of it; a wonderful, moving film."


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory, tiny_teacher_dir):
    """The tiny teacher in ONNX Runtime dynamic int8: batch-dependent."""
    from shrinkflow.compress import apply_recipe
    from shrinkflow.config import Candidate, QuantizeStep

    return apply_recipe(tiny_teacher_dir, Candidate(name="int8", recipe=(QuantizeStep(),)),
                        tmp_path_factory.mktemp("hostile-int8") / "int8", progress=False)


@pytest.fixture(scope="module")
def project(tmp_path_factory, int8_dir):
    root = tmp_path_factory.mktemp("hostile") / "project"
    root.mkdir()
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["serve"].update({"batching": True, "max_wait_ms": 5.0, "threads": 1, "max_texts_per_request": 8,
                            "truncation": "head_tail", "request_timeout_s": TIMEOUT_S, "max_header_bytes": 16384,
                            "max_headers": 100})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dvc.yaml").write_text((PROJECT_ROOT / "dvc.yaml").read_text())
    Registry(root / "registry").promote(int8_dir, PASS, record("int8"))   # no `serving` entry: decided by the graph
    return root


@pytest.fixture(scope="module")
def server(project, tmp_path_factory):
    srv = Server(project, free_port(), token=None, output=tmp_path_factory.mktemp("hostile-out") / "server.log")
    yield srv
    srv.stop()


def log_of(project: Path) -> PredictionLog:
    return PredictionLog(project / ".shrinkflow" / "predictions.db")


def metric(url: str, name: str, **labels) -> float:
    """A counter's value from /metrics (0 when the series does not exist)."""
    text = httpx.get(f"{url}/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.split()[-1])
    return 0.0


def post_raw(url: str, path: str, body: bytes, client: httpx.Client | None = None) -> httpx.Response:
    c = client or httpx
    return c.post(f"{url}{path}", content=body, headers={"Content-Type": "application/json"}, timeout=30)


# ------------------------------------------------------------------ item 1

def test_a_lone_surrogate_or_an_empty_text_gets_422_naming_its_index(server):
    r = post_raw(server.url, "/predict", b'{"texts": ["fine", "also fine", "ok", "ok\\ud800bad"]}')
    assert r.status_code == 422 and r.json()["error"] == "invalid_text"
    assert r.json()["detail"] == "texts[3]: not valid Unicode (lone surrogate U+D800 at character 2)"
    r = post_raw(server.url, "/predict", b'{"texts": ["fine", "", "  \\n"]}')
    assert r.status_code == 422
    assert r.json()["detail"] == ("texts[1]: empty or only whitespace: nothing to classify; "
                                  "texts[2]: empty or only whitespace: nothing to classify")
    assert [p["index"] for p in r.json()["problems"]] == [1, 2]


def test_twenty_bad_requests_among_400_concurrent_fail_only_themselves(server):
    """The issue's burst: 20 requests with a lone surrogate among 400
    concurrent ones made 223 of the 380 good ones answer 500."""
    before = log_of(server.root).count()
    results: list[tuple[int, int]] = []
    lock = threading.Lock()

    def client(k: int):
        with httpx.Client(timeout=60) as c:
            for i in range(k, 400, 40):
                body = b'{"texts": ["ok\\ud800bad"]}' if i % 20 == 0 else \
                    json.dumps({"texts": [f"good request {i}"]}).encode()
                r = post_raw(server.url, "/predict", body, c)
                with lock:
                    results.append((i, r.status_code))

    ts = [threading.Thread(target=client, args=(k,)) for k in range(40)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    bad = sorted(s for i, s in results if i % 20 == 0)
    good = sorted(s for i, s in results if i % 20)
    assert bad == [422] * 20 and good == [200] * 380
    assert log_of(server.root).count() - before == 380


BAD = (400, "not_json")
INVALID = (422, "invalid_request")


@pytest.mark.parametrize("body, on_predict, on_feedback", [
    # 10 KB nested 5000 deep: RecursionError in the JSON decoder answered 500
    ('{"texts": ' + "[" * 5000 + "]" * 5000 + "}", BAD, BAD),
    ('{"prediction_id": ' + '{"a": ' * 3000 + "1" + "}" * 3000 + "}", BAD, BAD),
    ('{"texts": ["a"], "n": ' + "9" * 5000 + "}", BAD, BAD),      # ValueError: an int over 4300 digits
    ('{"texts": ["a"], "n": NaN}', BAD, BAD),                     # NaN and Infinity are not JSON
    ('{"label": Infinity}', BAD, BAD),
    ("\ufeff{}", BAD, BAD),                                       # a UTF-8 byte order mark
    ("", BAD, BAD),
    ('{"label": 1, "label": 0}', INVALID, INVALID),               # a duplicated key: which one?
    ('{"prediction_id": "x", "label": true}', INVALID, INVALID),  # a bool is not the label 1
    ('{"prediction_id": "x", "label": 1.0}', INVALID, INVALID),
    ('{"prediction_id": "a\\ud800", "label": 1}', INVALID, INVALID),
    ('{"prediction_id": "a\\u0000b", "label": 1}', INVALID, INVALID),
    ('{"prediction_id": "x", "label": "\\udfff"}', INVALID, INVALID),
    ('{"\\udfff\\u0000": [], "texts": ["a"]}', INVALID, INVALID),
    ('{"texts": [' + ",".join(['"a"'] * 9) + "]}", (413, "too_many_texts"), INVALID),
])
def test_whatever_the_body_parser_raises_is_a_4xx(server, body, on_predict, on_feedback):
    for path, expected in (("/predict", on_predict), ("/feedback", on_feedback)):
        r = post_raw(server.url, path, body.encode("utf-8"))
        assert (r.status_code, r.json()["error"]) == expected, (path, r.text)
        assert r.json()["detail"]


@pytest.mark.parametrize("content_type, status", [
    (None, 415),                                   # no header at all
    ("application/x-www-form-urlencoded", 415),    # what `curl -d` sends without -H
    ("text/plain", 415),
    ("multipart/form-data; boundary=x", 415),
    ("application/jsonx", 415),
    ("application/json; charset=utf-8", 200),
    ('application/json; charset="UTF-8"', 200),                # quoted, any case
    ("application/json;Charset=utf8", 200),
    ("application/json; charset=utf_8", 200),
    ("application/json; charset=US-ASCII", 200),               # ASCII is UTF-8's first 128 code points
    ("Application/JSON", 200),
    ("application/vnd.api+json", 200),
])
def test_only_a_json_content_type_is_read(server, content_type, status):
    """A body not sent as JSON is refused, 415 naming the header to send,
    before it is read; nothing refused is logged."""
    before = log_of(server.root).count()
    headers = {} if content_type is None else {"Content-Type": content_type}
    with httpx.Client() as c:   # httpx adds no Content-Type to raw content
        r = c.post(f"{server.url}/predict", content=b'{"texts": ["sent as what?"]}', headers=headers, timeout=30)
    assert r.status_code == status, r.text
    if status == 415:
        assert r.json()["error"] == "unsupported_media_type"
        assert "Content-Type: application/json" in r.json()["detail"]
        assert (repr(content_type.split(";")[0].lower()) if content_type else "no Content-Type") in r.json()["detail"]
        r = httpx.post(f"{server.url}/feedback", content=b'{"prediction_id": "x", "label": 1}', headers=headers,
                       timeout=30)
        assert (r.status_code, r.json()["error"]) == (415, "unsupported_media_type")
    assert log_of(server.root).count() - before == (status == 200)


@pytest.mark.parametrize("headers, body, says", [
    ({"Content-Type": "application/json; charset=utf-16"}, '{"texts": ["sent as what?"]}'.encode("utf-16"),
     "charset: 'utf-16'"),
    ({"Content-Type": "application/json; charset=latin-1"}, '{"texts": ["caf\u00e9"]}'.encode("latin-1"),
     "charset: 'latin-1'"),
    ({"Content-Type": 'application/json; Charset="UTF-16"'}, '{"texts": ["x"]}'.encode("utf-16"),
     "charset: 'utf-16'"),
    ({"Content-Type": "application/json", "Content-Encoding": "br"}, b"\x0b\x02\x80", "Content-Encoding: 'br'"),
    ({"Content-Type": "application/json", "Content-Encoding": "gzip"}, None, "Content-Encoding: 'gzip'"),
])
def test_a_body_in_another_charset_or_compressed_is_refused_as_such(server, headers, body, says):
    """A newcomer's findings: a gzip body was answered "not_utf8 (byte 1)",
    and a body declared charset=utf-16 was read as UTF-8 (latin-1 text
    silently, as mojibake or an error). JSON is UTF-8: both get 415 saying
    why; charset=utf-8 (test above) is read."""
    import gzip

    body = body if body is not None else gzip.compress(b'{"texts": ["compressed"]}')
    before = log_of(server.root).count()
    with httpx.Client() as c:
        r = c.post(f"{server.url}/predict", content=body, headers=headers, timeout=30)
    assert (r.status_code, r.json()["error"]) == (415, "unsupported_media_type"), r.text
    assert says in r.json()["detail"], r.text
    assert log_of(server.root).count() == before


def test_feedback_with_an_unknown_or_hostile_id_is_a_4xx(server):
    r = post_raw(server.url, "/feedback", json.dumps({"prediction_id": "0" * 32, "label": 1}).encode())
    assert (r.status_code, r.json()["error"]) == (404, "unknown_prediction")
    r = post_raw(server.url, "/feedback", json.dumps({"prediction_id": "x" * 101, "label": 1}).encode())
    assert (r.status_code, r.json()["error"]) == (422, "invalid_request")


def _json_values():
    text = st.text(st.characters(), max_size=30)   # every code point, lone surrogates and controls included
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | text
    return st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(text, c, max_size=4),
                        max_leaves=10)


HOSTILE = [b'{"texts": ' + b"[" * 3000 + b"]" * 3000 + b"}", b'{"texts": ["a"], "n": ' + b"7" * 4400 + b"}",
           b'{"texts": [NaN]}', b'{"texts": ["a"], "texts": ["b"]}', b'{"texts": ["\\ud800"]}', b'{"texts": [""]}',
           b'{"texts": ["\\u0000"]}', b'{"texts": ["\xed\xa0\x80"]}', b"\xef\xbb\xbf{}", b"null", b"[]", b"{}"]


def _predict_bodies():
    text = st.text(st.characters(), max_size=40)
    dumps = lambda v: json.dumps(v).encode()   # noqa: E731 - ensure_ascii: surrogates travel as \ud8xx escapes
    return st.one_of(
        _json_values().map(dumps),
        st.fixed_dictionaries({"texts": st.lists(text, max_size=10)}).map(dumps),
        st.fixed_dictionaries({"texts": st.lists(_json_values(), max_size=3)}).map(dumps),
        st.binary(max_size=300),
        st.sampled_from(HOSTILE))


def _feedback_bodies(known_id: str):
    text = st.text(st.characters(), max_size=40)
    dumps = lambda v: json.dumps(v).encode()   # noqa: E731
    ids = st.one_of(st.just(known_id), text, _json_values())
    labels = st.one_of(st.sampled_from(["positive", "negative", 0, 1, 2, -1, True, 1.0, None]), _json_values())
    return st.one_of(st.fixed_dictionaries({"prediction_id": ids, "label": labels}).map(dumps),
                     _json_values().map(dumps), st.binary(max_size=300), st.sampled_from(HOSTILE))


class GoodTraffic:
    """Clients sending good requests in a loop until stopped; ``texts(k, i)``
    is client k's i-th request."""

    def __init__(self, url: str, clients: int = 3, texts=lambda k, i: [f"good {k} {i}", LONG]):
        self.url, self.texts, self.codes, self.texts_ok = url, texts, [], 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(k,)) for k in range(clients)]

    def _run(self, k: int):
        with httpx.Client(timeout=60) as c:
            i = 0
            while not self._stop.is_set():
                texts = self.texts(k, i)
                r = post_raw(self.url, "/predict", json.dumps({"texts": texts}).encode(), c)
                with self._lock:
                    self.codes.append(r.status_code)
                    self.texts_ok += len(texts) if r.status_code == 200 else 0
                i += 1

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join()


@pytest.mark.parametrize("with_traffic", [False, pytest.param(True, marks=pytest.mark.slow)],   # ~6 s: the quick
                         ids=["alone", "among-good-traffic"])                                  # run stays < 3 min
def test_generated_bodies_never_get_a_5xx_and_good_requests_all_succeed(server, with_traffic):
    """Property: any body (arbitrary JSON, Unicode with surrogates and control
    characters, arbitrary bytes) on /predict and /feedback gets no 5xx; every
    good request sent meanwhile is answered 200; the log gains exactly one row
    per text answered 200; the server prints no traceback."""
    known = post_raw(server.url, "/predict", b'{"texts": ["a known prediction"]}').json()
    known_id = known["predictions"][0]["prediction_id"]
    before_rows, before_out = log_of(server.root).count(), len(server.output_text())
    answered = {"texts": 0, "codes": []}

    @settings(max_examples=80, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(data=st.data())
    def check(data):
        path = data.draw(st.sampled_from(["/predict", "/feedback"]))
        body = data.draw(_predict_bodies() if path == "/predict" else _feedback_bodies(known_id))
        r = post_raw(server.url, path, body)
        assert r.status_code < 500, (path, body[:200], r.status_code, r.text[:300])
        answered["codes"].append(r.status_code)
        if path == "/predict" and r.status_code == 200:
            answered["texts"] += len(r.json()["predictions"])

    if with_traffic:
        with GoodTraffic(server.url) as good:
            check()
        assert good.codes and set(good.codes) == {200}
        good_texts = good.texts_ok
    else:
        check()
        good_texts = 0
    assert log_of(server.root).count() - before_rows == answered["texts"] + good_texts
    assert "Traceback" not in server.output_text()[before_out:]
    assert any(c == 200 for c in answered["codes"]) and any(400 <= c < 500 for c in answered["codes"])


# ------------------------------------------------------------------ isolation inside the server

def test_a_failing_model_call_is_retried_request_by_request(project, int8_dir):
    """A text that reaches the model and makes it raise (a lone surrogate,
    submitted past the endpoint's checks) fails its own request only; the
    requests gathered with it get exactly what they get alone."""
    from shrinkflow.predictors import load_predictor
    from shrinkflow.serving import MicroBatcher, ModelHolder

    holder = ModelHolder(Registry(project / "registry"), 1, "head")
    holder.load_production()
    alone = load_predictor(int8_dir, 1, spin=False)

    async def run():
        batcher = MicroBatcher(holder, max_batch_size=32, max_wait_ms=200.0)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(t) for t in
                                          (["one"], ["two", "three"], ["bad \ud800"], ["four"])),
                                        return_exceptions=True)
        finally:
            await batcher.stop()

    one, two, bad, four = asyncio.run(run())
    assert isinstance(bad, TypeError)
    for got, texts in ((one, ["one"]), (two, ["two", "three"]), (four, ["four"])):
        out, model = got
        assert model.version == "v0001"
        expected = np.stack([alone.predict([t]).logits[0] for t in texts])
        assert np.array_equal(out.logits, expected)


def test_a_log_group_commit_that_fails_on_one_row_fails_only_its_request(tmp_path):
    """Group commit: one transaction for every request waiting. A row that
    cannot be written (here a prediction id already in the log) fails its own
    request; the others in the same group are committed."""
    from shrinkflow.serving import LogWriter

    log = PredictionLog(tmp_path / "p.db").open()
    log.append([Prediction("taken", utc_now(), "v1", "first", [0.5, 0.5], 0, 1.0)])

    def rows(text, pid=None):
        return [Prediction(pid or uuid.uuid4().hex, utc_now(), "v1", text, [0.4, 0.6], 1, 1.0, 3, False)]

    async def run():
        writer = LogWriter(log)
        # queued before the writer thread starts, so all four form one group
        writes = [asyncio.ensure_future(writer.write(r)) for r in
                  (rows("a"), rows("b") + rows("c"), rows("dup", "taken"), rows("d"))]
        await asyncio.sleep(0)
        writer.start()
        try:
            return await asyncio.gather(*writes, return_exceptions=True)
        finally:
            writer.stop()

    a, bc, dup, d = asyncio.run(run())
    assert (a, bc, d) == (None, None, None) and isinstance(dup, Exception)
    assert sorted(log.window()["text"]) == ["a", "b", "c", "d", "first"]


def test_a_locked_log_fails_the_whole_group_at_once(tmp_path):
    """A lock fails every row alike: the group is not retried row by row (10
    requests would wait 10 busy timeouts)."""
    import sqlite3

    from shrinkflow.serving import LogWriter

    log = PredictionLog(tmp_path / "p.db", timeout_s=0.3).open()
    con = sqlite3.connect(tmp_path / "p.db", isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")

    async def run():
        writer = LogWriter(log)
        writes = [asyncio.ensure_future(writer.write([Prediction(uuid.uuid4().hex, utc_now(), "v1", f"t{i}",
                                                                 [0.5, 0.5], 0, 1.0)])) for i in range(10)]
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        writer.start()
        try:
            return await asyncio.gather(*writes, return_exceptions=True), time.perf_counter() - t0
        finally:
            writer.stop()

    try:
        results, elapsed = asyncio.run(run())
    finally:
        con.execute("ROLLBACK")
        con.close()
    assert all(isinstance(r, Exception) and "locked" in str(r) for r in results)
    assert elapsed < 1.5          # one busy timeout (0.3 s), not ten
    assert log.count() == 0


# ------------------------------------------------------------------ item 2

def logged_probabilities(project: Path, ids: list[str]) -> list[list[float]]:
    rows = log_of(project).window().set_index("prediction_id")
    return [list(rows.loc[i, "probabilities"]) for i in ids]


def test_a_prediction_never_depends_on_what_it_was_batched_with(server, int8_dir):
    """The issue's case: a short review came back negative alone and positive
    when another client's long review arrived at the same moment. The tiny
    int8 model is batch-dependent (checked below, so this test can fail):
    through the server the short text's probabilities are exactly the same
    alone and under concurrent long-text traffic, 40 times out of 40."""
    from shrinkflow.predictors import load_predictor
    from shrinkflow.serving import softmax

    model = load_predictor(int8_dir, 1, spin=False, truncation="head_tail")
    alone_logits = model.predict([SHORT]).logits
    assert not np.array_equal(alone_logits[0], model.predict([SHORT, LONG]).logits[0])   # batch-dependent
    expected = softmax(np.asarray(alone_logits, dtype=np.float64))[0].tolist()
    assert httpx.get(f"{server.url}/health").json()["serving"]["per_row"] is True

    ids = [post_raw(server.url, "/predict", json.dumps({"texts": [SHORT]}).encode()).json()
           ["predictions"][0]["prediction_id"] for _ in range(3)]
    batches_before = metric(server.url, "shrinkflow_batch_size_count")
    singles_before = metric(server.url, "shrinkflow_batch_size_bucket", le="1.0")
    # one long text per request: a model call of more than one text gathered several clients
    with GoodTraffic(server.url, clients=4, texts=lambda k, i: [LONG]):
        time.sleep(0.3)
        with httpx.Client(timeout=60) as c:
            for _ in range(40):
                r = post_raw(server.url, "/predict", json.dumps({"texts": [SHORT]}).encode(), c)
                ids.append(r.json()["predictions"][0]["prediction_id"])
    # model calls gathered several requests meanwhile (else this proves nothing)
    gathered = (metric(server.url, "shrinkflow_batch_size_count") - batches_before) - \
               (metric(server.url, "shrinkflow_batch_size_bucket", le="1.0") - singles_before)
    assert gathered > 0
    assert logged_probabilities(server.root, ids) == [expected] * 43


# ------------------------------------------------------------------ item 3

def test_head_tail_truncation_reads_the_verdict_and_the_log_says_it_was_cut(server, int8_dir):
    """serve.truncation: head_tail (this server). A long review ending with a
    strong verdict: the model reads 32 tokens (its max_seq_len), the answer
    and the log say it was cut, and the logits are head_tail's, not head's."""
    from shrinkflow.predictors import load_predictor
    from shrinkflow.serving import softmax

    r = post_raw(server.url, "/predict", json.dumps({"texts": [VERDICT, SHORT]}).encode())
    cut, short = r.json()["predictions"]
    assert (cut["truncated"], cut["tokens_seen"]) == (True, 32)
    assert (short["truncated"], short["tokens_seen"]) == (False, 9)
    probs = {t: softmax(np.asarray(load_predictor(int8_dir, 1, spin=False, truncation=t).predict([VERDICT]).logits,
                                   dtype=np.float64))[0].tolist() for t in ("head", "head_tail")}
    assert probs["head"] != probs["head_tail"]
    assert logged_probabilities(server.root, [cut["prediction_id"]]) == [probs["head_tail"]]
    row = log_of(server.root).window().set_index("prediction_id").loc[cut["prediction_id"]]
    assert (row["truncated"], row["tokens_seen"]) == (1, 32)


# ------------------------------------------------------------------ item 4

def vm_hwm_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))


def raw(port: int, data: bytes, wait_s: float = 5.0, close_after_send: bool = False) -> tuple[bytes, float]:
    """Send ``data`` on a fresh connection and read until the server closes it
    (or ``wait_s``). Returns (what came back, seconds until the close)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(wait_s)
    t0 = time.perf_counter()
    got = b""
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if close_after_send:
            return b"", 0.0
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    finally:
        s.close()
    return got, time.perf_counter() - t0


HEAD = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def test_a_30_mb_header_is_refused_without_the_memory(server):
    """No header limit: a single 30 MB header was accepted (200) and raised the
    server's peak memory by 58 MB. Now 431 (or a closed connection) after
    serve.max_header_bytes, and the peak does not move by tens of MB."""
    before_kb = vm_hwm_kb(server.proc.pid)
    rejected = metric(server.url, "shrinkflow_errors_total", endpoint="/predict", kind="headers_too_large")
    body = b'{"texts": ["x"]}'
    got, _ = raw(server.port, HEAD + b"X-Big: " + b"a" * (30 * 1024 * 1024) + b"\r\n"
                 + b"Content-Length: %d\r\n\r\n" % len(body) + body, wait_s=30)
    assert got == b"" or got.startswith(b"HTTP/1.1 431 "), got[:200]
    assert vm_hwm_kb(server.proc.pid) - before_kb < 16 * 1024
    assert metric(server.url, "shrinkflow_errors_total", endpoint="/predict",
                  kind="headers_too_large") == rejected + 1
    assert post_raw(server.url, "/predict", body).status_code == 200


def test_101_headers_get_431_and_100_are_fine(server):
    body = b'{"texts": ["x"]}'

    def with_headers(n: int) -> bytes:   # Host, Content-Type, Connection, Content-Length, fillers: n in all
        return HEAD + b"Connection: close\r\n" + b"".join(b"X-F%d: 1\r\n" % i for i in range(n - 4)) + \
            b"Content-Length: %d\r\n\r\n" % len(body) + body

    got, _ = raw(server.port, with_headers(101))
    assert got.startswith(b"HTTP/1.1 431 ") and b"too_many_headers" in got, got[:300]
    got, _ = raw(server.port, with_headers(100))
    assert got.startswith(b"HTTP/1.1 200 "), got[:300]


@pytest.mark.slow  # ~9 s of waiting for the request timeout
def test_a_slow_client_gets_408_within_the_request_timeout(server):
    """Headers and 10 of 31 announced body bytes, then silence: the
    connection was held unanswered for 70 s and more. Now 408 and a close
    within serve.request_timeout_s (3 s here) plus slack; likewise for headers
    that never end; a connection that sends nothing is closed."""
    t_before = metric(server.url, "shrinkflow_errors_total", endpoint="/predict", kind="request_timeout")
    s_before = metric(server.url, "shrinkflow_requests_total", endpoint="/predict", status="408")
    got, elapsed = raw(server.port, HEAD + b"Content-Length: 31\r\n\r\n" + b'{"texts": ', wait_s=10)
    assert got.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in got, got[:300]
    assert TIMEOUT_S - 0.1 <= elapsed < TIMEOUT_S + 1.5
    got, elapsed = raw(server.port, b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow", wait_s=10)
    assert got.startswith(b"HTTP/1.1 408 "), got[:300]
    assert elapsed < TIMEOUT_S + 1.5
    got, elapsed = raw(server.port, b"", wait_s=10)
    assert got == b"" and elapsed < TIMEOUT_S + 1.5
    # both 408s show in /metrics (the first counted by the app, the second at the edge)
    assert metric(server.url, "shrinkflow_errors_total", endpoint="/predict", kind="request_timeout") == t_before + 2
    assert metric(server.url, "shrinkflow_requests_total", endpoint="/predict", status="408") == s_before + 2
    assert post_raw(server.url, "/predict", b'{"texts": ["after"]}').status_code == 200


def test_a_client_that_leaves_mid_body_is_no_500_and_no_traceback(server):
    out_before = len(server.output_text())
    left = metric(server.url, "shrinkflow_errors_total", endpoint="/predict", kind="client_disconnected")
    for _ in range(3):
        raw(server.port, HEAD + b"Content-Length: 31\r\n\r\n" + b'{"texts": ', close_after_send=True)
    deadline = time.time() + 5
    while metric(server.url, "shrinkflow_errors_total", endpoint="/predict",
                 kind="client_disconnected") < left + 3 and time.time() < deadline:
        time.sleep(0.1)
    assert metric(server.url, "shrinkflow_errors_total", endpoint="/predict", kind="client_disconnected") == left + 3
    assert metric(server.url, "shrinkflow_requests_total", endpoint="/predict", status="500") == 0
    assert "Traceback" not in server.output_text()[out_before:]
    assert post_raw(server.url, "/predict", b'{"texts": ["after"]}').status_code == 200
