"""How much int8 quantization of the teacher costs, per tensor and per
channel, on the teachers the monitoring benchmark left (the kept teacher, and
the teacher retrained on production labels).

The retrain's fallback candidate is the retrained teacher in int8 (the
``int8`` candidate: ONNX Runtime dynamic quantization, one weight scale per
tensor by default). In the monitoring benchmark of 2026-12-04 14:46 it scored
0.76 points under its own fp32 on the movie test split, and 0.25 over it on
val; the kept teacher's int8 was 0.47 over its fp32 on test. This measures,
side by side in one run, each teacher exported to ONNX in fp32 and quantized
per tensor and per channel (``QuantizeStep.per_channel``), through validate's
own machinery (``shrinkflow.evaluate.measure_interleaved``: one process per
model, labels as served, a batch-dependent model one text per call, latency
in interleaved rounds): accuracy on val, test, the monitor's drift reference
(in domain, never trained on) and the recovery tweets (shifted, never sent as
traffic), p95 batch-1 latency and size.

The default student (params.yaml's distilled candidate) is measured the same way: its
recipe up to the quantize step (distill with the monitoring benchmark's
distill seed, cold, from the kept teacher; vocabulary pruning), exported to
ONNX fp32 once, then quantized per tensor and per channel (the way of its
quantize step, per tensor by default, is what was deployed as v0001: the
model is compared byte for byte with the registry's) and per channel.

    .venv/bin/python bench/monitoring.py --distill-seed 1   # leaves the teachers in bench/work/monitoring
    .venv/bin/python bench/int8_granularity.py

Writes bench/results/int8_granularity.{md,json}.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import RESULTS, ROOT, default_candidate, now_utc

WORK = ROOT / "bench" / "work" / "monitoring"
PROJECT = WORK / "project"
TEACHERS = {"teacher before": WORK / "teacher_before", "teacher after retrain": PROJECT / "models/teacher"}
FIRST_PRODUCTION = PROJECT / "registry/versions/v0001/model"


def build(teacher: Path, out: Path, max_seq_len: int, opset: int) -> dict[str, Path]:
    """``teacher`` (a HF model directory) as three served model directories
    under ``out``: ONNX fp32, int8 per tensor, int8 per channel."""
    from shrinkflow.compress.export import export_onnx
    from shrinkflow.compress.quantize import quantize_dynamic_onnx
    from shrinkflow.config import QuantizeStep
    from shrinkflow.modeling import TOKENIZER, load_torch_model, read_manifest, write_manifest

    labels = read_manifest(teacher)["labels"]
    fp32 = out / "model.fp32.onnx"
    export_onnx(load_torch_model(teacher), fp32, opset=opset)
    dirs = {}
    for name, step in (("fp32", None), ("int8 per tensor", QuantizeStep()),
                       ("int8 per channel", QuantizeStep(per_channel=True))):
        d = out / name.replace(" ", "-")
        d.mkdir()
        if step is None:
            shutil.copy(fp32, d / "model.onnx")
        else:
            quantize_dynamic_onnx(fp32, d / "model.onnx", step)
        shutil.copy(teacher / TOKENIZER, d / TOKENIZER)
        write_manifest(d, "onnx", max_seq_len, labels=labels)
        dirs[name] = d
    return dirs


def student_per_channel(params) -> bool:
    """Whether the default student's quantize step is per channel (its
    v0001 in the monitoring benchmark is then the per-channel build).
    Exits when the step is neither this script's per tensor nor per
    channel (embedding tables left fp32 or scaled per row)."""
    cand = default_candidate(params)   # the project's own params
    step = next(s for s in cand.recipe if s.method == "quantize")
    if not step.quantize_embeddings or step.embedding_scales != "tensor":
        sys.exit(f"the default student's quantize step ({step}) is not one this script builds: it quantizes the "
                 "embedding tables one scale per table")
    return step.per_channel


def build_student(teacher: Path, params, out: Path, seed: int | None) -> dict[str, Path]:
    """The default student (``params``' distilled candidate) of ``teacher``
    as three served model directories under ``out``: its recipe without the
    quantize step (cold; every distill step's seed ``seed`` when given) in
    ONNX fp32, then that model quantized per tensor and per channel."""
    from shrinkflow.compress.quantize import quantize_dynamic_onnx
    from shrinkflow.compress.recipe import apply_recipe
    from shrinkflow.splits import read_parquet

    cand = default_candidate(params)   # the project's own params
    steps = [s.model_copy(update={"seed": seed}) if s.method == "distill" and seed is not None else s
             for s in cand.recipe]
    quant = [s for s in steps if s.method == "quantize"]
    assert len(quant) == 1 and steps[-1] is quant[0], "the default student ends with one quantize step"
    train = read_parquet(PROJECT / "data/prepared/train.parquet")
    fp32 = apply_recipe(teacher, cand.model_copy(update={"name": f"{cand.name}-fp32", "recipe": tuple(steps[:-1])}),
                        out / "fp32", opset=params.compress.onnx_opset, train_texts=train["text"].tolist(),
                        train_labels=train["label"].to_numpy(), threads=params.train.threads, progress=False)
    dirs = {"fp32": fp32}
    for name, per_channel in (("int8 per tensor", False), ("int8 per channel", True)):
        d = out / name.replace(" ", "-")
        shutil.copytree(fp32, d)
        quantize_dynamic_onnx(fp32 / "model.onnx", d / "model.onnx",
                              quant[0].model_copy(update={"per_channel": per_channel}))
        dirs[name] = d
    return dirs


def main() -> None:
    from shrinkflow.config import load_params
    from shrinkflow.evaluate import measure_interleaved
    from shrinkflow.splits import read_parquet
    from shrinkflow.traffic import shifted_split

    params = load_params(PROJECT / "params.yaml")
    # in domain: val (gates and selection), and test with the monitor's drift reference (neither trained on nor
    # used to choose); shifted: the recovery tweets (never sent as traffic)
    frames = {s: read_parquet(PROJECT / f"data/prepared/{s}.parquet") for s in ("val", "test", "reference")}
    frames["tweets"] = shifted_split(PROJECT / "data/raw/source.tar.gz")["recovery"]
    texts = {s: f["text"].tolist() for s, f in frames.items()}
    truth = {s: f["label"].to_numpy() for s, f in frames.items()}
    lat = params.validate_.latency
    seed = json.loads((RESULTS / "monitoring.json").read_text()).get("distill_seed")
    rows, same_as_v0001 = [], None
    way = "per channel" if student_per_channel(params) else "per tensor"  # the way v0001 was built
    for teacher, path in (*TEACHERS.items(), ("default student", None)):
        with tempfile.TemporaryDirectory() as tmp:
            if path is None:
                dirs = build_student(TEACHERS["teacher before"], params, Path(tmp), seed)
                same_as_v0001 = (dirs[f"int8 {way}"] / "model.onnx").read_bytes() == \
                    (FIRST_PRODUCTION / "model.onnx").read_bytes()
            else:
                dirs = build(path, Path(tmp), params.train.max_seq_len, params.compress.onnx_opset)
            got = measure_interleaved({k: str(v) for k, v in dirs.items()}, texts, texts["val"][:512], lat,
                                      invariance_texts=texts["val"][:64], max_batch_prob_diff=1e-4)
            for name, d in dirs.items():
                r = got[name]
                rows.append({"teacher": teacher, "model": name,
                             "per_row": r.get("batch_invariance", {}).get("per_row", False),
                             **{s: round(float((np.asarray(r["predictions"][s]) == truth[s]).mean()), 4)
                                for s in texts},
                             "test+reference": round(float(np.concatenate(
                                 [np.asarray(r["predictions"][s]) == truth[s] for s in ("test", "reference")]).mean()), 4),
                             "latency_ms_p95_b1": r["performance"]["latency_ms_p95_b1"],
                             "size_mb": round((d / "model.onnx").stat().st_size / 2 ** 20, 1)})
                print(json.dumps(rows[-1]), flush=True)
    doc = {"measured_at": now_utc(), "n": {s: len(v) for s, v in texts.items()}, "distill_seed": seed,
           "student": default_candidate(params).name, f"student_int8_{way.replace(' ', '_')}_same_as_v0001": same_as_v0001, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "int8_granularity.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / "int8_granularity.md").write_text(markdown(doc) + "\n")
    print(markdown(doc))


def markdown(doc: dict) -> str:
    n = doc["n"]
    lines = ["# The teacher and the default student in int8: per tensor or per channel", "",
             f"Measured {doc['measured_at']} by `bench/int8_granularity.py` on the teachers the monitoring benchmark "
             f"left; val {n['val']}, test {n['test']} and the monitor's drift reference {n['reference']}, recovery tweets "
             f"{n['tweets']} (labels as served; drops in "
             "points against the same teacher's ONNX fp32; latency in interleaved rounds in one run).", "",
             "| teacher | model | val | test | test+reference | tweets | val drop | test drop | test+reference drop "
             "| tweets drop | p95 b1 (ms) | MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["teacher"]: r for r in doc["rows"] if r["model"] == "fp32"}
    for r in doc["rows"]:
        b = base[r["teacher"]]
        cols = ("val", "test", "test+reference", "tweets")
        lines.append(f"| {r['teacher']} | {r['model']} | " + " | ".join(f"{r[s]:.4f}" for s in cols) + " | "
                     + " | ".join(f"{100 * (b[s] - r[s]):+.2f}" for s in cols)
                     + f" | {r['latency_ms_p95_b1']:.2f} | {r['size_mb']} |")
    way = "per-channel" if "student_int8_per_channel_same_as_v0001" in doc else "per-tensor"
    same = doc.get(f"student_int8_{way.replace('-', '_')}_same_as_v0001")
    if same is not None:
        same = "the same bytes as" if same else "not the same bytes as"
        lines += ["", f"The default student: `{doc['student']}`'s recipe up to its quantize step, cold, from the kept "
                  f"teacher (distill seed {doc['distill_seed']}, as the monitoring benchmark's v0001), exported once "
                  f"and quantized both ways; its {way} int8 is {same} the v0001 the benchmark deployed."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
