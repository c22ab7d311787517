"""What starting every measuring process at once saves validate.

``shrinkflow.evaluate.measure_interleaved`` runs each model in a spawned
process of its own. It now starts them all at once (their loads, mostly
imports, overlap) and asks them all to stop before it joins any; before, it
started one, waited for its load, and so on, and stopped them one by one.
Side by side in one run, alternating which goes first: the whole
measurement (predictions on val, interleaved latency rounds, RSS) of the
kept teacher and every registry version of a deployed project, both ways.
The old way is the same code with each process waited for as it starts and
joined as it is stopped.

Writes bench/results/measure_start.{json,md}.

    .venv/bin/python bench/measure_start.py --project bench/work/monitor_speed/project
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import RESULTS, ROOT, stamp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, required=True, help="a project with models/teacher and a registry")
    ap.add_argument("--pairs", type=int, default=3, help="measurements each way")
    ap.add_argument("--val-rows", type=int, default=200)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import shrinkflow.evaluate as ev
    from shrinkflow.config import LatencyParams
    from shrinkflow.splits import read_parquet

    project = args.project.resolve()
    models = {"teacher": project / "models/teacher",
              **{v.name: v / "model" for v in sorted((project / "registry/versions").iterdir())}}
    val = read_parquet(project / "data/prepared/val.parquet")["text"].tolist()[:args.val_rows]
    lat = LatencyParams(threads=1, warmup_iters=1, iters_b1=5, iters_b32=3, rounds=2)
    new = (ev.ModelProcess.__init__, ev.ModelProcess.stop, ev.ModelProcess.close)

    def one_at_a_time_init(self, model_dir, threads, wait=True):
        new[0](self, model_dir, threads, wait=True)

    def no_early_stop(self):
        pass

    def stop_and_join(self):
        new[1](self)
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()

    ways = {"at once": new, "one at a time": (one_at_a_time_init, no_early_stop, stop_and_join)}
    seconds = {w: [] for w in ways}
    for i in range(args.pairs):
        for way in (list(ways) if i % 2 == 0 else list(ways)[::-1]):
            ev.ModelProcess.__init__, ev.ModelProcess.stop, ev.ModelProcess.close = ways[way]
            t0 = time.perf_counter()
            ev.measure_interleaved(models, {"val": val}, val, lat, log=lambda m: None)
            seconds[way].append(round(time.perf_counter() - t0, 2))
            print(way, seconds[way][-1], flush=True)
    ev.ModelProcess.__init__, ev.ModelProcess.stop, ev.ModelProcess.close = new
    doc = {**stamp(), "project": str(args.project), "models": list(models), "val_rows": len(val),
           "latency": lat.model_dump(), "seconds": seconds,
           "median_s": {w: statistics.median(s) for w, s in seconds.items()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "measure_start.json").write_text(json.dumps(doc, indent=2) + "\n")
    m = doc["median_s"]
    md = ["# Starting the measuring processes at once", "",
          f"Measured {doc['measured_at']} on {doc['machine']} by `bench/measure_start.py`: "
          f"`measure_interleaved` on {len(models)} models ({', '.join(models)}) of `{args.project}`, "
          f"{len(val)} val texts, latency {lat.iters_b1} x {lat.rounds} rounds at batch 1; "
          f"{args.pairs} measurements each way, alternating which goes first. Wall seconds:", "",
          "| processes | runs (s) | median (s) |", "|---|---|---|"]
    md += [f"| {w} | {', '.join(map(str, s))} | {m[w]} |" for w, s in seconds.items()]
    md += ["", f"At once saves {m['one at a time'] - m['at once']:.2f} s a measurement "
               f"({(m['one at a time'] - m['at once']) / m['one at a time']:.0%})."]
    (RESULTS / "measure_start.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
