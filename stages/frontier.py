"""frontier: does train large, then compress beat training small directly?

Picks each budget's best compressed candidate on val, reports it on test.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from stages.common import main, read_split

SD_NAME = "small-direct-vocab-int8"


def _point(run: dict, labels: dict, classes) -> dict:
    """Accuracy and macro-F1 on val, test and shifted (None without a
    shifted split), then the model's performance figures."""
    from shrinkflow.stats import quality

    p = run["predictions"]
    q = {s: quality(labels[s], p[s], classes) if len(labels[s]) else None for s in ("val", "test", "shifted")}

    def get(split, key):
        return None if q[split] is None else q[split][key]

    return {"accuracy_val": get("val", "accuracy"), "accuracy": get("test", "accuracy"),
            "accuracy_shifted": get("shifted", "accuracy"), "macro_f1_val": get("val", "macro_f1"),
            "macro_f1": get("test", "macro_f1"), "macro_f1_shifted": get("shifted", "macro_f1"),
            **run["performance"]}


def frontier(params, root: Path) -> None:
    from shrinkflow.compress import apply_recipe
    from shrinkflow.config import Candidate, QuantizeStep, VocabPruneStep
    from shrinkflow.evaluate import measure_interleaved
    from shrinkflow.frontier import frontier_markdown, plot, robustness_row, verdict
    from shrinkflow.files import atomic_write_text, write_json
    from shrinkflow.labels import read_labels
    from shrinkflow.modeling import TOKENIZER, load_tokenizer, load_torch_model, read_manifest
    from shrinkflow.headline import frontier_headline
    from shrinkflow.paths import (CANDIDATES, FRONTIER_MD, FRONTIER_PNG, HEADLINE_FRONTIER, LABELS_JSON,
                                  METRICS_FRONTIER, SMALL_DIRECT, TEACHER)
    from shrinkflow.predictors import load_predictor, predict_labels
    from shrinkflow.validation import check_model_labels

    fp = params.frontier
    classes = read_labels(root / LABELS_JSON)
    teacher_dir, small, candidates = root / TEACHER, root / SMALL_DIRECT, root / CANDIDATES
    compressed = [c for c in params.compress.candidates if c.recipe]
    check_model_labels(classes, {str(d): read_manifest(d).get("labels")
                                 for d in (teacher_dir, small, *(candidates / c.name for c in compressed))})
    threads = params.train.threads
    frames = {s: read_split(s, root) for s in ("train", "val", "test", "shifted")}
    texts = {s: frames[s]["text"].tolist() for s in ("val", "test", "shifted")}
    labels = {s: frames[s]["label"].tolist() for s in ("val", "test", "shifted")}
    lat = params.validate.latency
    with tempfile.TemporaryDirectory(prefix="shrinkflow-frontier-") as tmp:
        tmp = Path(tmp)
        sd_dir = apply_recipe(small, Candidate(name="sd", recipe=(VocabPruneStep(), QuantizeStep())),
                              tmp / "sd", train_texts=frames["train"]["text"].tolist(),
                              train_labels=frames["train"]["label"].to_numpy(), threads=threads, progress=False)
        # Latency moves run to run on a shared machine: measure the teacher, the
        # baseline and every compressed candidate here, in interleaved rounds.
        models = {"teacher": teacher_dir, SD_NAME: sd_dir, **{c.name: candidates / c.name for c in compressed}}
        runs = measure_interleaved(models, texts, texts["val"], lat, log=lambda m: print(f"frontier: {m}"))
        points = {name: _point(run, labels, classes) for name, run in runs.items()}
        robustness = {}
        test_labels = frames["test"]["label"].to_numpy()
        for label, src in (("teacher (large)", teacher_dir), ("small-direct", small)):
            q = apply_recipe(src, Candidate(name="q", recipe=(QuantizeStep(),)), tmp / f"q-{src.name}",
                             progress=False)
            int8_acc = float((predict_labels(load_predictor(q, threads), texts["test"]) == test_labels).mean())
            tok = load_tokenizer(src / TOKENIZER, params.train.max_seq_len)
            robustness[label] = robustness_row(load_torch_model(src), tok, texts["test"], test_labels,
                                               fp.robustness_sparsities, int8_acc)
    teacher = points.pop("teacher")
    rows = verdict({n: m for n, m in points.items() if n != SD_NAME}, SD_NAME, points[SD_NAME], fp.match_tolerance)
    plot({"teacher": teacher, **points}, {SD_NAME}, root / FRONTIER_PNG)
    atomic_write_text(root / FRONTIER_MD, frontier_markdown(teacher, points, {SD_NAME}, rows, robustness,
                                                     fp.small_direct, fp.match_tolerance))
    write_json(root / METRICS_FRONTIER, {"labels": list(classes), "verdict": rows, "robustness": robustness,
                                  "points": points, "teacher": teacher})
    write_json(root / HEADLINE_FRONTIER, frontier_headline(rows))
    for r in rows:
        print(f"frontier: {r}")


if __name__ == "__main__":
    main("frontier", frontier)
