"""Text augmentation for distillation (after TinyBERT's data augmentation).

The student learns the teacher's function from the teacher's outputs, so
any text the teacher labels is training signal: near-copies of the training
sentences (a cropped span, some words swapped for others from the training
vocabulary) show the student the neighbourhood of each example, where a
small model and a large one disagree most, without any new labelled data.
The teacher relabels every variant (soft labels), so a swap that flips the
sentiment teaches the right thing. TinyBERT swaps in GloVe or BERT-MLM
neighbours; both need downloads, so words here are drawn from the training
split's own unigram distribution.
"""

from __future__ import annotations

import math

import numpy as np


def augment_texts(texts: list[str], copies: int, seed: int, replace_fraction: float = 0.15,
                  crop_probability: float = 0.5, min_crop_fraction: float = 0.5) -> list[str]:
    """``copies`` variants of every text, in order (copy 0 of every text first).

    Each variant: with ``crop_probability`` (texts of 4+ words), a contiguous
    span keeping between ``min_crop_fraction`` and 90% of the words; then each
    word replaced with probability ``replace_fraction`` by a word drawn from
    the unigram distribution of ``texts``. Deterministic for a given seed.
    """
    if copies <= 0 or not texts:
        return []
    rng = np.random.default_rng(seed)
    tokenized = [t.split() for t in texts]
    vocab, counts = np.unique(np.array([w for ws in tokenized for w in ws] or [""], dtype=object),
                              return_counts=True)
    probs = counts / counts.sum()
    out = []
    for _ in range(copies):
        for words in tokenized:
            words = list(words)
            n = len(words)
            if n >= 4 and rng.random() < crop_probability:
                keep = max(2, math.ceil(rng.uniform(min_crop_fraction, 0.9) * n))
                start = int(rng.integers(0, n - keep + 1))
                words = words[start:start + keep]
            swap = rng.random(len(words)) < replace_fraction
            if swap.any():
                drawn = rng.choice(vocab, size=int(swap.sum()), p=probs)
                for i, w in zip(np.flatnonzero(swap), drawn):
                    words[i] = w
            out.append(" ".join(words) if words else "")
    return out
