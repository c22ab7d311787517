"""The retrain flow's library steps: measure the teacher a retrain is about
to replace, and record what the retrain was (data/feedback/retrain.json,
shrinkflow.artifacts.RetrainRecord) for validate's teacher gates and deploy's
lineage.

Not imported by any stage (validate reads the record through the catalog),
so measuring here never makes a stage stale. Nothing happens at import.
"""

from __future__ import annotations

from pathlib import Path

from shrinkflow.artifacts import PreviousTeacher, RetrainRecord


def measure_teacher(root: Path | str, threads: int = 2) -> PreviousTeacher:
    """The kept teacher (models/teacher) before a retrain replaces it: the
    content hash of its files and its accuracy on val and on the held-out
    production labels (data/prepared/feedback_heldout.parquet, written by
    the data stage; None when it holds no row). Read with the head
    truncation, as validate reads it. Raises MissingInput when a split is
    missing, FileNotFoundError when there is no teacher."""
    from shrinkflow.files import content_hash, file_hashes
    from shrinkflow.paths import TEACHER
    from shrinkflow.predictors import load_predictor, predict_labels
    from shrinkflow.splits import read_split
    from shrinkflow.validation import heldout_accuracy

    root = Path(root)
    predictor = load_predictor(root / TEACHER, threads=threads)
    figures = {}
    for split in ("val", "feedback_heldout"):
        df = read_split(split, root)
        texts = df["text"].astype(str).tolist()
        preds = predict_labels(predictor, texts) if texts else []
        figures[split] = (heldout_accuracy([int(y) for y in df["label"]], [int(p) for p in preds]), len(texts))
    return PreviousTeacher(content_hash=content_hash(file_hashes(root / TEACHER)),
                           val_accuracy=figures["val"][0], feedback_heldout_accuracy=figures["feedback_heldout"][0],
                           feedback_heldout_rows=figures["feedback_heldout"][1])


def record_retrain(root: Path | str, requested_by: dict, feedback: dict, previous: PreviousTeacher) -> RetrainRecord:
    """Write data/feedback/retrain.json (atomically, through the catalog)
    and return it: ``requested_by`` the monitor run and window, ``feedback``
    the dataset version appended (shrinkflow.feedback.append_feedback's
    result), ``previous`` the old teacher's figures."""
    from shrinkflow.catalog import RETRAIN, save

    record = RetrainRecord(requested_by=requested_by, feedback=feedback, previous_teacher=previous)
    save(RETRAIN, record, root)
    return record
