"""train: fine-tune the teacher once; it is kept and compressed many times.

With ``train.fine_tune: false`` the local checkpoint is already fine-tuned
for the task: it is only measured on val and saved as the teacher.
"""

from __future__ import annotations

from pathlib import Path

from stages.common import main, read_split


def train_metrics(result, labels, compute: dict, averaged: dict | None = None):
    """metrics/train.json: a TrainResult's fields, the class names in class-id
    order and the stage's compute meter (``ComputeMeter.result()``), as a
    ``TrainMetrics``; ``averaged``: the retrained teacher's average with the
    kept one (``KeptTeacherAverage`` fields), only when there was one.
    Raises pydantic.ValidationError when they do not match it."""
    from shrinkflow.artifacts import TrainMetrics

    extra = {"averaged_with_kept_teacher": averaged} if averaged is not None else {}
    return TrainMetrics(**{**result.__dict__, "labels": list(labels), "compute": compute, **extra})


def kept_teacher_to_average(tp, root: Path, feedback_rows: int) -> Path | None:
    """The kept teacher the retrained one is averaged with
    (``train.retrain_keep_share`` > 0), staged by the retrain flow in
    ``RETRAIN_KEPT_TEACHER_MODEL``; None when there is nothing to average: a
    share of 0, no production labels (a plain run), or none staged (said in
    the log: a retrain stages it or fails first; this is a run that re-trains
    on production labels after a retrain that staged none)."""
    from shrinkflow.paths import RETRAIN_KEPT_TEACHER_MODEL

    if tp.retrain_keep_share == 0 or feedback_rows == 0:
        return None
    kept = root / RETRAIN_KEPT_TEACHER_MODEL
    if not (kept / "config.json").is_file():
        print(f"train: train.retrain_keep_share is {tp.retrain_keep_share:g} but no kept teacher is staged in "
              f"{RETRAIN_KEPT_TEACHER_MODEL} (the retrain flow stages it): the teacher is not averaged")
        return None
    return kept


def with_feedback(train_df, feedback_train):
    """The training split followed by the production labels a retrain
    appended (``feedback_train``: text, label as class ids). No feedback
    rows: ``train_df`` itself, so the default run trains on the same frame."""
    import pandas as pd

    if not len(feedback_train):
        return train_df
    return pd.concat([train_df, feedback_train[list(train_df.columns)]], ignore_index=True)


def train(params, root: Path) -> None:
    from shrinkflow.catalog import TRAIN_METRICS, save
    from shrinkflow.cost import ComputeMeter
    from shrinkflow.files import write_json
    from shrinkflow.labels import read_labels
    from shrinkflow.modeling import save_torch_model_atomically
    from shrinkflow.headline import train_headline
    from shrinkflow.paths import HEADLINE_TRAIN, LABELS_JSON, TEACHER
    from shrinkflow.train import average_retrained_teacher, measure_teacher, train_teacher

    labels = read_labels(root / LABELS_JSON)
    tp = params.train
    # What training the large model cost: the first term of the ROI (deploy).
    with ComputeMeter(params.cost.country_iso_code) as meter:
        averaged = None
        if tp.fine_tune:
            feedback = read_split("feedback_train", root)
            kept = kept_teacher_to_average(tp, root, len(feedback))
            val = read_split("val", root)
            model, tok, result = train_teacher(with_feedback(read_split("train", root), feedback), val, tp,
                                               labels=labels)
            if kept is not None:
                averaged = average_retrained_teacher(model, tok, kept, tp.retrain_keep_share, val,
                                                     result.best_val_accuracy)
                print(f"train: the retrained teacher averaged with the kept one ({kept}, share "
                      f"{tp.retrain_keep_share:g}): val accuracy {averaged['val_accuracy_before']:.4f} -> "
                      f"{averaged['val_accuracy_after']:.4f}")
        else:
            model, tok, result = measure_teacher(read_split("val", root), tp, labels)
    # Typed before the model is saved: a record that does not match its model
    # fails the stage with nothing written.
    metrics = train_metrics(result, labels, meter.result(), averaged)
    save_torch_model_atomically(model, tok, root / TEACHER, tp.max_seq_len, labels=labels)
    save(TRAIN_METRICS, metrics, root)
    write_json(root / HEADLINE_TRAIN, train_headline(metrics))
    what = "fine-tuned" if result.fine_tuned else "already fine-tuned (fine_tune: false), measured"
    print(f"train: {what}: best val accuracy {result.best_val_accuracy:.4f} (epoch {result.best_epoch}) "
          f"in {result.train_seconds:.0f}s")


if __name__ == "__main__":
    main("train", train)
