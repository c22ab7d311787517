"""Vocabulary pruning: drop embedding rows of tokens the domain never uses."""

from __future__ import annotations

import json
from collections import Counter


def _is_single_char(token: str) -> bool:
    return len(token) == 1 or (token.startswith("##") and len(token) == 3)


def kept_token_ids(tokenizer_json: str, texts: list[str], min_count: int = 1) -> list[int]:
    """Sorted ids to keep: seen >= min_count times, specials, single chars."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_padding()
    counts = Counter(i for enc in tok.encode_batch(list(texts)) for i in enc.ids)
    spec = json.loads(tokenizer_json)
    vocab: dict[str, int] = spec["model"]["vocab"]
    keep = {i for i, c in counts.items() if c >= min_count}
    keep |= {t["id"] for t in spec.get("added_tokens", [])}
    keep |= {i for t, i in vocab.items() if _is_single_char(t)}
    return sorted(keep)


def remap_tokenizer(tokenizer_json: str, kept: list[int]) -> str:
    """The same WordPiece tokenizer over the kept tokens, renumbered 0..n-1.

    Greedy longest-match WordPiece segments any text whose pieces were all
    kept exactly as before, so in-vocabulary text gets identical ids (up to
    renumbering); other words fall back to shorter kept pieces.
    """
    spec = json.loads(tokenizer_json)
    new_id = {old: new for new, old in enumerate(kept)}
    if spec["model"].get("type") != "WordPiece":
        raise ValueError(f"vocab_prune supports WordPiece tokenizers, not {spec['model'].get('type')}")
    spec["model"]["vocab"] = {t: new_id[i] for t, i in spec["model"]["vocab"].items() if i in new_id}
    for t in spec.get("added_tokens", []):
        t["id"] = new_id[t["id"]]
    post = spec.get("post_processor") or {}
    for special in (post.get("special_tokens") or {}).values():
        special["ids"] = [new_id[i] for i in special["ids"]]
    for key in ("padding",):
        if spec.get(key) and "pad_id" in spec[key]:
            spec[key]["pad_id"] = new_id[spec[key]["pad_id"]]
    return json.dumps(spec, ensure_ascii=False)


def prune_embeddings(model, kept: list[int]):
    """Keep only rows ``kept`` of the word embedding, in place; returns model."""
    import torch

    emb = model.bert.embeddings.word_embeddings
    index = torch.tensor(kept, dtype=torch.long)
    new = torch.nn.Embedding(len(kept), emb.embedding_dim)
    with torch.no_grad():
        new.weight.copy_(emb.weight[index])
    model.bert.embeddings.word_embeddings = new
    model.config.vocab_size = len(kept)
    pad = model.config.pad_token_id
    model.config.pad_token_id = kept.index(pad) if pad in kept else 0
    return model
