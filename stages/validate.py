"""validate: measure the teacher and every candidate side by side, gate and
select on val, confirm the choice alone on test."""

from __future__ import annotations


from pathlib import Path

from stages.common import main, read_lines, read_split

# Splits every model predicts. Labels are used for val (selection), test
# (confirmation, chosen candidate only) and shifted (reported); reference
# only feeds teacher agreement, which needs no labels. Not train: agreement on
# the distillation data cost the teacher ~55 s of a 10-minute main job (7,400
# sentences at batch 32) and decides nothing.
PREDICTED = ("val", "test", "reference", "shifted")
TEACHER_KEY = "teacher (fp32, torch eager)"


def validate(params, root: Path) -> None:
    from shrinkflow.evaluate import measure_interleaved
    from shrinkflow.catalog import GATES, VALIDATION, save
    from shrinkflow.files import atomic_write_text, content_hash, file_hashes, file_md5, write_json
    from shrinkflow.labels import read_labels
    from shrinkflow.modeling import read_manifest
    from shrinkflow.headline import validate_headline
    from shrinkflow.paths import (CANDIDATES, GATES_MD, HEADLINE_VALIDATE, LABELS_JSON, PREDICTION_CACHE,
                                  PRODUCTION_MODEL, TEACHER, WINDOW_HELDOUT, split_path)
    from shrinkflow.prediction_cache import PredictionCache, model_hash
    from shrinkflow.markdown import validation_markdown
    from shrinkflow.catalog import load_retrain_record
    from shrinkflow.artifacts import PRODUCTION_ROLE_BASELINE
    from shrinkflow.validation import (CONFIRMATION_SPLIT, PRODUCTION_CANDIDATE, SELECTION_SPLIT,
                                       check_model_labels, gate_teacher, is_retrained, retrain_production,
                                       retrained_teacher_gates, validate_runs)

    # Class ids in the splits index this tuple; every model must output its
    # classes in the same order, or its "accuracy" would compare other classes.
    label_names = read_labels(root / LABELS_JSON)
    teacher_dir, candidates = root / TEACHER, root / CANDIDATES
    names = [c.name for c in params.compress.candidates]
    if PRODUCTION_CANDIDATE in names:
        from shrinkflow.errors import DataError

        raise DataError(f"a candidate may not be named {PRODUCTION_CANDIDATE!r}: on a re-compression that name is "
                        "the model in production (compress.candidates)")
    check_model_labels(label_names, {str(d): read_manifest(d).get("labels")
                                     for d in (teacher_dir, *(candidates / n for n in names))})
    # A re-compression: the production model, copied out of the registry, is
    # measured and gated as one more candidate (none by default).
    production_version, production_role = read_production(root, label_names)
    baseline_only = production_role == PRODUCTION_ROLE_BASELINE
    dirs = {n: candidates / n for n in names} | (
        {PRODUCTION_CANDIDATE: root / PRODUCTION_MODEL} if production_version else {})
    frames = {s: read_split(s, root) for s in PREDICTED}
    # "window_heldout": production text held out of a re-compression's
    # distillation; teacher agreement on it is gated (empty by default).
    # "feedback_heldout": production labels held out of a retrain (empty by default).
    frames["feedback_heldout"] = read_split("feedback_heldout", root)
    # "unlabelled" (a re-compression's distillation texts) is not predicted,
    # for the reason train is not: agreement on what a student was distilled
    # on decides nothing, and it cost a re-compression's validate four models'
    # passes over ~1,200 window texts (bench/results/monitoring.md: validate
    # 63.0 s before, 57.1 s after, in a run 11% slower overall). Its key
    # stays, always n/a.
    texts = {s: f["text"].tolist() for s, f in frames.items()} | {
        "unlabelled": [], "window_heldout": read_lines(root / WINDOW_HELDOUT)}
    labels = {s: [int(x) for x in frames[s]["label"]] for s in ("val", "test", "shifted")}
    lat = params.validate.latency
    teacher_files = file_hashes(teacher_dir)
    teacher_hash = content_hash(teacher_files)
    # The candidates of a retrained teacher are also gated against the val
    # accuracy of the production model the retrain replaced, as its manifest
    # records it, when that was measured on today's val split, and the choice
    # confirmed against its test accuracy on today's test split
    # (data/feedback/retrain.json; max_accuracy_drop_vs_production). Not on a
    # re-compression: production is measured beside the candidates there.
    # Read before the models are measured, so a bad record fails in seconds.
    retrain = load_retrain_record(root)
    if baseline_only and not is_retrained(retrain, teacher_hash):
        # a retrain's copy left behind (a rejected retrain, then `dvc repro`):
        # this teacher is no retrain's, so there is nothing to be a baseline of
        print(f"validate: production {production_version}'s copy is a retrain's baseline, but the teacher is not "
              "a retrained one (data/feedback/retrain.json): it is not measured")
        del dirs[PRODUCTION_CANDIDATE]
        production_version, baseline_only = None, False
    recorded, why_not = (retrain_production(retrain, teacher_hash, file_md5(root / split_path(SELECTION_SPLIT)),
                                            file_md5(root / split_path(CONFIRMATION_SPLIT)))
                         if params.validate.gates.max_accuracy_drop_vs_production is not None
                         and (production_version is None or baseline_only) else (None, None))
    # Hash before measuring: these are the bytes that get validated.
    files = {}
    for n in dirs:
        hashes = file_hashes(dirs[n])
        files[n] = {"files": hashes, "content_hash": content_hash(hashes)}
    # A built candidate with production's very files (int8 reads no window
    # text: rebuilt, it is the same model) is production: measured once, under
    # its own name, and its figures are production's baseline.
    production_as = next((n for n in names if production_version and not baseline_only and
                          files[n]["content_hash"] == files[PRODUCTION_CANDIDATE]["content_hash"]), None)
    if production_as:
        print(f"validate: {production_as!r} has production {production_version}'s files: measured once, as "
              f"{production_as!r}")
        del dirs[PRODUCTION_CANDIDATE], files[PRODUCTION_CANDIDATE]
    # The teacher and every candidate, timed in alternating rounds over the
    # same minutes: the speedup gate compares figures from one time window.
    # (The key cannot clash: candidate names are lower-case slugs.)
    # Batch invariance on val for every candidate (the teacher is never served);
    # one that fails it is predicted one text per call, as it would be served.
    # Labels a model already predicted on the same texts (the teacher, the
    # int8 teacher and production on val, test, reference and shifted, in a
    # re-compression) come from the prediction cache: the same labels.
    runs = measure_interleaved({TEACHER_KEY: teacher_dir, **dirs}, texts,
                               texts[SELECTION_SPLIT], lat, log=lambda m: print(f"validate: {m}"),
                               invariance_texts=texts[SELECTION_SPLIT], invariance_skip=frozenset({TEACHER_KEY}),
                               max_batch_prob_diff=params.validate.gates.max_batch_prob_diff,
                               cache=PredictionCache(root / PREDICTION_CACHE),
                               model_hashes={TEACHER_KEY: model_hash(teacher_dir, teacher_files)} | {
                                   n: model_hash(dirs[n], files[n]["files"]) for n in dirs},
                               probability_splits=frozenset({"window_heldout"}))
    teacher = runs.pop(TEACHER_KEY)
    for n in dirs:
        if file_hashes(dirs[n]) != files[n]["files"]:
            raise RuntimeError(f"{dirs[n]} changed while it was being validated")
    # Typed as they are built: a figure that does not match its model fails
    # here, before anything is written, not in deploy.
    if recorded is not None:
        test = (f", and the choice confirmed against its test accuracy {recorded.test_accuracy:.4g}"
                if recorded.test_accuracy is not None else "")
        print(f"validate: a retrained teacher (data/feedback/retrain.json): its candidates are gated against the "
              f"production it replaced, {recorded.version}, val accuracy {recorded.val_accuracy:.4g} as recorded "
              f"at its deploy (the same val split, md5 {recorded.val_md5}){test}")
    if why_not:
        print(f"validate: a retrained teacher: {why_not}")
    report, selection = validate_runs(teacher, runs, labels, params.validate, files, label_names,
                                      production_version=production_version, production_as=production_as,
                                      recorded_production=recorded, production_baseline_only=baseline_only)
    selection = gate_teacher(selection, retrained_teacher_gates(
        retrain, teacher_hash, report.teacher.accuracy,
        [int(x) for x in frames["feedback_heldout"]["label"]], teacher["predictions"]["feedback_heldout"],
        params.validate.gates))
    save(VALIDATION, report, root)
    save(GATES, selection, root)
    write_json(root / HEADLINE_VALIDATE, validate_headline(report))
    atomic_write_text(root / GATES_MD, validation_markdown(report, selection))
    print(f"validate: {selection.reason}")


def read_production(root: Path, label_names) -> tuple[str | None, str | None]:
    """(version, role) of the production model a re-compression or a retrain
    copied into data/unlabelled/production (its version.json; role
    PRODUCTION_ROLE_CANDIDATE, the default of a copy that names none, or
    PRODUCTION_ROLE_BASELINE), or (None, None): no copy (the default), or
    one whose classes differ from the data's (it could not be compared;
    said on stdout). Raises DataError for a version.json that is not an
    object naming the version, or names a role it does not know."""
    from shrinkflow.artifacts import PRODUCTION_ROLE_BASELINE, PRODUCTION_ROLE_CANDIDATE
    from shrinkflow.errors import DataError
    from shrinkflow.files import read_json
    from shrinkflow.modeling import read_manifest
    from shrinkflow.paths import PRODUCTION_META, PRODUCTION_MODEL

    if not (root / PRODUCTION_META).is_file() or not (root / PRODUCTION_MODEL).is_dir():
        return None, None
    try:
        meta = read_json(root / PRODUCTION_META)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{root / PRODUCTION_META} is not JSON ({exc}); remove {root / PRODUCTION_META.parent} "
                        "and re-run (a re-compression or retrain copies production again)") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("version"), str) or not meta["version"]:
        raise DataError(f"{root / PRODUCTION_META} must be an object naming the production \"version\" (got "
                        f"{meta!r:.80}); remove {root / PRODUCTION_META.parent} and re-run (a re-compression or "
                        "retrain copies production again)")
    role = meta.get("role", PRODUCTION_ROLE_CANDIDATE)
    if role not in (PRODUCTION_ROLE_CANDIDATE, PRODUCTION_ROLE_BASELINE):
        raise DataError(f"{root / PRODUCTION_META}: role {role!r} is neither {PRODUCTION_ROLE_CANDIDATE!r} nor "
                        f"{PRODUCTION_ROLE_BASELINE!r}")
    labels = read_manifest(root / PRODUCTION_MODEL).get("labels")
    if labels is None or list(labels) != list(label_names):
        print(f"validate: production {meta['version']} is not measured: its classes {labels} are not the "
              f"data's {list(label_names)}")
        return None, None
    print(f"validate: production {meta['version']} is measured as the candidate 'production'"
          if role == PRODUCTION_ROLE_CANDIDATE else
          f"validate: production {meta['version']} is measured as the baseline of a retrain's candidates (their "
          "window-agreement gain and accuracy against production), not as a candidate")
    return str(meta["version"]), role


if __name__ == "__main__":
    main("validate", validate)
