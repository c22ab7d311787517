"""monitoring.run.kept_teacher: the monitor's teacher rules judge production
only against the teacher production was validated against (a newcomer's
findings: a 3-class teacher judged a 4-class production at 0.331 agreement;
a refused run's new teacher called for a retrain)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import yaml

from monitoring.run import kept_teacher
from shrinkflow.paths import TEACHER
from shrinkflow.registry import ModelRef
from shrinkflow.status import model_labels


def lock(root, md5: str) -> None:
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"train": {"outs": [
        {"path": str(TEACHER), "hash": "md5", "md5": md5}]}}}))


def test_the_kept_teacher_is_used_only_when_it_is_productions(tmp_path, tiny_teacher_dir):
    root = tmp_path / "project"
    shutil.copytree(tiny_teacher_dir, root / TEACHER)
    labels = list(model_labels(tiny_teacher_dir))
    production = ModelRef("v0002", tiny_teacher_dir, {"labels": labels, "lineage": {"teacher_md5": "aaa.dir"}})

    assert kept_teacher(root, production) == (root / TEACHER, None)       # no dvc.lock: the labels alone
    lock(root, "aaa.dir")
    assert kept_teacher(root, production) == (root / TEACHER, None)
    lock(root, "bbb.dir")
    teacher, why = kept_teacher(root, production)
    assert teacher is None and "dvc.lock pins another teacher" in why and "bbb.dir" in why and "aaa.dir" in why
    assert "v0002" in why

    lock(root, "aaa.dir")
    other = ModelRef("v0001", tiny_teacher_dir, {"labels": [*labels, "lonely"], "lineage": {"teacher_md5": "aaa.dir"}})
    teacher, why = kept_teacher(root, other)
    assert teacher is None and f"labels {labels} are not production v0001's" in why

    shutil.rmtree(root / TEACHER)
    teacher, why = kept_teacher(root, production)
    assert teacher is None and why.startswith("no kept teacher (models/teacher)") and "dvc checkout" in why


def test_a_teacher_on_disk_other_than_the_one_dvc_lock_pins_is_not_used(tmp_path, tiny_teacher_dir):
    """A helper's finding: after `git checkout` of an older dvc.lock and
    `dvc checkout`, then the newer dvc.lock back without `dvc checkout`,
    dvc.lock named production's teacher while another one was on disk, and
    the rules judged production against it (agreement 0.600 against 1.000)."""
    from shrinkflow.dvcrun import out_md5

    root = tmp_path / "project"
    root.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True,
                   env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    shutil.copytree(tiny_teacher_dir, root / TEACHER)
    md5 = out_md5(root, TEACHER)
    assert md5 and md5.endswith(".dir")
    lock(root, md5)
    labels = list(model_labels(tiny_teacher_dir))
    production = ModelRef("v0003", tiny_teacher_dir, {"labels": labels, "lineage": {"teacher_md5": md5}})
    assert kept_teacher(root, production) == (root / TEACHER, None)
    (root / TEACHER / "notes.txt").write_text("another teacher's file")
    teacher, why = kept_teacher(root, production)
    assert teacher is None and "the teacher on disk" in why and "`dvc checkout models/teacher` restores it" in why
    assert out_md5(root, TEACHER) in why and md5 in why
