"""data: read, clean, label, split, check the contract; write the splits,
the label set, the user's unlabelled text and the data metrics."""

from __future__ import annotations

import sys

from pathlib import Path

from stages.common import main


def data(params, root: Path) -> None:
    from shrinkflow.data import prepare_raw
    from shrinkflow.feedback import feedback_splits, read_feedback
    from shrinkflow.files import atomic_write_bytes, write_json
    from shrinkflow.labels import write_labels
    from shrinkflow.modeling import tokenizer_path
    from shrinkflow.headline import data_headline
    from shrinkflow.paths import (FEEDBACK, FEEDBACK_SPLITS, HEADLINE_DATA, LABELS_JSON, METRICS_DATA, RAW_DIR, SPLITS,
                                  UNLABELLED_PREPARED, split_path)

    # Everything is computed before anything is written: bad data leaves
    # no partial outputs behind.
    prepared = prepare_raw(root / RAW_DIR, params.data, tokenizer_path(params.train.model), params.train.max_seq_len)
    # The production labels a retrain appended (none by default): mapped to
    # this task's class ids, split by a hash of each text.
    feedback = dict(zip(FEEDBACK_SPLITS, feedback_splits(read_feedback(root / FEEDBACK), prepared.labels,
                                                         params.data.feedback_heldout_fraction, str(FEEDBACK))))
    for warning in prepared.warnings:
        print(f"warning: data: {warning}", file=sys.stderr)
    for name in SPLITS:
        atomic_write_bytes(root / split_path(name), prepared.splits[name].to_parquet(index=False))
    for name, frame in feedback.items():
        atomic_write_bytes(root / split_path(name), frame.to_parquet(index=False))
    atomic_write_bytes(root / UNLABELLED_PREPARED, prepared.unlabelled.to_parquet(index=False))
    write_labels(root / LABELS_JSON, prepared.labels)
    write_json(root / METRICS_DATA, prepared.stats)
    write_json(root / HEADLINE_DATA, data_headline(prepared.stats))
    stats = prepared.stats
    sample = stats.get("truncated_share_sample_rows")
    sampled = [name for name, frame in prepared.splits.items() if sample is not None and len(frame) > sample]
    print(f"data: {len(prepared.labels)} classes, "
          + ", ".join(f"{k}={v}" for k, v in stats.items()
                      if k.startswith(("rows_", "truncated_share_")) and k != "truncated_share_sample_rows")
          + "".join(f", rows_{name}={len(frame)}" for name, frame in feedback.items() if len(frame))
          + (f" (truncated_share of {', '.join(sampled)} on a sample of {sample:,} texts)" if sampled else ""))


if __name__ == "__main__":
    main("data", data)
