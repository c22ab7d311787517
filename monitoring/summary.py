"""The typed summary of one monitoring run, and the one function that reads
Evidently's result into it.

Evidently's snapshot is a list of metrics; its own examples index it by
position (``result['metrics'][0]['value']``), which breaks silently when a
preset adds or reorders a metric. ``extract`` reads every figure by the
metric's type and column instead, and raises when one is missing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ColumnDrift(_Frozen):
    column: str
    method: str          # as Evidently names it, e.g. "K-S p_value"
    value: float         # the test's p-value, or its distance for distance methods
    threshold: float
    drifted: bool


class EmbeddingDrift(_Frozen):
    method: Literal["model"] = "model"
    # ROC AUC of a classifier telling reference from current embeddings
    # (0.5: indistinguishable), as Evidently computes it.
    roc_auc: float
    threshold: float
    drifted: bool
    dims: int


class Quality(_Frozen):
    """Feedback labels in the window against the version's validated accuracy."""

    labels: int
    accuracy: float
    f1: float                     # two classes: the positive class's (id 1); more: the macro-F1
    validated_accuracy: float | None
    accuracy_drop: float | None   # validated - feedback accuracy; positive is worse
    # Over the classes in the feedback labels or the predictions; None in
    # summaries written before any number of classes.
    macro_f1: float | None = None
    recall: dict[str, float] | None = None   # by class name, for the classes the feedback labels hold
    # The kept teacher in shadow on the window's feedback labels, against its
    # accuracy on the test split at deploy (the served version's
    # teacher_metrics); drop = validated - feedback, positive is worse. None
    # without a teacher, or in summaries written before the retrain rule.
    teacher_labels: int | None = None
    teacher_accuracy: float | None = None
    teacher_validated_accuracy: float | None = None
    teacher_accuracy_drop: float | None = None


class TeacherAgreement(_Frozen):
    """The label-free compression gap: the kept teacher in shadow."""

    rows: int
    agreement: float
    validated_agreement: float | None   # on the test split, at deploy time
    # The test texts that agreement was measured on: its own sampling error
    # (None: unknown, e.g. a summary written before the field existed).
    validated_rows: int | None = None


class Window(_Frozen):
    rows: int
    first_ts: str | None
    last_ts: str | None
    sha256: str          # over the window's prediction ids: the same window hashes the same
    model_versions: tuple[str, ...]
    feedback_labels: int
    # What a re-compression could learn from: the distinct texts of its
    # corpus (the newest monitor.recompress_last_n logged rows up to the
    # window's end, ``corpus_rows`` of them; summaries written before counted
    # the window alone and have no corpus_rows) split
    # (shrinkflow.window.split_window, monitor.heldout_fraction) into
    # distillation and held-out text. None in summaries written before.
    distill_texts: int | None = None
    heldout_texts: int | None = None
    corpus_rows: int | None = None
    # Rows answered under another label set of integer names (a renumbering
    # may have changed what a name means): their classes and feedback are
    # unknown (monitoring.evidently_reports.clean_window); their texts count.
    # None in summaries written before.
    other_label_set_rows: int | None = None


class NotComputed(_Frozen):
    """A figure the run could not compute on this window, and why. The other
    figures and the policy go on without it."""

    metric: str          # e.g. "embedding_drift", "descriptor:non_letter_pct", "quality_report"
    reason: str


class Truncation(_Frozen):
    """What the model did not read: the share of texts cut to its max_seq_len."""

    strategy: str                # serve.truncation the reference was read with
    known_rows: int              # window rows whose log says whether they were cut
    share: float | None          # among those; None when none is known (a log before schema 2)
    reference_share: float | None  # the served model on the reference split
    # Evidently's drift test of the per-row truncated yes/no (a descriptor
    # beside the text descriptors), window against reference; None when it
    # could not be computed (not_computed "truncation_drift") or in summaries
    # written before it existed.
    drift: ColumnDrift | None = None


class ShareShift(_Frozen):
    """The class whose share of the served predictions moved most."""

    label: str
    current: float
    reference: float
    shift: float                 # current - reference


class DriftSummary(_Frozen):
    """Every figure of one monitoring run. A figure that could not be
    computed on the window is None and named in ``not_computed`` with its
    reason. Summaries written before ``not_computed`` and ``truncation``
    existed read with their defaults; those written before any number of
    classes (``positive_share_reference`` / ``_current``: the built-in
    task's) read as its two class shares."""

    created: str
    model_version: str
    window: Window
    reference_rows: int
    descriptors: tuple[ColumnDrift, ...]        # the descriptors that were computed
    drifted_descriptor_share: float | None      # among those; None when none was
    embedding: EmbeddingDrift | None
    prediction_label: ColumnDrift | None
    # Drift of the served model's probability for the class it answered.
    prediction_probability: ColumnDrift | None
    # The served version's label names, in class-id order.
    labels: tuple[str, ...] = ("negative", "positive")
    # Each class's share of the served predictions, by name: on the reference
    # split and in the window (None when no row of the window has a known label).
    class_share_reference: dict[str, float]
    class_share_current: dict[str, float] | None
    largest_share_shift: ShareShift | None = None
    quality: Quality | None
    teacher: TeacherAgreement | None
    truncation: Truncation | None = None
    not_computed: tuple[NotComputed, ...] = ()
    # Why the teacher rules (agreement, embedding drift, the teacher's
    # feedback accuracy) could not run: no kept teacher, or not the one
    # production was validated against (monitoring.run.kept_teacher). None:
    # they ran (or, in a summary written before the field, not recorded).
    teacher_unavailable: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _two_class_summaries(cls, data):
        """A summary written before any number of classes held the built-in
        task's positive share: read it as its two class shares."""
        if isinstance(data, dict) and "positive_share_reference" in data:
            data = dict(data)
            ref, cur = data.pop("positive_share_reference"), data.pop("positive_share_current", None)
            data.setdefault("class_share_reference", {"negative": round(1 - ref, 6), "positive": ref})
            data.setdefault("class_share_current",
                            None if cur is None else {"negative": round(1 - cur, 6), "positive": cur})
            if cur is not None:
                data.setdefault("largest_share_shift", {"label": "positive", "current": cur, "reference": ref,
                                                        "shift": round(cur - ref, 6)})
        return data

    def reason_not_computed(self, metric: str) -> str | None:
        """Why ``metric`` was not computed, or None if it was (or was never asked for)."""
        return next((n.reason for n in self.not_computed if n.metric == metric), None)


# Evidently's tests that return a p-value (drift below the threshold); the
# others (wasserstein, psi, kl_div, jensenshannon, hellinger, ...) return a
# distance (drift at or above it). Named explicitly, or as displayed
# ("K-S p_value") when Evidently picked the test itself.
P_VALUE_METHODS = frozenset({"ks", "chisquare", "z", "fisher_exact", "g_test", "anderson", "mannw",
                             "cramer_von_mises", "epps_singleton", "t_test", "empirical_mmd"})


def _is_p_value(method: str) -> bool:
    return method in P_VALUE_METHODS or "p_value" in method.replace("-", "_").lower()


def column_drifts(metrics: list[dict]) -> dict[str, ColumnDrift]:
    """Every ValueDrift in a snapshot, by column."""
    out = {}
    for m in metrics:
        cfg = m.get("config", {})
        if cfg.get("type") != "evidently:metric_v2:ValueDrift":
            continue
        method, threshold, value = cfg["method"], float(cfg["threshold"]), float(m["value"])
        # p-value tests drift below the threshold; distances at or above it.
        drifted = value < threshold if _is_p_value(method) else value >= threshold
        out[cfg["column"]] = ColumnDrift(column=cfg["column"], method=method, value=value,
                                         threshold=threshold, drifted=drifted)
    return out


def embedding_auc(metrics: list[dict], name: str) -> float | None:
    for m in metrics:
        cfg = m.get("config", {})
        if cfg.get("type") == "evidently:metric_v2:EmbeddingsDrift" and cfg.get("embeddings_name") == name:
            return float(m["value"])
    return None


def extract(snapshot: dict, descriptors: list[str], *, label_column: str | None, probability_column: str | None,
            embeddings_name: str | None, embedding_threshold: float, embedding_dims: int) -> dict:
    """The figures a DriftSummary needs from one Evidently snapshot
    (``Snapshot.dict()``), by metric type and column name. Only the figures
    asked for are read (a None column: not asked); each one asked for must be
    there, or KeyError. ``drifted_descriptor_share`` is None when no
    descriptor is asked for."""
    metrics = snapshot["metrics"]
    drifts = column_drifts(metrics)
    wanted = [c for c in [*descriptors, label_column, probability_column] if c is not None]
    missing = [c for c in wanted if c not in drifts]
    if missing:
        raise KeyError(f"the Evidently snapshot has no drift result for {missing}")
    desc = tuple(drifts[c] for c in descriptors)
    out = {"descriptors": desc,
           "drifted_descriptor_share": round(sum(d.drifted for d in desc) / len(desc), 6) if desc else None,
           "prediction_label": drifts[label_column] if label_column else None,
           "prediction_probability": drifts[probability_column] if probability_column else None,
           "embedding": None}
    if embeddings_name is not None:
        auc = embedding_auc(metrics, embeddings_name)
        if auc is None:
            raise KeyError(f"the Evidently snapshot has no embedding drift for {embeddings_name!r}")
        out["embedding"] = EmbeddingDrift(roc_auc=auc, threshold=embedding_threshold,
                                          drifted=auc > embedding_threshold, dims=embedding_dims)
    return out
