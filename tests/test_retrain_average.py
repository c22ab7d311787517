"""A retrained teacher averaged with the kept one (``train.retrain_keep_share``,
WiSE-FT): the weight average itself, and the train stage in a scratch project
with a tiny local BERT (hidden 32, 2 layers) on the keyword task of
tests/test_local_teacher.py: averaged only on a retrain (production labels)
with a kept teacher staged, recorded in metrics/train.json."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.test_local_teacher import LABELS, make_checkpoint, task_frame


def tiny_classifier(seed: int, labels=LABELS, hidden: int = 32):
    import torch
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={v: i for i, v in enumerate(labels)})
    return T.BertForSequenceClassification(cfg)


def test_the_average_is_each_weight_shared_between_the_two_teachers():
    import torch

    from shrinkflow.train import average_with_kept

    new, kept = tiny_classifier(0), tiny_classifier(1)
    a = {k: v.clone() for k, v in new.state_dict().items()}
    b = kept.state_dict()
    out = average_with_kept(new, kept, 0.25)
    floats = [k for k, v in a.items() if v.is_floating_point()]
    assert out == {"tensors": len(floats)} and len(floats) > 10
    for k in floats:
        torch.testing.assert_close(new.state_dict()[k], 0.75 * a[k] + 0.25 * b[k])
    # integer buffers (position ids) are left alone; a share of 0 changes nothing
    same = tiny_classifier(0)
    assert average_with_kept(same, kept, 0.0) == {"tensors": 0}
    assert all(torch.equal(same.state_dict()[k], a[k]) for k in a)


def test_teachers_that_cannot_be_averaged_are_refused_saying_why():
    from shrinkflow.errors import ModelError
    from shrinkflow.train import average_with_kept

    with pytest.raises(ModelError, match="classes"):
        average_with_kept(tiny_classifier(0), tiny_classifier(1, labels=("a", "b", "c")), 0.5)
    with pytest.raises(ModelError, match="architecture"):
        average_with_kept(tiny_classifier(0), tiny_classifier(1, hidden=16), 0.5)
    for keep in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            average_with_kept(tiny_classifier(0), tiny_classifier(1), keep)


@pytest.fixture()
def project(tmp_path):
    """A scratch project for the train stage: the keyword task's train and
    val splits, 30 production labels to fine-tune on, params for a tiny
    local BERT."""
    from shrinkflow.labels import write_labels

    root = Path(__file__).resolve().parents[1]
    ck = make_checkpoint("bert", tmp_path / "checkpoint")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["train"].update({"model": {"kind": "local", "path": str(ck)}, "max_seq_len": 16, "threads": 1,
                         "epochs": 3, "batch_size": 16, "learning_rate": 3e-3})
    raw["compress"]["candidates"] = [{"name": "int8", "recipe": [{"method": "quantize"}]}]
    work = tmp_path / "project"
    (work / "data" / "prepared").mkdir(parents=True)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    shutil.copy(root / "dvc.yaml", work / "dvc.yaml")
    prepared = work / "data" / "prepared"
    task_frame(150, 0).to_parquet(prepared / "train.parquet")
    task_frame(45, 1).to_parquet(prepared / "val.parquet")
    task_frame(30, 3).to_parquet(prepared / "feedback_train.parquet")
    write_labels(prepared / "labels.json", LABELS)
    return work


def set_params(root: Path, **train) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["train"].update(train)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))


def run_train(root: Path) -> dict:
    from shrinkflow.files import read_json
    from stages.common import run_stage
    from stages.train import train

    assert run_stage("train", train, root) == 0
    return read_json(root / "metrics" / "train.json")


def teacher_state(root: Path) -> dict:
    from shrinkflow.modeling import load_torch_model

    return {k: v.clone() for k, v in load_torch_model(root / "models" / "teacher").state_dict().items()}


def test_the_train_stage_averages_a_retrained_teacher_with_the_staged_kept_one(project, capsys):
    import torch

    from shrinkflow.files import content_hash, file_hashes
    from shrinkflow.paths import RETRAIN_KEPT_TEACHER_MODEL
    from shrinkflow.retrain import stage_kept_teacher

    # the kept teacher: another seed's teacher, staged as the retrain flow does
    set_params(project, seed=1)
    run_train(project)
    kept = teacher_state(project)
    assert stage_kept_teacher(project, 0.4) == content_hash(file_hashes(project / "models" / "teacher"))
    # the new teacher alone (share 0: nothing averaged, nothing recorded)
    set_params(project, seed=0, retrain_keep_share=0.0)
    alone = run_train(project)
    new = teacher_state(project)
    assert "averaged_with_kept_teacher" not in alone
    # the same training, averaged: 0.6 of the new weights and 0.4 of the kept
    set_params(project, retrain_keep_share=0.4)
    metrics = run_train(project)
    averaged = teacher_state(project)
    for k, v in new.items():
        if v.is_floating_point():
            torch.testing.assert_close(averaged[k], 0.6 * v + 0.4 * kept[k])
    record = metrics["averaged_with_kept_teacher"]
    assert record["keep_share"] == 0.4 and record["kept_teacher"] == content_hash(
        file_hashes(project / RETRAIN_KEPT_TEACHER_MODEL))
    assert record["val_accuracy_before"] == pytest.approx(alone["best_val_accuracy"])
    assert 0 <= record["val_accuracy_after"] <= 1 and record["tensors"] > 10
    assert "averaged with the kept one" in capsys.readouterr().out


def test_no_production_labels_or_no_kept_teacher_means_no_average(project, capsys):
    from shrinkflow.paths import RETRAIN_KEPT_TEACHER_MODEL
    from shrinkflow.retrain import stage_kept_teacher

    set_params(project, retrain_keep_share=0.5)
    # a retrain's production labels, but no kept teacher staged: said, not averaged
    assert "averaged_with_kept_teacher" not in run_train(project)
    assert "no kept teacher is staged" in capsys.readouterr().out
    # a kept teacher staged, but no production labels (a plain run): not averaged
    stage_kept_teacher(project, 0.5)
    assert (project / RETRAIN_KEPT_TEACHER_MODEL / "config.json").is_file()
    pd.DataFrame({"text": pd.Series([], dtype=str), "label": pd.Series([], dtype="int64")}).to_parquet(
        project / "data" / "prepared" / "feedback_train.parquet")
    assert "averaged_with_kept_teacher" not in run_train(project)


@pytest.mark.parametrize("share", [1.0, 1.5, -0.01, float("nan"), float("inf"), "half", None])
def test_a_share_outside_0_to_1_is_refused_by_the_params(share):
    from pydantic import ValidationError

    from shrinkflow.config import TrainParams

    with pytest.raises(ValidationError, match="retrain_keep_share"):
        TrainParams(retrain_keep_share=share)


@pytest.mark.parametrize("share", [0, 0.0, 0.5, 0.999])
def test_a_share_in_0_to_1_is_taken(share):
    from shrinkflow.config import TrainParams

    assert TrainParams(retrain_keep_share=share).retrain_keep_share == share
