"""A retrain whose teacher fails its gates leaves nothing behind: the
project is put back as it was (shrinkflow.retrain.save_state /
restore_state), on a real git-less DVC project whose stage stands in for
train, with a cached out (the teacher) and a ``cache: false`` metric."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shrinkflow.files import content_hash, file_hashes
from shrinkflow.paths import FEEDBACK, REJECTED_RETRAINS, RETRAIN_BEFORE, RETRAIN_RECORD, TEACHER
from shrinkflow.retrain import restore_state, save_state, teacher_rejection, uncached_outs

TRAIN = """import pathlib
labels = pathlib.Path("data/feedback/labels.jsonl").read_text().splitlines()
pathlib.Path("models/teacher").mkdir(parents=True, exist_ok=True)
pathlib.Path("models/teacher/weights.txt").write_text(f"trained on {len(labels)} labels")
pathlib.Path("metrics").mkdir(exist_ok=True)
pathlib.Path("metrics/train.json").write_text(f'{{"rows": {len(labels)}}}')
"""
DVC_YAML = f"""stages:
  train:
    cmd: {sys.executable} train.py
    deps:
      - train.py
      - data/feedback/labels.jsonl
    outs:
      - models/teacher
    metrics:
      - metrics/train.json:
          cache: false
"""


def dvc(root: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True,
                          env={**__import__("os").environ, "DVC_NO_ANALYTICS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture()
def project(tmp_path):
    root = tmp_path / "project"
    (root / FEEDBACK).parent.mkdir(parents=True)
    (root / FEEDBACK).write_text('{"text": "good", "label": "positive"}\n')
    (root / RETRAIN_RECORD).write_text("{}\n")
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "train.py").write_text(TRAIN)
    dvc(root, "init", "--no-scm", "-q")
    dvc(root, "repro", "-q")
    return root


def test_uncached_outs_are_what_dvc_checkout_cannot_restore(project):
    assert uncached_outs(project) == [Path("metrics/train.json")]


@pytest.mark.parametrize("gates, reason", [
    ({}, None),
    ({"teacher_gates": None, "reason": "x"}, None),
    ({"teacher_gates": {"passed": True}, "reason": "x"}, None),
    ({"teacher_gates": {"passed": False}, "reason": "the retrained teacher failed max_teacher_val_drop"},
     "the retrained teacher failed max_teacher_val_drop"),
])
def test_teacher_rejection_only_when_a_teacher_gate_failed(gates, reason):
    assert teacher_rejection(gates) == reason


def test_a_rejected_retrain_puts_the_project_back(project):
    before = {rel: (project / rel).read_bytes() for rel in ("dvc.lock", FEEDBACK, RETRAIN_RECORD,
                                                             "metrics/train.json", TEACHER / "weights.txt")}
    kept_teacher = content_hash(file_hashes(project / TEACHER))
    saved = save_state(project)
    assert set(saved) == {"dvc.lock", str(FEEDBACK), str(RETRAIN_RECORD), "metrics/train.json"}

    # the retrain: labels appended, the record rewritten, train re-run
    with open(project / FEEDBACK, "a") as fh:
        fh.write('{"text": "bad", "label": "negative"}\n')
    (project / RETRAIN_RECORD).write_text('{"previous_teacher": null}\n')
    dvc(project, "repro", "-q")
    rejected_teacher = content_hash(file_hashes(project / TEACHER))
    assert rejected_teacher != kept_teacher

    out = restore_state(project, {"feedback_md5": "abc", "reason": "max_teacher_val_drop failed"})
    assert out["teacher"] == kept_teacher
    for rel, data in before.items():
        assert (project / rel).read_bytes() == data, rel
    assert json.loads(dvc(project, "status", "--json")) == {}  # nothing stale: no retrain loop
    lines = (project / REJECTED_RETRAINS).read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"feedback_md5": "abc", "reason": "max_teacher_val_drop failed",
                                               "rejected_teacher": rejected_teacher}]
    assert not (project / RETRAIN_BEFORE).exists()


def test_the_warm_start_a_rejected_retrain_staged_is_put_back(project):
    """The retrain stages production's student anew (shrinkflow.warmstart):
    after a rejection the warm-start folder holds what it held before, the
    student staged by the last re-compression, and nothing the retrain added."""
    from shrinkflow.paths import WARM_START

    before = {WARM_START / "README.md": b"staged students\n", WARM_START / "source.json": b'{"version": "v0002"}',
              WARM_START / "student-a" / "student.safetensors": b"weights of v0002's student"}
    for rel, data in before.items():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_bytes(data)
    saved = save_state(project)
    assert {str(rel) for rel in before} <= set(saved)

    # the retrain's staging: the earlier student cleared, another staged for the retrain
    (project / WARM_START / "student-a" / "student.safetensors").unlink()
    (project / WARM_START / "student-a").rmdir()
    (project / WARM_START / "student-b").mkdir()
    (project / WARM_START / "student-b" / "student.safetensors").write_bytes(b"weights of v0003's student")
    (project / WARM_START / "source.json").write_text('{"version": "v0003", "for_retrain": true}')
    restore_state(project, {"reason": "max_teacher_val_drop failed"})
    now = {p.relative_to(project): p.read_bytes() for p in (project / WARM_START).rglob("*") if p.is_file()}
    assert now == before
    assert not (project / WARM_START / "student-b").exists()


def test_the_kept_teacher_a_rejected_retrain_staged_is_put_back(project):
    """train.retrain_keep_share > 0: the retrain copies the kept teacher into
    data/feedback/kept_teacher/model (shrinkflow.retrain.stage_kept_teacher),
    replacing the copy an earlier retrain staged; a rejection puts that
    earlier copy back, and a share of 0 clears any copy."""
    from shrinkflow.errors import MissingInput
    from shrinkflow.paths import RETRAIN_KEPT_TEACHER, RETRAIN_KEPT_TEACHER_MODEL
    from shrinkflow.retrain import stage_kept_teacher

    (project / TEACHER / "config.json").write_text('{"model_type": "bert"}')
    earlier = {RETRAIN_KEPT_TEACHER / "README.md": b"the kept teacher\n",
               RETRAIN_KEPT_TEACHER_MODEL / "config.json": b'{"model_type": "bert", "earlier": true}',
               RETRAIN_KEPT_TEACHER_MODEL / "model.safetensors": b"the teacher before the last retrain"}
    for rel, data in earlier.items():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_bytes(data)
    save_state(project)
    staged = stage_kept_teacher(project, 0.5)
    assert staged == content_hash(file_hashes(project / TEACHER))
    assert {p.name: p.read_bytes() for p in (project / RETRAIN_KEPT_TEACHER_MODEL).iterdir()} == \
        {p.name: p.read_bytes() for p in (project / TEACHER).iterdir()}
    restore_state(project, {"reason": "min_teacher_feedback_gain failed"})
    now = {p.relative_to(project): p.read_bytes() for p in (project / RETRAIN_KEPT_TEACHER).rglob("*") if p.is_file()}
    assert now == earlier
    # a share of 0 stages nothing and clears the copy; a share with no teacher says so
    assert stage_kept_teacher(project, 0.0) is None
    assert not (project / RETRAIN_KEPT_TEACHER_MODEL).exists() and (project / RETRAIN_KEPT_TEACHER / "README.md").exists()
    (project / TEACHER / "config.json").unlink()
    with pytest.raises(MissingInput, match="no kept teacher"):
        stage_kept_teacher(project, 0.5)


def test_restore_without_a_saved_state_raises(project):
    with pytest.raises(FileNotFoundError):
        restore_state(project, {})


def test_only_the_stages_whose_outs_the_retrain_changed_are_checked_out(tmp_path):
    """A stage the retrain did not run (frontier, whose outs this clone may
    never have had in its cache: the e2e test's case) is left alone."""
    from shrinkflow.retrain import changed_stages

    def lock(path, **stages):
        path.write_text(yaml.safe_dump({"schema": "2.0", "stages": {
            name: {"cmd": "x", "outs": [{"path": f"models/{name}", "md5": md5}]} for name, md5 in stages.items()}}, sort_keys=False))
        return path

    saved = lock(tmp_path / "saved.lock", data="d1", train="t1", frontier="f1", deploy="p1")
    now = lock(tmp_path / "now.lock", data="d2", train="t2", frontier="f1", compress="c2")
    assert changed_stages(now, saved) == ["data", "train", "deploy"]  # deploy: gone from the current lock
    assert changed_stages(saved, saved) == []
    assert changed_stages(tmp_path / "missing.lock", saved) == ["data", "train", "frontier", "deploy"]
    assert changed_stages(now, tmp_path / "missing.lock") == []


def test_a_retrain_interrupted_in_train_gets_its_removed_teacher_back(project):
    """A newcomer's finding: Ctrl-C during a retrain's train left
    models/teacher deleted (DVC removes a stage's outs before it runs it,
    and dvc.lock's entry is unchanged until it finishes, so the changed
    stages alone put nothing back) and the feedback dataset changed."""
    before = {rel: (project / rel).read_bytes() for rel in ("dvc.lock", FEEDBACK, TEACHER / "weights.txt")}
    kept_teacher = content_hash(file_hashes(project / TEACHER))
    save_state(project)
    with open(project / FEEDBACK, "a") as fh:
        fh.write('{"text": "bad", "label": "negative"}\n')
    import shutil

    shutil.rmtree(project / TEACHER)                 # train started, then Ctrl-C
    out = restore_state(project, {"reason": "interrupted: KeyboardInterrupt"}, also_missing=("train",))
    assert out["teacher"] == kept_teacher
    for rel, data in before.items():
        assert (project / rel).read_bytes() == data, rel
    assert json.loads(dvc(project, "status", "--json")) == {}
    assert json.loads((project / REJECTED_RETRAINS).read_text())["reason"] == "interrupted: KeyboardInterrupt"


def test_without_also_missing_an_interrupted_stages_outs_stay_missing(project):
    save_state(project)
    import shutil

    shutil.rmtree(project / TEACHER)
    restore_state(project, {"reason": "x"})
    assert not (project / TEACHER).exists()         # what the flow's interruption path passes also_missing for
