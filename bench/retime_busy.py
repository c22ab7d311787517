"""Does timing again on a busy machine keep a burst of load out of the
latency gates?

validate times the teacher and every candidate together; when other
processes take more than a quarter core meanwhile (``shrinkflow.cpuload``),
it waits ``validate.latency.busy_retime_wait_s`` and times them all again,
up to ``retimes_when_busy`` times, and keeps the quietest timing
(``shrinkflow.evaluate.measure_interleaved``). This script measures what
that buys on the monitoring benchmark's models, as validate times them on a
re-compression (bench/slowdown_spread.py: the fp32 teacher, the int8
teacher, a byte-for-byte copy of production, the re-distilled student,
production last), three ways, alternating:

- ``burst, timed once`` (``retimes_when_busy: 0``): two processes spin a
  core each from the moment timing starts, for as long as one quiet timing
  takes (another job's burst: a compress, a test run);
- ``burst, retimed`` (``retimes_when_busy: 1``, the default wait): the same
  burst;
- ``sustained, retimed``: the spinners never stop (a shared server): timing
  again cannot help, and the gates' notes say so
  (``shrinkflow.gates.busy_timing_note``).

For each it records the slowdown against production that the
``max_p95_b1_slowdown_vs_production`` gate reads (candidate p95 over
production's within each round, the median over rounds, minus 1), how many
timings there were, and the cores other processes took during the one kept.
The copy's true slowdown is 0; the int8 teacher's about 0.9.

Results: bench/results/retime_busy.{md,json}. Needs bench/monitoring.py's
work folder (bench/work/monitoring).

    PYTHONPATH=bench:. .venv/bin/python bench/retime_busy.py [--repeats 5] [--sustained 3]
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import sys
import threading
import time

from _common import RESULTS, stamp
from slowdown_spread import CANDIDATES, GATE, _spin, slowdowns, validate_models

ARMS = ("burst, timed once", "burst, retimed", "sustained, retimed")


class Burst:
    """Two spinning processes, started when validate's log says the timing
    starts, stopped ``seconds`` later (None: only when ``stop`` is called)."""

    def __init__(self, seconds: float | None):
        self.seconds, self.procs, self.lock, self.timer = seconds, [], threading.Lock(), None

    def log(self, msg: str) -> None:
        if msg.startswith("measure: timing ") and self.timer is None and not self.procs:
            with self.lock:
                self.procs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(2)]
                for p in self.procs:
                    p.start()
            if self.seconds is not None:
                self.timer = threading.Timer(self.seconds, self.stop)
                self.timer.start()

    def stop(self) -> None:
        with self.lock:
            for p in self.procs:
                p.terminate()
                p.join()
            self.procs = []


def main() -> None:
    from shrinkflow.evaluate import measure_interleaved

    repeats = int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 5
    sustained = int(sys.argv[sys.argv.index("--sustained") + 1]) if "--sustained" in sys.argv else 3
    records = []
    with validate_models() as (base, texts, first, retrained, models):

        def measure(lat, log):
            t0 = time.monotonic()
            return measure_interleaved(models, {}, texts, lat, log=log), time.monotonic() - t0

        def direct(run):
            return {n: slowdowns(run, n)["direct"] for n in CANDIDATES}

        # one quiet timing first: how long a burst lasts (as long as one timing)
        quiet_lat = base.model_copy(update={"retimes_when_busy": 0})
        t_start = {}
        run, _ = measure(quiet_lat, lambda m: t_start.setdefault("t", time.monotonic())
                         if m.startswith("measure: timing ") else None)
        timing_s = round(time.monotonic() - t_start["t"], 1)
        quiet = {"slowdown": direct(run),
                 "other_cores": run["production"]["performance"].get("timing_other_cores")}
        print(f"quiet: one timing {timing_s} s; {quiet}", flush=True)
        plan = [a for _ in range(repeats) for a in ARMS[:2]] + [ARMS[2]] * sustained
        for i, arm in enumerate(plan):
            lat = base.model_copy(update={"retimes_when_busy": 0 if arm == ARMS[0] else 1})
            burst = Burst(None if arm == ARMS[2] else timing_s)
            try:
                run, wall = measure(lat, burst.log)
            finally:
                if burst.timer is not None:
                    burst.timer.cancel()
                burst.stop()
            perf = run["production"]["performance"]
            rec = {"arm": arm, "slowdown": direct(run),
                   "timing_attempts": perf["timing_attempts"], "other_cores": perf.get("timing_other_cores"),
                   "wall_s": round(wall, 1)}
            records.append(rec)
            print(f"{i + 1}/{len(plan)} {json.dumps(rec)}", flush=True)
    summary = {}
    for arm in ARMS:
        rs = [r for r in records if r["arm"] == arm]
        if not rs:
            continue
        summary[arm] = {"n": len(rs), "median_wall_s": statistics.median(r["wall_s"] for r in rs),
                        "median_other_cores": statistics.median(r["other_cores"] or 0 for r in rs),
                        "retimed": sum(r["timing_attempts"] > 1 for r in rs),
                        **{n: {"median": statistics.median(r["slowdown"][n] for r in rs),
                               "min": min(r["slowdown"][n] for r in rs), "max": max(r["slowdown"][n] for r in rs),
                               "refused": sum(r["slowdown"][n] > GATE for r in rs)} for n in CANDIDATES}}
    doc = {**stamp(), "latency": base.model_dump(), "one_timing_s": timing_s, "quiet": quiet, "gate": GATE,
           "records": records, "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "retime_busy.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Timing again on a busy machine", "",
             f"Measured {doc['measured_at']} ({doc['machine']}). Each row is one `measure_interleaved` call with "
             f"the five models of `bench/slowdown_spread.py` alive (the fp32 teacher, the int8 teacher "
             f"{retrained}, a byte-for-byte copy of production {first}, the re-distilled student, production), "
             f"in validate's order, {base.iters_b1} batch-1 calls per model in {base.rounds} rounds. A burst: two "
             f"processes spin a core each from the moment timing starts, for {timing_s} s (one quiet timing). "
             f"Retimed: `retimes_when_busy: 1`, waiting {base.busy_retime_wait_s:g} s. Sustained: the spinners "
             f"never stop. Slowdown: the `max_p95_b1_slowdown_vs_production` gate's figure (candidate p95 over "
             f"production's round by round, median, minus 1); refused at {GATE:.2f}.", "",
             f"Quiet, before: copy {quiet['slowdown']['production-copy']:+.3f}, re-distilled "
             f"{quiet['slowdown']['redistilled']:+.3f}, int8 teacher {quiet['slowdown']['int8-teacher']:+.3f}; "
             f"others took {quiet['other_cores']} cores.", "",
             "| arm | runs | retimed | others' cores (median, timing kept) | wall s (median) | "
             + " | ".join(f"{n}: median [min, max], refused" for n in CANDIDATES) + " |",
             "|---|---|---|---|---|" + "---|" * len(CANDIDATES)]
    for arm, s in summary.items():
        lines.append(f"| {arm} | {s['n']} | {s['retimed']}/{s['n']} | {s['median_other_cores']:.2f} | "
                     f"{s['median_wall_s']:.0f} | " + " | ".join(
                         f"{s[n]['median']:+.3f} [{s[n]['min']:+.3f}, {s[n]['max']:+.3f}], {s[n]['refused']}/{s['n']}"
                         for n in CANDIDATES) + " |")
    lines += ["", "Per run:", "", "| # | arm | timings | others' cores | wall s | "
              + " | ".join(CANDIDATES) + " |", "|---|---|---|---|---|" + "---|" * len(CANDIDATES)]
    for i, r in enumerate(records):
        lines.append(f"| {i + 1} | {r['arm']} | {r['timing_attempts']} | {r['other_cores']} | {r['wall_s']} | "
                     + " | ".join(f"{r['slowdown'][n]:+.3f}" for n in CANDIDATES) + " |")
    (RESULTS / "retime_busy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
