"""How much of a re-compression's gap on shifted text is int8's, per tensor
and per channel.

``bench/recompress_rows.py`` keeps, for every run, the re-distilled fp32
student (the WiSE-FT share kept) and the texts compress read, and the
production student it warm-started from. This script takes each of them
through the default student's later steps (``vocab_prune`` as the run's
build counted it: the training split, plus the run's window texts for a
re-distilled student; ONNX export) once, then quantizes that ONNX fp32
graph each way (ONNX Runtime dynamic int8: per tensor; per channel,
``QuantizeStep.per_channel``; per channel with the embedding tables left
fp32, ``quantize_embeddings`` false, or quantized one scale per row,
``embedding_scales: row``; and per tensor and per channel from the same
student built without the recipe's ``vocab_prune`` step) and scores every model as served (one text per
call for a batch-dependent one), side by side in one process: the 1,376
recovery tweets (never traffic), and the movie-review test and val splits.
The way the params' default student quantizes (per tensor: its default)
must give the very bytes the run deployed or
built (checked: a mismatch stops the script), so the other columns differ
from the run in the quantization alone. p95 batch-1 latency of production
and of the first run, every way, in interleaved rounds (``shrinkflow.evaluate.measure_interleaved``).

    .venv/bin/python bench/recompress_rows.py --name NAME --runs '...'
    .venv/bin/python bench/recompress_int8.py --name NAME [--out recompress_int8]

Writes bench/results/recompress_int8.{md,json} (or OUT's).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import RESULTS, ROOT, default_candidate, stamp

WORK = ROOT / "bench" / "work" / "recompress_rows"
PROJECT = WORK / "project"
FULL_VOCAB = "_full_vocabulary"
# The quantize step's settings compared, from the student as the recipe
# builds it up to its quantize step or (FULL_VOCAB) without vocab_prune.
QUANTIZATIONS = {
    "per tensor": {"per_channel": False, "quantize_embeddings": True, "embedding_scales": "tensor"},
    "per channel": {"per_channel": True, "quantize_embeddings": True, "embedding_scales": "tensor"},
    "per channel, embeddings fp32": {"per_channel": True, "quantize_embeddings": False, "embedding_scales": "tensor"},
    "per channel, embeddings per row": {"per_channel": True, "quantize_embeddings": True, "embedding_scales": "row"},
    # per-tensor weights with the tables as above: which part of per tensor's loss is the tables'
    "per tensor, embeddings fp32": {"per_channel": False, "quantize_embeddings": False, "embedding_scales": "tensor"},
    "per tensor, embeddings per row": {"per_channel": False, "quantize_embeddings": True, "embedding_scales": "row"},
    # the same student without the recipe's vocab_prune step (every token kept)
    "full vocabulary, per tensor": {"per_channel": False, "quantize_embeddings": True, "embedding_scales": "tensor",
                                    FULL_VOCAB: True},
    "full vocabulary, per channel": {"per_channel": True, "quantize_embeddings": True, "embedding_scales": "tensor",
                                     FULL_VOCAB: True}}


def quantize_step(step, update: dict):
    """``step`` (a QuantizeStep) with ``update``'s settings, validated."""
    return step.model_validate({**step.model_dump(), **{k: v for k, v in update.items() if k != FULL_VOCAB}})


def built_way(params) -> str:
    """The key of ``QUANTIZATIONS`` that the default student's quantize step
    in ``params`` builds (what production and the runs were built with).
    Exits when none is."""
    cand = default_candidate(params)   # the project's own params
    step = next(s for s in cand.recipe if s.method == "quantize")
    for way, update in QUANTIZATIONS.items():
        if not update.get(FULL_VOCAB) and step == quantize_step(step, update):
            return way
    sys.exit(f"the default student's quantize step ({step}) is none of {list(QUANTIZATIONS)}")


def build_int8(sidecar: Path, window: list[str] | None, params, out: Path,
               ways: dict[str, dict]) -> dict[str, Path]:
    """The fp32 student in ``sidecar`` (compress.warm's format) through the
    default student's steps between distill and quantize (vocabulary
    pruning counting the training split and ``window``; export), and
    without vocabulary pruning (when a way asks for it), then quantized
    each way of ``ways`` (items of ``QUANTIZATIONS``): ``{"fp32", "fp32, full vocabulary", "per tensor",
    ...}`` model directories under ``out``."""

    from shrinkflow.compress.quantize import quantize_dynamic_onnx
    from shrinkflow.compress.recipe import apply_recipe
    from shrinkflow.compress.warm import warm_student
    from shrinkflow.modeling import TOKENIZER, load_torch_model
    from shrinkflow.splits import read_parquet

    cand = default_candidate(params)   # the project's own params
    quant = [s for s in cand.recipe if s.method == "quantize"]
    assert cand.recipe[0].method == "distill" and len(quant) == 1 and cand.recipe[-1] is quant[0]
    teacher_dir = PROJECT / "models/teacher"
    layers = json.loads((sidecar / "warm_start.json").read_text())["layers"]
    hf = out / "hf"
    warm_student(load_torch_model(teacher_dir), layers, sidecar).save_pretrained(hf)
    for f in (TOKENIZER, "shrinkflow_model.json"):
        shutil.copy(teacher_dir / f, hf / f)
    train = read_parquet(PROJECT / "data/prepared/train.parquet")
    sources = {}
    for full in sorted({bool(u.get(FULL_VOCAB)) for u in ways.values()} | {False}):
        steps = tuple(st for st in cand.recipe[1:-1] if not (full and st.method == "vocab_prune"))
        key = "fp32, full vocabulary" if full else "fp32"
        sources[full] = apply_recipe(hf, cand.model_copy(update={"name": f"{cand.name}-{'full' if full else 'fp32'}",
                                                                 "recipe": steps}),
                                     out / key.replace(" ", "-").replace(",", ""), opset=params.compress.onnx_opset,
                                     train_texts=train["text"].tolist(), train_labels=train["label"].to_numpy(),
                                     unlabelled_texts=window, threads=params.train.threads, progress=False)
    dirs = {("fp32, full vocabulary" if full else "fp32"): d for full, d in sources.items()}
    for name, update in ways.items():
        d = out / name.replace(" ", "-").replace(",", "")
        fp32 = sources[bool(update.get(FULL_VOCAB))]
        shutil.copytree(fp32, d)
        quantize_dynamic_onnx(fp32 / "model.onnx", d / "model.onnx", quantize_step(quant[0], update))
        dirs[name] = d
    return dirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True, help="the recompress_rows results this measures (bench/results/NAME.json)")
    ap.add_argument("--out", default="recompress_int8", help="the results' name (bench/results/OUT.{md,json})")
    ap.add_argument("--ways", type=json.loads, default=None,
                    help="a JSON list of the QUANTIZATIONS to build (default: all); the params' own way is always built")
    args = ap.parse_args()
    name, out = args.name, args.out
    sys.path.insert(0, str(ROOT))
    from recompress_rows import paired_se, score, tweets

    from shrinkflow.config import load_params
    from shrinkflow.evaluate import measure_interleaved
    from shrinkflow.registry import Registry
    from shrinkflow.splits import read_parquet

    src = json.loads((RESULTS / f"{name}.json").read_text())
    params = load_params(PROJECT / "params.yaml")
    way = built_way(params)
    unknown = set(args.ways or ()) - set(QUANTIZATIONS)
    if unknown:
        sys.exit(f"--ways: {sorted(unknown)} not among {list(QUANTIZATIONS)}")
    ways = {q: u for q, u in QUANTIZATIONS.items() if args.ways is None or q in args.ways or q == way}
    production = Registry(PROJECT / params.deploy.registry_dir).load(src["production"]).path
    rec_x, rec_y = tweets("recovery")
    test = read_parquet(PROJECT / "data/prepared/test.parquet")
    val = read_parquet(PROJECT / "data/prepared/val.parquet")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {"teacher": PROJECT / "models/teacher"}
        built = build_int8(WORK / "production_student", None, params, tmp / "production", ways)
        if (built[way] / "model.onnx").read_bytes() != (production / "model.onnx").read_bytes():
            sys.exit(f"production's student quantized {way} is not production {src['production']}'s model")
        models.update({f"production {k}": v for k, v in built.items()})
        for i, run in enumerate(src["runs"], start=1):
            window = (WORK / f"window_{i}.txt").read_text(encoding="utf-8").splitlines()
            built = build_int8(WORK / f"student_{i}", window, params, tmp / f"run{i}", ways)
            if (built[way] / "model.onnx").read_bytes() != (WORK / f"distilled_{i}" / "model.onnx").read_bytes():
                sys.exit(f"run {i}'s student quantized {way} is not the candidate its build made")
            models.update({f"run {i} {k}": v for k, v in built.items()})
        acc, right = score(models, rec_x, rec_y, test, val)
        texts = val["text"].tolist()
        timed = {f"{who} {q}": str(models[f"{who} {q}"]) for who in ("production", "run 1") for q in ways}
        perf = measure_interleaved(timed, {"val": texts[:64]}, texts[:512], params.validate_.latency,
                                   invariance_texts=texts[:64], max_batch_prob_diff=1e-4)
    teacher = acc["teacher"]
    rows = []
    for i, run in enumerate(src["runs"], start=1):
        for q in ways:
            before, after = f"production {q}", f"run {i} {q}"
            gap = teacher["tweets"] - acc[before]["tweets"]
            rows.append({"run": i, "pool_offset": run["pool_offset"], "rows_distill": run["rows_distill"],
                         "heldout_fraction": run["heldout_fraction"], "overrides": run.get("overrides") or {},
                         "quantization": q, "production_tweets": acc[before]["tweets"],
                         "student_tweets": acc[after]["tweets"], "student_fp32_tweets": acc[f"run {i} fp32" + (
                             ", full vocabulary" if ways[q].get(FULL_VOCAB) else "")]["tweets"],
                         "gap_points": round(100 * gap, 2),
                         "recovered": round((acc[after]["tweets"] - acc[before]["tweets"]) / gap, 4),
                         "recovered_se": round(paired_se(right[after]["tweets"], right[before]["tweets"]) / gap, 4),
                         "in_domain_points": round(100 * (acc[after]["movie_test"] - acc[before]["movie_test"]), 2),
                         "in_domain_se": round(100 * paired_se(right[after]["movie_test"],
                                                               right[before]["movie_test"]), 2),
                         "val_drop_vs_teacher_points": round(100 * (teacher["movie_val"]
                                                                    - acc[after]["movie_val"]), 2)})
    doc = {**stamp(), "source": name, "built_way": way, "max_accuracy_drop": params.validate_.gates.max_accuracy_drop,
           "production": src["production"],
           "n": {"tweets": len(rec_x), "test": len(test), "val": len(val)}, "accuracy": acc,
           "latency_ms_p95_b1": {k: perf[k]["performance"]["latency_ms_p95_b1"] for k in timed}, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{out}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / f"{out}.md").write_text(markdown(doc) + "\n")
    print(markdown(doc))


def markdown(doc: dict) -> str:
    """The results as a markdown page."""
    acc = doc["accuracy"]

    def test_drop(r: dict) -> float:  # what the deploy gate's test confirmation reads (max_accuracy_drop)
        return 100 * (acc["teacher"]["movie_test"] - acc[f"run {r['run']} {r['quantization']}"]["movie_test"])

    lines = [f"# A re-compression's gap on shifted text, int8 per tensor and per channel ({doc['source']})", "",
             f"Measured {doc['measured_at']} on {doc['machine']} by `bench/recompress_int8.py` on the students "
             f"`bench/recompress_rows.py --name {doc['source']}` kept (`bench/results/{doc['source']}.md`): production "
             f"{doc['production']}'s student and each run's re-distilled one, quantized each way from the same ONNX "
             f"fp32 graph ({doc.get('built_way', 'per tensor')}, as the runs built them: the very bytes they built). "
             "Scored as served on "
             f"{doc['n']['tweets']} recovery tweets (never traffic) and the {doc['n']['test']} movie-review test "
             "sentences.", "",
             "| model | tweets | test | val |", "|---|---|---|---|"]
    for k, a in acc.items():
        lines.append(f"| {k} | {a['tweets']:.4f} | {a['movie_test']:.4f} | {a['movie_val']:.4f} |")
    if doc.get("note"):
        lines += ["", f"Note: {doc['note']}."]
    lines += ["", "| run | pool tweets from | texts distilled | held out | int8 | production on tweets | gap (points) "
              "| student on tweets (fp32) | gap recovered | in domain, test (points) | val drop vs teacher (points) "
              "| test drop vs teacher (points) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['run']} | {r['pool_offset']} | {r['rows_distill']} | {r['heldout_fraction']} | "
                     f"{r['quantization']} | {r['production_tweets']:.4f} | {r['gap_points']:.2f} | "
                     f"{r['student_tweets']:.4f} ({r['student_fp32_tweets']:.4f}) | "
                     f"{r['recovered']:.0%} ± {r['recovered_se']:.0%} | "
                     f"{r['in_domain_points']:+.2f} ± {r['in_domain_se']:.2f} | "
                     f"{r['val_drop_vs_teacher_points']:.2f} | "
                     f"{test_drop(r):.2f} |")
    by_q = {q: [r for r in doc["rows"] if r["quantization"] == q] for q in QUANTIZATIONS}
    gate = 100 * doc["max_accuracy_drop"]
    lines += [""] + [f"Mean over the runs, {q}: {np.mean([r['recovered'] for r in rs]):.0%} of the gap recovered, "
                     f"{np.mean([r['in_domain_points'] for r in rs]):+.2f} points in domain; "
                     f"{sum(test_drop(r) <= gate + 1e-9 for r in rs)} of {len(rs)} within the deploy gate's "
                     f"{gate:g} points of the teacher on test (production: "
                     f"{100 * (acc['teacher']['movie_test'] - acc[f'production {q}']['movie_test']):.2f} under it)."
                     for q, rs in by_q.items() if rs]
    lat = doc["latency_ms_p95_b1"]
    lines += ["", "p95 batch-1 latency (ms, interleaved rounds in one run): " +
              ", ".join(f"{k} {v:.3f}" for k, v in lat.items()) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
