"""The retrain flow's library steps: measure the teacher a retrain is about
to replace, and record what the retrain was (data/feedback/retrain.json,
shrinkflow.artifacts.RetrainRecord) for validate's teacher gates and deploy's
lineage.

Not imported by any stage (validate reads the record through the catalog),
so measuring here never makes a stage stale. Nothing happens at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from shrinkflow.artifacts import GatesReport, PreviousTeacher, RecordedProduction, RetrainRecord


def measure_teacher(root: Path | str, threads: int = 2) -> PreviousTeacher:
    """The kept teacher (models/teacher) before a retrain replaces it: the
    content hash of its files and its accuracy on val and on the held-out
    production labels (data/prepared/feedback_heldout.parquet, written by
    the data stage; None when it holds no row). Read with the head
    truncation, as validate reads it. Raises MissingInput when a split is
    missing, FileNotFoundError when there is no teacher."""
    from shrinkflow.files import content_hash, file_hashes
    from shrinkflow.paths import TEACHER
    from shrinkflow.predictors import load_predictor, predict_labels
    from shrinkflow.splits import read_split
    from shrinkflow.validation import heldout_accuracy

    root = Path(root)
    predictor = load_predictor(root / TEACHER, threads=threads)
    figures = {}
    for split in ("val", "feedback_heldout"):
        df = read_split(split, root)
        texts = df["text"].astype(str).tolist()
        preds = predict_labels(predictor, texts) if texts else []
        figures[split] = (heldout_accuracy([int(y) for y in df["label"]], [int(p) for p in preds]), len(texts))
    return PreviousTeacher(content_hash=content_hash(file_hashes(root / TEACHER)),
                           val_accuracy=figures["val"][0], feedback_heldout_accuracy=figures["feedback_heldout"][0],
                           feedback_heldout_rows=figures["feedback_heldout"][1])


def recorded_production(registry_root: Path | str) -> RecordedProduction | None:
    """The production version of the registry at ``registry_root`` with the
    val accuracy and val md5 its manifest records (``RecordedProduction``),
    or None: nothing in production, or a manifest without those figures (an
    older version); its test accuracy and test md5 when the manifest has
    both (else None). Raises shrinkflow.errors.RegistryError on a broken
    registry."""
    from shrinkflow.registry import Registry

    registry = Registry(Path(registry_root))
    version = registry.alias()
    if version is None:
        return None
    manifest = registry.manifest(version)
    acc = (manifest.get("selection_metrics") or {}).get("accuracy")
    md5s = (manifest.get("lineage") or {}).get("data_md5") or {}
    if acc is None or md5s.get("val") is None:
        return None
    test = manifest.get("metrics") or {}
    # the deployed figures are the confirmation's, on test (split names it)
    test_acc = test.get("accuracy") if test.get("split") == "test" else None
    return RecordedProduction(version=version, val_accuracy=acc, val_md5=md5s["val"],
                              **({"test_accuracy": test_acc, "test_md5": md5s["test"]}
                                 if test_acc is not None and md5s.get("test") else {}))


def record_retrain(root: Path | str, requested_by: dict, feedback: dict, previous: PreviousTeacher,
                   production: RecordedProduction | None = None) -> RetrainRecord:
    """Write data/feedback/retrain.json (atomically, through the catalog)
    and return it: ``requested_by`` the monitor run and window, ``feedback``
    the dataset version appended (shrinkflow.feedback.append_feedback's
    result), ``previous`` the old teacher's figures, ``production`` the
    production model's recorded val accuracy (``recorded_production``)."""
    from shrinkflow.catalog import RETRAIN, save

    record = RetrainRecord(requested_by=requested_by, feedback=feedback, previous_teacher=previous,
                           production=production)
    save(RETRAIN, record, root)
    return record


# ------------------------------------------------- what a retrain did

# Outcomes of one retrain: a version deployed; the retrained teacher passed
# its gates but no candidate passed theirs (production keeps serving);
# the teacher failed its gates (the project put back as it was); or the
# window's labels were all in the feedback dataset already (nothing ran).
DEPLOYED, NOTHING, REJECTED, UNCHANGED = "deployed", "nothing", "rejected", "unchanged"


def vs_production(selection: GatesReport) -> dict | None:
    """The selected candidate against the production model a retrain
    replaced: its ``max_accuracy_drop_vs_production`` verdicts on ``val``
    (selection) and ``test`` (confirmation), each as
    shrinkflow.recompression.gate_figures (its note gives both accuracies),
    None where that gate did not run. None when nothing was selected or
    neither ran (no production, or the gate unset)."""
    from shrinkflow.recompression import gate_figures

    name = "max_accuracy_drop_vs_production"
    if selection.selected is None:
        return None
    doc = selection.candidates.get(selection.selected)
    val = doc.gates.get(name) if doc is not None else None
    conf = selection.confirmation
    test = conf.gates.gates.get(name) if conf is not None and conf.candidate == selection.selected else None
    if val is None and test is None:
        return None
    return {"val": gate_figures(val) if val is not None else None,
            "test": gate_figures(test) if test is not None else None}


def retrain_outcome(selection: GatesReport | None, deployed_version: str | None, feedback: dict,
                    previous_teacher: PreviousTeacher | None = None, reason: str | None = None,
                    production: RecordedProduction | None = None) -> dict:
    """What one retrain did, as the monitor records it (decision.json
    ``retrain``) and shows it (the Prefect artifact ``shrinkflow-retrain``):
    ``outcome`` (``deployed``, ``nothing``, ``rejected`` or ``unchanged``,
    above), ``deployed_version``, the selection's ``selected`` and
    ``reason``, ``feedback`` (the dataset version: md5, rows, added,
    relabelled, archive), the old teacher's figures, ``teacher_gates`` (each teacher
    gate with value, threshold and margin, passed or not; None when the
    teacher was not gated), ``candidates`` (shrinkflow.recompression
    .candidate_failures), ``production_before`` (``production``: the
    version in production when the retrain started, with its recorded val
    and test accuracy; None: nothing was) and ``vs_production`` (the
    selected candidate against it on val and test, ``vs_production``).
    ``selection``: the lifecycle's reports/gates.json, None when nothing ran
    (``reason`` then says why). JSON types."""
    from shrinkflow.recompression import candidate_failures, gate_figures

    prev = previous_teacher.to_json_dict() if previous_teacher is not None else None
    replaced = production.to_json_dict() if production is not None else None
    feedback = {k: feedback.get(k) for k in ("md5", "rows", "added", "relabelled", "archive")}
    if selection is None:
        return {"outcome": UNCHANGED, "deployed_version": None, "kept_version": None, "selected": None,
                "reason": reason or "no new production labels: the feedback dataset is unchanged",
                "feedback": feedback, "previous_teacher": prev, "teacher_gates": None, "candidates": {},
                "production_before": replaced, "vs_production": None}
    tg = selection.teacher_gates
    teacher = {name: gate_figures(g) for name, g in tg.gates.items()} if tg is not None else None
    outcome = (DEPLOYED if deployed_version else
               REJECTED if tg is not None and not tg.passed else NOTHING)
    return {"outcome": outcome, "deployed_version": deployed_version, "kept_version": None,
            "selected": selection.selected, "reason": reason or selection.reason, "feedback": feedback,
            "previous_teacher": prev, "teacher_gates": teacher, "candidates": candidate_failures(selection),
            "production_before": replaced, "vs_production": vs_production(selection)}


def production_lines(outcome: dict) -> list[str]:
    """``retrain_outcome``'s production before the retrain and the selected
    candidate against it, as lines (none when nothing was in production):
    "production before the retrain: v0001 (val 0.8416, test 0.8617), as its
    manifest records it" and, per split the gate ran on, "'int8' against it
    on test: test accuracy 0.8541 against production v0001's 0.8617
    (max_accuracy_drop_vs_production passed: drop +0.0076, threshold 0.01)"."""
    prod = outcome.get("production_before")
    if not prod:
        return []
    test = f", test {prod['test_accuracy']:.4g}" if prod.get("test_accuracy") is not None else ""
    lines = [f"production before the retrain: {prod['version']} (val {prod['val_accuracy']:.4g}{test}), as its "
             "manifest records it"]
    for split, f in (outcome.get("vs_production") or {}).items():
        if f is not None:
            lines.append(f"{outcome['selected']!r} against it on {split}: {f.get('note', '')} "
                         f"(max_accuracy_drop_vs_production {'passed' if f['passed'] else 'FAILED'}: drop "
                         f"{f['value']:+.4g}, threshold {f['threshold']:.4g})")
    return lines


def retrain_markdown(outcome: dict) -> str:
    """The Prefect artifact ``shrinkflow-retrain``: the outcome in one bold
    line, the feedback dataset, the retrained teacher's gates and each
    candidate's failed gates with value, threshold and margin."""
    from shrinkflow.recompression import gate_rows

    fb = outcome["feedback"]
    head = {DEPLOYED: f"**Deployed {outcome['deployed_version']}** ({outcome['selected']!r})",
            NOTHING: "**Nothing deployed**: the retrained teacher passed its gates, no candidate passed theirs; "
                     "production keeps serving",
            REJECTED: "**Rejected**: the retrained teacher failed its gates; the project is back as it was "
                      "before the retrain, production keeps serving",
            UNCHANGED: "**Nothing retrained**: the window's labels were all in the feedback dataset already"
            }[outcome["outcome"]]
    lines = ["# Retrain", "", head + ".", "",
             f"Feedback dataset {fb.get('md5')}: {fb.get('rows')} labels ({fb.get('added')} added, "
             f"{fb.get('relabelled')} relabelled).", "", f"Selection: {outcome['reason']}", ""]
    lines += [f"{line}." for line in production_lines(outcome)] + ([""] if production_lines(outcome) else [])
    # every teacher gate gets its row, passed or not ("passed": False only
    # keeps gate_rows from adding an "every gate passed" line above them)
    gates = {**({"teacher": {"passed": False, "failed": outcome["teacher_gates"]}}
                if outcome["teacher_gates"] else {}), **outcome["candidates"]}
    if gates:
        lines += ["| candidate | gate | value | threshold | margin |", "|---|---|---|---|---|", *gate_rows(gates)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------- a rejected teacher

def uncached_outs(root: Path | str) -> list[Path]:
    """Every ``cache: false`` out, metric and plot of dvc.yaml's stages
    (relative paths): what ``dvc checkout`` cannot restore. Raises
    FileNotFoundError without a dvc.yaml."""
    import yaml

    from shrinkflow.dvcrun import outs_by_kind

    doc = yaml.safe_load((Path(root) / "dvc.yaml").read_text()) or {}
    return [Path(path) for stage in (doc.get("stages") or {}).values() for path in outs_by_kind(stage)[1]]


def changed_stages(current_lock: Path, saved_lock: Path) -> list[str]:
    """The stages of ``saved_lock`` (a dvc.lock) whose outs differ in
    ``current_lock`` (missing or another md5), in the saved file's order:
    what ``dvc checkout`` must put back after a rejected retrain. A missing
    file reads as a lock with no stages."""
    import yaml

    def stages(path: Path) -> dict:
        return (yaml.safe_load(path.read_text()) or {}).get("stages") or {} if path.is_file() else {}

    now, before = stages(current_lock), stages(saved_lock)
    return [name for name, st in before.items() if (now.get(name) or {}).get("outs") != st.get("outs")]


def missing_out_stages(root: Path, lock: Path, stages: Sequence[str]) -> list[str]:
    """The stages among ``stages`` whose outs, as ``lock`` (a dvc.lock)
    lists them, are not all under ``root``: what an interrupted stage left
    removed (DVC deletes a stage's outs before it runs it, and its lock
    entry changes only once it finished)."""
    import yaml

    pinned = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {} if lock.is_file() else {}
    return [name for name in stages if name in pinned
            and any(not (root / out["path"]).exists() for out in pinned[name].get("outs") or [])]


def save_state(root: Path | str) -> list[str]:
    """Before a retrain's lifecycle: copy what it changes and DVC's cache
    cannot give back (dvc.lock, the feedback dataset, the retrain record,
    every ``cache: false`` out, what the retrain stages anew: every file
    under ``staging_dirs()``, the warm-start students and the kept teacher)
    into ``shrinkflow.paths.RETRAIN_BEFORE``, replacing an earlier copy; its
    ``files.json`` lists the paths and which existed. Returns the paths saved
    (relative)."""
    import json
    import shutil

    from shrinkflow.files import atomic_write_text
    from shrinkflow.paths import FEEDBACK, RETRAIN_BEFORE, RETRAIN_RECORD

    root = Path(root)
    paths = [Path("dvc.lock"), FEEDBACK, RETRAIN_RECORD, *uncached_outs(root), *staged_files(root)]
    tmp = root / RETRAIN_BEFORE.with_name(RETRAIN_BEFORE.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    existed = {}
    for rel in paths:
        existed[str(rel)] = (root / rel).is_file()
        if existed[str(rel)]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, tmp / rel)
    atomic_write_text(tmp / "files.json", json.dumps(existed, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(root / RETRAIN_BEFORE, ignore_errors=True)
    tmp.rename(root / RETRAIN_BEFORE)
    return [p for p, e in existed.items() if e]


def staging_dirs() -> tuple[Path, ...]:
    """What a retrain stages before its lifecycle (relative to the project):
    the warm-start students (``WARM_START``) and the kept teacher a
    retrained one is averaged with (``RETRAIN_KEPT_TEACHER``)."""
    from shrinkflow.paths import RETRAIN_KEPT_TEACHER, WARM_START

    return (WARM_START, RETRAIN_KEPT_TEACHER)


def staged_files(root: Path) -> list[Path]:
    """Every file under ``staging_dirs()`` in the project at ``root``
    (relative, sorted): what a retrain's staging replaces."""
    root = Path(root)
    return sorted(p.relative_to(root) for d in staging_dirs() if (root / d).is_dir()
                  for p in (root / d).rglob("*") if p.is_file())


def stage_kept_teacher(root: Path | str, keep_share: float) -> str | None:
    """Before a retrain's lifecycle: with ``keep_share`` (``train.retrain_keep_share``)
    above 0, copy the kept teacher (``TEACHER``) into
    ``RETRAIN_KEPT_TEACHER_MODEL``, replacing an earlier copy (built beside it
    and renamed: a crash leaves the old copy or the new one); at 0, remove
    any copy, so the train dep holds its README only. Returns the staged
    teacher's content hash, or None. Raises MissingInput when a share is
    set and the project has no teacher."""
    import shutil

    from shrinkflow.errors import MissingInput
    from shrinkflow.files import content_hash, file_hashes
    from shrinkflow.paths import RETRAIN_KEPT_TEACHER_MODEL, TEACHER

    root = Path(root)
    dest = root / RETRAIN_KEPT_TEACHER_MODEL
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if keep_share == 0:
        shutil.rmtree(dest, ignore_errors=True)
        return None
    if not (root / TEACHER / "config.json").is_file():
        raise MissingInput(f"train.retrain_keep_share is {keep_share:g} but there is no kept teacher at "
                           f"{root / TEACHER} to average the retrained one with")
    shutil.copytree(root / TEACHER, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return content_hash(file_hashes(dest))


def teacher_rejection(gates: dict) -> str | None:
    """The reason a retrain's teacher was rejected, from its gate report
    (reports/gates.json as a dict): None when no teacher gate was applied or
    all passed."""
    tg = gates.get("teacher_gates")
    if not tg or tg.get("passed", True):
        return None
    return gates.get("reason") or "the retrained teacher failed its gates"


def restore_state(root: Path | str, rejection: dict, also_missing: Sequence[str] = ()) -> dict:
    """After a retrain whose teacher failed its gates: put the project back
    as ``save_state`` found it (its files, then ``dvc checkout --force``:
    the old teacher, candidates, splits and reports from DVC's cache), so
    the kept teacher is the one production was built from and later
    re-compressions are not gated against the rejected one; then append
    ``rejection`` (what failed, the feedback md5, the rejected teacher's
    hash) to ``shrinkflow.paths.REJECTED_RETRAINS``. Only the stages whose
    outs the retrain changed (``changed_stages``) are checked out. The feedback labels stay
    in the content-addressed archive (data/feedback/archive) and in the
    prediction log. ``also_missing``: stages also checked out when one of
    their outs is missing (``missing_out_stages``: after a retrain
    interrupted mid-stage). Returns ``{"restored": [paths], "teacher":
    content hash}``.
    Raises FileNotFoundError when there is no saved state, RuntimeError
    (saying how to recover by hand) when ``dvc checkout`` fails."""
    import json
    import shutil

    from shrinkflow.dvcrun import dvc_command
    from shrinkflow.files import atomic_write_bytes, atomic_write_text, content_hash, file_hashes
    from shrinkflow.paths import REJECTED_RETRAINS, RETRAIN_BEFORE, TEACHER

    root = Path(root)
    saved = root / RETRAIN_BEFORE
    existed = json.loads((saved / "files.json").read_text())
    # the rejected teacher's hash, before the checkout replaces it
    rejected = content_hash(file_hashes(root / TEACHER)) if (root / TEACHER).is_dir() else None
    # Only the stages the retrain changed are checked out: a stage it did not
    # run (frontier, say) may pin outs this clone never had in its cache.
    changed = changed_stages(root / "dvc.lock", saved / "dvc.lock")
    changed += [s for s in missing_out_stages(root, saved / "dvc.lock", also_missing) if s not in changed]
    for rel, was in existed.items():
        if was:
            atomic_write_bytes(root / rel, (saved / rel).read_bytes())
        elif (root / rel).exists():
            (root / rel).unlink()
    # what the retrain staged (warm-start students, the kept teacher), where none was before
    for rel in staged_files(root):
        if str(rel) not in existed:
            (root / rel).unlink()
    for staging in staging_dirs():
        for folder in sorted((p for p in (root / staging).rglob("*") if p.is_dir()), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()
    try:
        if changed:
            dvc_command(["checkout", "--force", *changed], root)
    except RuntimeError as exc:
        raise RuntimeError(f"the rejected teacher could not be replaced by the one before the retrain: {exc}\n"
                           "dvc.lock is already back as it was; run `dvc checkout --force` once the cause is "
                           "fixed (a missing cache entry: `dvc pull`)") from None
    line = json.dumps({**rejection, "rejected_teacher": rejected}, sort_keys=True) + "\n"
    log = root / REJECTED_RETRAINS
    atomic_write_text(log, (log.read_text() if log.is_file() else "") + line)
    shutil.rmtree(saved, ignore_errors=True)
    return {"restored": sorted(k for k, v in existed.items() if v),
            "teacher": content_hash(file_hashes(root / TEACHER)) if (root / TEACHER).is_dir() else None}
