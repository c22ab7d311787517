"""Training helpers. (What DVC did with a stage: tests/test_cli_repro.py.)"""

from __future__ import annotations

import numpy as np

from shrinkflow.train import length_grouped_batches


def test_length_grouped_batches_cover_every_row_once_and_reduce_padding():
    rng = np.random.default_rng(0)
    lengths = list(rng.integers(3, 64, size=1000))
    batches = length_grouped_batches(lengths, batch_size=32, chunk_batches=10, rng=np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    order = np.random.default_rng(1).permutation(1000)
    naive = sum(len(order[i:i + 32]) * max(lengths[j] for j in order[i:i + 32]) for i in range(0, 1000, 32))
    assert padded < 0.75 * naive


def test_tiny_training_learns_and_saves_safetensors(tiny_teacher_dir, small_splits):
    from shrinkflow.predictors import load_predictor, predict_labels

    files = {p.name for p in tiny_teacher_dir.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    train = small_splits["train"]
    pred = predict_labels(load_predictor(tiny_teacher_dir, threads=1), train["text"].tolist())
    # A random-init tiny BERT cannot generalise from 320 rows, but it must fit
    # them: far above the 50% a constant predictor gets.
    assert (pred == train["label"].to_numpy()).mean() > 0.8

