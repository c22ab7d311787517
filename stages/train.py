"""train: fine-tune the teacher once; it is kept and compressed many times.

With ``train.fine_tune: false`` the local checkpoint is already fine-tuned
for the task: it is only measured on val and saved as the teacher.
"""

from __future__ import annotations

from pathlib import Path

from stages.common import main, read_split


def train_metrics(result, labels, compute: dict):
    """metrics/train.json: a TrainResult's fields, the class names in class-id
    order and the stage's compute meter (``ComputeMeter.result()``), as a
    ``TrainMetrics``. Raises pydantic.ValidationError when they do not match it."""
    from shrinkflow.artifacts import TrainMetrics

    return TrainMetrics(**{**result.__dict__, "labels": list(labels), "compute": compute})


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
    from shrinkflow.train import measure_teacher, train_teacher

    labels = read_labels(root / LABELS_JSON)
    tp = params.train
    # What training the large model cost: the first term of the ROI (deploy).
    with ComputeMeter(params.cost.country_iso_code) as meter:
        if tp.fine_tune:
            train_df = with_feedback(read_split("train", root), read_split("feedback_train", root))
            model, tok, result = train_teacher(train_df, read_split("val", root), tp, labels=labels)
        else:
            model, tok, result = measure_teacher(read_split("val", root), tp, labels)
    # Typed before the model is saved: a record that does not match its model
    # fails the stage with nothing written.
    metrics = train_metrics(result, labels, meter.result())
    save_torch_model_atomically(model, tok, root / TEACHER, tp.max_seq_len, labels=labels)
    save(TRAIN_METRICS, metrics, root)
    write_json(root / HEADLINE_TRAIN, train_headline(metrics))
    what = "fine-tuned" if result.fine_tuned else "already fine-tuned (fine_tune: false), measured"
    print(f"train: {what}: best val accuracy {result.best_val_accuracy:.4f} (epoch {result.best_epoch}) "
          f"in {result.train_seconds:.0f}s")


if __name__ == "__main__":
    main("train", train)
