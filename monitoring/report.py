"""One monitoring run: a window of the prediction log (current) against the
reference split (reference), as Evidently reports on disk plus a DriftSummary.

Evidently, torch and the models are imported inside the functions, so that
importing ``monitoring`` stays cheap and free of side effects.

Text descriptors are computed without any download: Evidently's TextLength,
WordCount, SentenceCount and NonLetterCharacterPercentage run offline; its
OOVWordsPercentage and Sentiment call ``nltk.download`` at run time, so the
out-of-vocabulary share is computed here instead, against the words of the
training split (the vocabulary the model actually learned from).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np

from monitoring.summary import DriftSummary, Quality, TeacherAgreement, Window, extract

TEXT = "text"
LABEL = "prediction"
PROB = "prob_positive"
TARGET = "target"
EMBEDDINGS = "sentence"
# Evidently descriptor aliases, then our own.
EVIDENTLY_DESCRIPTORS = ("length_chars", "word_count", "sentence_count", "non_letter_pct")
OOV = "oov_share"
DESCRIPTORS = (*EVIDENTLY_DESCRIPTORS, OOV)
REPORT_HTML, REPORT_JSON, QUALITY_HTML, SUMMARY_JSON = "report.html", "report.json", "quality.html", "summary.json"
_WORD = re.compile(r"[a-z']+")


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


def softmax_positive(logits: np.ndarray) -> np.ndarray:
    from shrinkflow.serving import softmax  # the one the server answers with

    return softmax(logits)[:, 1]


def window_sha256(prediction_ids) -> str:
    return hashlib.sha256("\n".join(map(str, prediction_ids)).encode()).hexdigest()


def teacher_pass(teacher_dir: Path, texts: list[str], threads: int = 2, batch_size: int = 32):
    """(labels, mean-pooled last-layer sentence embeddings) from the kept
    teacher, in one forward pass per batch."""
    import torch

    from shrinkflow.modeling import TOKENIZER, encode, load_tokenizer, load_torch_model, read_manifest

    torch.set_num_threads(threads)
    tok = load_tokenizer(Path(teacher_dir) / TOKENIZER, read_manifest(Path(teacher_dir))["max_seq_len"])
    model = load_torch_model(Path(teacher_dir))
    labels, embs = [], []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            ids, mask = encode(tok, texts[start:start + batch_size])
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        output_hidden_states=True)
            m = torch.from_numpy(mask).unsqueeze(-1).float()
            embs.append(((out.hidden_states[-1] * m).sum(1) / m.sum(1).clamp(min=1)).numpy())
            labels.append(out.logits.argmax(-1).numpy())
    if not texts:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0))
    return np.concatenate(labels), np.concatenate(embs)


def _frame(texts, probs, embeddings, vocab, targets=None):
    import pandas as pd

    df = pd.DataFrame({TEXT: list(texts), PROB: np.asarray(probs, dtype=float)})
    df[LABEL] = (df[PROB] >= 0.5).astype(int)
    df[OOV] = oov_share(list(texts), vocab)
    if targets is not None:
        df[TARGET] = np.asarray(targets, dtype=int)
    if embeddings is not None:  # one concat: column-by-column inserts fragment the frame
        df = pd.concat([df, pd.DataFrame(embeddings, columns=[f"emb_{i}" for i in range(embeddings.shape[1])],
                                         index=df.index)], axis=1)
    return df


def _datasets(current, reference, embedding_dims: int, with_target: bool):
    from evidently import BinaryClassification, DataDefinition, Dataset
    from evidently.descriptors import NonLetterCharacterPercentage, SentenceCount, TextLength, WordCount

    definition = DataDefinition(
        text_columns=[TEXT], numerical_columns=[PROB, OOV],
        categorical_columns=[LABEL] + ([TARGET] if with_target else []),
        embeddings={EMBEDDINGS: [f"emb_{i}" for i in range(embedding_dims)]} if embedding_dims else None,
        classification=[BinaryClassification(target=TARGET, prediction_labels=LABEL)] if with_target else None)
    descriptors = [TextLength(TEXT, alias="length_chars"), WordCount(TEXT, alias="word_count"),
                   SentenceCount(TEXT, alias="sentence_count"),
                   NonLetterCharacterPercentage(TEXT, alias="non_letter_pct")]
    return (Dataset.from_pandas(current, data_definition=definition, descriptors=descriptors),
            Dataset.from_pandas(reference, data_definition=definition, descriptors=descriptors))


def build(window, reference, *, served_dir: Path, teacher_dir: Path | None, train_texts: list[str],
          validated: dict, params, out_dir: Path, created: str, seed: int = 0) -> DriftSummary:
    """Build the reports of one window into ``out_dir`` (created whole or not
    at all) and return their summary.

    ``window``: the prediction log's DataFrame (predlog.COLUMNS);
    ``reference``: the reference split (text, label); ``validated``: the
    served version's figures at deploy time (``version``, ``accuracy``,
    ``agreement``); ``params``: MonitorParams.
    """
    from evidently import Report
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import model as model_method
    from evidently.metrics import ValueDrift
    from evidently.metrics.embeddings import EmbeddingsDrift
    from evidently.presets import ClassificationPreset, DataDriftPreset

    from shrinkflow.runtime import load_predictor
    from shrinkflow.stats import agreement, quality

    if len(window) == 0:
        raise ValueError("the prediction log window is empty: nothing to monitor")
    vocab = vocabulary(train_texts)
    ref_texts = reference["text"].tolist()
    cur_texts = window["text"].tolist()
    cur_probs = np.asarray([p[1] for p in window["probabilities"]], dtype=float)
    # The served model on the reference split: what its outputs looked like on
    # the data it was validated against.
    ref_probs = softmax_positive(load_predictor(served_dir, threads=2).predict_logits(ref_texts)) \
        if ref_texts else np.zeros(0)

    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(window), size=min(params.shadow_sample_rows, len(window)), replace=False))
    teacher, dims, ref_emb, cur_emb = None, 0, None, None
    if teacher_dir is not None:
        # One load of the teacher, one pass over the sample and the reference.
        labels, emb = teacher_pass(teacher_dir, [cur_texts[i] for i in sample] + ref_texts)
        t_labels, t_emb, ref_emb = labels[:len(sample)], emb[:len(sample)], emb[len(sample):]
        served = (cur_probs[sample] >= 0.5).astype(int)
        teacher = TeacherAgreement(rows=len(sample), agreement=agreement(served, t_labels),
                                   validated_agreement=validated.get("agreement"))
        dims = t_emb.shape[1]
        cur_emb = t_emb
    # Embeddings exist for the shadow sample only, so the embedding report runs
    # on that sample; the text and prediction drift use the whole window.
    current = _frame(cur_texts, cur_probs, None, vocab)
    ref_frame = _frame(ref_texts, ref_probs, None, vocab)
    cur_ds, ref_ds = _datasets(current, ref_frame, 0, False)
    metrics = [DataDriftPreset(columns=list(DESCRIPTORS), method="ks"),
               ValueDrift(column=LABEL, method="z"), ValueDrift(column=PROB, method="ks")]
    snap = Report(metrics).run(cur_ds, ref_ds)
    snapshots = {"report": snap}
    emb_name = None
    if dims:
        emb_cur = _frame([cur_texts[i] for i in sample], cur_probs[sample], cur_emb, vocab)
        emb_ref = _frame(ref_texts, ref_probs, ref_emb, vocab)
        e_cur, e_ref = _datasets(emb_cur, emb_ref, dims, False)
        snapshots["embeddings"] = Report([EmbeddingsDrift(
            embeddings_name=EMBEDDINGS, drift_method=model_method(threshold=params.embedding_drift_auc))]).run(
            e_cur, e_ref)
        emb_name = EMBEDDINGS

    labelled = window[window["feedback_label"].notna()]
    q = None
    if len(labelled):
        y = labelled["feedback_label"].astype(int).to_numpy()
        pred = labelled["label"].astype(int).to_numpy()
        fig = quality(y, pred)
        v_acc = validated.get("accuracy")
        q = Quality(labels=len(labelled), accuracy=fig["accuracy"], f1=fig["f1"], validated_accuracy=v_acc,
                    accuracy_drop=round(v_acc - fig["accuracy"], 6) if v_acc is not None else None)
        if len(labelled) >= 2 and "label" in reference:
            l_cur = _frame(labelled["text"].tolist(),
                           [p[1] for p in labelled["probabilities"]], None, vocab, y)
            l_ref = _frame(ref_texts, ref_probs, None, vocab, reference["label"].to_numpy())
            lc, lr = _datasets(l_cur, l_ref, 0, True)
            snapshots["quality"] = Report([ClassificationPreset()]).run(lc, lr)

    merged = {"metrics": [m for s in snapshots.values() for m in s.dict()["metrics"]]}
    figures = extract(merged, list(DESCRIPTORS), label_column=LABEL, probability_column=PROB,
                      embeddings_name=emb_name, embedding_threshold=params.embedding_drift_auc, embedding_dims=dims)
    ids = window["prediction_id"].tolist()
    summary = DriftSummary(
        created=created, model_version=validated["version"],
        window=Window(rows=len(window), first_ts=str(window["ts"].iloc[0]), last_ts=str(window["ts"].iloc[-1]),
                      sha256=window_sha256(ids), model_versions=tuple(sorted(set(window["model_version"]))),
                      feedback_labels=len(labelled)),
        reference_rows=len(ref_texts), **figures,
        positive_share_reference=round(float((ref_probs >= 0.5).mean()), 6) if len(ref_probs) else 0.0,
        positive_share_current=round(float((cur_probs >= 0.5).mean()), 6),
        quality=q, teacher=teacher)
    _write(out_dir, snapshots, summary)
    return summary


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
