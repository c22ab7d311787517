"""Typed artifacts: what crosses a stage boundary, as pydantic models.

Each model is one JSON document a stage writes and a later stage, the
registry, ``status``, the CLI or the server reads. The files keep their
shape byte for byte: ``to_json_dict`` dumps only the keys that were set (so
an older file that lacks a key is written back without it), and every
figure is a ``Number`` (an int stays an int, a float keeps its exact
repr), so ``write_json(path, Model.model_validate(read_json(path))
.to_json_dict())`` rewrites a file identically (tests/test_artifacts.py).

Where the files legitimately vary, keys are optional: figures added later
(macro-F1, per-class recall, the paired macro-F1 drop, ``labels``,
``serving``) are absent from older files. Everything else is strict
(``extra="forbid"``), except where a model says why not.

Units: latencies in milliseconds (``latency_ms_*``, ``cpu_ms_*``), sizes in
MB (10^6 bytes), accuracy, F1, recall, agreement and drops as fractions in
[0, 1], throughput in examples per second, CPU time in CPU-seconds, cost in
the ``cost.currency`` per ``price_per_core_hour`` (USD by default).

Library code: no Prefect, nothing happens at import; imports nothing of
shrinkflow (the train and compress stages save through these models, so a
module imported here would become a dependency of the teacher's training in
DVC's eyes). Where each document lives: ``shrinkflow.catalog``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

# A figure as read and written: an int stays an int and a float keeps its
# repr (pydantic's smart union: the exact type wins), so a file read and
# written back is byte-identical.
Number = Union[int, float]


class Artifact(BaseModel):
    """Base of every artifact: strict keys, immutable, dumped as its file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json_dict(self) -> dict[str, Any]:
        """The document as written to disk: JSON types, only the keys that were set."""
        return self.model_dump(mode="json", exclude_unset=True)


# ---------------------------------------------------------------- figures


class Quality(Artifact):
    """Quality of one model on one labelled split (``shrinkflow.stats.quality``):
    accuracy, macro-F1 and F1 of class 1 (binary tasks only, else None) as
    fractions; per-class recall (None for a class absent from the split) and
    support by class name; ``n`` texts. macro-F1 and the per-class figures are
    absent from files written before multi-class support."""

    accuracy: Number
    f1: Number | None = None
    macro_f1: Number | None = None
    per_class_recall: dict[str, Number | None] | None = None
    per_class_n: dict[str, int] | None = None
    n: int


class PairedDrop(Artifact):
    """A candidate against the teacher on the same texts
    (``shrinkflow.stats.paired_accuracy_drop`` / ``paired_macro_f1_drop``):
    the accuracy drop (teacher minus candidate, a fraction) with its standard
    error and Wald interval at ``confidence``, McNemar's p and the discordant
    counts; the macro-F1 drop with its bootstrap interval (absent in older files)."""

    accuracy_drop: Number
    accuracy_drop_se: Number
    accuracy_drop_ci_low: Number
    accuracy_drop_ci_high: Number
    confidence: Number
    mcnemar_p: Number
    candidate_only_correct: int
    teacher_only_correct: int
    macro_f1_drop: Number | None = None
    macro_f1_drop_ci_low: Number | None = None
    macro_f1_drop_ci_high: Number | None = None
    macro_f1_drop_resamples: int | None = None


class Performance(Artifact):
    """Measured performance (``shrinkflow.evaluate``): latency p50/p95 in ms at
    batch 1 and 32, throughput at batch 32 (examples/s), on-disk size (MB),
    peak RSS (MB), CPU ms per prediction at batch 1 and 32; how many
    interleaved timing rounds they came from (absent when not interleaved);
    how many times the models were timed (``timing_attempts``: more than 1
    when the machine was busy, ``LatencyParams.retimes_when_busy``) and the
    cores other processes took on average during the timing kept
    (``timing_other_cores``, ``shrinkflow.cpuload``; absent where not
    measured), of ``timing_cpus`` logical CPUs (those the measuring process
    may run on), and, in a cgroup with a CPU quota, the quota in cores
    (``timing_cpu_quota``) and the share of its enforcement periods that
    throttled the models during that timing (``timing_throttled_share``),
    and the share of the time the timed threads were ready to run but
    waiting for a CPU (``timing_cpu_wait_share``: the measuring processes'
    run-queue delay per second, ``cpuload.run_delay_s``, over the latency
    threads)."""

    latency_ms_p50_b1: Number
    latency_ms_p95_b1: Number
    latency_ms_p50_b32: Number
    latency_ms_p95_b32: Number
    throughput_eps_b32: Number
    size_mb: Number
    peak_rss_mb: Number
    cpu_ms_per_prediction_b1: Number | None = None
    cpu_ms_per_prediction_b32: Number | None = None
    timing_rounds_b1: int | None = None
    timing_rounds_b32: int | None = None
    timing_attempts: int | None = None
    timing_other_cores: Number | None = None
    timing_cpus: int | None = None
    timing_cpu_quota: Number | None = None
    timing_throttled_share: Number | None = None
    timing_cpu_wait_share: Number | None = None

    def performance(self) -> dict[str, Any]:
        """The PERFORMANCE_KEYS figures, by key."""
        return {k: getattr(self, k) for k in PERFORMANCE_KEYS}


# The performance figures a deployed version carries over from validation
# (``shrinkflow.validation.deployed_figures``): every Performance field but
# those on how the timing went (rounds, attempts, others' load).
PERFORMANCE_KEYS = tuple(k for k in Performance.model_fields if not k.startswith("timing_"))


class BatchInvariance(Artifact):
    """Whether a candidate's outputs depend on the batch it is in
    (``shrinkflow.predictors.batch_invariance``): the largest and mean change
    of a probability between batch ``batch_size`` and one text per call,
    labels that flipped, over ``rows`` texts; ``per_row``: served one text
    per call because of it."""

    # allow: the runtime may add diagnostic figures; none is read by name
    # but the ones below.
    model_config = ConfigDict(extra="allow", frozen=True)

    max_prob_diff: Number
    label_flips: int
    mean_prob_diff: Number | None = None
    batch_size: int | None = None
    rows: int | None = None
    per_row: bool | None = None


class TeacherMeasurements(Quality, Performance):
    """The teacher (fp32, torch eager) on ``split``: quality and performance,
    and its accuracy on the shifted domain (None without shifted labels).
    In metrics/validate.json (``teacher``, on val) and a version manifest
    (``teacher_metrics``, on test)."""

    split: str
    accuracy_shifted: Number | None = None


class CandidateMeasurements(Quality, PairedDrop, Performance):
    """One candidate's measurements: metrics/validate.json ``candidates[name]``
    (on val, with the hashes of the files that were validated), and in a
    version manifest ``selection_metrics`` (val, without hashes) and
    ``metrics`` (test quality, val agreement and performance: see
    ``shrinkflow.validation.deployed_figures``).

    ``speedup_p95_b1``: teacher p95 over candidate p95 at batch 1, round by
    round (absent when not timed interleaved). ``p95_b1_ratio_vs_production``:
    on a re-compression, its p95 over the production model's at batch 1,
    within each interleaved round, the median over rounds (1.10: 10% slower;
    absent otherwise; ``shrinkflow.validation.production_ratios``). ``agreement``: fraction of
    texts where it predicts the teacher's label, by split (None: empty split);
    ``soft_agreement``: the overlap of its class probabilities with the
    teacher's (``stats.soft_agreement``), on the splits whose probabilities
    were measured (the held-out window; absent otherwise). ``files``: sha256
    by relative path; ``content_hash``: one hash of them."""

    split: str
    accuracy_shifted: Number | None = None
    speedup_p95_b1: Number | None = None
    p95_b1_ratio_vs_production: Number | None = None
    agreement: dict[str, Number | None]
    soft_agreement: dict[str, Number | None] | None = None
    batch_invariance: BatchInvariance | None = None
    files: dict[str, str] | None = None
    content_hash: str | None = None


# ---------------------------------------------------------------- gates


class GateResult(Artifact):
    """One gate's verdict, and its stored form (a gate report's ``gates[name]``).

    ``value`` and ``threshold`` in the gate's units (fractions, ms, MB, a
    ratio); ``direction`` "min" (value >= threshold passes) or "max";
    ``margin``: how far past the threshold, in the gate's units: >= 0 passes,
    < 0 fails and |margin| says by how much. ``enforced`` False for a gate
    whose failure does not block deployment but changes how the candidate is
    served (batch invariance under serve_per_row); ``note`` then says what
    happens instead. Reports written before ``enforced`` and ``note`` existed
    lack them: they read as the defaults and are written back without them.
    """

    name: str
    passed: bool
    value: Number
    threshold: Number
    direction: Literal["min", "max"]
    margin: Number
    enforced: bool = True
    note: str = ""

    def describe(self) -> str:
        """One line: the gate, its verdict, value, threshold and margin (and the note)."""
        verb = "passed" if self.passed else ("FAILED" if self.enforced else "not met")
        rel = ">=" if self.direction == "min" else "<="
        return (f"{self.name} {verb}: {self.value:.4g} (needs {rel} {self.threshold:.4g}; "
                f"margin {self.margin:+.4g})" + (f": {self.note}" if self.note else ""))


@dataclass(frozen=True)
class GateReport:
    """Every gate's verdict for one candidate, in the order they were checked
    (``shrinkflow.gates.evaluate_gates``); stored as a ``CandidateGates``."""

    candidate: str
    results: tuple[GateResult, ...]

    @property
    def passed(self) -> bool:
        """Every enforced gate passed (a gate that is not enforced never blocks)."""
        return all(r.passed or not r.enforced for r in self.results)

    @property
    def failures(self) -> tuple[GateResult, ...]:
        """Enforced gates that failed: what blocks deployment."""
        return tuple(r for r in self.results if not r.passed and r.enforced)

    @property
    def advisories(self) -> tuple[GateResult, ...]:
        """Gates not met that do not block, each with its ``note``."""
        return tuple(r for r in self.results if not r.passed and not r.enforced)

    def summary(self) -> str:
        if self.passed:
            return f"candidate {self.candidate!r} passed all {len(self.results)} gates"
        return f"candidate {self.candidate!r} failed: " + "; ".join(r.describe() for r in self.failures)

    def to_dict(self) -> dict:
        """The stored form (``shrinkflow.artifacts.CandidateGates``), as JSON types."""
        return {"candidate": self.candidate, "passed": self.passed,
                "gates": {r.name: r.model_dump() for r in self.results}}

    @classmethod
    def from_dict(cls, d: dict) -> "GateReport":
        """The report a stored gate report (``to_dict``'s shape) records.
        Raises pydantic.ValidationError for a gate entry that is not a GateResult."""
        return cls(d["candidate"], tuple(GateResult.model_validate(g) for g in d["gates"].values()))


class CandidateGates(Artifact):
    """One candidate's gate report (``shrinkflow.gates.GateReport.to_dict``):
    reports/gates.json ``candidates[name]`` and ``confirmation.gates``, and
    registry/versions/vNNNN/gates.json."""

    candidate: str
    passed: bool
    gates: dict[str, GateResult]

    def to_report(self) -> GateReport:
        """The GateReport this document records (its verdicts, in order)."""
        return GateReport(self.candidate, tuple(self.gates.values()))

    @classmethod
    def from_report(cls, report: GateReport) -> "CandidateGates":
        """The stored form of ``report``: every verdict with all its fields."""
        return cls.model_validate(report.to_dict())


class ConfirmationMetrics(Quality, PairedDrop):
    """The chosen candidate on the confirmation split (test): quality, the
    paired drops against the teacher, and its agreement with the teacher (a
    fraction)."""

    agreement: Number | None


class Confirmation(Artifact):
    """The chosen candidate alone on the test split
    (``shrinkflow.validation.confirmation``): its figures, the teacher's on
    the same texts, its accuracy gates again; ``enforced``: a failure blocks
    deployment (``validate.confirm_on_test: gate``). In metrics/validate.json,
    reports/gates.json and a version manifest, all under ``confirmation``."""

    candidate: str
    split: str
    teacher: Quality
    metrics: ConfirmationMetrics
    gates: CandidateGates
    passed: bool
    enforced: bool


class ValidationReport(Artifact):
    """metrics/validate.json: the teacher and every candidate measured side
    by side on ``selection_split`` (val), and the confirmation of the chosen
    one on ``confirmation_split`` (test; None when none was chosen).
    ``labels``: class names in class-id order (absent in older files)."""

    selection_split: str
    confirmation_split: str
    labels: list[str] | None = None
    teacher: TeacherMeasurements
    candidates: dict[str, CandidateMeasurements]
    confirmation: Confirmation | None


# On a re-compression, the model in production is measured and gated as one
# more candidate under this name (shrinkflow.recompression); the validate
# stage refuses it as a name in compress.candidates.
PRODUCTION_CANDIDATE = "production"
# What validate does with that copy (its version.json ``role``): on a
# re-compression, one more candidate (gated, selectable: kept when it wins);
# on a retrain, only the baseline of the candidates' window-agreement gain,
# never selected (the teacher changed: keeping the model the old teacher
# taught would undo the retrain; shrinkflow.recompression.snapshot_production).
PRODUCTION_ROLE_CANDIDATE, PRODUCTION_ROLE_BASELINE = "candidate", "baseline"


class GatesReport(Artifact):
    """reports/gates.json: every candidate's gate report on val, the selection
    (``selected``: the candidate to deploy, None when none may be;
    ``best_effort``: the best regardless of gates; ``reason``: why, in words)
    and the confirmation on test. ``production``: on a re-compression, the
    version in production, measured and gated as the candidate
    ``production`` (absent otherwise). ``production_baseline``: on a retrain,
    the version in production, measured as the baseline of the candidates'
    window-agreement gain and accuracy against production only (not gated,
    never selected; absent otherwise)."""

    selected: str | None
    best_effort: str | None = None
    reason: str
    labels: list[str] | None = None
    candidates: dict[str, CandidateGates]
    confirmation: Confirmation | None
    production: str | None = None
    # On a re-compression, the built candidate that has the production
    # version's very files (the int8 teacher rebuilt while it is in
    # production), measured once under its own name instead of as
    # ``production``: selecting it keeps production. None otherwise.
    production_as: str | None = None
    production_baseline: str | None = None
    # A retrained teacher's own gates (shrinkflow.gates.teacher_gates; its
    # ``candidate`` is "teacher"): when any fails, no candidate is selected.
    # Absent when the teacher is not a retrain's.
    teacher_gates: CandidateGates | None = None
    # Candidates chosen on val whose enforced confirmation on test failed, in
    # the order they were tried (each then set aside and the next passing one
    # confirmed), but for the one in ``confirmation``: when nothing was
    # confirmed, that is the last one tried. Absent when none was set aside.
    unconfirmed: list[Confirmation] | None = None

    @property
    def production_selected(self) -> bool:
        """Whether the selection is the production model itself: the
        ``production`` candidate, or the rebuilt candidate with its very files
        (``production_as``). Deploy then promotes nothing."""
        return self.selected is not None and self.selected in (PRODUCTION_CANDIDATE, self.production_as)


# ---------------------------------------------------------------- retrain


class PreviousTeacher(Artifact):
    """The teacher a retrain replaces, measured before train ran:
    ``content_hash`` of its files (shrinkflow.files.content_hash), its
    accuracy on val and on the held-out production labels (None when none
    were held out), and how many those were."""

    content_hash: str
    val_accuracy: Number
    feedback_heldout_accuracy: Number | None
    feedback_heldout_rows: int


class RecordedProduction(Artifact):
    """The model in production when a retrain started, as its registry
    manifest records it: ``version``, the val accuracy validate measured
    when it was deployed (``selection_metrics``, a fraction) and the md5 of
    that val split as DVC pinned it (``lineage.data_md5.val``); its test
    accuracy (``metrics``, the confirmation) and the test split's md5
    (``lineage.data_md5.test``; both None in a manifest without them).
    Validate gates the retrained candidates against it
    (max_accuracy_drop_vs_production) on val only when today's val split has
    that md5, and confirms the chosen one against it on test only when
    today's test split has that md5: the same texts."""

    version: Annotated[str, Field(pattern=r"^v\d{4,}$")]
    val_accuracy: Annotated[Number, Field(ge=0, le=1)]
    val_md5: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    test_accuracy: Annotated[Number, Field(ge=0, le=1)] | None = None
    test_md5: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")] | None = None

    @model_validator(mode="after")
    def _test_figures_together(self) -> "RecordedProduction":
        # a test accuracy without the md5 of the split it was measured on
        # cannot be matched to today's test split (and an md5 alone gates nothing)
        if (self.test_accuracy is None) != (self.test_md5 is None):
            raise ValueError("test_accuracy and test_md5 go together: both set or both null")
        return self


class RetrainRecord(Artifact):
    """data/feedback/retrain.json: the last retrain. ``requested_by``: the
    monitor run and window that asked for it (free-form, like a window's
    meta); ``feedback``: the dataset version it trained on (``md5`` as DVC
    records it, ``rows``, and what the window added); ``previous_teacher``:
    the old teacher's figures the retrained one is gated against;
    ``production``: the production model's recorded val accuracy, which the
    retrained candidates are gated against (None: nothing in production, or
    a manifest without the figures). All None (the committed default,
    ``{}``): no retrain yet."""

    requested_by: dict[str, Any] | None = None
    feedback: dict[str, Any] | None = None
    previous_teacher: PreviousTeacher | None = None
    production: RecordedProduction | None = None

    @model_validator(mode="after")
    def _a_retrain_names_its_teacher(self) -> "RetrainRecord":
        # validate gates a retrain by previous_teacher (the teacher gates) and
        # production (max_accuracy_drop_vs_production) only when the old
        # teacher is named: a record with the rest but not it would drop both
        # gates without a word
        if self.previous_teacher is None and any(
                v is not None for v in (self.requested_by, self.feedback, self.production)):
            raise ValueError("previous_teacher is missing: a retrain record names the teacher it replaced "
                             "(the retrain flow writes it; {} means no retrain)")
        return self


# ---------------------------------------------------------------- cost


class ServingCost(Artifact):
    """Serving cost per million predictions at one batch size (``b1``,
    ``b32``), teacher against the deployed model: CPU ms per prediction,
    cost (currency per million), energy (kWh per million, None without a
    metered rate), and the predictions after which compressing paid for
    itself (None: it never does)."""

    teacher_cpu_ms_per_prediction: Number
    deployed_cpu_ms_per_prediction: Number
    teacher_cost_per_million: Number
    deployed_cost_per_million: Number
    saving_per_million: Number
    teacher_energy_kwh_per_million: Number | None
    deployed_energy_kwh_per_million: Number | None
    break_even_predictions: int | None
    pays_back: bool


class CostReturn(Artifact):
    """The cost and return of one deployed version (``shrinkflow.cost.roi``):
    CPU-seconds spent training the teacher and building every candidate
    (``build_cpu_seconds`` by candidate, None: not metered, listed in
    ``build_cpu_unknown``), their cost at ``price_per_core_hour``, energy
    (kWh) and CO2 (kg) where codecarbon measured a rate, and ``serving``
    costs by batch size. In deploy/deployment.json and a version manifest
    (``roi``)."""

    price_per_core_hour: Number
    train_cpu_seconds: Number
    compress_cpu_seconds: Number
    build_cpu_seconds: dict[str, Number | None]
    build_cpu_unknown: list[str]
    spent_cpu_seconds: Number
    spent_cost: Number
    spent_energy_kwh: Number | None
    spent_co2_kg: Number | None
    kwh_per_cpu_second: Number | None
    energy_source: str | None
    country_iso_code: str | None
    serving: dict[str, ServingCost]


class ComputeRecord(Artifact):
    """What a stage's ``shrinkflow.cost.ComputeMeter`` recorded: CPU-seconds
    and wall seconds; with codecarbon, the energy (kWh), CO2 (kg), the grid's
    country and the CPU model (absent without it)."""

    cpu_seconds: Number
    wall_seconds: Number
    energy_kwh: Number | None = None
    co2_kg: Number | None = None
    country_iso_code: str | None = None
    cpu_model: str | None = None
    energy_source: str | None = None


class BuildRecord(Artifact):
    """One candidate's build in metrics/compress.json: wall seconds, CPU-seconds
    (None: cached before builds were metered), whether it came from the
    candidate cache, its parameters and zlib-compressed size (MB)."""

    # allow: each compression step adds its own figures (layers, vocab_size,
    # distillation row counts); none is read by name but the ones below.
    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    build_cpu_seconds: Number | None = None


class CompressMetrics(Artifact):
    """metrics/compress.json, written by the compress stage: every
    candidate's build (by name) and what the whole stage's compute meter
    recorded (what this run spent: a cached candidate costs ~nothing now).
    Read by deploy for the cost and return."""

    candidates: dict[str, BuildRecord]
    compute: ComputeRecord | None = None


class KeptTeacherAverage(Artifact):
    """A retrained teacher's weights averaged with the kept teacher's
    (``shrinkflow.train.average_with_kept``, ``train.retrain_keep_share``):
    the share of the kept teacher's weights, its content hash (sha256 over
    its files), the tensors averaged, and the teacher's val accuracy (a
    fraction) as fine-tuned and after the average."""

    keep_share: Number
    kept_teacher: str
    tensors: int
    val_accuracy_before: Number
    val_accuracy_after: Number


class TrainMetrics(Artifact):
    """metrics/train.json, written by the train stage: the teacher's training
    (``shrinkflow.train.TrainResult``'s fields: best epoch, its val accuracy,
    val accuracy and train loss by epoch, seconds, parameter count, whether it
    was fine-tuned or only measured), the class names in class-id order and
    the stage's compute meter. Read by deploy for the cost and return.
    ``fine_tuned``, ``labels`` and ``compute`` are absent from older files.
    ``averaged_with_kept_teacher``: only when a retrain averaged the new
    teacher with the kept one (then the teacher saved is the average, and
    ``best_val_accuracy`` the fine-tuned teacher's before it)."""

    best_epoch: int
    best_val_accuracy: Number
    val_accuracy_by_epoch: list[Number]
    train_loss_by_epoch: list[Number]
    train_seconds: Number
    num_parameters: int
    fine_tuned: bool | None = None
    labels: list[str] | None = None
    compute: ComputeRecord | None = None
    averaged_with_kept_teacher: KeptTeacherAverage | None = None


# ---------------------------------------------------------------- deploy and registry


class ServingMode(Artifact):
    """How the server runs a version: ``per_row`` (one text per call) when
    validate found its outputs depend on the batch, with the figures that
    said so (largest probability change, a fraction; labels flipped). Empty
    (no keys) when validate measured no batch invariance."""

    per_row: bool | None = None
    max_batch_prob_diff: Number | None = None
    label_flips: int | None = None


class VersionManifest(Artifact):
    """registry/versions/vNNNN/manifest.json: one immutable registered version,
    in the spirit of MLflow's ``ModelVersion`` entity (``version``,
    ``created_at`` as an ISO-8601 UTC timestamp, the source ``candidate``).

    Its test figures (``metrics``) and the teacher's on the same texts
    (``teacher_metrics``), the val figures it was selected on
    (``selection_metrics``), its gates on val and the confirmation on test,
    the recipe that built it, its lineage (``shrinkflow.lineage``), cost and
    return, the sha256 of each model file and one ``content_hash``;
    ``same_model_as``: an earlier version with identical files.
    ``labels`` (class names in class-id order) and ``serving`` are absent
    from versions stored before they were recorded; ``roi`` may be None."""

    version: str
    created_at: str
    candidate: str
    labels: list[str] | None = None
    serving: ServingMode | None = None
    # The recipe steps as configured (shrinkflow.config's step models dump
    # them); kept as dicts: each method has its own keys.
    recipe: list[dict[str, Any]]
    metrics: CandidateMeasurements
    teacher_metrics: TeacherMeasurements
    selection_metrics: CandidateMeasurements
    confirmation: Confirmation
    selection: str
    roi: CostReturn | None = None
    # Lineage is a free-form record of the environment (git, dvc.lock, library
    # versions, data hashes) that grows with the project: not validated by key.
    lineage: dict[str, Any]
    same_model_as: str | None = None
    files: dict[str, str]
    content_hash: str
    gates: dict[str, GateResult]
    # The sha256 of each file of the version's warm-start sidecar
    # (versions/vNNNN/warm_start/: the distilled student the next
    # re-compression starts from); None: stored without one.
    warm_start_files: dict[str, str] | None = None

    @classmethod
    def check_record(cls, record: dict[str, Any], gates: CandidateGates, files: dict[str, str],
                     content_hash: str) -> None:
        """Check the record the deploy stage hands ``Registry.promote`` before
        it is stored: with the keys the registry adds (version, time, hashes,
        gates) it must validate as a manifest, so a version that would not load
        back is refused while production is unchanged. Raises
        pydantic.ValidationError."""
        cls.model_validate({"same_model_as": None, **record, "version": "v0000", "created_at": "",
                            "files": files, "content_hash": content_hash, "gates": gates.to_json_dict()["gates"]})


class Aliases(Artifact):
    """registry/aliases.json: named pointers to versions, as MLflow's
    registered-model aliases: ``production`` and ``previous_production``
    (the version production was before its last move; absent in older
    registries)."""

    # allow: aliases are names; a registry may hold others.
    model_config = ConfigDict(extra="allow", frozen=True)

    production: str | None = None
    previous_production: str | None = None


class HistoryEvent(Artifact):
    """One line of registry/history.jsonl: a move of the production alias
    (``promote`` or ``rollback``) at ``at`` (ISO-8601 UTC), to ``version``
    from ``previous``; ``same_model_as`` for a promotion of identical files."""

    # allow: an event kind may carry its own keys.
    model_config = ConfigDict(extra="allow", frozen=True)

    at: str
    event: str
    version: str
    previous: str | None = None
    same_model_as: str | None = None


class DeploymentRecord(Artifact):
    """deploy/deployment.json: what the deploy stage did: ``candidate`` is
    production as ``version`` (its ``content_hash``) in the registry at
    ``registry``; ``previous`` the production version before this deploy
    (None on the first), ``same_model_as`` an earlier version with identical
    files; the cost and return (``roi``, absent from records written before
    cost was recorded). ``kept``: a re-compression selected the production
    model itself, so nothing was promoted: ``version`` is the production
    version that stays and ``previous`` the same version (production did not
    change), ``reason`` why (both absent when a candidate was promoted)."""

    version: str
    previous: str | None
    same_model_as: str | None
    candidate: str
    registry: str
    content_hash: str
    roi: CostReturn | None = None
    kept: bool | None = None
    reason: str | None = None
