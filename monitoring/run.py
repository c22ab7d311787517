"""One monitoring run over a project, as library calls the monitor flow's
tasks wrap: read the window, build its reports, decide, record.

Paths come from the catalog (shrinkflow.paths) and params; nothing here
imports Prefect.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from monitoring.index import DECISION_JSON, prune, write_index
from monitoring.policy import ACTING, Decision, PastDecision, decide
from monitoring.summary import DriftSummary


def run_id(now: datetime) -> str:
    """A report directory name: sortable UTC timestamp."""
    return now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S_%fZ")


def read_window(root: Path, params):
    """The newest ``monitor.window_last_n`` rows of the prediction log.

    Waits up to ``monitor.log_wait_s`` for a log another process holds
    locked (SQLite's busy timeout), then raises PredictionLogError naming the
    monitor, the log's path (relative to ``root``), the lock and the wait.
    Any other failure to read the log is a PredictionLogError naming the
    monitor too."""
    import time

    from shrinkflow.predlog import PredictionLogError, log_label, prediction_log

    rel = log_label(params.serve)   # the path in params.yaml, or the PostgreSQL URL
    log = prediction_log(root, params.serve, timeout_s=params.monitor.log_wait_s)
    start = time.monotonic()
    try:
        return log.window(last=params.monitor.window_last_n)
    except PredictionLogError as exc:
        waited = time.monotonic() - start
        if exc.locked:
            raise PredictionLogError(
                f"the monitor could not read the prediction log {rel}: it is locked by another process "
                f"(waited {waited:.1f} s, monitor.log_wait_s {params.monitor.log_wait_s:g}); SQLite said: "
                f"{exc.cause}. Find the process holding it (for example `fuser {rel}`) or raise "
                f"monitor.log_wait_s", path=exc.path, cause=exc.cause) from exc
        raise PredictionLogError(f"the monitor could not read the prediction log {rel}: {exc}",
                                 path=exc.path, cause=exc.cause) from exc
    finally:
        log.close()


def read_recompress_corpus(root: Path, params, window) -> list[str]:
    """The texts a re-compression distils on and holds out from: the newest
    ``monitor.recompress_last_n`` rows of the prediction log logged up to the
    end of ``window`` (the monitor's window, a DataFrame with ``ts`` and
    ``text``), and never fewer rows than the window itself; oldest first,
    duplicates kept (shrinkflow.window.split_window deduplicates). Rows
    logged after the window was read are not included. Raises
    PredictionLogError as ``read_window`` does."""
    from datetime import timedelta

    from shrinkflow.predlog import prediction_log

    n = max(params.monitor.recompress_last_n, len(window))
    if n == len(window):
        return window["text"].tolist()
    last = window["ts"].max()
    last = last if isinstance(last, datetime) else datetime.fromisoformat(str(last))
    log = prediction_log(root, params.serve, timeout_s=params.monitor.log_wait_s)
    try:
        corpus = log.window(last=n, until=(last + timedelta(microseconds=1)).isoformat(timespec="microseconds"))
    finally:
        log.close()
    texts = corpus["text"].tolist()
    missing = set(window["text"]) - set(texts)
    if missing:  # not expected: the window is the newest rows up to its end
        texts += [t for t in window["text"] if t in missing]
    return texts


def prepare(root: Path, params) -> bool:
    """Start now what a monitor run of ``root`` in this process will need, so
    that it overlaps other start-up work (the CLI calls it while Prefect's
    temporary server starts): the shadow teacher's worker process
    (monitoring.shadow_worker.prestart; it imports torch and loads the
    teacher in its own process) when the run will send the teacher
    ``WORKER_MIN_TEXTS`` texts or more, and this process's imports of
    Evidently (and of torch and transformers when the teacher runs here).
    Returns whether a worker was started. Raises ImportError as the imports
    would."""
    from monitoring.evidently_reports import import_heavy
    from monitoring.shadow_worker import WORKER_MIN_TEXTS, prestart
    from shrinkflow.paths import TEACHER

    teacher = Path(root) / TEACHER
    worker = teacher.is_dir() and min(params.monitor.shadow_sample_rows, params.monitor.window_last_n,
                                      _log_rows(root, params)) >= WORKER_MIN_TEXTS
    if worker:
        prestart(teacher, params.serve.truncation)
    import_heavy(torch_too=not worker)
    return worker


def _log_rows(root: Path, params) -> int:
    """How many rows the prediction log holds; 0 when it cannot say within a
    second (the run itself then reads it, and reports what is wrong)."""
    from shrinkflow.predlog import prediction_log

    if params.serve.log_url is None and not (Path(root) / params.serve.log_path).is_file():
        return 0   # no log yet (and SQLite would create the file)
    try:
        return prediction_log(root, params.serve, timeout_s=1.0).count()
    except Exception:  # noqa: BLE001 - only a guess of the run's size: the run reports the error
        return 0


def build_reports(root: Path, params, window, now: datetime) -> tuple[DriftSummary, Path]:
    """Evidently reports of ``window`` against the reference split, for the
    production version, into monitor.reports_dir/<UTC timestamp>/. What
    depends only on that version, the teacher and the reference split is
    kept in shrinkflow.paths.MONITOR_CACHE between runs. The re-compression's
    corpus (``read_recompress_corpus``) is read too: the summary counts the
    texts a re-compression would distil on. Raises PredictionLogError as
    ``read_window`` does, MissingInput for a missing reference or train
    split."""
    from monitoring.evidently_reports import build
    from shrinkflow.paths import MONITOR_CACHE
    from shrinkflow.splits import read_split
    from shrinkflow.registry import Registry

    root = Path(root)
    ref = Registry(root / params.deploy.registry_dir).load()   # verified, like serving
    # What the server answers: per text when the served version's record
    # says so (validate found it batch-dependent), else as its predictor is.
    per_row = (ref.manifest.get("serving") or {}).get("per_row")
    metrics = ref.manifest.get("metrics", {})
    validated = {"version": ref.version, "accuracy": metrics.get("accuracy"),
                 "agreement": (metrics.get("agreement") or {}).get("test"),
                 "agreement_rows": metrics.get("n"),   # validate measures both on the test split
                 # the kept teacher on the same test split at deploy: the retrain rule's baseline
                 "teacher_accuracy": (ref.manifest.get("teacher_metrics") or {}).get("accuracy")}
    teacher, teacher_unavailable = kept_teacher(root, ref)
    out = root / params.monitor.reports_dir / run_id(now)
    # read_split: a missing split (a failed data run removed them) is a
    # MissingInput naming the stage that makes it, not a traceback.
    summary = build(window, read_split("reference", root), served_dir=ref.path,
                    teacher_dir=teacher, teacher_unavailable=teacher_unavailable,
                    train_texts=read_split("train", root)["text"].tolist(),
                    validated=validated, params=params.monitor, out_dir=out,
                    created=now.astimezone(timezone.utc).isoformat(timespec="seconds"),
                    truncation=params.serve.truncation, per_row=per_row, cache_dir=root / MONITOR_CACHE,
                    corpus_texts=read_recompress_corpus(root, params, window))
    return summary, out


def kept_teacher(root: Path, production) -> tuple[Path | None, str | None]:
    """The kept teacher (models/teacher) the teacher rules (agreement,
    embedding drift, the teacher's feedback accuracy) may judge
    ``production`` (a ``registry.Loaded``) against: (its directory, None),
    or (None, why not) when it is missing, when its label names are not
    production's (its class ids would be compared with other classes':
    production rolled back past a change of the label set), or when the
    teacher on disk (as DVC hashes it, ``dvcrun.out_md5``; else the one
    dvc.lock pins) is not the one production was validated against (its
    lineage's ``teacher_md5``: a later run trained a new teacher and the
    gates refused its candidates, production was rolled back past a
    retrain, or a `git checkout` without `dvc checkout` left another
    teacher on disk). Without that lineage, the labels alone are checked.
    (A newcomer's findings: a 3-class teacher judged a 4-class production
    at 0.331 agreement, and a refused run's teacher called for a retrain.)"""
    from shrinkflow.errors import RegistryError
    from shrinkflow.dvcrun import out_md5
    from shrinkflow.lineage import dvc_lock_stages, out_hash
    from shrinkflow.paths import TEACHER
    from shrinkflow.status import model_labels

    teacher = Path(root) / TEACHER
    restore = "(`dvc checkout models/teacher` restores the one dvc.lock pins; `shrinkflow run` trains one)"
    if not teacher.is_dir():
        return None, f"no kept teacher ({TEACHER}) {restore}"
    try:
        labels = model_labels(teacher)
    except RegistryError as exc:
        return None, f"the kept teacher ({TEACHER}) is unusable: {exc}"
    served = tuple(production.manifest.get("labels") or model_labels(production.path, production.version))
    if tuple(labels) != served:
        return None, (f"the kept teacher's labels {list(labels)} are not production {production.version}'s "
                      f"{list(served)}: its answers cannot be compared (deploy a version of this teacher, or roll "
                      "back to one)")
    validated_md5 = (production.manifest.get("lineage") or {}).get("teacher_md5")
    if not validated_md5:
        return teacher, None
    try:
        pinned = out_hash(dvc_lock_stages(Path(root)), "train", str(TEACHER))
    except Exception:  # noqa: BLE001 - no dvc.lock, or one DVC cannot read
        pinned = None
    # The teacher on disk as DVC hashes it (dvc.lock may pin one and the
    # checkout hold another: a `git checkout` without `dvc checkout`).
    on_disk = out_md5(root, TEACHER)
    if on_disk is not None and on_disk != validated_md5:
        if pinned == validated_md5:
            return None, (f"the teacher on disk ({TEACHER}, md5 {on_disk}) is not the one dvc.lock pins and "
                          f"production {production.version} was validated against (md5 {validated_md5}): "
                          f"`dvc checkout {TEACHER}` restores it")
        return None, (f"the kept teacher ({TEACHER}, md5 {on_disk}) is not the one production "
                      f"{production.version} was validated against (md5 {validated_md5}): a later run trained it "
                      "and its candidates were not deployed, or production was rolled back past a retrain "
                      "(deploy a version of this teacher, or check out the dvc.lock of production's and "
                      f"`dvc checkout {TEACHER}`)")
    if on_disk is None and pinned and pinned != validated_md5:
        return None, (f"dvc.lock pins another teacher ({TEACHER}, md5 {pinned}) than production "
                      f"{production.version} was validated against (md5 {validated_md5}): a later run trained it "
                      "and its candidates were not deployed, or production was rolled back past a retrain "
                      "(deploy a version of this teacher, or check out the dvc.lock of production's)")
    return teacher, None


def load_history(state: Path) -> list[PastDecision]:
    """The earlier decisions (decisions.jsonl), oldest first. Lines written
    before ``acted`` existed read as acted (the conservative reading)."""
    if not Path(state).is_file():
        return []
    return [PastDecision.model_validate_json(line) for line in Path(state).read_text().splitlines() if line.strip()]


def decision_ts(now: datetime) -> str:
    """How a decision's time is written in its history line and
    decision.json (``unmark_acted`` finds the line by it)."""
    return now.astimezone(timezone.utc).isoformat()


def decide_and_record(summary: DriftSummary, params, report_dir: Path, state: Path, now: datetime,
                      flow_run: str | None = None, act: bool = True, workspace: Path | None = None,
                      task: str = "default") -> Decision:
    """Apply the policy against the recorded history, then record the decision
    beside the report and in the history (one fsynced line), add the run's
    snapshot to the Evidently workspace at ``workspace`` (None: none), and
    regenerate the index.

    ``act``: whether a ``recompress`` verdict will be acted on (False for
    ``--report-only``). The history records ``acted``; only an action taken
    starts the cooldown and marks the window as having triggered.

    ``task``: names the run's project in the workspace
    (monitoring.workspace.task_name). Where the snapshot went, or why it
    could not be written, is decision.json's ``evidently``; a workspace that
    cannot be written never fails the run."""
    decision = decide(summary, params.monitor, load_history(state), now)
    acted = bool(act and decision.action in ACTING)
    doc = {**decision.model_dump(mode="json"), "triggers": list(decision.triggers), "acted": acted,
           "not_computed": [n.model_dump(mode="json") for n in summary.not_computed], "flow_run": flow_run,
           "ts": decision_ts(now)}
    if workspace is not None:
        from monitoring.workspace import record_run_safely

        doc["evidently"] = record_run_safely(Path(workspace), task, summary, decision, Path(report_dir),
                                             acted=acted, when=now).model_dump(mode="json")
    (Path(report_dir) / DECISION_JSON).write_text(json.dumps(doc, indent=2) + "\n")
    Path(state).parent.mkdir(parents=True, exist_ok=True)
    line = PastDecision(ts=doc["ts"], action=decision.action, window_sha256=decision.window_sha256, acted=acted)
    with open(state, "a") as fh:
        fh.write(line.model_dump_json() + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    prune(Path(report_dir).parent, params.monitor.keep_reports)
    write_index(Path(report_dir).parent)
    return decision


def unmark_acted(state: Path, ts: str) -> bool:
    """Record the history line of the decision made at ``ts`` as not acted
    on (``acted: false``): its re-compression or retrain was interrupted
    and put back, so neither the dedup nor the cooldown should hold the
    next window back (a helper's finding: Ctrl-C held every re-compression
    back for cooldown_hours). The file is rewritten atomically. Returns
    whether a line was changed."""
    from shrinkflow.files import atomic_write_text

    state = Path(state)
    if not state.is_file():
        return False
    lines, changed = [], False
    for line in state.read_text().splitlines():
        if line.strip():
            past = PastDecision.model_validate_json(line)
            if past.ts == ts and past.acted:
                line, changed = past.model_copy(update={"acted": False}).model_dump_json(), True
        lines.append(line)
    if changed:
        atomic_write_text(state, "\n".join(lines) + "\n")
    return changed


def record_recompress(report_dir: Path, outcome: dict) -> dict:
    """Add what the re-compression this run started did to its
    decision.json, as ``recompress`` (``shrinkflow.recompression
    .recompress_outcome``'s dict: deployed, kept or nothing, the versions,
    the reason and each candidate's failed gates with their figures), then
    regenerate the index. The history is not touched: the verdict was
    recorded as acted before the re-compression ran, so the cooldown and the
    dedup hold whatever it deployed. Returns the updated document. Raises
    FileNotFoundError when the run has no decision.json."""
    return _record_outcome(report_dir, "recompress", outcome)


def record_retrain(report_dir: Path, outcome: dict) -> dict:
    """Add what the retrain this run started did to its decision.json, as
    ``retrain`` (``shrinkflow.retrain.retrain_outcome``'s dict: deployed,
    nothing, rejected or unchanged, the version, the reason, the feedback
    dataset, every teacher gate and each candidate's failed gates), then
    regenerate the index, as ``record_recompress`` does. Returns the updated
    document. Raises FileNotFoundError when the run has no decision.json."""
    return _record_outcome(report_dir, "retrain", outcome)


def record_crash(report_dir: Path, action: str, exc: BaseException) -> dict:
    """Record in this run's decision.json that the ``action`` ("recompress"
    or "retrain") it started raised ``exc``: ``{"outcome": "crashed",
    "error": "<type>: <message>"}`` (the message cut to 2,000 characters),
    shown in the reports index. The verdict stays acted on (a failure that
    repeats would otherwise re-run at every firing); a helper's finding was
    that nothing said so. Returns the updated document."""
    # as UTF-8 can hold it (a lone surrogate in the message broke the index: a helper's finding)
    message = f"{type(exc).__name__}: {exc}".encode("utf-8", "backslashreplace").decode("utf-8")
    return _record_outcome(report_dir, action, {"outcome": "crashed", "error": message[:2000]})


def record_interrupted(report_dir: Path, action: str) -> dict:
    """Record in this run's decision.json that the ``action`` it started was
    stopped (Ctrl-C, SIGTERM) before it moved production: ``acted`` false and
    ``{"outcome": "interrupted"}``, as the history line (``unmark_acted``)
    says, so the run's record and the reports index agree with what the dedup
    and the cooldown read. Returns the updated document."""
    return _record_outcome(report_dir, action, {"outcome": "interrupted"}, acted=False)


FLOW_INPUT_DIR = "flow_inputs"


def save_flow_input(report_dir: Path, name: str, value: list) -> str:
    """Write ``value`` (the texts, or the (text, label) pairs, a monitor run
    hands to the re-compression or retrain flow) to
    ``<report_dir>/flow_inputs/<name>.json`` atomically and return its path.
    Why: Prefect stores a flow run's parameters in its API, which refuses
    more than 512 KiB of them, and a corpus of article-length texts is more
    (a helper's finding: 2,001 Reuters articles, 609,329 bytes, "422 ... Flow
    run parameters must be less than 524,288 bytes"); the flow gets the path."""
    from shrinkflow.files import atomic_write_text

    path = Path(report_dir) / FLOW_INPUT_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(value, ensure_ascii=False))
    return str(path)


def load_flow_input(path: str | Path, what: str, pairs: bool = False) -> list:
    """The list ``save_flow_input`` wrote at ``path``: texts, or with
    ``pairs`` [text, label] pairs. Raises ValueError naming ``what`` and the
    path when the file is missing, not JSON, not a list, or an item is not a
    string (a pair of strings)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc}") from exc
    if not isinstance(value, list):
        raise ValueError(f"{what}: {path} holds a {type(value).__name__}, not a list")
    def ok(item) -> bool:
        if pairs:
            return isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)
        return isinstance(item, str)

    bad = next((i for i, item in enumerate(value) if not ok(item)), None)
    if bad is not None:
        kind = "a [text, label] pair of strings" if pairs else "a text"
        raise ValueError(f"{what}: item {bad} of {path} is not {kind}: {value[bad]!r:.200}")
    return value


def _record_outcome(report_dir: Path, key: str, outcome: dict, **fields) -> dict:
    from shrinkflow.files import atomic_write_text

    path = Path(report_dir) / DECISION_JSON
    doc = {**json.loads(path.read_text()), **fields, key: outcome}
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    write_index(Path(report_dir).parent)
    return doc


def summary_markdown(summary: DriftSummary, decision: Decision, report_dir: Path, reports_url: str | None,
                     acted: bool | None = None) -> str:
    """The Prefect artifact: verdict, key figures (and those not computed,
    with why), links to the reports. ``acted`` False: a recompress verdict
    that was not acted on (``--report-only``)."""
    rel = Path(report_dir).name

    def link(name: str, run: bool = True) -> str:
        if reports_url:
            return f"{reports_url.rstrip('/')}/{rel + '/' if run else ''}{name}"
        return ((Path(report_dir) if run else Path(report_dir).parent) / name).resolve().as_uri()

    e, t, q, tr = summary.embedding, summary.teacher, summary.quality, summary.truncation

    def nc(metric: str, default: str) -> str:
        reason = summary.reason_not_computed(metric)
        return f"not computed: {reason}" if reason else default

    share = summary.drifted_descriptor_share
    note = " — not acted on (--report-only)" if decision.action in ACTING and acted is False else ""
    lines = [f"# Monitor: **{decision.action}** ({summary.model_version}){note}", "",
             f"Window: {summary.window.rows} predictions, {summary.window.first_ts} .. {summary.window.last_ts} "
             f"(sha256 {summary.window.sha256[:12]}); reference: {summary.reference_rows} texts.", "",
             "| signal | value |", "|---|---|",
             f"| drifted text descriptors | {share:.2f} of {len(summary.descriptors)} |" if share is not None
             else "| drifted text descriptors | not computed |",
             f"| embedding drift ROC AUC | {e.roc_auc:.3f} |" if e
             else f"| embedding drift | {nc('embedding_drift', 'n/a (no teacher)')} |",
             f"| teacher agreement | {t.agreement:.3f} on {t.rows} texts |" if t
             else f"| teacher agreement | {nc('teacher_agreement', 'n/a')} |",
             f"| feedback accuracy | {q.accuracy:.3f} on {q.labels} labels"
             + (f" (macro-F1 {q.macro_f1:.3f})" if q.macro_f1 is not None else "") + " |" if q
             else "| feedback accuracy | no labels |",
             f"| teacher feedback accuracy | {q.teacher_accuracy:.3f} on {q.teacher_labels} labels"
             + (f" (validated {q.teacher_validated_accuracy:.3f})" if q.teacher_validated_accuracy is not None
                else "") + " |" if q is not None and q.teacher_accuracy is not None
             else "| teacher feedback accuracy | n/a |",
             f"| class shares (current / reference) | {_shares(summary)} |",
             f"| truncated texts (window / reference, {tr.strategy}) | {_fmt(tr.share, '.3f')} of {tr.known_rows} "
             f"known / {_fmt(tr.reference_share, '.3f')}"
             + (f", drift p={tr.drift.value:.3g}{' (drifted)' if tr.drift.drifted else ''}" if tr.drift else "")
             + " |" if tr else "| truncated texts | not recorded |", ""]
    if summary.not_computed:
        lines += ["## Not computed on this window", *[f"- {n.metric}: {n.reason}" for n in summary.not_computed], ""]
    lines += ["## Why", *[f"- {r}" for r in decision.reasons], "",
              "Reports: " + " · ".join(
                  [f"[{label}]({link(name)})" for name, label in (("report.html", "drift"),
                                                                  ("embeddings.html", "embeddings"),
                                                                  ("quality.html", "quality"))
                   if (Path(report_dir) / name).is_file()] + [f"[index]({link('index.html', run=False)})"])]
    return "\n".join(lines) + "\n"


def _shares(summary: DriftSummary) -> str:
    """Each class's share, window / reference, the one that moved most first."""
    cur, ref, moved = summary.class_share_current, summary.class_share_reference, summary.largest_share_shift
    order = sorted(ref, key=lambda k: k != (moved.label if moved else None))
    return ", ".join(f"{k} {_fmt(cur.get(k) if cur else None, '.2f')} / {ref[k]:.2f}" for k in order)


def _fmt(value: float | None, spec: str) -> str:
    return "not computed" if value is None else format(value, spec)


def window_feedback(window, labels) -> list[tuple[str, str]]:
    """The window's feedback labels as (text, label name) pairs, oldest row
    first (the prediction log's order), for a retrain: each row's label
    read through the served version's ``labels`` as the monitor reads it
    (monitoring.evidently_reports.clean_window); a label the version does not
    have is left out."""
    import math

    from monitoring.evidently_reports import clean_window

    w = clean_window(window, tuple(labels))
    return [(t, labels[int(f)]) for t, f in zip(w["text"], w["feedback"]) if not math.isnan(f)]
