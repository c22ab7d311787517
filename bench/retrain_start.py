"""Where a retrain's fine-tuning should start: from ``train.model`` (the
pretrained checkpoint, what the retrain flow does: the teacher fine-tuned
anew on the training split plus the production labels) or from the kept
teacher (continued fine-tuning on the same rows).

Issue 17's retrain target loses at most 0.5 accuracy points in domain. In the
monitoring benchmark the teacher retrained from the pretrained checkpoint was
0.63 points under the kept teacher on test + drift reference, with a paired
standard error of 0.52: a fresh fine-tune disagrees with the old one on many
in-domain sentences, so the difference can be neither confirmed nor refuted.
A teacher continued from the kept one should disagree with it less in domain
(a smaller, better resolved difference) while it learns the production labels.

This measures, side by side in one run, on the monitoring benchmark's
retrain inputs (``bench/work/monitoring/project``: the training split, the
feedback-train rows, the held-out production labels):
- the kept teacher (``teacher_before``) and a teacher fine-tuned anew from
  ``train.model`` on the training split plus the feedback-train rows, as
  the retrain does (at ``train.retrain_keep_share`` 0 it is the teacher the
  benchmark's retrain deploys; the benchmark's own ``models/teacher`` is
  the averaged one at a share above 0, so it is not read);
- the kept teacher fine-tuned further on the training split plus the
  feedback-train rows, for each setting in ``CONTINUED`` (epochs, learning
  rate; the rest of ``train`` as in params.yaml);
- weight-space averages of the two teachers (both fine-tuned from the same
  pretrained checkpoint): each weight ``(1 - keep) * retrained + keep *
  kept`` for each ``keep`` in ``SOUPS`` (WiSE-FT: Wortsman et al., "Robust
  fine-tuning of zero-shot models", CVPR 2022; ``shrinkflow.train.average_with_kept``,
  what the retrain does with ``train.retrain_keep_share``), no training.
Each in torch fp32 (the teacher as validate measures it), on val, test +
reference (in domain, never trained on), the held-out production labels and
the recovery tweets (shifted, never sent as traffic); each in-domain figure
paired against the kept teacher (``shrinkflow.stats.paired_accuracy_drop``).

    .venv/bin/python bench/monitoring.py --distill-seed 1   # leaves the inputs in bench/work/monitoring
    PYTHONPATH=bench:. .venv/bin/python bench/retrain_start.py   # about 17 min on 2 cores

Writes bench/results/retrain_start.{md,json}.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, ROOT, now_utc

WORK = ROOT / "bench" / "work" / "monitoring"
PROJECT = WORK / "project"
KEPT = WORK / "teacher_before"
# (epochs, learning rate) of the continued fine-tuning
CONTINUED = ((1, 2.0e-5), (2, 2.0e-5), (1, 5.0e-5))
# shares of the kept teacher's weights in the average with the retrained one
SOUPS = (0.3, 0.5, 0.7)
ANEW = "fine-tuned anew from train.model (the retrain at share 0)"


def predict(model_dir: Path, texts: dict[str, list[str]], threads: int) -> dict[str, np.ndarray]:
    """Labels of the torch model at ``model_dir`` on each split's texts."""
    from shrinkflow.predictors import load_predictor, predict_labels

    predictor = load_predictor(model_dir, threads=threads)
    return {s: predict_labels(predictor, t) for s, t in texts.items()}


def main() -> None:
    from shrinkflow.config import LocalModel, load_params
    from shrinkflow.labels import read_labels
    from shrinkflow.modeling import load_tokenizer, load_torch_model, save_torch_model
    from shrinkflow.splits import read_parquet
    from shrinkflow.stats import paired_accuracy_drop
    from shrinkflow.train import average_with_kept, train_teacher
    from shrinkflow.traffic import shifted_split
    from stages.train import with_feedback

    params = load_params(PROJECT / "params.yaml")
    labels = read_labels(PROJECT / "data/prepared/labels.json")
    frames = {s: read_parquet(PROJECT / f"data/prepared/{s}.parquet")
              for s in ("train", "val", "test", "reference", "feedback_train", "feedback_heldout")}
    frames["tweets"] = shifted_split(PROJECT / "data/raw/source.tar.gz")["recovery"]
    evaluated = ("val", "test", "reference", "feedback_heldout", "tweets")
    texts = {s: frames[s]["text"].tolist() for s in evaluated}
    truth = {s: frames[s]["label"].to_numpy() for s in evaluated}
    train_df = with_feedback(frames["train"], frames["feedback_train"])
    threads = params.train.threads
    preds = {"kept teacher": predict(KEPT, texts, threads)}
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        # fine-tuned anew from train.model, as the retrain does before it averages (the
        # project's models/teacher is the averaged one when the loop ran at a share above 0)
        anew = Path(tmp) / "anew"
        t0 = time.perf_counter()
        model, tok, _ = train_teacher(train_df, frames["val"], params.train, progress=False, labels=labels)
        seconds[ANEW] = round(time.perf_counter() - t0, 1)
        save_torch_model(model, tok, anew, params.train.max_seq_len, labels=labels)
        preds[ANEW] = predict(anew, texts, threads)
        for keep in SOUPS:
            soup = load_torch_model(anew)
            average_with_kept(soup, load_torch_model(KEPT), keep)
            out = Path(tmp) / f"average-{keep:g}"
            save_torch_model(soup, load_tokenizer(anew / "tokenizer.json", params.train.max_seq_len), out,
                             params.train.max_seq_len, labels=labels)
            preds[f"average, {keep:g} kept + {1 - keep:g} anew"] = predict(out, texts, threads)
    for epochs, lr in CONTINUED:
        name = f"continued from kept, {epochs} epoch(s), lr {lr:g}"
        tp = params.train.model_copy(update={"model": LocalModel(path=str(KEPT)), "epochs": epochs,
                                             "learning_rate": lr})
        t0 = time.perf_counter()
        model, tok, result = train_teacher(train_df, frames["val"], tp, progress=False, labels=labels)
        seconds[name] = round(time.perf_counter() - t0, 1)
        with tempfile.TemporaryDirectory() as tmp:
            save_torch_model(model, tok, Path(tmp), params.train.max_seq_len, labels=labels)
            preds[name] = predict(Path(tmp), texts, threads)
        print(name, seconds[name], "s", flush=True)
    y_dom = np.concatenate([truth["test"], truth["reference"]])
    kept = preds["kept teacher"]
    kept_dom = np.concatenate([kept["test"], kept["reference"]])
    rows = []
    for name, p in preds.items():
        dom = np.concatenate([p["test"], p["reference"]])
        drop = paired_accuracy_drop(y_dom, kept_dom, dom)
        rows.append({"model": name, "train_seconds": seconds.get(name),
                     **{s: round(float((p[s] == truth[s]).mean()), 4) for s in evaluated},
                     "test+reference": round(float((dom == y_dom).mean()), 4),
                     "in_domain_vs_kept_points": round(-100 * drop["accuracy_drop"], 2),
                     "in_domain_vs_kept_se_points": round(100 * drop["accuracy_drop_se"], 2),
                     "in_domain_vs_kept_ci95_points": [round(-100 * drop["accuracy_drop_ci_high"], 2),
                                                       round(-100 * drop["accuracy_drop_ci_low"], 2)],
                     "in_domain_disagreement_with_kept": round(float((dom != kept_dom).mean()), 4)})
        print(json.dumps(rows[-1]), flush=True)
    doc = {"measured_at": now_utc(), "n": {s: len(t) for s, t in texts.items()},
           "feedback_train_rows": len(frames["feedback_train"]), "train_rows": len(frames["train"]), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "retrain_start.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / "retrain_start.md").write_text(markdown(doc) + "\n")
    print(markdown(doc))


def markdown(doc: dict) -> str:
    n = doc["n"]
    lines = ["# Where a retrain starts: the pretrained checkpoint or the kept teacher", "",
             f"Measured {doc['measured_at']} by `bench/retrain_start.py` on the monitoring benchmark's retrain "
             f"inputs: {doc['train_rows']:,} training rows plus {doc['feedback_train_rows']} production labels to "
             f"fine-tune on; val {n['val']}, test {n['test']} + drift reference {n['reference']} (in domain), "
             f"{n['feedback_heldout']} held-out production labels, {n['tweets']} recovery tweets (never sent as "
             "traffic). Torch fp32, as validate measures the teacher. In domain: test + reference, paired "
             "against the kept teacher (points; 95% interval).", "",
             "| teacher | train s | val | test+reference | vs kept (points) | 95% interval | disagrees with kept "
             "| held-out labels | tweets |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lo, hi = r["in_domain_vs_kept_ci95_points"]
        secs = "" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        kept = r["in_domain_disagreement_with_kept"] == 0
        vs = "—" if kept else f"{r['in_domain_vs_kept_points']:+.2f}"
        ci = "—" if kept else f"[{lo:+.2f}, {hi:+.2f}]"
        lines.append(f"| {r['model']} | {secs} | {r['val']:.4f} | {r['test+reference']:.4f} | {vs} | {ci} | "
                     f"{100 * r['in_domain_disagreement_with_kept']:.1f}% | {r['feedback_heldout']:.4f} | "
                     f"{r['tweets']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if "--markdown-only" in sys.argv:  # the table again from the JSON (no training)
        (RESULTS / "retrain_start.md").write_text(markdown(json.loads((RESULTS / "retrain_start.json").read_text()))
                                                  + "\n")
    else:
        main()
