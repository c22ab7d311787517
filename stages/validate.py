"""validate: measure the teacher and every candidate side by side, gate and
select on val, confirm the choice alone on test."""

from __future__ import annotations

import sys

from pathlib import Path

from stages.common import read_lines, read_split, run_stage

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
    from shrinkflow.files import atomic_write_text, content_hash, file_hashes, write_json
    from shrinkflow.labels import read_labels
    from shrinkflow.modeling import read_manifest
    from shrinkflow.headline import validate_headline
    from shrinkflow.paths import (CANDIDATES, GATES_MD, HEADLINE_VALIDATE, LABELS_JSON, TEACHER, UNLABELLED,
                                  WINDOW_HELDOUT)
    from shrinkflow.markdown import validation_markdown
    from shrinkflow.catalog import load_retrain_record
    from shrinkflow.validation import (SELECTION_SPLIT, check_model_labels, gate_teacher, retrained_teacher_gates,
                                       validate_runs)

    # Class ids in the splits index this tuple; every model must output its
    # classes in the same order, or its "accuracy" would compare other classes.
    label_names = read_labels(root / LABELS_JSON)
    teacher_dir, candidates = root / TEACHER, root / CANDIDATES
    names = [c.name for c in params.compress.candidates]
    check_model_labels(label_names, {str(d): read_manifest(d).get("labels")
                                     for d in (teacher_dir, *(candidates / n for n in names))})
    frames = {s: read_split(s, root) for s in PREDICTED}
    # "window_heldout": production text held out of a re-compression's
    # distillation; teacher agreement on it is gated (empty by default).
    # "feedback_heldout": production labels held out of a retrain (empty by default).
    frames["feedback_heldout"] = read_split("feedback_heldout", root)
    texts = {s: f["text"].tolist() for s, f in frames.items()} | {
        "unlabelled": read_lines(root / UNLABELLED), "window_heldout": read_lines(root / WINDOW_HELDOUT)}
    labels = {s: [int(x) for x in frames[s]["label"]] for s in ("val", "test", "shifted")}
    lat = params.validate.latency
    teacher_hash = content_hash(file_hashes(teacher_dir))
    # Hash before measuring: these are the bytes that get validated.
    files = {}
    for n in names:
        hashes = file_hashes(candidates / n)
        files[n] = {"files": hashes, "content_hash": content_hash(hashes)}
    # The teacher and every candidate, timed in alternating rounds over the
    # same minutes: the speedup gate compares figures from one time window.
    # (The key cannot clash: candidate names are lower-case slugs.)
    # Batch invariance on val for every candidate (the teacher is never served);
    # one that fails it is predicted one text per call, as it would be served.
    runs = measure_interleaved({TEACHER_KEY: teacher_dir, **{n: candidates / n for n in names}}, texts,
                               texts[SELECTION_SPLIT], lat, log=lambda m: print(f"validate: {m}"),
                               invariance_texts=texts[SELECTION_SPLIT], invariance_skip=frozenset({TEACHER_KEY}),
                               max_batch_prob_diff=params.validate.gates.max_batch_prob_diff)
    teacher = runs.pop(TEACHER_KEY)
    for n in names:
        if file_hashes(candidates / n) != files[n]["files"]:
            raise RuntimeError(f"{CANDIDATES / n} changed while it was being validated")
    # Typed as they are built: a figure that does not match its model fails
    # here, before anything is written, not in deploy.
    report, selection = validate_runs(teacher, runs, labels, params.validate, files, label_names)
    selection = gate_teacher(selection, retrained_teacher_gates(
        load_retrain_record(root), teacher_hash, report.teacher.accuracy,
        [int(x) for x in frames["feedback_heldout"]["label"]], teacher["predictions"]["feedback_heldout"],
        params.validate.gates))
    save(VALIDATION, report, root)
    save(GATES, selection, root)
    write_json(root / HEADLINE_VALIDATE, validate_headline(report))
    atomic_write_text(root / GATES_MD, validation_markdown(report, selection))
    print(f"validate: {selection.reason}")


if __name__ == "__main__":
    sys.exit(run_stage("validate", validate))
