"""Where between a quiet machine and a busy one do validate's latency
figures stop holding, and does disk I/O count?

``max_timing_other_cpu_share`` (0.25 of the CPUs validate may run on: half a
core on 2 cores) refuses every candidate on a timing during which other
processes took more than that. It was set between quiet timings (0.2-1.1%
of the machine) and busy ones (32-55%: bench/results/retime_busy.md), with
nothing measured between. This script times the monitoring benchmark's five
models as validate does on a re-compression (``bench/slowdown_spread.py``:
the fp32 teacher, the int8 teacher, a byte-for-byte copy of production, the
re-distilled student, production), timed once (``retimes_when_busy: 0``),
while a steady load runs throughout, alternating:

- ``quiet``;
- ``1 process at 25% / 50% / 75% duty``: one process that spins for that
  share of every 20 ms and sleeps the rest (about 0.25 / 0.5 / 0.75 cores,
  in bursts, as a server's request handling or a log shipper loads a core);
- ``2 processes at 50% duty`` (about a core, spread over both);
- ``disk writer``: a process that writes 8 MB blocks and fsyncs each, over
  and over (a DVC push, a checkpoint save): iowait, which ``cpuload`` does
  not count as busy, and the kernel's own writeback;
- ``quiet, 1 thread`` and ``1 process at 25% duty, 1 thread``: the models
  run 1 thread each in place of 2, so the wait share's threshold is seen at
  another thread count.

For each run it records the slowdown against production that the
``max_p95_b1_slowdown_vs_production`` gate reads (``slowdowns(...)["direct"]``;
the copy's true value is 0, the int8 teacher's about +0.9), the teacher's
and production's p95 at batch 1, and the share of the CPUs others took as
validate measured it (``timing_other_cores`` / ``timing_cpus``, the figure
the gate reads) and the share of the time the timed threads were ready to
run but waiting for a CPU (``timing_cpu_wait_share``: their run-queue delay
per second over the threads, the figure ``max_timing_cpu_wait_share``
reads).

Results: bench/results/load_levels.{md,json}. Needs bench/monitoring.py's
work folder (bench/work/monitoring).

    PYTHONPATH=bench:. .venv/bin/python bench/load_levels.py [--repeats 3]
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

from _common import RESULTS, stamp
from slowdown_spread import CANDIDATES, GATE, slowdowns, validate_models

from shrinkflow.config import Gates

PERIOD_S = 0.020
ARMS = {   # name: ((processes, duty cycle) or "disk", the models' threads)
    "quiet": ((0, 0.0), 2),
    "1 process at 25% duty": ((1, 0.25), 2),
    "1 process at 50% duty": ((1, 0.5), 2),
    "1 process at 75% duty": ((1, 0.75), 2),
    "2 processes at 50% duty": ((2, 0.5), 2),
    "disk writer": ("disk", 2),
    "quiet, 1 thread": ((0, 0.0), 1),
    "1 process at 25% duty, 1 thread": ((1, 0.25), 1),
}
SHARE_GATE = Gates().max_timing_other_cpu_share
WAIT_GATE = Gates().max_timing_cpu_wait_share


def _duty(share: float) -> None:
    """Spin for ``share`` of every PERIOD_S, sleep the rest, until killed."""
    while True:
        start = time.perf_counter()
        while time.perf_counter() - start < share * PERIOD_S:
            pass
        time.sleep(max(0.0, PERIOD_S - (time.perf_counter() - start)))


def _disk(folder: str) -> None:
    """Write 8 MB blocks to a file in ``folder`` and fsync each, until killed."""
    block = os.urandom(8 << 20)
    path = os.path.join(folder, "load.bin")
    while True:
        with open(path, "wb") as f:
            for _ in range(8):
                f.write(block)
                f.flush()
                os.fsync(f.fileno())


def report() -> None:
    """``--report``: the last run's records re-counted at this code's gates."""
    from shrinkflow.config import LatencyParams

    doc = json.loads((RESULTS / "load_levels.json").read_text())
    run_doc = json.loads((RESULTS / "monitoring.json").read_text())
    first = doc.get("first") or run_doc["recompress"]["deployed_before"]
    retrained = doc.get("retrained") or run_doc["retrain"]["deployed_after"]
    measured = {k: doc[k] for k in stamp() if k in doc}
    write_report(doc["records"], LatencyParams(**doc["latency"]), first, retrained, measured,
                 reported=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def main() -> None:
    from shrinkflow.evaluate import measure_interleaved

    if "--report" in sys.argv:
        return report()

    repeats = int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 3
    records = []
    with validate_models() as (base, texts, first, retrained, models), tempfile.TemporaryDirectory() as tmp:
        lat = base.model_copy(update={"retimes_when_busy": 0})
        for i in range(repeats):
            for arm, (load, threads) in ARMS.items():
                procs = ([multiprocessing.Process(target=_disk, args=(tmp,), daemon=True)] if load == "disk" else
                         [multiprocessing.Process(target=_duty, args=(load[1],), daemon=True)
                          for _ in range(load[0])])
                for p in procs:
                    p.start()
                try:
                    run = measure_interleaved(models, {}, texts, lat.model_copy(update={"threads": threads}),
                                              log=lambda m: None)
                finally:
                    for p in procs:
                        p.terminate()
                        p.join()
                perf = run["production"]["performance"]
                other, cpus = perf.get("timing_other_cores"), perf.get("timing_cpus")
                rec = {"arm": arm, "repeat": i + 1, "threads": threads,
                       "slowdown": {n: slowdowns(run, n)["direct"] for n in CANDIDATES},
                       "production_p95_b1_ms": perf["latency_ms_p95_b1"],
                       "teacher_p95_b1_ms": run["teacher"]["performance"]["latency_ms_p95_b1"],
                       "other_cores": other, "cpus": cpus, "cpu_wait_share": perf.get("timing_cpu_wait_share"),
                       "other_share": None if other is None or not cpus else round(other / cpus, 4)}
                records.append(rec)
                print(json.dumps(rec), flush=True)
    write_report(records, lat, first, retrained, stamp())


def write_report(records: list[dict], lat, first: str, retrained: str, measured: dict,
                 reported: str | None = None) -> None:
    """Summarise ``records`` per load and write load_levels.json and .md, the refusals
    counted at this code's gates; ``measured``: the stamp of the run that measured
    them; ``reported``: when ``--report`` re-counted them (None: just measured)."""
    summary = {}
    for arm in ARMS:
        rs = [r for r in records if r["arm"] == arm]
        shares = [r["other_share"] for r in rs if r["other_share"] is not None]
        waits = [r["cpu_wait_share"] for r in rs if r["cpu_wait_share"] is not None]
        summary[arm] = {"n": len(rs), "other_share_min": min(shares, default=None),
                        "other_share_max": max(shares, default=None),
                        "gate_refuses": sum(s > SHARE_GATE for s in shares),
                        "cpu_wait_share_min": min(waits, default=None), "cpu_wait_share_max": max(waits, default=None),
                        "wait_gate_refuses": sum(w > WAIT_GATE for w in waits),
                        "either_gate_refuses": sum(r["other_share"] is not None and r["other_share"] > SHARE_GATE
                                                   or r["cpu_wait_share"] is not None
                                                   and r["cpu_wait_share"] > WAIT_GATE for r in rs),
                        "teacher_p95_b1_ms": statistics.median(r["teacher_p95_b1_ms"] for r in rs),
                        "production_p95_b1_ms": statistics.median(r["production_p95_b1_ms"] for r in rs),
                        **{n: {"min": min(r["slowdown"][n] for r in rs), "max": max(r["slowdown"][n] for r in rs),
                               "refused": sum(r["slowdown"][n] > GATE for r in rs)} for n in CANDIDATES}}
    doc = {**measured, "latency": lat.model_dump(), "gate": GATE, "share_gate": SHARE_GATE, "wait_gate": WAIT_GATE,
           "first": first, "retrained": retrained, "records": records, "summary": summary}
    if reported:
        doc["reported_at"] = reported
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "load_levels.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Validate's timing under steady loads between quiet and busy", "",
             f"Measured {doc['measured_at']} ({doc['machine']}). Each row: `measure_interleaved` on the five models "
             f"of `bench/slowdown_spread.py` (the fp32 teacher, the int8 teacher {retrained}, a byte-for-byte copy "
             f"of production {first}, the re-distilled student, production), {lat.iters_b1} batch-1 calls per "
             f"model in {lat.rounds} rounds, {lat.threads} threads (1 where the load says so), timed once "
             "(`retimes_when_busy: 0`), while the "
             f"load runs throughout. Duty: a process spinning for that share of every {PERIOD_S * 1000:.0f} ms. "
             "Disk writer: 8 MB blocks written and fsynced in a loop. Others' share: the share of the CPUs other "
             f"processes took as validate measured it, the figure `max_timing_other_cpu_share` ({SHARE_GATE}) "
             f"reads. Waited: the share of the time the timed threads were ready to run but waiting for a CPU "
             f"(`timing_cpu_wait_share`: their run-queue delay per second over the threads), the figure "
             f"`max_timing_cpu_wait_share` ({WAIT_GATE}) reads. Slowdown: the `max_p95_b1_slowdown_vs_production` "
             f"gate's figure (candidate p95 over production's round by round, median, minus 1; the copy's true value "
             f"0, the int8 teacher's about +0.9); refused above {GATE:.2f}."
             + (f" Refusals counted at this code's gates by `--report` ({reported}) from the records measured then."
                if reported else ""), "",
             "| load | runs | others' share [min, max] | refused by the share gate | waited [min, max] | "
             "refused by the wait gate | refused by either | teacher p95 b1 ms | production p95 b1 ms | "
             + " | ".join(f"{n}: [min, max], refused" for n in CANDIDATES) + " |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(CANDIDATES)]
    for arm, s in summary.items():
        share = ("n/a" if s["other_share_min"] is None else
                 f"[{s['other_share_min']:.1%}, {s['other_share_max']:.1%}]")
        wait = ("n/a" if s["cpu_wait_share_min"] is None else
                f"[{s['cpu_wait_share_min']:.1%}, {s['cpu_wait_share_max']:.1%}]")
        lines.append(f"| {arm} | {s['n']} | {share} | {s['gate_refuses']}/{s['n']} | {wait} | "
                     f"{s['wait_gate_refuses']}/{s['n']} | {s['either_gate_refuses']}/{s['n']} | "
                     f"{s['teacher_p95_b1_ms']:.3g} | "
                     f"{s['production_p95_b1_ms']:.3g} | " + " | ".join(
                         f"[{s[n]['min']:+.3f}, {s[n]['max']:+.3f}], {s[n]['refused']}/{s['n']}" for n in CANDIDATES)
                     + " |")
    lines += ["", "Per run:", "", "| load | # | others' share | waited | teacher p95 b1 ms | "
              + " | ".join(CANDIDATES) + " |", "|---|---|---|---|---|" + "---|" * len(CANDIDATES)]
    for r in records:
        share = "n/a" if r["other_share"] is None else f"{r['other_share']:.1%}"
        wait = "n/a" if r["cpu_wait_share"] is None else f"{r['cpu_wait_share']:.1%}"
        lines.append(f"| {r['arm']} | {r['repeat']} | {share} | {wait} | {r['teacher_p95_b1_ms']:.3g} | "
                     + " | ".join(f"{r['slowdown'][n]:+.3f}" for n in CANDIDATES) + " |")
    (RESULTS / "load_levels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))



if __name__ == "__main__":
    main()
