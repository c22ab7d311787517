"""Distillation settings, scored before anything else touches the student.

Each variant distils a student (3 layers unless its `layers` says otherwise) from the kept teacher and scores the
fp32 torch student with the full vocabulary on val and test, so the effect of
the distillation settings is seen apart from vocabulary pruning and int8
(bench/student_steps.py measures those). Variants are JSON overrides of

    layers=[0, 2, 4], epochs=2, lr=2e-4, T=2.0, alpha=0.5, bs=32, hw=0.0, seed=0

    .venv/bin/python bench/distill_variants.py '[{"alpha": 1.0}, {"alpha": 1.0, "hw": 1.0}]'

Appends one JSON line per variant to bench/results/distill_variants.jsonl.
"""

from __future__ import annotations

import json
import sys
import time
from _common import RESULTS, now_utc, splits, teacher_and_tokenizer



def main() -> None:
    import torch

    from shrinkflow.compress.distill import hidden_targets, kd_train, make_student, teacher_outputs
    from shrinkflow.compress.texts import encode_unpadded as _encode_unpadded
    from shrinkflow.train import evaluate_accuracy, seed_everything

    torch.set_num_threads(2)
    fr = splits("train", "val", "test")
    teacher, tok = teacher_and_tokenizer()
    teacher.eval()
    seqs = _encode_unpadded(tok, fr["train"]["text"].tolist())
    evals = {s: [x[:64] for x in _encode_unpadded(tok, fr[s]["text"].tolist())] for s in ("val", "test")}
    base = {s: round(evaluate_accuracy(teacher, v, fr[s]["label"].to_numpy()), 4) for s, v in evals.items()}
    for override in json.loads(sys.argv[1]):
        c = dict(layers=[0, 2, 4], epochs=2, lr=2e-4, T=2.0, alpha=0.5, bs=32, hw=0.0, seed=0) | override
        seed_everything(c["seed"])
        t0 = time.perf_counter()
        wanted = hidden_targets(tuple(c["layers"]), teacher.config.num_hidden_layers) if c["hw"] else ()
        targets, hidden = teacher_outputs(teacher, seqs, wanted)
        student = make_student(teacher, tuple(c["layers"]))
        kd_train(student, seqs, targets, fr["train"]["label"].to_numpy(), epochs=c["epochs"], learning_rate=c["lr"],
                 temperature=c["T"], alpha_kl=c["alpha"], batch_size=c["bs"], warmup_fraction=0.06,
                 seed=c["seed"], progress=False, hidden=hidden or None, hidden_weight=c["hw"])
        row = {"variant": c, "seconds": round(time.perf_counter() - t0), "teacher": base,
               "measured_at": now_utc()}
        for s, v in evals.items():
            row[s] = round(evaluate_accuracy(student, v, fr[s]["label"].to_numpy()), 4)
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RESULTS / "distill_variants.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
