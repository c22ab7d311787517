"""Predictors: one interface over torch-eager and ONNX Runtime models.

``load_predictor(dir)`` reads the model's manifest and returns an object with
``predict(texts) -> Output`` (logits ``[B, C]`` plus, per text, how many
tokens the model read and whether the text was cut) and
``predict_logits(texts) -> np.ndarray[B, C]``. Validation, benchmarks,
monitoring and serving all go through it, so what is measured is what is
served.

Two things decide what a model *reads* and were invisible before:

- **Truncation.** A text longer than the model's ``max_seq_len`` tokens is
  cut. ``head`` keeps the first tokens (what training does); ``head_tail``
  keeps the first quarter of the budget and the last three quarters, after
  Sun et al., "How to Fine-Tune BERT for Text Classification?" (CCL 2019),
  whose head+tail (128 + 382 of 512) beat head-only on long reviews: a
  verdict at the end of a long review is what head-only loses.
- **Batch invariance.** ONNX Runtime's dynamic int8 (``DynamicQuantizeLinear``)
  computes one activation scale over the whole input tensor, padding
  included, so a text's logits change with the texts it is batched with
  (microsoft/onnxruntime#10111). ``predict_served(..., per_row=True)`` runs
  each text alone, so its answer never depends on its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from shrinkflow.modeling import TOKENIZER, load_tokenizer, load_torch_model, read_manifest

Truncation = Literal["head", "head_tail"]
TRUNCATIONS: tuple[str, ...] = ("head", "head_tail")
# head_tail: the share of the token budget taken from the start of the text
# (Sun et al. 2019: 128 of 510 content tokens from the head, the rest from the tail).
HEAD_SHARE = 0.25
# ONNX ops whose output for one row depends on the other rows of the batch.
BATCH_DEPENDENT_OPS = frozenset({"DynamicQuantizeLinear"})


@dataclass(frozen=True)
class Encoded:
    """A tokenized batch: ``ids`` and ``mask`` are int64 ``[B, L]`` padded to
    the longest row; ``tokens_seen`` (int64 ``[B]``) counts the tokens the
    model reads, special tokens included; ``truncated`` (bool ``[B]``) is
    True where the text had more tokens than ``max_seq_len``."""

    ids: np.ndarray
    mask: np.ndarray
    tokens_seen: np.ndarray
    truncated: np.ndarray


@dataclass(frozen=True)
class Output:
    """``logits`` float ``[B, C]``; ``tokens_seen`` int64 ``[B]``;
    ``truncated`` bool ``[B]``."""

    logits: np.ndarray
    tokens_seen: np.ndarray
    truncated: np.ndarray


class TextEncoder:
    """Texts -> ``Encoded``, cutting each text to ``max_seq_len`` tokens by
    ``truncation`` (``head`` or ``head_tail``, see the module docstring).

    Raises ``ValueError`` for an unknown strategy. Texts must be valid
    Unicode (no lone surrogates); the tokenizer raises ``TypeError`` otherwise.
    """

    def __init__(self, tokenizer_path: Path | str, max_seq_len: int, truncation: Truncation = "head"):
        if truncation not in TRUNCATIONS:
            raise ValueError(f"unknown truncation {truncation!r}; one of {list(TRUNCATIONS)}")
        self.max_seq_len, self.truncation = int(max_seq_len), truncation
        self.tokenizer = load_tokenizer(tokenizer_path, max_seq_len)
        self.pad_id = self.tokenizer.padding["pad_id"] if self.tokenizer.padding else 0
        if truncation == "head_tail":
            from tokenizers import Tokenizer

            # The whole text is tokenized, then cut by hand: the tokenizer's
            # own truncation only keeps one end. A second copy from the file,
            # not from to_str(): a vocabulary-pruned tokenizer maps several
            # tokens to one id, and its to_str()/from_str() round trip drops
            # tokens ("loved" came back as "lo ##ved").
            self._full = Tokenizer.from_file(str(tokenizer_path))
            self._full.no_truncation()
            self._full.no_padding()

    def __call__(self, texts: list[str]) -> Encoded:
        if self.truncation == "head":
            encs = self.tokenizer.encode_batch(list(texts))
            ids = np.asarray([e.ids for e in encs], dtype=np.int64).reshape(len(encs), -1)
            mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64).reshape(len(encs), -1)
            truncated = np.asarray([len(e.overflowing) > 0 for e in encs], dtype=bool)
            return Encoded(ids, mask, mask.sum(axis=1).astype(np.int64), truncated)
        rows = [e.ids for e in self._full.encode_batch(list(texts))]
        budget = self.max_seq_len
        head = max(1, int(round(budget * HEAD_SHARE)))
        kept = [r if len(r) <= budget else r[:head] + r[len(r) - (budget - head):] for r in rows]
        width = max((len(r) for r in kept), default=0)
        ids = np.full((len(kept), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(kept), width), dtype=np.int64)
        for i, r in enumerate(kept):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        truncated = np.asarray([len(r) > budget for r in rows], dtype=bool)
        return Encoded(ids, mask, mask.sum(axis=1).astype(np.int64), truncated)


class TorchPredictor:
    """A torch-eager model directory (``format: torch``)."""

    batch_dependent = False

    def __init__(self, model_dir: Path, threads: int, truncation: Truncation = "head"):
        import torch

        torch.set_num_threads(threads)
        self._torch = torch
        manifest = read_manifest(model_dir)
        self.encoder = TextEncoder(Path(model_dir) / TOKENIZER, manifest["max_seq_len"], truncation)
        self.tokenizer = self.encoder.tokenizer
        self.model = load_torch_model(model_dir)

    def predict(self, texts: list[str]) -> Output:
        enc = self.encoder(texts)
        with self._torch.inference_mode():
            out = self.model(input_ids=self._torch.from_numpy(enc.ids),
                             attention_mask=self._torch.from_numpy(enc.mask))
        return Output(out.logits.float().numpy(), enc.tokens_seen, enc.truncated)

    def predict_logits(self, texts: list[str]) -> np.ndarray:
        return self.predict(texts).logits


class OrtPredictor:
    """An ONNX Runtime model directory (``format: onnx``)."""

    def __init__(self, model_dir: Path, threads: int, spin: bool = True, truncation: Truncation = "head"):
        import onnxruntime as ort

        manifest = read_manifest(model_dir)
        self.encoder = TextEncoder(Path(model_dir) / TOKENIZER, manifest["max_seq_len"], truncation)
        self.tokenizer = self.encoder.tokenizer
        opts = ort.SessionOptions()
        # Pin threads like torch.set_num_threads, so latencies compare fairly.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # ORT's worker threads spin while waiting for work: the lowest latency
        # for one caller (validation), but on a shared 2-core server they burn
        # the CPU the HTTP loop and the log writer need. serve turns it off.
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(Path(model_dir) / "model.onnx"), opts,
                                            providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self.session.get_inputs()}
        self.batch_dependent = bool(batch_dependent_ops(Path(model_dir) / "model.onnx"))

    def predict(self, texts: list[str]) -> Output:
        enc = self.encoder(texts)
        feed = {"input_ids": enc.ids, "attention_mask": enc.mask}
        logits = self.session.run(["logits"], {k: v for k, v in feed.items() if k in self._inputs})[0]
        return Output(logits, enc.tokens_seen, enc.truncated)

    def predict_logits(self, texts: list[str]) -> np.ndarray:
        return self.predict(texts).logits


def batch_dependent_ops(onnx_path: Path | str) -> list[str]:
    """The op types in an ONNX graph (subgraphs included) whose output for one
    row depends on the other rows (``BATCH_DEPENDENT_OPS``); [] if none."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    found: set[str] = set()

    def walk(graph) -> None:
        for node in graph.node:
            if node.op_type in BATCH_DEPENDENT_OPS:
                found.add(node.op_type)
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return sorted(found)


def load_predictor(model_dir: Path | str, threads: int = 2, spin: bool = True, truncation: Truncation = "head"):
    """A predictor for a shrinkflow model directory. Raises FileNotFoundError
    (not a model directory) or ValueError (unknown format or truncation)."""
    fmt = read_manifest(Path(model_dir))["format"]
    if fmt == "torch":
        return TorchPredictor(Path(model_dir), threads, truncation)
    if fmt == "onnx":
        return OrtPredictor(Path(model_dir), threads, spin, truncation)
    raise ValueError(f"{model_dir}: unknown model format {fmt!r}")


def predict_served(predictor, texts: list[str], per_row: bool, chunk: int = 8) -> Output:
    """What the server answers for ``texts``, in their order.

    ``per_row``: each text is its own model call, so its output is exactly
    what it gets alone (for batch-dependent models). Otherwise the texts are
    sorted by length and run in chunks of ``chunk``: a batch pads every text to
    its longest, so one padded call of 32 random-length texts did ~2.5x the
    work of the same texts unpadded (measured: fewer requests/s than no
    batching at all); chunks of similar length keep the padding small while
    still sharing each call's overhead.
    """
    n = len(texts)
    if n == 0:
        raise ValueError("no texts to predict")
    order = [[i] for i in range(n)] if per_row else \
        [list(ix) for ix in np.array_split(np.argsort([len(t) for t in texts], kind="stable"),
                                           list(range(chunk, n, chunk)))]
    logits = tokens = truncated = None
    for idx in order:
        out = predictor.predict([texts[i] for i in idx])
        if logits is None:
            logits = np.empty((n, out.logits.shape[1]), dtype=out.logits.dtype)
            tokens, truncated = np.empty(n, dtype=np.int64), np.empty(n, dtype=bool)
        logits[idx], tokens[idx], truncated[idx] = out.logits, out.tokens_seen, out.truncated
    return Output(logits, tokens, truncated)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``[B, C]`` logits, computed in the logits' dtype
    after subtracting each row's max (no overflow)."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def batch_invariance(predictor, texts: list[str], batch_size: int = 32, seed: int = 0) -> dict:
    """How much a text's output depends on the texts batched with it.

    Every text is predicted alone (one call each), then in batches of
    ``batch_size`` drawn by a seeded shuffle, so each batch mixes lengths and
    pads most of its rows. Returns ``rows``, ``batch_size``,
    ``max_prob_diff`` (the largest absolute change of any class probability,
    in [0, 1]), ``mean_prob_diff`` and ``label_flips`` (texts whose argmax
    changed), plus ``labels_alone`` (the per-row argmax, int list): what a
    per-row server answers. Raises ValueError on no texts.
    """
    if not texts:
        raise ValueError("batch invariance needs at least one text")
    alone = np.vstack([softmax(predictor.predict_logits([t]).astype(np.float64)) for t in texts])
    order = np.random.default_rng(seed).permutation(len(texts))
    batched = np.empty_like(alone)
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        batched[idx] = softmax(predictor.predict_logits([texts[i] for i in idx]).astype(np.float64))
    diff = np.abs(alone - batched).max(axis=1)
    return {"rows": len(texts), "batch_size": batch_size, "max_prob_diff": float(diff.max()),
            "mean_prob_diff": float(diff.mean()),
            "label_flips": int((alone.argmax(axis=1) != batched.argmax(axis=1)).sum()),
            "labels_alone": alone.argmax(axis=1).tolist()}


def predict_logits_batched(predictor, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """``[N, C]`` logits for many texts, in their order, batched by length so
    padding stays small."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = None
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        logits = predictor.predict_logits([texts[i] for i in idx])
        if out is None:
            out = np.empty((len(texts), logits.shape[1]), dtype=logits.dtype)
        out[idx] = logits
    return out if out is not None else np.empty((0, 0), dtype=np.float32)


def predict_labels(predictor, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Labels for many texts, batched by length so padding stays small."""
    if not texts:
        return np.empty(0, dtype=np.int64)
    return predict_logits_batched(predictor, texts, batch_size).argmax(axis=1).astype(np.int64)
