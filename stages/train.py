"""train: fine-tune the teacher once; it is kept and compressed many times."""

from __future__ import annotations

import sys

from stages.common import read_split, run_stage


def train(params) -> None:
    from shrinkflow.cost import ComputeMeter
    from shrinkflow.io import write_json
    from shrinkflow.modeling import save_torch_model_atomically
    from shrinkflow.paths import METRICS_TRAIN, TEACHER
    from shrinkflow.train import train_teacher

    # What training the large model cost: the first term of the ROI (deploy).
    with ComputeMeter(params.cost.country_iso_code) as meter:
        model, tok, result = train_teacher(read_split("train"), read_split("val"), params.train)
    save_torch_model_atomically(model, tok, TEACHER, params.train.max_seq_len)
    write_json(METRICS_TRAIN, {**result.__dict__, "compute": meter.result()})
    print(f"train: best val accuracy {result.best_val_accuracy:.4f} (epoch {result.best_epoch}) "
          f"in {result.train_seconds:.0f}s")


if __name__ == "__main__":
    sys.exit(run_stage("train", train))
