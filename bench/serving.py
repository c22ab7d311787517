"""Load benchmark of `shrinkflow serve` against a plain transformers baseline.

One client process on loopback (aiohttp, asyncio): CONCURRENCY clients, one
text per request, for DURATION_S seconds each, against, in one run:
  1. `shrinkflow serve` on the project's production version (what `shrinkflow
     run` deployed), micro-batching on, **per row**: requests are gathered but
     each text is its own model call, so no answer depends on other requests
     (batch-invariant; what the server does for a batch-dependent version such
     as ONNX Runtime dynamic int8);
  2. the same, **batched**: gathered texts share padded model calls (faster,
     but a dynamic-int8 answer then depends on its neighbours);
  3. micro-batching off (each request its own call; per_row as the deployed
     version decides);
  4. the baseline a team would write without shrinkflow: a minimal FastAPI app
     serving the fp32 teacher through `transformers.pipeline("text-classification")`.
The shrinkflow servers run the app as `shrinkflow serve` does, behind its HTTP
edge (shrinkflow.httpedge). Records throughput, p50/p95/p99 latency, the count
of each status code, rows logged against successful responses, and which mode
the deployed version is served in (its /health). Writes
bench/results/serving.{md,json}, so the cost of batch invariance (per row vs
batched) and the speedup of what is served over the baseline come from one run.

    .venv/bin/python bench/serving.py   # after `shrinkflow run`
    BENCH_DURATION_S=5 BENCH_OUT=/tmp/x .venv/bin/python bench/serving.py   # a quick smoke run elsewhere
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from _common import RESULTS, ROOT, now_utc

CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", 50))
DURATION_S = float(os.environ.get("BENCH_DURATION_S", 60))
# The project whose deployed version is measured (default: this one) and
# where the results go (default: bench/results, the committed figures).
PROJECT = Path(os.environ.get("BENCH_PROJECT", ROOT)).resolve()
OUT = Path(os.environ.get("BENCH_OUT", RESULTS)).resolve()

SHRINKFLOW_APP = """
import sys, uvicorn
from pathlib import Path
from shrinkflow.config import load_params
from shrinkflow.httpedge import PROTOCOL
from shrinkflow.predlog import prediction_log
from shrinkflow.registry import Registry
from shrinkflow.serving import make_app
root = Path(sys.argv[1]); p = load_params(root / "params.yaml")
# SQLite at the run's own file (bench/serving_replicas.py measures PostgreSQL)
serve = p.serve.model_copy(update={"batching": sys.argv[3] == "on", "log_url": None, "log_path": sys.argv[4]})
per_row = {"per-row": True, "batched": False, "as-deployed": None}[sys.argv[5]]
app = make_app(Registry(root / p.deploy.registry_dir), prediction_log(root, serve), serve, per_row=per_row)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", http=PROTOCOL, ws="none")
"""

BASELINE_APP = """
import sys, torch, uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast, pipeline
torch.set_num_threads(2)
teacher = sys.argv[1]
clf = pipeline("text-classification", model=AutoModelForSequenceClassification.from_pretrained(teacher),
               tokenizer=PreTrainedTokenizerFast(tokenizer_file=teacher + "/tokenizer.json"), device=-1)
app = FastAPI()
class Req(BaseModel):
    texts: list[str]
@app.post("/predict")
def predict(req: Req):
    return {"predictions": clf(req.texts, truncation=True, max_length=64)}
@app.get("/health")
def health():
    return {"status": "ok"}
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(code: str, *args: str) -> tuple[subprocess.Popen, str, dict]:
    """Start a server; returns it, its URL and its /health document."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-c", code, args[0], str(port), *args[1:]], cwd=PROJECT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=1)
            if r.status_code == 200:
                return proc, url, r.json()
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


async def load(url: str, texts: list[str]) -> dict:
    """CONCURRENCY clients, each one keep-alive connection, one request after
    another. aiohttp rather than httpx: the client shares the 2 cores with the
    server, and httpx spent 2.9 ms of CPU per request there, aiohttp 0.4 ms."""
    import aiohttp

    latencies, codes = [], Counter()
    stop = time.perf_counter() + DURATION_S
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:
        async def user(k: int):
            i = k
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    async with client.post(f"{url}/predict", json={"texts": [texts[i % len(texts)]]}) as r:
                        await r.read()
                        codes[r.status] += 1
                        if r.status == 200:
                            latencies.append(time.perf_counter() - t0)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    codes[type(exc).__name__] += 1
                i += CONCURRENCY
        t0 = time.perf_counter()
        await asyncio.gather(*(user(k) for k in range(CONCURRENCY)))
        wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    return {"requests_per_s": round(len(latencies) / wall, 1), "ok": len(latencies),
            "status_counts": {str(k): v for k, v in codes.items()},
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "latency_ms_p95": round(float(np.percentile(lat, 95)), 2) if len(lat) else None,
            "latency_ms_p99": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
            "wall_s": round(wall, 1)}


def main() -> None:
    from shrinkflow.splits import read_parquet

    sys.path.insert(0, str(ROOT))
    from shrinkflow.config import load_params
    from shrinkflow.lineage import cpu_model
    from shrinkflow.predlog import PredictionLog
    from shrinkflow.registry import Registry

    params = load_params(PROJECT / "params.yaml")
    registry = Registry(PROJECT / params.deploy.registry_dir)
    version = registry.alias()
    if version is None:
        raise SystemExit(f"nothing deployed in {PROJECT}: run `shrinkflow run` first")
    candidate = registry.manifest(version).get("candidate", "?")
    texts = read_parquet(PROJECT / "data/prepared/test.parquet")["text"].tolist()
    work = PROJECT / "bench" / "work" / "serving"
    work.mkdir(parents=True, exist_ok=True)
    shrinkflow_runs = (
        ("shrinkflow, micro-batching on, per row (batch-invariant)", "on", "per-row"),
        ("shrinkflow, micro-batching on, batched (not batch-invariant for dynamic int8)", "on", "batched"),
        ("shrinkflow, micro-batching off", "off", "as-deployed"))
    runs, modes = {}, {}
    plan = [(name, SHRINKFLOW_APP, (str(PROJECT), batching, str(work / f"{mode}-{batching}.db"), mode))
            for name, batching, mode in shrinkflow_runs]
    plan.append(("baseline: FastAPI + transformers pipeline, fp32 teacher", BASELINE_APP,
                 (str(PROJECT / "models/teacher"),)))
    for name, code, args in plan:
        for db in work.glob("*.db*"):
            db.unlink()
        proc, url, health = start(code, *args)
        print(f"--- {name}: {CONCURRENCY} clients for {DURATION_S:.0f}s", flush=True)
        try:
            res = asyncio.run(load(url, texts))
        finally:
            proc.terminate()
            proc.wait(timeout=120)
        if code is SHRINKFLOW_APP:
            res["rows_logged"] = PredictionLog(args[2]).count()
            res["serving"] = health.get("serving")
            modes[args[3]] = health.get("serving")
        print(json.dumps(res), flush=True)
        runs[name] = res
    per_row, batched, off, base = runs.values()
    deployed = modes["as-deployed"] or {}
    served = per_row if deployed.get("per_row") else batched   # what `shrinkflow serve` does with this version
    doc = {"when": now_utc(), "cpu": cpu_model(),
           "model_version": version, "candidate": candidate, "deployed_serving": deployed,
           "concurrency": CONCURRENCY, "client": "aiohttp",
           "serve_threads": params.serve.threads, "max_batch_size": params.serve.max_batch_size,
           "max_wait_ms": params.serve.max_wait_ms, "duration_s": DURATION_S, "runs": runs,
           "speedup_rps_vs_baseline": round(served["requests_per_s"] / base["requests_per_s"], 2),
           "speedup_rps_vs_baseline_per_row": round(per_row["requests_per_s"] / base["requests_per_s"], 2),
           "speedup_rps_vs_baseline_batched": round(batched["requests_per_s"] / base["requests_per_s"], 2),
           "speedup_rps_vs_baseline_unbatched": round(off["requests_per_s"] / base["requests_per_s"], 2),
           "per_row_cost_rps": round(per_row["requests_per_s"] / batched["requests_per_s"], 2),
           "batching_gain_rps": round(served["requests_per_s"] / off["requests_per_s"], 2)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "serving.json").write_text(json.dumps(doc, indent=2) + "\n")

    def fivexx(r):
        return sum(v for k, v in r["status_counts"].items() if k.startswith("5"))

    rows = [f"| {n} | {r['requests_per_s']} | {r['latency_ms_p50']} | {r['latency_ms_p95']} | {r['latency_ms_p99']} | "
            f"{', '.join(f'{k}: {v}' for k, v in sorted(r['status_counts'].items()))} | "
            f"{r.get('rows_logged', 'n/a')} |" for n, r in runs.items()]
    how = (f"per row, decided by its {deployed.get('per_row_decided_by')}" if deployed.get("per_row")
           else f"batched, decided by its {deployed.get('per_row_decided_by')}")
    shrink = (per_row, batched, off)
    md = ["# Serving benchmark", "",
          f"Measured {doc['when']} on this project's 2-core machine ({doc['cpu']}); server and load client share "
          f"it. {CONCURRENCY} concurrent aiohttp clients on loopback (one process), one text per request "
          f"(test-split sentences), "
          f"{DURATION_S:.0f} s per server, one after the other in one run. shrinkflow serves production "
          f"{version} ({candidate}; `serve.threads` = {doc['serve_threads']} per model call, at most 2 calls at "
          f"once; batching up to {doc['max_batch_size']} texts or {doc['max_wait_ms']} ms) with its prediction log "
          "on, behind its HTTP edge; the baseline serves the fp32 teacher (2 torch threads) "
          "through `transformers.pipeline` in a minimal FastAPI app, with no log.", "",
          f"`shrinkflow serve` serves {version} **{how}** (its /health). Per row, requests are still gathered, "
          "but each text is its own model call, so no answer depends on the texts it was gathered with "
          "(ONNX Runtime dynamic int8 computes activation scales over the whole batch); batched, gathered texts "
          "share padded calls.", "",
          "| server | req/s | p50 ms | p95 ms | p99 ms | status codes | rows logged |", "|---|---|---|---|---|---|---|",
          *rows, "",
          f"- what is served ({'per row' if served is per_row else 'batched'}) vs baseline: "
          f"**{doc['speedup_rps_vs_baseline']}x** the requests per second (goal >= 5x); p95 "
          f"{served['latency_ms_p95']} vs {base['latency_ms_p95']} ms.",
          f"- the cost of batch invariance: per row gives {doc['per_row_cost_rps']}x the requests per second of "
          f"batched ({per_row['requests_per_s']} vs {batched['requests_per_s']}; p95 {per_row['latency_ms_p95']} "
          f"vs {batched['latency_ms_p95']} ms); against the baseline, per row {doc['speedup_rps_vs_baseline_per_row']}x, "
          f"batched {doc['speedup_rps_vs_baseline_batched']}x, micro-batching off "
          f"{doc['speedup_rps_vs_baseline_unbatched']}x.",
          f"- 5xx responses: {', '.join(str(fivexx(r)) for r in shrink)} (per row, batched, off); rows logged = 200 "
          f"responses: {', '.join(str(r['rows_logged'] == r['ok']) for r in shrink)}."]
    # keep bench/serving_replicas.py's section (between its markers)
    before = (OUT / "serving.md").read_text() if (OUT / "serving.md").is_file() else ""
    begin, end = "<!-- serving_replicas.py: begin -->", "<!-- serving_replicas.py: end -->"
    kept = before[before.index(begin):before.index(end) + len(end)] + "\n" if begin in before and end in before else ""
    (OUT / "serving.md").write_text("\n".join(md) + "\n" + ("\n" + kept if kept else ""))
    print("\n".join(md))


if __name__ == "__main__":
    main()
