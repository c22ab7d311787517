"""What a cgroup CPU quota, and pinning to some CPUs, do to validate's timing.

On a team's server validate often runs in a container: ``docker --cpus`` or
a Kubernetes CPU limit gives it a CFS quota (so many CPU-microseconds per
100 ms period), and ``--cpuset-cpus`` pins it to some of the host's CPUs.
Neither shows in ``/proc/stat``'s whole-machine line, which is what
``shrinkflow.cpuload`` read before this benchmark:

- a quota: the models' threads can use up the quota inside a period and
  stop until the next one, on an otherwise idle machine. ``cpuload`` now
  reads the quota and the cgroup's ``nr_throttled`` / ``nr_periods``;
- pinning: other processes on the host's other CPUs were counted as load,
  and load on the pinned CPUs was diluted by the idle rest. ``cpuload`` now
  counts only the CPUs of the process's affinity (``/proc/stat``'s ``cpuN``
  lines).

It times the monitoring benchmark's five models as validate does on a
re-compression (``bench/slowdown_spread.py``: the fp32 teacher, the int8
teacher, a byte-for-byte copy of production, the re-distilled student,
production), with ``retimes_when_busy: 0`` (the raw timing), in these arms,
alternating:

- ``no quota, 2 threads`` (validate's default threads): the baseline;
- ``quota 2 cores, 2 threads``;
- ``quota 1 core, 2 threads``: more threads than the quota;
- ``quota 1 core, 1 thread``: threads within the quota;
- ``pinned to CPU 0, a spinner on CPU 1, 1 thread``: the load per-CPU
  counting sees (near 0) against the whole machine's (about a core).

The quota arms create a cgroup (v1 ``cpu`` controller or v2) and move this
process into it, so they need root and a writable cgroup mount; without one
they are left out and the results say so.

For each run it records the slowdown against production the
``max_p95_b1_slowdown_vs_production`` gate reads (``slowdowns(...)["direct"]``),
production's and the teacher's p95 at batch 1, the throttled share of the
quota's periods and the others' cores validate measured.

Results: bench/results/cpu_quota.{md,json}. Needs bench/monitoring.py's work
folder (bench/work/monitoring).

    PYTHONPATH=bench:. .venv/bin/python bench/cpu_quota.py [--repeats 3]
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import sys
import time

from _common import RESULTS, stamp
from slowdown_spread import CANDIDATES, GATE, _spin, slowdowns, validate_models

PERIOD_US = 100_000
ARMS = {   # name: (quota in cores or None, threads, pinned)
    "no quota, 2 threads": (None, 2, False),
    "quota 2 cores, 2 threads": (2.0, 2, False),
    "quota 1 core, 2 threads": (1.0, 2, False),
    "quota 1 core, 1 thread": (1.0, 1, False),
    "pinned to CPU 0, a spinner on CPU 1, 1 thread": (None, 1, True),
}


class Cgroup:
    """A child cgroup of this process's CPU cgroup (``shrinkflow.cpuload``),
    created for the benchmark; ``set_quota`` and ``enter`` / ``leave`` move
    this process (and the model processes it starts) in and out."""

    def __init__(self, name: str = "shrinkflow_bench_quota"):
        from shrinkflow.cpuload import cpu_cgroup

        found = cpu_cgroup()
        if found is None:
            raise OSError("no CPU cgroup mounted")
        self.version, self.parent = found.version, found.dirs[0]
        self.dir = self.parent / name
        self.dir.mkdir(exist_ok=True)          # PermissionError without root
        if self.version == 2 and not (self.dir / "cpu.max").exists():
            raise OSError(f"{self.dir}: the cpu controller is not enabled for it (cgroup.subtree_control)")

    def set_quota(self, cores: float | None) -> None:
        if self.version == 2:
            (self.dir / "cpu.max").write_text("max" if cores is None else f"{int(cores * PERIOD_US)} {PERIOD_US}")
        else:
            (self.dir / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.dir / "cpu.cfs_quota_us").write_text("-1" if cores is None else str(int(cores * PERIOD_US)))

    def enter(self) -> None:
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def leave(self) -> None:
        (self.parent / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        self.leave()
        time.sleep(0.5)
        try:
            self.dir.rmdir()
        except OSError:
            pass


def _pinned_spin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    _spin()


def main() -> None:
    from shrinkflow.cpuload import system_busy_s
    from shrinkflow.evaluate import measure_interleaved

    repeats = int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 3
    try:
        cgroup = Cgroup()
        why_no_quota = None
    except OSError as e:
        cgroup, why_no_quota = None, f"{type(e).__name__}: {e}"
        print(f"no quota arms: {why_no_quota}", flush=True)
    arms = [a for a, (q, _, _) in ARMS.items() if q is None or cgroup is not None]
    if len(os.sched_getaffinity(0)) < 2:
        arms = [a for a in arms if not ARMS[a][2]]
    all_cpus = os.sched_getaffinity(0)
    records = []
    try:
        with validate_models() as (base, texts, first, retrained, models):
            for i in range(repeats):
                for arm in arms:
                    quota, threads, pinned = ARMS[arm]
                    lat = base.model_copy(update={"retimes_when_busy": 0, "threads": threads})
                    spinner, whole = None, {}
                    if cgroup is not None:
                        cgroup.set_quota(quota)
                        cgroup.enter()
                    if pinned:
                        os.sched_setaffinity(0, {0})
                        spinner = multiprocessing.Process(target=_pinned_spin, args=(1,), daemon=True)
                        spinner.start()

                    def log(msg, whole=whole):
                        if msg.startswith("measure: timing "):   # the whole machine's busy time, from here
                            whole.update(busy=system_busy_s(), t=time.monotonic())

                    try:
                        run = measure_interleaved(models, {}, texts, lat, log=log)
                        whole_cores = None
                        if whole:
                            wall = time.monotonic() - whole["t"]
                            whole_cores = round((system_busy_s() - whole["busy"]) / wall, 3)
                    finally:
                        if spinner is not None:
                            spinner.terminate()
                            spinner.join()
                            os.sched_setaffinity(0, all_cpus)
                        if cgroup is not None:
                            cgroup.leave()
                    perf = run["production"]["performance"]
                    rec = {"arm": arm, "repeat": i + 1,
                           "slowdown": {n: slowdowns(run, n)["direct"] for n in CANDIDATES},
                           "production_p95_b1_ms": perf["latency_ms_p95_b1"],
                           "teacher_p95_b1_ms": run["teacher"]["performance"]["latency_ms_p95_b1"],
                           "other_cores": perf.get("timing_other_cores"), "cpus": perf.get("timing_cpus"),
                           "cpu_quota": perf.get("timing_cpu_quota"),
                           "throttled_share": perf.get("timing_throttled_share"),
                           "machine_busy_cores": whole_cores}
                    records.append(rec)
                    print(json.dumps(rec), flush=True)
    finally:
        if cgroup is not None:
            cgroup.remove()
    summary = {}
    for arm in arms:
        rs = [r for r in records if r["arm"] == arm]

        def med(key, rs=rs):
            values = [r[key] for r in rs if r[key] is not None]
            return statistics.median(values) if values else None
        summary[arm] = {"n": len(rs), **{k: med(k) for k in ("production_p95_b1_ms", "teacher_p95_b1_ms",
                                                              "other_cores", "throttled_share",
                                                              "machine_busy_cores")},
                        **{n: {"min": min(r["slowdown"][n] for r in rs), "max": max(r["slowdown"][n] for r in rs),
                               "refused": sum(r["slowdown"][n] > GATE for r in rs)} for n in CANDIDATES}}
    doc = {**stamp(), "latency": base.model_dump(), "gate": GATE, "no_quota_arms": why_no_quota,
           "cgroup_version": None if cgroup is None else cgroup.version, "records": records, "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu_quota.json").write_text(json.dumps(doc, indent=2) + "\n")
    write_markdown(doc, first, retrained)


def _f(x, fmt):
    return "n/a" if x is None else format(x, fmt)


def write_markdown(doc: dict, first: str, retrained: str) -> None:
    lat = doc["latency"]
    lines = ["# Timing in a cgroup with a CPU quota, and pinned to a CPU", "",
             f"Measured {doc['measured_at']} ({doc['machine']}), cgroup "
             f"{'v' + str(doc['cgroup_version']) if doc['cgroup_version'] else 'none'}. Each row: "
             f"`measure_interleaved` on the five models of `bench/slowdown_spread.py` (the fp32 teacher, the "
             f"int8 teacher {retrained}, a byte-for-byte copy of production {first}, the re-distilled student, "
             f"production), {lat['iters_b1']} batch-1 calls per model in {lat['rounds']} rounds, timed once "
             f"(`retimes_when_busy: 0`). Slowdown: the `max_p95_b1_slowdown_vs_production` gate's figure "
             f"(candidate p95 over production's round by round, median, minus 1); refused above {GATE:.2f}. "
             "Throttled: the share of the quota's 100 ms periods in which it ran out (`nr_throttled` / "
             "`nr_periods`), as validate records it (`timing_throttled_share`). Others' cores: as validate "
             "measures them, on the CPUs it may run on; machine's busy cores: every CPU, everything "
             "(validate's models included), over the same timing.", ""]
    if doc["no_quota_arms"]:
        lines += [f"No quota arms here: {doc['no_quota_arms']}.", ""]
    lines += ["| arm | runs | throttled (median) | production p95 b1 ms | teacher p95 b1 ms | others' cores "
              "(validate) | machine's busy cores | " + " | ".join(f"{n}: [min, max], refused" for n in CANDIDATES)
              + " |", "|---|---|---|---|---|---|---|" + "---|" * len(CANDIDATES)]
    for arm, s in doc["summary"].items():
        lines.append(f"| {arm} | {s['n']} | {_f(s['throttled_share'], '.1%')} | {_f(s['production_p95_b1_ms'], '.3g')}"
                     f" | {_f(s['teacher_p95_b1_ms'], '.3g')} | {_f(s['other_cores'], '.2f')} | "
                     f"{_f(s['machine_busy_cores'], '.2f')} | " + " | ".join(
                         f"[{s[n]['min']:+.3f}, {s[n]['max']:+.3f}], {s[n]['refused']}/{s['n']}" for n in CANDIDATES)
                     + " |")
    lines += ["", "Per run:", "", "| arm | # | throttled | production p95 b1 ms | others' cores | "
              + " | ".join(CANDIDATES) + " |", "|---|---|---|---|---|" + "---|" * len(CANDIDATES)]
    for r in doc["records"]:
        lines.append(f"| {r['arm']} | {r['repeat']} | {_f(r['throttled_share'], '.1%')} | "
                     f"{r['production_p95_b1_ms']:.3g} | {_f(r['other_cores'], '.2f')} | "
                     + " | ".join(f"{r['slowdown'][n]:+.3f}" for n in CANDIDATES) + " |")
    (RESULTS / "cpu_quota.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
