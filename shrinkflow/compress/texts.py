"""The text a build learns from or calibrates on, as token ids.

Shared by the recipe steps (shrinkflow.compress.steps) and by the fusion
check in shrinkflow.compress.recipe.
"""

from __future__ import annotations


def encode_unpadded(tokenizer_json: str, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without padding or truncation (one list per text)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_padding()
    return [e.ids for e in tok.encode_batch(list(texts))]


def window_texts(unlabelled_texts: list[str] | None) -> list[str]:
    """The non-blank unlabelled (production window) texts."""
    return [t for t in (unlabelled_texts or []) if t.strip()]


def calibration_texts(train_texts: list[str], unlabelled_texts: list[str] | None) -> list[str]:
    """Training texts, interleaved one for one with the unlabelled (production
    window) texts when there are any: activation ranges then cover the text the
    model will serve as well as the text it learned from. Without unlabelled
    text: the training texts unchanged."""
    extra = window_texts(unlabelled_texts)
    if not extra:
        return list(train_texts)
    mixed = [t for pair in zip(extra, train_texts) for t in pair]
    return mixed + extra[len(train_texts):] + list(train_texts[len(extra):])


def calibration_feeds(tokenizer_json: str, texts: list[str], n: int, max_seq_len: int,
                      batch_size: int = 16) -> list[dict]:
    """The first ``n`` texts (the split is already shuffled), as ORT feeds:
    dicts of int64 ``input_ids`` and ``attention_mask`` arrays [batch, seq],
    truncated to ``max_seq_len`` and padded per batch."""
    from tokenizers import Tokenizer

    from shrinkflow.arch import pad_token
    from shrinkflow.modeling import encode

    tok = Tokenizer.from_str(tokenizer_json)
    tok.enable_truncation(max_length=max_seq_len)
    pad, pad_id = pad_token(tok)
    tok.enable_padding(pad_id=pad_id, pad_token=pad)
    feeds = []
    for start in range(0, min(n, len(texts)), batch_size):
        ids, mask = encode(tok, texts[start:min(n, start + batch_size)])
        feeds.append({"input_ids": ids, "attention_mask": mask})
    return feeds
