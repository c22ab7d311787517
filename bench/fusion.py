"""What do ONNX Runtime's transformer fusions give here?

Builds the kept teacher (models/teacher) four ways, fp32 and dynamic int8,
each without and with ``compress.fuse_transformer_ops`` (SkipLayerNormalization
+ BiasGelu; see shrinkflow.compress.export.fuse_transformer_graph), and times
all four interleaved in one run (validate's method), with val accuracy.
Writes bench/results/fusion.{md,json}.

    .venv/bin/python bench/fusion.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from _common import RESULTS, ROOT, stamp

KEYS = ("latency_ms_p50_b1", "latency_ms_p95_b1", "latency_ms_p50_b32", "latency_ms_p95_b32",
        "cpu_ms_per_prediction_b1", "cpu_ms_per_prediction_b32", "size_mb")


def main() -> None:
    from shrinkflow.splits import read_parquet

    from shrinkflow.compress import apply_recipe
    from shrinkflow.config import Candidate, LatencyParams, QuantizeStep
    from shrinkflow.evaluate import measure_interleaved
    from shrinkflow.modeling import read_manifest
    from shrinkflow.paths import TEACHER, split_path

    train = read_parquet(ROOT / split_path("train"))["text"].tolist()
    val = read_parquet(ROOT / split_path("val"))
    lat = LatencyParams(threads=2, warmup_iters=20, iters_b1=400, iters_b32=20, rounds=20)
    with tempfile.TemporaryDirectory(prefix="shrinkflow-fusion-") as tmp:
        models = {}
        for fuse in (False, True):
            for name, recipe in (("fp32", ()), ("int8", (QuantizeStep(),))):
                label = f"{name}{' fused' if fuse else ''}"
                models[label] = apply_recipe(ROOT / TEACHER, Candidate(name=name, recipe=recipe),
                                             Path(tmp) / label.replace(" ", "-"), train_texts=train,
                                             progress=False, fuse=fuse)
        ops = {n: read_manifest(p)["stats"].get("fused_ops") for n, p in models.items()}
        runs = measure_interleaved(models, {"val": val["text"].tolist()}, val["text"].tolist(), lat)
    y = val["label"].tolist()
    rows = {n: {"accuracy_val": sum(int(a == b) for a, b in zip(r["predictions"]["val"], y)) / len(y),
                **{k: r["performance"][k] for k in KEYS}, "fused_ops": ops[n]} for n, r in runs.items()}
    doc = {**stamp(), "latency": lat.model_dump(), "models": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fusion.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# ONNX Runtime transformer fusions on the kept teacher", "",
             f"Measured {doc['measured_at']} ({doc['machine']}), 2 threads, all four models timed interleaved in "
             f"one run ({lat.iters_b1} batch-1 calls and {lat.iters_b32} batches of 32 each, {lat.rounds} rounds).",
             "", "| model | val acc | p50 b1 ms | p95 b1 ms | p50 b32 ms | p95 b32 ms | CPU ms/pred b1 | "
             "CPU ms/pred b32 | MB | fused ops |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        fused = ", ".join(f"{k} {v}" for k, v in (r["fused_ops"] or {}).items()) or "none"
        lines.append(f"| {n} | {r['accuracy_val']:.4f} | " + " | ".join(
            f"{r[k]:.2f}" for k in KEYS[:-1]) + f" | {r['size_mb']:.1f} | {fused} |")
    for base in ("fp32", "int8"):
        a, b = rows[base], rows[f"{base} fused"]
        lines.append("")
        lines.append(f"- {base}: fused / unfused p50 b1 {b['latency_ms_p50_b1'] / a['latency_ms_p50_b1']:.3f}, "
                     f"p95 b1 {b['latency_ms_p95_b1'] / a['latency_ms_p95_b1']:.3f}, "
                     f"p50 b32 {b['latency_ms_p50_b32'] / a['latency_ms_p50_b32']:.3f} (below 1 = fusion faster)")
    (RESULTS / "fusion.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
