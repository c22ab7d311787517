"""Vocabulary pruning: drop embedding rows of tokens the domain never uses."""

from __future__ import annotations

import json
from collections import Counter

from shrinkflow.arch import embeddings, set_word_embeddings, word_embeddings


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


def nearest_kept(embeddings, kept: list[int], chunk: int = 4096) -> dict[int, int]:
    """For every row not in ``kept``: the kept row with the highest cosine
    similarity to it (old ids both). Chunked: never a vocab x vocab matrix."""
    import torch

    emb = torch.nn.functional.normalize(embeddings.detach().float(), dim=1)
    keep = set(kept)
    index = torch.tensor(kept, dtype=torch.long)
    dropped = [i for i in range(emb.shape[0]) if i not in keep]
    out: dict[int, int] = {}
    for start in range(0, len(dropped), chunk):
        rows = dropped[start:start + chunk]
        best = (emb[torch.tensor(rows, dtype=torch.long)] @ emb[index].T).argmax(1)
        out.update(zip(rows, index[best].tolist()))
    return out


def remap_tokenizer(tokenizer_json: str, kept: list[int], nearest: dict[int, int] | None = None) -> str:
    """The same WordPiece tokenizer over the kept tokens, renumbered 0..n-1.

    Without ``nearest``: greedy longest-match WordPiece segments any text
    whose pieces were all kept exactly as before, so in-vocabulary text gets
    identical ids (up to renumbering); other words fall back to shorter kept
    pieces. With ``nearest`` (dropped old id -> kept old id): every token
    stays in the vocabulary, so all text is segmented as before, and a
    dropped token reads its nearest kept token's embedding row.
    """
    spec = json.loads(tokenizer_json)
    new_id = {old: new for new, old in enumerate(kept)}
    if spec["model"].get("type") != "WordPiece":
        raise ValueError(f"vocab_prune supports WordPiece tokenizers, not {spec['model'].get('type')}")
    if nearest:
        new_id.update({old: new_id[near] for old, near in nearest.items()})
    spec["model"]["vocab"] = {t: new_id[i] for t, i in spec["model"]["vocab"].items() if i in new_id}
    for t in spec.get("added_tokens", []):
        t["id"] = new_id[t["id"]]
    _remap_post_processor(spec.get("post_processor") or {}, new_id)
    for key in ("padding",):
        if spec.get(key) and "pad_id" in spec[key]:
            spec[key]["pad_id"] = new_id[spec[key]["pad_id"]]
    # Compact separators: the tokenizer counts in the served size.
    return json.dumps(spec, ensure_ascii=False, separators=(",", ":"))


def _remap_post_processor(post: dict, new_id: dict[int, int]) -> None:
    """Renumber the special-token ids a post-processor inserts, in place:
    TemplateProcessing (BERT, MPNet) lists them under ``special_tokens``,
    BertProcessing / RobertaProcessing as ``cls``/``sep`` [token, id] pairs,
    a ``Sequence`` nests processors."""
    for special in (post.get("special_tokens") or {}).values():
        special["ids"] = [new_id[i] for i in special["ids"]]
    for key in ("cls", "sep"):
        if isinstance(post.get(key), list) and len(post[key]) == 2:
            post[key][1] = new_id[post[key][1]]
    for inner in post.get("processors") or []:
        _remap_post_processor(inner, new_id)


def prune_embeddings(model, kept: list[int]):
    """Keep only rows ``kept`` of the word embedding, in place; returns model.

    The pad id (config.pad_token_id) is renumbered; MPNet and RoBERTa
    embeddings also hold it as ``padding_idx`` (their position ids are counted
    from non-pad tokens), so that is renumbered too.
    """
    import torch

    emb = word_embeddings(model)
    index = torch.tensor(kept, dtype=torch.long)
    new = torch.nn.Embedding(len(kept), emb.embedding_dim)
    with torch.no_grad():
        new.weight.copy_(emb.weight[index])
    set_word_embeddings(model, new)
    model.config.vocab_size = len(kept)
    pad = model.config.pad_token_id
    model.config.pad_token_id = kept.index(pad) if pad in kept else 0
    block = embeddings(model)
    if getattr(block, "padding_idx", None) is not None:
        old = block.padding_idx
        block.padding_idx = kept.index(old) if old in kept else model.config.pad_token_id
    return model
