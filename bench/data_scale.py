"""How the data stage scales: a 1,000,000-row CSV of short texts.

Generates a seeded CSV of 1,000,000 short texts (5-20 words from a 4,000-word
made-up vocabulary, 5 classes with class-specific words, 1% exact
duplicates, 0.1% empty texts), then runs the data stage's library work on
its first 100,000 rows and on all of it, each in a fresh child process:
``shrinkflow.data.prepare_raw`` (read, clean, label, split, contract, class
counts, the share of texts the teacher's tokenizer truncates at 64) and the
parquet writes the stage then does. Wall and CPU time per phase and the
child's peak RSS (VmHWM: Linux carries ru_maxrss across exec, so the parent's
peak would leak into a spawned child's) go to bench/results/data_scale.md
and .json.

    python bench/data_scale.py             # 100k and 1M rows
    python bench/data_scale.py --rows 100000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "data_scale"
RESULTS = ROOT / "bench" / "results"
CLASSES = ("billing", "delivery", "login", "outage", "refund")
TOTAL_ROWS = 1_000_000


def vocabulary(n: int, seed: int) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "gu", "ban", "tel", "mor", "vin", "sha",
                 "qu", "ex", "il", "on", "ar"]
    words: set[str] = set()
    while len(words) < n:
        k = int(rng.integers(1, 4))
        words.add("".join(syllables[i] for i in rng.integers(0, len(syllables), k)))
    return sorted(words)


def generate(path: Path, rows: int, seed: int = 0) -> Path:
    """A CSV (text,label) of ``rows`` seeded short texts; see the module doc."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    vocab = np.array(vocabulary(4000, seed))
    labels = rng.integers(0, len(CLASSES), rows)
    lengths = rng.integers(5, 21, rows)
    # Each class draws a third of its words from its own 200-word slice.
    common = rng.integers(0, len(vocab), (rows, 20))
    own = (labels[:, None] * 200 + rng.integers(0, 200, (rows, 20))) % len(vocab)
    words = np.where(rng.random((rows, 20)) < 1 / 3, own, common)
    texts = [" ".join(vocab[w[:n]]) for w, n in zip(words, lengths)]
    dup = rng.choice(rows, rows // 100, replace=False)
    src = rng.choice(rows, rows // 100, replace=False)
    for d, s in zip(dup, src):
        texts[d], labels[d] = texts[s], labels[s]
    for e in rng.choice(rows, rows // 1000, replace=False):
        texts[e] = ""
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"text": texts, "label": np.array(CLASSES)[labels]}).to_csv(path, index=False)
    return path


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(raw_dir: Path, out_dir: Path) -> dict:
    """The data stage's work on ``raw_dir``/train.csv, timed by phase."""
    import resource

    from shrinkflow.config import DataParams, FilesSource, PretrainedModel
    from shrinkflow.data import class_counts, prepare_files, truncated_shares
    from shrinkflow.bootstrap import configure_env
    from shrinkflow.labels import write_labels
    from shrinkflow.modeling import tokenizer_path

    configure_env(ROOT)  # as a stage runs: TOKENIZERS_PARALLELISM=false among others

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    params = DataParams(source=FilesSource(path="data/user/scale.csv"))
    phases = {}
    t0, c0 = time.perf_counter(), cpu()
    prepared = prepare_files(params.source, raw_dir, params)
    counts = class_counts(prepared.splits, prepared.labels)
    t1, c1 = time.perf_counter(), cpu()
    phases["read_clean_split_check"] = (t1 - t0, c1 - c0)
    shares = truncated_shares(prepared.splits, tokenizer_path(PretrainedModel()), 64)
    t2, c2 = time.perf_counter(), cpu()
    phases["truncated_share"] = (t2 - t1, c2 - c1)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, df in prepared.splits.items():
        df.to_parquet(out_dir / f"{name}.parquet", index=False)
    write_labels(out_dir / "labels.json", prepared.labels)
    t3, c3 = time.perf_counter(), cpu()
    phases["write_parquet"] = (t3 - t2, c3 - c2)
    return {"phases": {k: {"wall_s": round(w, 2), "cpu_s": round(c, 2)} for k, (w, c) in phases.items()},
            "wall_s": round(t3 - t0, 2), "cpu_s": round(c3 - c0, 2), "peak_rss_mb": round(vm_hwm_mb(), 1),
            "rows": {k: len(v) for k, v in prepared.splits.items()}, "cleaning": prepared.stats["cleaning"],
            "truncated_share": shares, "class_counts_train": counts["train"]}


def measure(rows: int, full_csv: Path) -> dict:
    raw = WORK / f"raw_{rows}"
    raw.mkdir(parents=True, exist_ok=True)
    train = raw / "train.csv"
    if not train.is_file():
        with open(full_csv, encoding="utf-8") as src, open(train, "w", encoding="utf-8") as dst:
            for i, line in enumerate(src):
                if i > rows:
                    break
                dst.write(line)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, "--child", str(raw), str(WORK / f"prepared_{rows}")],
                          env=env, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["csv_mb"] = round(train.stat().st_size / 1e6, 1)
    result["input_rows"] = rows
    return result


def report(results: list[dict], measured: float | None = None) -> str:
    from shrinkflow.lineage import cpu_model

    when = datetime.fromtimestamp(measured, timezone.utc) if measured else datetime.now(timezone.utc)

    lines = [
        "# Data stage at scale",
        "",
        f"`python bench/data_scale.py`, {when:%Y-%m-%d %H:%M} UTC, on {cpu_model()} "
        f"({os.cpu_count()} cores, shared with other work). One fresh process per size running "
        "`shrinkflow.data.prepare_files` (read the CSV, clean, label, stratified split, contract check, "
        "class counts), `truncated_shares` (the teacher's tokenizer over every split, single-threaded as "
        "the stage runs it; a split over 50,000 texts is measured on a seeded sample of 50,000, "
        "`shrinkflow.data.TRUNCATION_SAMPLE_ROWS`) and the parquet writes. The stage command adds its "
        "interpreter start and imports (about 2 s), and fetch a byte copy of the file. Seeded synthetic "
        "CSV: 5-20 made-up words per text (about 37 MiniLM tokens), 5 classes, 1% exact duplicates, "
        "0.1% empty texts.",
        "",
        "| rows | CSV MB | read+clean+split+check s | truncation share s | write s | total wall s | total CPU s "
        "| peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        p = r["phases"]
        lines.append(f"| {r['input_rows']:,} | {r['csv_mb']} | {p['read_clean_split_check']['wall_s']} | "
                     f"{p['truncated_share']['wall_s']} | {p['write_parquet']['wall_s']} | {r['wall_s']} | "
                     f"{r['cpu_s']} | {r['peak_rss_mb']} |")
    lines += ["", "Rows out and cleaning counts:", ""]
    for r in results:
        lines.append(f"- {r['input_rows']:,}: {r['rows']}; cleaning {r['cleaning']['train']}")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="*", default=[100_000, TOTAL_ROWS])
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite data_scale.md from data_scale.json without measuring")
    ap.add_argument("--child", nargs=2, metavar=("RAW_DIR", "OUT_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]))))
        return
    if args.report_only:
        (RESULTS / "data_scale.md").write_text(report(json.loads((RESULTS / "data_scale.json").read_text()),
                                                      measured=(RESULTS / "data_scale.json").stat().st_mtime))
        return
    full = WORK / "scale_1m.csv"
    if not full.is_file():
        t = time.perf_counter()
        generate(full, TOTAL_ROWS)
        print(f"generated {full} in {time.perf_counter() - t:.1f} s", flush=True)
    results = []
    for rows in args.rows:
        results.append(measure(rows, full))
        print(json.dumps(results[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_scale.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "data_scale.md").write_text(report(results))
    print((RESULTS / "data_scale.md").read_text())


if __name__ == "__main__":
    main()
