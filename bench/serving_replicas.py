"""Serving replicas on one PostgreSQL prediction log (issue 18, item 4),
against one replica on SQLite.

Three runs, one after the other, each CONCURRENCY aiohttp clients on
loopback, one text per request, for DURATION_S seconds, against real
`shrinkflow serve` processes started as a user starts them
(``shrinkflow serve --params FILE --port N`` in the project):
  1. one replica, its log in SQLite (the default, serve.log_url null);
  2. one replica, its log in PostgreSQL (serve.log_url postgresql://...):
     what the backend alone costs;
  3. two replicas on two ports, one PostgreSQL log; the clients alternate
     between them (client k talks to replica k mod 2).
PostgreSQL is a throwaway cluster (shrinkflow.pgcluster, fsync on as a real
server has it) on a loopback port, a fresh schema per run; the password
reaches the servers through PGPASSFILE, never params. Each run records
req/s, p50/p95/p99 latency, the count of each status code, and the rows
logged against the successful responses (for PostgreSQL, the exact
prediction ids: every id answered 200 by either replica is in the log, and
no other). After run 3 the monitor reads the combined window
(``monitoring.run.read_window`` through serve.log_url, what `shrinkflow
monitor` calls) and builds its reports and verdict on it. Writes
bench/results/serving_replicas.{md,json}, and a section of
bench/results/serving.md (between its serving_replicas.py markers).

On a 2-core machine the client, PostgreSQL and both replicas share the two
cores: run 3 measures that two replicas on one log work (zero 5xx, nothing
lost) and what sharing costs, not how replicas scale on separate hosts.

    .venv/bin/python bench/serving_replicas.py   # after `shrinkflow run` (needs a production version)
    BENCH_PROJECT=/path/to/project BENCH_DURATION_S=5 BENCH_OUT=/tmp/x .venv/bin/python bench/serving_replicas.py
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from _common import RESULTS, ROOT, now_utc, wait_until_ready

CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", 50))
DURATION_S = float(os.environ.get("BENCH_DURATION_S", 60))
PROJECT = Path(os.environ.get("BENCH_PROJECT", ROOT)).resolve()
OUT = Path(os.environ.get("BENCH_OUT", RESULTS)).resolve()
WORK = PROJECT / "bench" / "work" / "serving_replicas"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def params_file(name: str, **serve) -> Path:
    """The project's params.yaml with ``serve`` keys replaced, in WORK
    (monitor reports there too, not in the project's reports)."""
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["serve"].update(serve)
    raw["monitor"]["reports_dir"] = str((WORK / "reports").relative_to(PROJECT))
    path = WORK / f"params-{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def start(params: Path, env: dict) -> tuple[subprocess.Popen, str]:
    """`shrinkflow serve` with ``params`` on a free port; returns it once its
    /health answers 200, and its URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--params", str(params), "--port", str(port)],
                            cwd=PROJECT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(proc, f"{url}/health", "shrinkflow serve")
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def load(urls: list[str], texts: list[str]) -> tuple[dict, list[set[str]]]:
    """CONCURRENCY clients, client k on ``urls[k % len(urls)]``, each one
    keep-alive connection, one request after another. Returns the figures
    and, per URL, the prediction ids it answered 200."""
    import aiohttp

    latencies, codes = [], Counter()
    ids: list[set[str]] = [set() for _ in urls]
    stop_at = time.perf_counter() + DURATION_S
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:
        async def user(k: int):
            i, which = k, k % len(urls)
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    async with client.post(f"{urls[which]}/predict", json={"texts": [texts[i % len(texts)]]}) as r:
                        body = await r.read()
                        codes[r.status] += 1
                        if r.status == 200:
                            latencies.append(time.perf_counter() - t0)
                            ids[which].add(json.loads(body)["predictions"][0]["prediction_id"])
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    codes[type(exc).__name__] += 1
                i += CONCURRENCY
        t0 = time.perf_counter()
        await asyncio.gather(*(user(k) for k in range(CONCURRENCY)))
        wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    pct = (lambda q: round(float(np.percentile(lat, q)), 2) if len(lat) else None)
    return ({"requests_per_s": round(len(latencies) / wall, 1), "ok": len(latencies),
             "status_counts": {str(k): v for k, v in codes.items()},
             "fivexx": sum(v for k, v in codes.items() if str(k).startswith("5")),
             "latency_ms_p50": pct(50), "latency_ms_p95": pct(95), "latency_ms_p99": pct(99),
             "wall_s": round(wall, 1)}, ids)


def run(name: str, params: Path, replicas: int, env: dict, texts: list[str]) -> tuple[dict, list[set[str]]]:
    procs = []
    try:
        for _ in range(replicas):
            procs.append(start(params, env))
        print(f"--- {name}: {replicas} replica(s), {CONCURRENCY} clients for {DURATION_S:.0f} s", flush=True)
        # The machine's 1-minute load average around the run: other work on a
        # shared machine moves these figures more than the log's engine does.
        load_before = os.getloadavg()[0]
        res, ids = asyncio.run(load([url for _, url in procs], texts))
        res["loadavg_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    finally:
        for proc, _ in procs:
            stop(proc)   # drains in-flight requests; the log writer flushes
    res["replicas"] = replicas
    res["answered_by_replica"] = [len(s) for s in ids]
    return res, ids


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from monitoring.run import build_reports, decide_and_record, read_window
    from shrinkflow.config import load_params
    from shrinkflow.lineage import cpu_model
    from shrinkflow.pgcluster import PgCluster
    from shrinkflow.predlog import prediction_log
    from shrinkflow.registry import Registry
    from shrinkflow.splits import read_parquet

    params = load_params(PROJECT / "params.yaml")
    version = Registry(PROJECT / params.deploy.registry_dir).alias()
    if version is None:
        raise SystemExit(f"nothing deployed in {PROJECT}: run `shrinkflow run` first")
    texts = read_parquet(PROJECT / "data/prepared/test.parquet")["text"].tolist()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    # Directly under /tmp: the postgres user must reach the cluster's directory.
    cluster = PgCluster(Path(tempfile.mkdtemp(prefix="shrinkflow-bench-pg-")))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SHRINKFLOW_API_TOKEN", None)
    runs = {}
    try:
        cluster.init()
        cluster.start()
        env.update(cluster.env())
        os.environ.update(cluster.env())    # this process reads the log too
        cluster.create_database("shrinkflow")

        sqlite_params = params_file("sqlite", log_url=None, log_path=str((WORK / "predictions.db").relative_to(PROJECT)))
        res, _ = run("one replica, SQLite", sqlite_params, 1, env, texts)
        log = prediction_log(PROJECT, load_params(sqlite_params).serve)
        res["rows_logged"] = log.count()
        res["logged_equals_ok"] = res["rows_logged"] == res["ok"]
        runs["one replica, SQLite log"] = res
        print(json.dumps(res), flush=True)

        for name, replicas in (("one replica, PostgreSQL log", 1), ("two replicas, one PostgreSQL log", 2)):
            url = cluster.create_schema("shrinkflow", f"bench_{replicas}")
            pg_params = params_file(f"pg{replicas}", log_url=url)
            res, ids = run(name, pg_params, replicas, env, texts)
            serve = load_params(pg_params).serve
            log = prediction_log(PROJECT, serve)
            logged = set(log.window()["prediction_id"])
            log.close()
            answered = set().union(*ids)
            res["rows_logged"] = len(logged)
            res["logged_equals_ok"] = logged == answered and len(answered) == res["ok"]
            res["answered_not_logged"] = len(answered - logged)
            res["logged_not_answered"] = len(logged - answered)
            runs[name] = res
            print(json.dumps(res), flush=True)
        # The monitor on the combined window of both replicas.
        monitor_params = load_params(pg_params)
        window = read_window(PROJECT, monitor_params)
        in_window = set(window["prediction_id"])
        from datetime import datetime, timezone

        now = datetime.now(timezone.utc)
        summary, report_dir = build_reports(PROJECT, monitor_params, window, now)
        decision = decide_and_record(summary, monitor_params, report_dir, WORK / "decisions.jsonl", now, "bench",
                                     act=False)
        monitor = {"window_rows": len(window), "window_last_n": monitor_params.monitor.window_last_n,
                   "rows_by_replica": [len(in_window & s) for s in ids], "verdict": decision.action,
                   "summary_window_rows": summary.window.rows}
        print(json.dumps(monitor), flush=True)
    finally:
        cluster.destroy()

    one_sqlite, one_pg, two_pg = runs.values()
    doc = {"when": now_utc(), "cpu": cpu_model(), "model_version": version, "concurrency": CONCURRENCY,
           "duration_s": DURATION_S, "client": "aiohttp", "serve_threads": params.serve.threads,
           "postgresql": "throwaway cluster on loopback (shrinkflow.pgcluster), fsync on", "runs": runs,
           "monitor_on_combined_window": monitor,
           "rps_one_pg_vs_one_sqlite": round(one_pg["requests_per_s"] / one_sqlite["requests_per_s"], 2),
           "rps_two_pg_vs_one_sqlite": round(two_pg["requests_per_s"] / one_sqlite["requests_per_s"], 2)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "serving_replicas.json").write_text(json.dumps(doc, indent=2) + "\n")
    rows = [f"| {n} | {r['requests_per_s']} | {r['latency_ms_p50']} | {r['latency_ms_p95']} | {r['latency_ms_p99']} | "
            f"{', '.join(f'{k}: {v}' for k, v in sorted(r['status_counts'].items()))} | {r['fivexx']} | "
            f"{r['rows_logged']} | {r['logged_equals_ok']} |" for n, r in runs.items()]
    md = ["# Serving replicas on one PostgreSQL prediction log", "",
          f"Measured {doc['when']} on this project's 2-core machine ({doc['cpu']}) with "
          "`bench/serving_replicas.py`. Real `shrinkflow serve` processes serve production "
          f"{version} (`serve.threads` = {doc['serve_threads']}); {CONCURRENCY} concurrent aiohttp clients on "
          f"loopback, one text per request, {DURATION_S:.0f} s per run, one run after the other. PostgreSQL: "
          f"{doc['postgresql']}, a fresh schema per run. With two replicas, client k talks to replica k mod 2. "
          "The client, PostgreSQL and the replicas share the two cores: two replicas here show that one log "
          "serves both without loss, not how replicas on separate hosts scale.", "",
          "| run | req/s | p50 ms | p95 ms | p99 ms | status codes | 5xx | rows logged | logged = answered |",
          "|---|---|---|---|---|---|---|---|---|", *rows, "",
          f"- one replica on PostgreSQL vs one on SQLite: **{doc['rps_one_pg_vs_one_sqlite']}x** the requests "
          f"per second; two replicas on one PostgreSQL log vs one on SQLite: **{doc['rps_two_pg_vs_one_sqlite']}x**.",
          f"- two replicas: answered {two_pg['answered_by_replica']} predictions (replica 1, replica 2); every id "
          f"answered 200 is in the log and no other: {two_pg['logged_equals_ok']} "
          f"({two_pg['answered_not_logged']} answered but not logged, {two_pg['logged_not_answered']} logged but "
          "not answered).",
          "- the machine's 1-minute load average before and after each run (the load client and servers "
          "add about 2): " + "; ".join(f"{n} {r['loadavg_1min_before_after']}" for n, r in runs.items()) + ".",
          f"- the monitor (`monitoring.run.read_window` through serve.log_url) read the combined window: "
          f"{monitor['window_rows']} rows (window_last_n {monitor['window_last_n']}), "
          f"{monitor['rows_by_replica']} of them answered by each replica; its reports and verdict "
          f"({monitor['verdict']}) were built on it.", ""]
    (OUT / "serving_replicas.md").write_text("\n".join(md))
    print("\n".join(md))
    section = ["## Replicas on one PostgreSQL prediction log", "",
               f"From `bench/serving_replicas.py` ({doc['when']}; the whole record: "
               "[serving_replicas.md](serving_replicas.md)): real `shrinkflow serve` processes serving "
               f"{version}, {CONCURRENCY} aiohttp clients for {DURATION_S:.0f} s per run, the runs one after the "
               "other on this 2-core machine (clients, PostgreSQL and replicas share the cores).", "",
               "| run | req/s | vs one replica on SQLite | p95 ms | 5xx | logged = answered | load avg before/after |",
               "|---|---|---|---|---|---|---|",
               *[f"| {n} | {r['requests_per_s']} | "
                 f"{round(r['requests_per_s'] / one_sqlite['requests_per_s'], 2)}x | {r['latency_ms_p95']} | "
                 f"{r['fivexx']} | {r['logged_equals_ok']} | {r['loadavg_1min_before_after']} |"
                 for n, r in runs.items()], ""]
    write_section(OUT / "serving.md", "\n".join(section))


BEGIN, END = "<!-- serving_replicas.py: begin -->", "<!-- serving_replicas.py: end -->"


def write_section(path: Path, text: str) -> None:
    """Put ``text`` between BEGIN and END in ``path`` (appended, with the
    markers, the first time); the rest of the file (bench/serving.py's) is
    kept."""
    doc = path.read_text() if path.is_file() else ""
    block = f"{BEGIN}\n{text}\n{END}\n"
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):].lstrip("\n")
    else:
        doc = doc.rstrip("\n") + "\n\n" + block
    path.write_text(doc)


if __name__ == "__main__":
    main()
