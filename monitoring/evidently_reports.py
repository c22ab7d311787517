"""One monitoring run: a window of the prediction log (current) against the
reference split (reference), as Evidently reports on disk plus a DriftSummary.

Evidently, torch and the models are imported inside the functions, so that
importing ``monitoring`` stays cheap and free of side effects.

The monitor must never go down on what the log holds: an empty text, a text
of control characters, NaN probabilities, one class of feedback, a window of
one row, values another writer put there. So:

- the text descriptors are computed here (``text_descriptors``: numpy and
  the standard library, defined for every string, the empty one included)
  and handed to Evidently as plain numerical columns; Evidently only runs the
  drift tests. Its own ``NonLetterCharacterPercentage`` divides by the text's
  length (ZeroDivisionError on ``""``), and its ``OOVWordsPercentage`` and
  ``Sentiment`` call ``nltk.download`` at run time;
- every figure is computed on its own terms: one that cannot be computed on
  this window (no finite value, one class where a test needs two, an
  Evidently error) is reported as not computed with its reason, and the
  other figures and the policy go on.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np

from monitoring.reference_cache import ReferenceCache, directory_digest, texts_digest
from monitoring.summary import (DriftSummary, NotComputed, Quality, ShareShift, TeacherAgreement, Truncation,
                                Window, column_drifts, extract)

TEXT = "text"
LABEL = "prediction"
# The probability the served model gave the class it answered (its largest):
# defined for any number of classes, and it falls when the model grows unsure.
PROB = "prob_predicted"
TARGET = "target"
# Whether the model read the whole text (1) or a cut of it (0): per row from
# the prediction log, per reference text from the served model. A descriptor
# of its own, next to the text descriptors: its drift is reported with the
# truncated share (DriftSummary.truncation), not counted in text drift.
TRUNCATED = "truncated"
EMBEDDINGS = "sentence"
# Descriptors after Evidently 0.7.23's text features (same names, same
# definitions, see text_descriptors), then our own.
EVIDENTLY_DESCRIPTORS = ("length_chars", "word_count", "sentence_count", "non_letter_pct")
OOV = "oov_share"
DESCRIPTORS = (*EVIDENTLY_DESCRIPTORS, OOV)
REPORT_HTML, REPORT_JSON, QUALITY_HTML, SUMMARY_JSON = "report.html", "report.json", "quality.html", "summary.json"
_WORD = re.compile(r"[a-z']+")
# Evidently 0.7.23, legacy/features/word_count_feature.py and
# sentence_count_feature.py: the same patterns, so figures stay comparable
# with reports written before the descriptors moved here.
_NOT_LETTER_OR_SPACE = re.compile(r"[^a-zA-Z ]+")
_SENTENCE_END = re.compile(r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=\.|\?)\s")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def vocabulary(texts: list[str]) -> frozenset[str]:
    return frozenset(w for t in texts for w in words(t))


def oov_share(texts: list[str], vocab: frozenset[str]) -> np.ndarray:
    """Per text: the share of its words never seen in training (0 when it has none)."""
    out = []
    for t in texts:
        ws = words(t)
        out.append(sum(w not in vocab for w in ws) / len(ws) if ws else 0.0)
    return np.asarray(out, dtype=float)


def text_descriptors(texts: list[str], vocab: frozenset[str]):
    """Per text, the numerical descriptors DESCRIPTORS (a DataFrame, one row
    per text, float), defined for every string:

    - ``length_chars``: characters;
    - ``word_count``: words after removing everything but ASCII letters and
      spaces (Evidently's WordCount);
    - ``sentence_count``: Evidently's SentenceCount split (at least 1), but 0
      for a text with nothing but whitespace, where Evidently says 1;
    - ``non_letter_pct``: 100 x the characters that are neither letters nor
      spaces, over all characters (Evidently's NonLetterCharacterPercentage),
      and 0 for the empty text, where Evidently divides by zero;
    - ``oov_share``: ``oov_share`` above.
    """
    import pandas as pd

    texts = [str(t) for t in texts]
    lengths = np.asarray([len(t) for t in texts], dtype=float)
    non_letters = np.asarray([sum(1 for ch in t if not ch.isalpha() and ch != " ") for t in texts], dtype=float)
    return pd.DataFrame({
        "length_chars": lengths,
        "word_count": np.asarray([len(_NOT_LETTER_OR_SPACE.sub("", t).split()) for t in texts], dtype=float),
        "sentence_count": np.asarray([max(1, len(_SENTENCE_END.split(t))) if t.strip() else 0 for t in texts],
                                     dtype=float),
        "non_letter_pct": np.divide(100.0 * non_letters, lengths, out=np.zeros_like(lengths), where=lengths > 0),
        OOV: oov_share(texts, vocab),
    })


def softmax_positive(logits: np.ndarray) -> np.ndarray:
    """The class-1 probability of a two-class model's logits [B, 2] (tests
    and benchmarks of the built-in task; the monitor itself reads every
    class, see ``softmax_probabilities``)."""
    return softmax_probabilities(logits)[:, 1]


def softmax_probabilities(logits: np.ndarray) -> np.ndarray:
    """[B, C] probabilities of [B, C] logits, exactly as the server answers."""
    from shrinkflow.predictors import softmax  # the one the server answers with

    return softmax(np.asarray(logits, dtype=np.float64))


def window_sha256(prediction_ids) -> str:
    return hashlib.sha256("\n".join(map(str, prediction_ids)).encode()).hexdigest()


def _numeric(values) -> np.ndarray:
    """Any column of the log as float, NaN where a value is not a finite number."""
    import pandas as pd

    out = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").to_numpy(dtype=float)
    out[~np.isfinite(out)] = np.nan
    return out


def _probability(p, k: float) -> float:
    """The probability of class ``k`` (the row's own id) in one logged row,
    NaN when the row holds no usable one (not a number in [0, 1])."""
    if math.isnan(k):
        return math.nan
    try:
        v = float(p[int(k)])
    except (TypeError, ValueError, IndexError, KeyError):
        return math.nan
    return v if 0.0 <= v <= 1.0 else math.nan


def _row_labels(v) -> list:
    """A row's stored label names (schema 3), [] when it has none. A list,
    a tuple or a numpy array (what a Parquet read of the log gives)."""
    if isinstance(v, np.ndarray):
        v = v.tolist()
    return list(v) if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v) else []


def _class_ids(values, row_labels: list[list], labels: tuple[str, ...]) -> np.ndarray:
    """Class ids as the row logged them (indices into its own label names,
    or, on rows logged before schema 3, into ``labels``) turned into ids in
    ``labels``: float, NaN where unknown (not an integer id of the row's
    classes, a class ``labels`` does not have, or names given as None)."""
    out = _numeric(values)
    index = {name: i for i, name in enumerate(labels)}
    for i, (v, names) in enumerate(zip(out, row_labels)):
        if names is None or np.isnan(v) or v != int(v):   # None: a row whose names cannot be trusted
            out[i] = np.nan
        elif names:
            out[i] = index.get(names[int(v)], np.nan) if 0 <= v < len(names) else np.nan
        elif not 0 <= v < len(labels):
            out[i] = np.nan
    return out


def clean_window(window, labels: tuple[str, ...] = ("negative", "positive")):
    """The prediction log's window (predlog.COLUMNS) as the monitor reads it,
    whatever the rows hold, for the served version's ``labels`` (names in
    class-id order): a DataFrame with ``text`` (str; None -> ""), ``prob``
    (the probability of the class the row was answered with, NaN when
    unknown), ``label`` (the served class as an id in ``labels``, float, NaN
    when unknown), ``feedback`` (likewise, NaN when none), ``truncated`` (1.0
    / 0.0, NaN when unknown), ``prediction_id``, ``ts``,
    ``model_version`` (str) and ``other_label_set`` (bool, below).

    A row of schema 3 names its classes (``labels`` column): its ids are
    read through those names, so a row answered by a version with another
    label set maps by name (a class the served version lacks is unknown).
    Except where either set's names are all integers (``0, 1, 2``): such a
    name is an id, and a renumbered label set (``1, 2, 3`` -> ``0, 1, 2``)
    gives it another class (a helper's finding: old rows read that way put
    the teacher agreement at 0.021). Those rows' classes and feedback are
    unknown, and ``other_label_set`` marks them; their texts still count.
    Older rows are ids in ``labels`` (the built-in task's two)."""
    import pandas as pd

    from shrinkflow.labels import integer_names

    def text(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)

    labels = tuple(labels)
    names = [_row_labels(v) for v in window["labels"]] if "labels" in window else [[] for _ in range(len(window))]
    # The answered class as the row's own id (its probability's index).
    raw = _numeric(window["label"])
    own = np.asarray([v if not np.isnan(v) and v == int(v) and 0 <= v < (len(n) or len(labels)) else np.nan
                      for v, n in zip(raw, names)], dtype=float)
    served = set(labels)
    integer_ids = integer_names(labels)
    other = [bool(n) and set(n) != served and (integer_ids or integer_names(n)) for n in names]
    trusted = [None if o else n for n, o in zip(names, other)]
    label = _class_ids(window["label"], trusted, labels)
    feedback = _class_ids(window["feedback_label"], trusted, labels)
    truncated = _numeric(window["truncated"]) if "truncated" in window else np.full(len(window), np.nan)
    truncated[~np.isnan(truncated)] = (truncated[~np.isnan(truncated)] != 0).astype(float)
    return pd.DataFrame({
        "prediction_id": [str(v) for v in window["prediction_id"]],
        "ts": [str(v) for v in window["ts"]],
        "model_version": [str(v) for v in window["model_version"]],
        "text": [text(v) for v in window["text"]],
        "prob": np.asarray([_probability(p, k) if not np.isnan(lab) else math.nan
                            for p, k, lab in zip(window["probabilities"], own, label)], dtype=float),
        "label": label, "feedback": feedback, "truncated": truncated, "other_label_set": other})


# The shadow teacher's batches: texts sorted by length first, so each batch
# pads to about its own texts' length. The real 6-layer teacher on 2 cores
# (cProfile, bench/results/monitor_speed.md): 1,000 movie-review sentences
# sorted, 64 a batch, in 5.9 s; before, 728 in window order, 32 a batch, 6.2 s.
TEACHER_BATCH = 64


class ShadowTeacher:
    """The kept teacher in shadow: texts in, (labels [N] int64, mean-pooled
    last-layer sentence embeddings [N, D] float32) out, each text read cut
    the way the server cuts it (``truncation``, see shrinkflow.predictors).
    The model is loaded once, on the first call, and reused by every call.

    Each distinct text is run once (a window repeats texts: a sample of
    1,000 rows of the benchmark's 10,000-row window holds about 830), its
    outputs copied to every row that holds it. Distinct texts are run in
    batches of ``batch_size`` after sorting them by length (less padding);
    outputs come back in the texts' order. A text's
    outputs can differ in the last float bits with the other texts of its
    batch (padding changes the matmul shapes), never its meaning: the same
    list of texts gives the same arrays, bit for bit."""

    def __init__(self, teacher_dir: Path, threads: int = 2, batch_size: int = TEACHER_BATCH,
                 truncation: str = "head"):
        self.teacher_dir, self.threads, self.batch_size, self.truncation = (Path(teacher_dir), threads,
                                                                            batch_size, truncation)
        self._model = self._encoder = None

    def load(self) -> None:
        """Load the tokenizer and the model now (the first call does
        otherwise). Raises what loading raises (OSError, ValueError)."""
        import torch

        from shrinkflow.modeling import TOKENIZER, load_torch_model, read_manifest
        from shrinkflow.predictors import TextEncoder

        torch.set_num_threads(self.threads)
        self._encoder = TextEncoder(self.teacher_dir / TOKENIZER, read_manifest(self.teacher_dir)["max_seq_len"],
                                    self.truncation)
        self._model = load_torch_model(self.teacher_dir)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0))
        import torch

        if self._model is None:
            self.load()
        first: dict[str, int] = {}
        rows = np.asarray([first.setdefault(t, len(first)) for t in texts], dtype=np.int64)
        texts = list(first)   # distinct, in order of first appearance
        order = np.argsort([len(t) for t in texts], kind="stable")
        labels, embs = np.empty(len(texts), dtype=np.int64), None
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                idx = order[start:start + self.batch_size]
                enc = self._encoder([texts[i] for i in idx])
                out = self._model(input_ids=torch.from_numpy(enc.ids), attention_mask=torch.from_numpy(enc.mask),
                                  output_hidden_states=True)
                m = torch.from_numpy(enc.mask).unsqueeze(-1).float()
                emb = ((out.hidden_states[-1] * m).sum(1) / m.sum(1).clamp(min=1)).numpy()
                if embs is None:
                    embs = np.empty((len(texts), emb.shape[1]), dtype=emb.dtype)
                embs[idx], labels[idx] = emb, out.logits.argmax(-1).numpy()
        return labels[rows], embs[rows]

    def submit(self, texts: list[str]) -> "_Deferred":
        """A pass over ``texts``, run when its ``result()`` is asked for
        (the interface of monitoring.shadow_worker.ShadowTeacherProcess)."""
        return _Deferred(lambda: self(texts))

    def close(self) -> None:
        """Nothing to end in this process (the interface of
        monitoring.shadow_worker.ShadowTeacherProcess)."""


class _Deferred:
    def __init__(self, run):
        self._run = run

    def result(self):
        return self._run()


def teacher_pass(teacher_dir: Path, texts: list[str], threads: int = 2, batch_size: int = TEACHER_BATCH,
                 truncation: str = "head"):
    """(labels [N], mean-pooled last-layer sentence embeddings [N, D]) of
    ``texts`` from the kept teacher at ``teacher_dir``: one ShadowTeacher,
    one call (see there)."""
    return ShadowTeacher(teacher_dir, threads, batch_size, truncation)(texts)


def served_outputs(served_dir: Path, texts: list[str], truncation: str = "head", per_row: bool | None = None):
    """The served model's outputs on ``texts`` exactly as the server answers
    them (shrinkflow.predictors.predict_served): read with the serve truncation,
    and one text per call when ``per_row`` (None: when the model is
    batch-dependent, as the server decides). Returns runtime.Output (logits
    [B, C], tokens_seen [B], truncated [B]). Raises ValueError for no texts."""
    from shrinkflow.predictors import load_predictor, predict_served

    predictor = load_predictor(served_dir, threads=2, truncation=truncation)
    return predict_served(predictor, texts, per_row=predictor.batch_dependent if per_row is None else bool(per_row))


def _frame(descriptors, probs, labels, embeddings=None, targets=None, truncated=None, names=None):
    """The columns Evidently sees: descriptors, probability, label (and
    target, truncated, embeddings). No text column: Evidently has nothing
    left to compute on the raw text. ``names``: the label names, to give
    Evidently the classes by name (its multiclass report) rather than by id."""
    import pandas as pd

    def classes(values) -> np.ndarray:
        # int where every value is known: Evidently's classification metrics
        # refuse float labels; NaN (unknown) needs float.
        v = np.asarray(values, dtype=float)
        if names is not None and not np.isnan(v).any():
            return np.asarray([names[int(i)] for i in v], dtype=object)
        return v if np.isnan(v).any() else v.astype(np.int64)

    df = descriptors.reset_index(drop=True).copy()
    df[PROB] = np.asarray(probs, dtype=float)
    df[LABEL] = classes(labels)
    if targets is not None:
        df[TARGET] = classes(targets)
    if truncated is not None:
        df[TRUNCATED] = np.asarray(truncated, dtype=float)
    if embeddings is not None:  # one concat: column-by-column inserts fragment the frame
        df = pd.concat([df, pd.DataFrame(embeddings, columns=[f"emb_{i}" for i in range(embeddings.shape[1])],
                                         index=df.index)], axis=1)
    return df


def _datasets(current, reference, embedding_dims: int, with_target: bool, classes: int = 2):
    """Evidently datasets of two frames of ``_frame``. With a target: a
    binary classification for two classes (ids 0/1, positive class 1), else
    Evidently's multiclass classification (the prediction and target columns
    hold the class names)."""
    from evidently import BinaryClassification, DataDefinition, Dataset, MulticlassClassification

    task = BinaryClassification(target=TARGET, prediction_labels=LABEL) if classes == 2 else \
        MulticlassClassification(target=TARGET, prediction_labels=LABEL)
    definition = DataDefinition(
        numerical_columns=[*DESCRIPTORS, PROB],
        categorical_columns=[LABEL] + ([TARGET] if with_target else []) +
        ([TRUNCATED] if TRUNCATED in current.columns else []),
        embeddings={EMBEDDINGS: [f"emb_{i}" for i in range(embedding_dims)]} if embedding_dims else None,
        classification=[task] if with_target else None)
    return (Dataset.from_pandas(current, data_definition=definition),
            Dataset.from_pandas(reference, data_definition=definition))


def _reason(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:300]}" if msg else type(exc).__name__


def _run_units(units: list[tuple[str, list]], cur_ds, ref_ds):
    """One Evidently report of every unit's metrics, or, when that raises,
    of those units that run on their own. Returns (snapshot or None,
    {unit: reason} for the units that failed). One metric's failure fails
    Evidently's whole report, so a failing unit is found by running each
    alone."""
    from evidently import Report

    if not units:
        return None, {}
    try:
        return Report([m for _, ms in units for m in ms]).run(cur_ds, ref_ds), {}
    except Exception as exc:  # noqa: BLE001 - found and named unit by unit below
        if len(units) == 1:
            return None, {units[0][0]: _reason(exc)}
    ok, failed = [], {}
    for name, ms in units:
        try:
            ok.append((name, ms, Report(ms).run(cur_ds, ref_ds)))
        except Exception as exc:  # noqa: BLE001 - reported as not computed, with its reason
            failed[name] = _reason(exc)
    if len(ok) <= 1:
        return (ok[0][2] if ok else None), failed
    # One report (one HTML page) of the units that ran.
    return Report([m for _, ms, _ in ok for m in ms]).run(cur_ds, ref_ds), failed


def import_heavy(torch_too: bool = True) -> None:
    """Import now what ``build`` imports when it runs: Evidently's metrics
    and presets (about 4 s on a 2-core CPU) and, with ``torch_too``, torch
    and transformers (about 4 s; what the teacher needs when it runs in this
    process, and the served model on a cold cache). ``build`` needs no call
    to this; it lets a caller overlap that cost with other start-up work
    (monitoring.run.prepare). Raises ImportError as those imports would."""
    import evidently.legacy.metrics.data_drift.embedding_drift_methods  # noqa: F401
    import evidently.metrics.embeddings  # noqa: F401
    import evidently.presets  # noqa: F401
    if torch_too:
        import torch  # noqa: F401
        import transformers.modeling_utils  # noqa: F401


def build(window, reference, *, served_dir: Path, teacher_dir: Path | None, train_texts: list[str],
          validated: dict, params, out_dir: Path, created: str, seed: int = 0, truncation: str = "head",
          per_row: bool | None = None, labels: tuple[str, ...] | None = None,
          cache_dir: Path | None = None, corpus_texts: list | None = None,
          teacher_unavailable: str | None = None) -> DriftSummary:
    """Build the reports of one window into ``out_dir`` (created whole or not
    at all) and return their summary.

    ``window``: the prediction log's DataFrame (predlog.COLUMNS), any values;
    ``reference``: the reference split (text, label: class ids); ``validated``:
    the served version's figures at deploy time (``version``, ``accuracy``,
    ``agreement``, and ``agreement_rows``: the texts that agreement was
    measured on, when known); ``params``: MonitorParams; ``truncation``: how the server
    cuts long texts (serve.truncation); ``per_row``: whether the served
    version runs each text alone (None: when its predictor is batch-dependent),
    so that the reference outputs are exactly what the server answers;
    ``labels``: the served version's label names in class-id order (None:
    read from its manifest, shrinkflow_model.json); ``cache_dir``: where
    the reference split's outputs are kept between runs
    (monitoring.reference_cache; None: computed every run, the same
    figures); ``corpus_texts``: the texts a re-compression would distil on
    and hold out from (monitoring.run.read_recompress_corpus: the newest
    ``monitor.recompress_last_n`` logged rows up to the window's end; None:
    the window's own texts), which the summary's ``window.distill_texts``
    and ``heldout_texts`` count and the policy's re-compression floor reads;
    ``teacher_unavailable``: with ``teacher_dir`` None, why there is no
    teacher to judge production against (monitoring.run.kept_teacher),
    kept in the summary, where the policy warns with it.

    A figure that cannot be computed on this window is None in the summary
    and listed in ``not_computed`` with its reason. Raises ValueError for an
    empty window or an empty reference split, RegistryError for a served
    model whose manifest has no labels.

    numpy's floating-point warnings are off while it runs: on a tiny window a
    constant or all-NaN column makes Evidently divide 0 by 0 (``np.corrcoef``,
    its column statistics), which printed "RuntimeWarning: invalid value
    encountered in divide" on every such run. The NaN figures that follow are
    reported as not computed, with their reason (``_drop_nan``).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return _build(window, reference, served_dir=served_dir, teacher_dir=teacher_dir, train_texts=train_texts,
                      validated=validated, params=params, out_dir=out_dir, created=created, seed=seed,
                      truncation=truncation, per_row=per_row, labels=labels, cache_dir=cache_dir,
                      corpus_texts=corpus_texts, teacher_unavailable=teacher_unavailable)


def _build(window, reference, *, served_dir: Path, teacher_dir: Path | None, train_texts: list[str],
           validated: dict, params, out_dir: Path, created: str, seed: int, truncation: str,
           per_row: bool | None, labels: tuple[str, ...] | None, cache_dir: Path | None,
           corpus_texts: list | None, teacher_unavailable: str | None = None) -> DriftSummary:
    from shrinkflow.stats import agreement

    if len(window) == 0:
        raise ValueError("the prediction log window is empty: nothing to monitor")
    if labels is None:
        from shrinkflow.status import model_labels

        labels = model_labels(served_dir)
    labels = tuple(labels)
    n_classes = len(labels)
    not_computed: list[NotComputed] = []

    def skip(metric: str, reason: str) -> None:
        not_computed.append(NotComputed(metric=metric, reason=reason))

    w = clean_window(window, labels)
    other = np.flatnonzero(w["other_label_set"].to_numpy())
    if len(other):
        sets = sorted({(w["model_version"].iat[i], tuple(_row_labels(window["labels"].iloc[i]))) for i in other})
        skip("class_of_rows_under_another_label_set",
             f"{len(other)} row(s) were answered under another label set of integer names ("
             + "; ".join(f"{v}: {', '.join(n)}" for v, n in sets) + f"; served: {', '.join(labels)}): a "
             "renumbering may have given a name another class, so their classes and feedback are unknown "
             "(left out of the label figures); their texts are in the text and embedding drift")
    import pandas as pd

    vocab = vocabulary(train_texts)
    ref_texts = [str(t) for t in reference["text"].tolist()]
    cur_texts = w["text"].tolist()
    cur_probs, cur_labels = w["prob"].to_numpy(), w["label"].to_numpy()
    # The served model on the reference split, exactly as the server answers
    # (same truncation, per-row or batched as the served version is): what
    # its outputs looked like on the data it was validated against.
    if not ref_texts:
        raise ValueError("the reference split is empty: there is nothing to compare the window with")
    # What depends only on the deployed version, the teacher and the
    # reference split is kept between runs (monitoring.reference_cache),
    # computed exactly as here on a miss: the same figures either way.
    cache = ReferenceCache(cache_dir)
    ref_key = {"reference": texts_digest(ref_texts), "truncation": truncation}
    served_key = {**ref_key, "served": directory_digest(served_dir), "per_row": per_row}

    def served_reference() -> dict:
        out = served_outputs(served_dir, ref_texts, truncation, per_row)
        return {"logits": out.logits, "truncated": out.truncated}

    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(w), size=min(params.shadow_sample_rows, len(w)), replace=False))
    teacher, dims, ref_emb, cur_emb = None, 0, None, None
    # Rows with a feedback label: the teacher answers them too (the retrain rule).
    fb_rows, t_fb = np.flatnonzero(~np.isnan(w["feedback"].to_numpy())), None
    shadow = ref_pending = win_pending = cached = None
    if teacher_dir is None:
        teacher_unavailable = teacher_unavailable or "no kept teacher (models/teacher)"
        skip("teacher_agreement", f"{teacher_unavailable}: no teacher to run in shadow")
        skip("embedding_drift", f"{teacher_unavailable}: no teacher to embed the texts")
    else:
        # The teacher's passes are submitted now and collected after the
        # drift report: for enough texts they run in a process of their own
        # (monitoring.shadow_worker), beside this one's imports and reports.
        # The reference's pass only on a cache miss, and always on the
        # reference alone (so its batches, and its floats, never depend on
        # the window); then one pass over the shadow sample and the rows with
        # a feedback label.
        from monitoring.shadow_worker import shadow_teacher

        teacher_key = {**ref_key, "teacher": directory_digest(teacher_dir), "batch": TEACHER_BATCH,
                       "distinct": True}   # each distinct text run once (ShadowTeacher)
        cached = cache.lookup("teacher", teacher_key, len(ref_texts))
        # Sized by the window's pass, which every run makes (the reference's
        # is made once per deployed version and teacher, then cached).
        shadow = shadow_teacher(teacher_dir, truncation, len(sample) + len(fb_rows))
    try:
        if shadow is not None:
            ref_pending = shadow.submit(ref_texts) if cached is None else None
            win_pending = shadow.submit([cur_texts[i] for i in sample] + [cur_texts[i] for i in fb_rows])
        from evidently.metrics import ValueDrift
        from evidently.presets import DataDriftPreset

        served = cache.get("served", served_key, len(ref_texts), served_reference)
        if served["logits"].shape[1] != n_classes:
            raise ValueError(f"the served model {served_dir} answers {served['logits'].shape[1]} classes but its "
                             f"manifest names {n_classes}: {list(labels)}")
        ref_all = softmax_probabilities(served["logits"])
        ref_labels = ref_all.argmax(axis=1).astype(float)   # as the server answers: argmax
        ref_probs = ref_all.max(axis=1)
        ref_trunc = np.asarray(served["truncated"], dtype=float)

        # Text and prediction drift on the whole window. A column without one
        # finite value on either side cannot be tested: said before Evidently
        # is asked (it raises "An empty column ... was provided").
        cur_desc = text_descriptors(cur_texts, vocab)
        ref_desc = cache.get("descriptors", {**ref_key, "train": texts_digest(train_texts)}, len(ref_texts),
                             lambda: {c: v.to_numpy() for c, v in text_descriptors(ref_texts, vocab).items()})
        ref_desc = pd.DataFrame({c: ref_desc[c] for c in DESCRIPTORS})
        current = _frame(cur_desc, cur_probs, cur_labels, truncated=w["truncated"].to_numpy())
        ref_frame = _frame(ref_desc, ref_probs, ref_labels, truncated=ref_trunc)
        cur_ds, ref_ds = _datasets(current, ref_frame, 0, False)

        def testable(column: str, what: str) -> bool:
            for side, df in (("window", current), ("reference split", ref_frame)):
                if not np.isfinite(df[column].to_numpy(dtype=float)).any():
                    skip(what, f"no finite value of {column} in the {side}")
                    return False
            return True

        descriptors = [c for c in DESCRIPTORS if testable(c, f"descriptor:{c}")]
        units = []
        if descriptors:
            units.append(("descriptors", [DataDriftPreset(columns=descriptors, method="ks")]))
        if testable(LABEL, "prediction_label"):
            # Two classes: a z-test of the one share; more: chi-square over all of them.
            units.append(("prediction_label", [ValueDrift(column=LABEL,
                                                          method="z" if n_classes == 2 else "chisquare")]))
        if testable(PROB, "prediction_probability"):
            units.append(("prediction_probability", [ValueDrift(column=PROB, method="ks")]))
        if testable(TRUNCATED, "truncation_drift"):
            units.append(("truncation_drift", [ValueDrift(column=TRUNCATED, method="z")]))
        snap, failed = _run_units(units, cur_ds, ref_ds)
        if "descriptors" in failed:  # the preset as a whole failed: each descriptor on its own
            units = [(f"descriptor:{c}", [ValueDrift(column=c, method="ks")]) for c in descriptors] + \
                [u for u in units if u[0] != "descriptors"]
            snap, failed = _run_units(units, cur_ds, ref_ds)
        for name, reason in failed.items():
            skip(name, f"Evidently could not compute it: {reason}")
        done = {name for name, _ in units} - set(failed)
        snapshots = {"report": snap} if snap is not None else {}
        if "descriptors" not in done:
            descriptors = [c for c in descriptors if f"descriptor:{c}" in done]

        if shadow is not None:
            # The teacher's answers (waits for the passes still running).
            if cached is None:
                t_ref, e_ref = ref_pending.result()
                cached = cache.put("teacher", teacher_key, len(ref_texts), {"labels": t_ref, "embeddings": e_ref})
            ref_emb = cached["embeddings"]
            t_win, e_win = win_pending.result()
            t_labels, cur_emb, t_fb = t_win[:len(sample)], e_win[:len(sample)], t_win[len(sample):]
            known = ~np.isnan(cur_labels[sample])
            if known.any():
                teacher = TeacherAgreement(rows=int(known.sum()),
                                           agreement=agreement(cur_labels[sample][known].astype(int),
                                                               t_labels[known]),
                                           validated_agreement=validated.get("agreement"),
                                           validated_rows=validated.get("agreement_rows"))
            else:
                skip("teacher_agreement", f"none of the {len(sample)} sampled rows has a served label (one of "
                                          f"{list(labels)})")
            dims = cur_emb.shape[1]
    finally:
        if shadow is not None:
            shadow.close()

    from evidently.legacy.metrics.data_drift.embedding_drift_methods import model as model_method
    from evidently.metrics.embeddings import EmbeddingsDrift
    from evidently.presets import ClassificationPreset

    emb_name = None
    if dims:
        emb_cur = _frame(cur_desc.iloc[sample], cur_probs[sample], cur_labels[sample], cur_emb)
        emb_ref = _frame(ref_desc, ref_probs, ref_labels, ref_emb)
        e_cur, e_ref = _datasets(emb_cur, emb_ref, dims, False)
        e_snap, e_failed = _run_units([("embedding_drift", [EmbeddingsDrift(
            embeddings_name=EMBEDDINGS, drift_method=model_method(threshold=params.embedding_drift_auc))])],
            e_cur, e_ref)
        if e_snap is None:
            skip("embedding_drift", f"Evidently could not compute it on {len(sample)} window texts: "
                                    f"{e_failed['embedding_drift']}")
        else:
            snapshots["embeddings"] = e_snap
            emb_name = EMBEDDINGS

    feedback = w["feedback"].to_numpy()
    labelled = np.flatnonzero(~np.isnan(feedback) & ~np.isnan(cur_labels))
    q = None
    if len(labelled):
        y, pred = feedback[labelled].astype(int), cur_labels[labelled].astype(int)
        fig = class_quality(y, pred, labels)
        v_acc = validated.get("accuracy")
        q = Quality(labels=len(labelled), accuracy=fig["accuracy"], f1=fig["f1"], macro_f1=fig["macro_f1"],
                    recall=fig["recall"], validated_accuracy=v_acc,
                    accuracy_drop=round(v_acc - fig["accuracy"], 6) if v_acc is not None else None,
                    **teacher_quality(feedback[fb_rows], t_fb, validated.get("teacher_accuracy")))
        if len(labelled) >= 2 and "label" in reference:
            # Two classes: ids (binary, positive class 1, as before); more: names.
            names = None if n_classes == 2 else labels
            l_cur = _frame(cur_desc.iloc[labelled], cur_probs[labelled], pred, targets=y, names=names)
            l_ref = _frame(ref_desc, ref_probs, ref_labels, targets=reference["label"].to_numpy(), names=names)
            lc, lr = _datasets(l_cur, l_ref, 0, True, n_classes)
            q_snap, q_failed = _run_units([("quality_report", [ClassificationPreset()])], lc, lr)
            if q_snap is None:
                seen = sorted(set(y.tolist()) | set(pred.tolist()))
                hint = ("; Evidently 0.7's multiclass report needs the window's labels and predictions to "
                        "cover one class, or three or more, or two that include the class with id 1 "
                        f"({labels[1]!r}): with exactly two others it takes the window for a binary task "
                        "whose positive class is 1") if n_classes > 2 and len(seen) == 2 and 1 not in seen else ""
                skip("quality_report", f"Evidently's classification report on {len(labelled)} feedback labels "
                                       f"(classes {_named(sorted(set(y.tolist())), labels, n_classes)}, predicted "
                                       f"{_named(sorted(set(pred.tolist())), labels, n_classes)}): "
                                       f"{q_failed['quality_report']}{hint}")
            else:
                snapshots["quality"] = q_snap

    merged = {"metrics": [m for s in snapshots.values() for m in s.dict()["metrics"]]}
    figures = extract(merged, descriptors, label_column=LABEL if "prediction_label" in done else None,
                      probability_column=PROB if "prediction_probability" in done else None,
                      embeddings_name=emb_name, embedding_threshold=params.embedding_drift_auc, embedding_dims=dims)
    figures = _drop_nan(figures, skip)
    trunc_drift = column_drifts(merged["metrics"]).get(TRUNCATED) if "truncation_drift" in done else None
    if trunc_drift is not None and not math.isfinite(trunc_drift.value):
        skip("truncation_drift", f"Evidently returned {trunc_drift.value} for {trunc_drift.method}")
        trunc_drift = None

    known_trunc = w["truncated"].dropna()
    trunc = Truncation(strategy=truncation, known_rows=len(known_trunc),
                       share=round(float(known_trunc.mean()), 6) if len(known_trunc) else None,
                       reference_share=round(float(ref_trunc.mean()), 6), drift=trunc_drift)
    if not len(known_trunc):
        skip("truncated_share", "no row of the window says whether its text was truncated "
                                "(rows logged before prediction-log schema 2)")
    known_labels = cur_labels[~np.isnan(cur_labels)].astype(int)
    ref_share = class_shares(ref_labels.astype(int), labels)
    cur_share = class_shares(known_labels, labels) if len(known_labels) else None
    if cur_share is None:
        skip("class_share", f"no row of the window has a served label (one of {list(labels)})")
    # The split a re-compression would make of its texts (pure, by hash): the
    # policy does not trigger one that could not be split or has too few.
    from shrinkflow.window import split_window

    corpus = w["text"].tolist() if corpus_texts is None else list(corpus_texts)
    distill, heldout = split_window(corpus, params.heldout_fraction)
    summary = DriftSummary(
        created=created, model_version=validated["version"], labels=labels,
        window=Window(rows=len(w), first_ts=w["ts"].iloc[0], last_ts=w["ts"].iloc[-1],
                      sha256=window_sha256(w["prediction_id"]), model_versions=tuple(sorted(set(w["model_version"]))),
                      feedback_labels=int((~np.isnan(feedback)).sum()),
                      distill_texts=len(distill), heldout_texts=len(heldout), corpus_rows=len(corpus),
                      other_label_set_rows=len(other)),
        reference_rows=len(ref_texts), **figures,
        class_share_reference=ref_share, class_share_current=cur_share,
        largest_share_shift=largest_shift(cur_share, ref_share) if cur_share is not None else None,
        quality=q, teacher=teacher, truncation=trunc, not_computed=tuple(not_computed),
        teacher_unavailable=teacher_unavailable if teacher_dir is None else None)
    _write(out_dir, snapshots, summary)
    return summary


def teacher_quality(y: np.ndarray, teacher_pred: np.ndarray | None, validated: float | None) -> dict:
    """Quality's teacher fields: the kept teacher's accuracy on feedback
    labels ``y`` (class ids, float) from its predictions ``teacher_pred``
    (same length; None: no teacher ran), against ``validated`` (its test
    accuracy at deploy; None: not recorded). Drop = validated - accuracy."""
    if teacher_pred is None or not len(y):
        return {}
    acc = round(float(np.mean(y.astype(int) == np.asarray(teacher_pred).astype(int))), 6)
    return {"teacher_labels": int(len(y)), "teacher_accuracy": acc, "teacher_validated_accuracy": validated,
            "teacher_accuracy_drop": round(validated - acc, 6) if validated is not None else None}


def _named(ids: list[int], labels: tuple[str, ...], n_classes: int) -> list:
    """Class ids as the message shows them: the ids for two classes (as
    before), the names for more."""
    return ids if n_classes == 2 else [labels[i] for i in ids]


def class_shares(ids: np.ndarray, labels: tuple[str, ...]) -> dict[str, float]:
    """The share of each class among ``ids`` (ids in ``labels``), by name,
    every class listed (0.0 when absent). ``ids`` must not be empty."""
    counts = np.bincount(np.asarray(ids, dtype=int), minlength=len(labels))
    return {name: round(float(c / counts.sum()), 6) for name, c in zip(labels, counts)}


def largest_shift(current: dict[str, float], reference: dict[str, float]) -> ShareShift:
    """The class whose share moved most from the reference to the window;
    on a tie the one that rose (with two classes, both move alike: the one
    that gained), then the first in label order."""
    name = max(reference, key=lambda k: (round(abs(current.get(k, 0.0) - reference[k]), 9),
                                         current.get(k, 0.0) > reference[k]))
    return ShareShift(label=name, current=current.get(name, 0.0), reference=reference[name],
                      shift=round(current.get(name, 0.0) - reference[name], 6))


def class_quality(y: np.ndarray, pred: np.ndarray, labels: tuple[str, ...]) -> dict:
    """Accuracy, F1, macro-F1 and per-class recall of predictions ``pred``
    against feedback labels ``y`` (class ids in ``labels``, same length,
    not empty). ``f1``: the positive class's (id 1) for two classes, as the
    validation reports it, else the macro-F1. Macro-F1 averages over the
    classes that occur in ``y`` or ``pred`` (a class absent from both has no
    F1); ``recall`` is by name, for the classes that occur in ``y``."""
    from shrinkflow.stats import quality

    y, pred = np.asarray(y, dtype=int), np.asarray(pred, dtype=int)
    f1s = []
    for k in sorted(set(y.tolist()) | set(pred.tolist())):
        tp = int(((pred == k) & (y == k)).sum())
        fp, fn = int(((pred == k) & (y != k)).sum()), int(((pred != k) & (y == k)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    macro = round(float(np.mean(f1s)), 6)
    recall = {labels[k]: round(float((pred[y == k] == k).mean()), 6) for k in sorted(set(y.tolist()))}
    binary = quality(y, pred) if len(labels) == 2 else None
    acc = round(float((y == pred).mean()), 6)
    return {"accuracy": acc, "f1": binary["f1"] if binary else macro, "macro_f1": macro, "recall": recall}


def _drop_nan(figures: dict, skip) -> dict:
    """A test that returned NaN (Evidently does on some tiny windows) was not
    computed: a NaN compared with a threshold never fires, silently."""
    out = dict(figures)
    for key, metric in (("prediction_label", "prediction_label"), ("prediction_probability",
                                                                    "prediction_probability")):
        d = out.get(key)
        if d is not None and not math.isfinite(d.value):
            skip(metric, f"Evidently returned {d.value} for {d.method}")
            out[key] = None
    kept = []
    for d in out["descriptors"]:
        if math.isfinite(d.value):
            kept.append(d)
        else:
            skip(f"descriptor:{d.column}", f"Evidently returned {d.value} for {d.method}")
    if len(kept) != len(out["descriptors"]):
        out["descriptors"] = tuple(kept)
        out["drifted_descriptor_share"] = round(sum(d.drifted for d in kept) / len(kept), 6) if kept else None
    e = out.get("embedding")
    if e is not None and not math.isfinite(e.roc_auc):
        skip("embedding_drift", f"Evidently returned ROC AUC {e.roc_auc} (too few window texts to tell apart)")
        out["embedding"] = None
    return out


def _write(out_dir: Path, snapshots: dict, summary: DriftSummary) -> None:
    """HTML and JSON of every report plus summary.json, into a sibling temp
    directory renamed into place: a crash leaves no half-written run."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = {"report": (REPORT_HTML, REPORT_JSON), "embeddings": ("embeddings.html", "embeddings.json"),
             "quality": (QUALITY_HTML, "quality.json")}
    for key, snap in snapshots.items():
        html, js = names[key]
        snap.save_html(str(tmp / html))
        snap.save_json(str(tmp / js))
    (tmp / SUMMARY_JSON).write_text(json.dumps(summary.model_dump(mode="json"), indent=2) + "\n")
    tmp.rename(out_dir)
