"""Architecture adapter: where each supported encoder family keeps its parts.

A teacher is a Hugging Face ``*ForSequenceClassification`` model. Compression
steps need to reach inside it (the encoder's layer list for a layer-subset
student, each layer's attention and FFN Linear modules for structured and
magnitude pruning, the word embeddings for vocabulary pruning, the classifier
rows for relabelling), and the tokenizer's special tokens differ by family.
This module is the one place that knows those paths; nothing else in the
library spells ``model.bert`` or ``"[PAD]"``.

Supported ``model_type`` values (``config.json``): ``bert`` (BERT, MiniLM),
``mpnet`` (MPNet, e.g. all-mpnet-base-v2), ``roberta`` and ``distilbert``. A step that cannot
work on a family is listed in ``Family.unsupported`` with the reason, and
``check_step`` refuses it (the params schema calls it when the teacher's
family can be known, the compress stage always).

Pure Python: torch is never imported here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from shrinkflow.errors import MissingInput, ModelError


class UnsupportedArchitecture(ModelError):
    """A checkpoint's ``model_type`` (or a step on it) that shrinkflow cannot handle."""


@dataclass(frozen=True)
class Family:
    """Attribute paths (dotted, from the module named in the field's comment)
    to the parts compression needs, and the tokenizer's special tokens."""

    model_type: str
    base: str                       # model -> the bare encoder model (model.bert)
    layers: str                     # base -> the ModuleList of encoder layers
    word_embeddings: str            # base -> the token embedding (nn.Embedding)
    embeddings: str                 # base -> the whole embedding block
    attention: str                  # layer -> the module holding num_attention_heads etc.
    qkv: tuple[str, str, str]       # layer -> query, key, value Linear
    attn_out: str                   # layer -> the attention output projection Linear
    ffn_in: str                     # layer -> FFN expansion Linear
    ffn_out: str                    # layer -> FFN contraction Linear
    logits: str                     # model -> the Linear whose rows are the class logits
    tokenizer_model: str            # the tokenizers model type vocab pruning rewrites
    pad: str
    cls: str
    sep: str
    unk: str
    mask: str
    unsupported: dict[str, str] = field(default_factory=dict)   # method -> why
    heads_attr: str = "num_attention_heads"  # attention module's head-count attribute


_BERT_LAYER = dict(attention="attention.self",
                   qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
                   attn_out="attention.output.dense", ffn_in="intermediate.dense", ffn_out="output.dense")

FAMILIES: dict[str, Family] = {
    "bert": Family("bert", base="bert", layers="encoder.layer", word_embeddings="embeddings.word_embeddings",
                   embeddings="embeddings", logits="classifier", tokenizer_model="WordPiece",
                   pad="[PAD]", cls="[CLS]", sep="[SEP]", unk="[UNK]", mask="[MASK]", **_BERT_LAYER),
    "mpnet": Family("mpnet", base="mpnet", layers="encoder.layer", word_embeddings="embeddings.word_embeddings",
                    embeddings="embeddings", attention="attention.attn",
                    qkv=("attention.attn.q", "attention.attn.k", "attention.attn.v"),
                    attn_out="attention.attn.o", ffn_in="intermediate.dense", ffn_out="output.dense",
                    logits="classifier.out_proj", tokenizer_model="WordPiece",
                    pad="<pad>", cls="<s>", sep="</s>", unk="[UNK]", mask="<mask>",
                    unsupported={"structured_prune": "MPNet's relative position bias is one table shared by "
                                                     "every layer's heads, so heads cannot be removed per layer"}),
    "roberta": Family("roberta", base="roberta", layers="encoder.layer", word_embeddings="embeddings.word_embeddings",
                      embeddings="embeddings", logits="classifier.out_proj", tokenizer_model="BPE",
                      pad="<pad>", cls="<s>", sep="</s>", unk="<unk>", mask="<mask>",
                      unsupported={"vocab_prune": "its tokenizer is byte-level BPE; vocab_prune rewrites "
                                                  "WordPiece vocabularies only"},
                      **_BERT_LAYER),
    "distilbert": Family("distilbert", base="distilbert", layers="transformer.layer",
                         word_embeddings="embeddings.word_embeddings", embeddings="embeddings",
                         attention="attention", qkv=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
                         attn_out="attention.out_lin", ffn_in="ffn.lin1", ffn_out="ffn.lin2",
                         logits="classifier", tokenizer_model="WordPiece", heads_attr="n_heads",
                         pad="[PAD]", cls="[CLS]", sep="[SEP]", unk="[UNK]", mask="[MASK]"),
}
SUPPORTED = tuple(FAMILIES)
# Every family's pad token, in lookup order: a tokenizer.json names no model type.
PAD_TOKENS = tuple(dict.fromkeys(f.pad for f in FAMILIES.values()))


def family(model_or_type) -> Family:
    """The Family of a model, a transformers config or a ``model_type`` string.

    Raises UnsupportedArchitecture naming the type and the supported ones.
    """
    model_type = model_or_type if isinstance(model_or_type, str) else \
        getattr(getattr(model_or_type, "config", model_or_type), "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported; supported architectures: {', '.join(SUPPORTED)}")
    return FAMILIES[model_type]


def check_step(model_type: str, method: str) -> None:
    """Raise UnsupportedArchitecture if compression ``method`` cannot run on ``model_type``."""
    why = family(model_type).unsupported.get(method)
    if why:
        raise UnsupportedArchitecture(f"{method} is not supported for model_type {model_type}: {why}")


def checkpoint_config(checkpoint_dir: Path | str) -> dict:
    """A checkpoint's config.json as a dict, with ``model_type`` present.

    Raises MissingInput (a FileNotFoundError) / ValueError naming the file.
    """
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise MissingInput(f"{path}: no config.json; train.model.path must be a Hugging Face "
                           "checkpoint directory (config.json, model.safetensors, tokenizer files)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        config["model_type"] = str(config["model_type"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: cannot read model_type: {exc!r}") from None
    return config


def checkpoint_model_type(checkpoint_dir: Path | str) -> str:
    """``model_type`` from a checkpoint's config.json (raw, not validated)."""
    return checkpoint_config(checkpoint_dir)["model_type"]


def checkpoint_num_layers(checkpoint_dir: Path | str) -> int | None:
    """The encoder's layer count from config.json (``n_layers`` for DistilBERT); None if absent."""
    config = checkpoint_config(checkpoint_dir)
    n = config.get("num_hidden_layers", config.get("n_layers"))
    return int(n) if n is not None else None


def check_checkpoint(checkpoint_dir: Path | str) -> str:
    """Validate a local checkpoint directory before anything is loaded.

    Returns its model_type. Raises UnsupportedArchitecture for an unsupported
    ``model_type``, ModelError when there are no safetensors weights (a
    ``pytorch_model.bin`` alone is refused: loading a pickle can run code),
    MissingInput (a FileNotFoundError) without a config.json.
    """
    d = Path(checkpoint_dir)
    model_type = checkpoint_model_type(d)
    family(model_type)
    if not (d / "model.safetensors").is_file() and not any(d.glob("model-*.safetensors")):
        pickles = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
        hint = (f"it has only {', '.join(pickles)} (pickle, which can run code when loaded, so shrinkflow "
                "never loads it); convert it once with transformers: "
                "AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)") if pickles \
            else "no weights found"
        raise ModelError(f"{d}: no model.safetensors; {hint}")
    return model_type


def get_path(obj, path: str):
    """``get_path(model, "bert.encoder.layer")`` -> that attribute."""
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def set_path(obj, path: str, value) -> None:
    head, _, last = path.rpartition(".")
    setattr(get_path(obj, head) if head else obj, last, value)


def base_model(model):
    """The bare encoder model inside a ForSequenceClassification model."""
    return getattr(model, family(model).base)


def encoder_layers(model):
    """The encoder's layer ModuleList, in order."""
    return get_path(base_model(model), family(model).layers)


def set_encoder_layers(model, layers) -> None:
    """Replace the encoder's layer list (a torch.nn.ModuleList); updates config.num_hidden_layers."""
    set_path(base_model(model), family(model).layers, layers)
    model.config.num_hidden_layers = len(layers)


def embeddings(model):
    """The embedding block (word, position, ... embeddings and their LayerNorm)."""
    return get_path(base_model(model), family(model).embeddings)


def word_embeddings(model):
    """The token embedding (nn.Embedding, [vocab, hidden])."""
    return get_path(base_model(model), family(model).word_embeddings)


def set_word_embeddings(model, emb) -> None:
    set_path(base_model(model), family(model).word_embeddings, emb)


def attention_heads(model, layer):
    """(num_attention_heads, attention_head_size) of one layer as it is now."""
    f = family(model)
    a = get_path(layer, f.attention)
    return getattr(a, f.heads_attr), a.attention_head_size


def qkv_linears(model, layer) -> tuple:
    return tuple(get_path(layer, p) for p in family(model).qkv)


def attn_out_linear(model, layer):
    return get_path(layer, family(model).attn_out)


def ffn_linears(model, layer) -> tuple:
    """(expansion, contraction) Linear of one layer's FFN."""
    f = family(model)
    return get_path(layer, f.ffn_in), get_path(layer, f.ffn_out)


def set_layer_linears(model, layer, q, k, v, out, ffn_in, ffn_out, num_heads: int) -> None:
    """Put (smaller) Linear modules into one layer and record its head count."""
    f = family(model)
    for p, m in zip(f.qkv + (f.attn_out, f.ffn_in, f.ffn_out), (q, k, v, out, ffn_in, ffn_out)):
        set_path(layer, p, m)
    a = get_path(layer, f.attention)
    setattr(a, f.heads_attr, num_heads)
    if hasattr(a, "all_head_size"):  # BERT, MPNet, RoBERTa reshape by it; DistilBERT by -1
        a.all_head_size = num_heads * a.attention_head_size


def logits_linear(model):
    """The classifier's last Linear: row i produces class i's logit."""
    return get_path(model, family(model).logits)


def encoder_linear_modules(model) -> list:
    """Every Linear inside the encoder layers, in module order."""
    import torch

    return [m for m in encoder_layers(model).modules() if isinstance(m, torch.nn.Linear)]


def pad_token(tokenizer) -> tuple[str, int]:
    """(pad token, id) of a ``tokenizers.Tokenizer``: its own padding setting
    if saved with one, else the first family pad token in its vocabulary.
    Falls back to id 0 (the attention mask hides padding either way)."""
    if tokenizer.padding:
        return tokenizer.padding["pad_token"], tokenizer.padding["pad_id"]
    for tok in PAD_TOKENS:
        i = tokenizer.token_to_id(tok)
        if i is not None:
            return tok, i
    return PAD_TOKENS[0], 0
