"""End to end: a retrain verdict, in a project of its own (a temporary
git+DVC copy of this one; its own file, so a worker runs it beside the other
e2e files). The kept teacher is wrong on production text by construction
(every feedback label contradicts it), so `shrinkflow monitor` decides
retrain; the retrain flow appends the labels to the DVC-versioned feedback
dataset, DVC re-runs data and train (the teacher is fine-tuned on the train
split plus the production labels and averaged with the kept one, which the
flow staged as a train dep), compress, validate (the retrained teacher
gated against the old one) and deploy, and the new version's lineage names
the dataset's md5 and the monitor run. Then a second retrain whose teacher
fails its gates (set out of reach) deploys nothing and puts the project back
as it was before it: the kept teacher, dvc.lock and the feedback dataset,
the rejection recorded and the labels kept in the archive.

Real Prefect (test harness), real DVC, real data (a slice), a tiny model.
The teacher gates' boundaries are unit-tested (tests/test_feedback.py);
here they are set so that the tiny teacher passes them, and their presence
in the gate report is checked.
"""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest
import yaml

from tests.e2e import TINY, copy_project, deep_merge, run_cli, write_params

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PARAMS = deep_merge(TINY, {
    # the retrained teacher averaged with the kept one (WiSE-FT; tests/test_retrain_average.py has the weights)
    "train": {"retrain_keep_share": 0.5},
    "compress": {"candidates": [{"name": "int8", "recipe": [{"method": "quantize", "per_channel": True}]}]},
    "monitor": {"min_window_rows": 40, "shadow_sample_rows": 50, "min_feedback_labels": 20,
                "max_teacher_feedback_drop": 0.05},
    # The old teacher scores 0 on the held-out labels (each contradicts it):
    # any retrained teacher gains at least 0, and the tiny one may lose val.
    "validate": {"gates": {"max_teacher_val_drop": 1.0, "min_teacher_feedback_gain": 0.0}},
})


def test_a_retrain_appends_feedback_retrains_the_teacher_and_deploys_with_lineage_and_a_rejected_one_is_undone(
        tmp_path, prefect_api):
    import pandas as pd

    from monitoring.evidently_reports import softmax_probabilities
    from shrinkflow.feedback import normalise
    from shrinkflow.files import content_hash, file_hashes
    from shrinkflow.predictors import load_predictor
    from shrinkflow.predlog import Prediction, PredictionLog, utc_now
    from shrinkflow.registry import Registry

    project = copy_project(tmp_path / "project")
    write_params(project / "params.yaml", PARAMS)
    assert (project / "data/feedback/labels.jsonl").read_text() == ""   # a fresh project has the dataset
    code, out = run_cli(project, prefect_api, "run")
    assert code == 0, out[-4000:]
    reg = Registry(project / "registry")
    before = reg.alias()
    assert reg.manifest(before)["lineage"]["feedback"] == {
        "md5": hashlib.md5(b"").hexdigest(), "retrain": None}

    labels = json.loads((project / "data/prepared/labels.json").read_text())["labels"]
    shifted = pd.read_parquet(project / "data/prepared/shifted.parquet")["text"].tolist()
    texts = shifted + pd.read_parquet(project / "data/prepared/test.parquet")["text"].tolist()[:30]
    served = softmax_probabilities(load_predictor(reg.load().path, threads=1).predict_logits(texts))
    teacher = load_predictor(project / "models/teacher", threads=1).predict_logits(shifted).argmax(axis=1)
    params = yaml.safe_load((project / "params.yaml").read_text())
    log = PredictionLog(project / params["serve"]["log_path"]).open()
    rows = [Prediction(uuid.uuid4().hex, utc_now(), before, t, p.tolist(), int(p.argmax()), 2.0)
            for t, p in zip(texts, served)]
    log.append(rows)
    for r, t in zip(rows, teacher):   # every label contradicts the kept teacher
        log.add_feedback(r.prediction_id, 1 - int(t))
    old_teacher = (project / "models/teacher/model.safetensors").read_bytes()
    old_teacher_hash = content_hash(file_hashes(project / "models/teacher"))

    code, out = run_cli(project, prefect_api, "monitor")
    assert code == 0, out[-4000:]
    assert "verdict: retrain" in out and "teacher_feedback: FIRED" in out, out[-4000:]
    assert "Running stage 'data'" in out and "Running stage 'train'" in out
    new = reg.alias()
    assert new != before and f"retrain: DEPLOYED {new}" in out
    assert (project / "models/teacher/model.safetensors").read_bytes() != old_teacher
    # ... averaged with the kept teacher, which the flow staged as a train dep
    averaged = json.loads((project / "metrics/train.json").read_text())["averaged_with_kept_teacher"]
    assert averaged["keep_share"] == 0.5 and averaged["kept_teacher"] == old_teacher_hash, averaged
    assert (project / "data/feedback/kept_teacher/model/model.safetensors").read_bytes() == old_teacher
    assert "averaged with the kept one" in out, out[-4000:]

    # the dataset: text and label name, one row per distinct text, versioned
    body = (project / "data/feedback/labels.jsonl").read_text()
    dataset = [json.loads(line) for line in body.splitlines()]
    assert len(dataset) == len({normalise(t) for t in shifted}) and {r["label"] for r in dataset} <= set(labels)
    assert set(dataset[0]) == {"text", "label"}
    md5 = hashlib.md5(body.encode()).hexdigest()
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert next(d["md5"] for d in lock["data"]["deps"] if d["path"] == "data/feedback/labels.jsonl") == md5
    assert (project / "data/feedback/archive.dvc").is_file()
    assert (project / f"data/feedback/archive/{md5}.jsonl").read_text() == body
    train_rows = len(pd.read_parquet(project / "data/prepared/feedback_train.parquet"))
    heldout_rows = len(pd.read_parquet(project / "data/prepared/feedback_heldout.parquet"))
    assert train_rows + heldout_rows == len(dataset) and train_rows and heldout_rows

    # the retrained teacher's gates, against the old teacher measured before train
    gates = json.loads((project / "reports/gates.json").read_text())
    assert set(gates["teacher_gates"]["gates"]) == {"max_teacher_val_drop", "min_teacher_feedback_gain"}
    assert gates["teacher_gates"]["passed"] and gates["selected"] == "int8"
    assert "Retrained teacher" in (project / "reports/gates.md").read_text()
    # ... and the candidates against production's val accuracy as its manifest records it (the val split is
    # the same: the feedback rows have splits of their own)
    vs_prod = gates["candidates"]["int8"]["gates"]["max_accuracy_drop_vs_production"]
    prod_acc = reg.manifest(before)["selection_metrics"]["accuracy"]
    int8_acc = json.loads((project / "metrics/validate.json").read_text())["candidates"]["int8"]["accuracy"]
    assert vs_prod["value"] == pytest.approx(prod_acc - int8_acc) and vs_prod["threshold"] == 0.5
    assert f"production {before}'s" in vs_prod["note"]
    assert f"its candidates are gated against the production it replaced, {before}, val accuracy" in out, out[-4000:]
    # ... and the choice confirmed against production's recorded test accuracy, on the same test split
    on_test = gates["confirmation"]["gates"]["gates"]["max_accuracy_drop_vs_production"]
    prod_test = reg.manifest(before)["metrics"]["accuracy"]
    assert on_test["passed"] and "test accuracy" in on_test["note"] and f"{before}'s" in on_test["note"]
    assert on_test["value"] == pytest.approx(prod_test - gates["confirmation"]["metrics"]["accuracy"], abs=1e-9)

    # lineage: the dataset's md5 as DVC records it, and the monitor run that asked
    feedback = reg.manifest(new)["lineage"]["feedback"]
    assert feedback["md5"] == md5 and feedback["retrain"]["feedback"]["md5"] == md5
    asked = feedback["retrain"]["requested_by"]
    assert asked["monitor_flow_run"] and "teacher_feedback" in asked["triggers"]
    prev = feedback["retrain"]["previous_teacher"]
    md5s = reg.manifest(before)["lineage"]["data_md5"]
    assert feedback["retrain"]["production"] == {"version": before, "val_accuracy": prod_acc,
                                                 "val_md5": md5s["val"], "test_accuracy": prod_test,
                                                 "test_md5": md5s["test"]}
    # every held-out label contradicts the old teacher (up to a near-tie read in another batch)
    assert prev["feedback_heldout_accuracy"] < 0.2 and prev["feedback_heldout_rows"] == heldout_rows

    # the monitor run records what its retrain did: decision.json, the console, the index
    run_dir = max(d for d in (project / "monitoring/reports").iterdir() if d.is_dir())
    done = json.loads((run_dir / "decision.json").read_text())["retrain"]
    assert (done["outcome"], done["deployed_version"], done["selected"]) == ("deployed", new, "int8")
    assert done["feedback"]["md5"] == md5 and done["feedback"]["rows"] == len(dataset)
    assert done["previous_teacher"] == prev
    assert {g: f["passed"] for g, f in done["teacher_gates"].items()} == {
        "max_teacher_val_drop": True, "min_teacher_feedback_gain": True}
    assert done["candidates"]["int8"] == {"passed": True, "failed": {}}
    # ... and the production it replaced, with the new version against it on val and test
    assert done["production_before"] == feedback["retrain"]["production"]
    assert done["vs_production"]["val"]["value"] == pytest.approx(vs_prod["value"], abs=1e-9)
    assert done["vs_production"]["test"]["passed"] is True
    assert f"production before the retrain: {before} (val {prod_acc:.4g}, test {prod_test:.4g})" in out, out[-4000:]
    assert "'int8' against it on test: test accuracy" in out, out[-4000:]
    assert "retrained teacher: min_teacher_feedback_gain passed" in out, out[-4000:]
    assert f"(deployed {new})" in (project / "monitoring/reports/index.html").read_text()

    # --- A second retrain whose teacher cannot pass its gates (no val loss at
    # all and +100 points on the held-out labels): nothing is deployed and
    # the project is put back as the first retrain left it.
    write_params(project / "params.yaml", deep_merge(PARAMS, {
        "monitor": {"cooldown_hours": 0.0},
        "validate": {"gates": {"max_teacher_val_drop": 0.0, "min_teacher_feedback_gain": 1.0}}}))
    more = pd.read_parquet(project / "data/prepared/val.parquet")["text"].tolist()[:60]
    kept_teacher = (project / "models/teacher/model.safetensors").read_bytes()
    lock_before, dataset_before = (project / "dvc.lock").read_bytes(), body
    served = softmax_probabilities(load_predictor(reg.load().path, threads=1).predict_logits(more))
    wrong = load_predictor(project / "models/teacher", threads=1).predict_logits(more).argmax(axis=1)
    rows = [Prediction(uuid.uuid4().hex, utc_now(), new, t, p.tolist(), int(p.argmax()), 2.0)
            for t, p in zip(more, served)]
    log.append(rows)
    for r, t in zip(rows, wrong):   # every new label contradicts the retrained teacher
        log.add_feedback(r.prediction_id, 1 - int(t))

    # as if a re-compression had left held-out window texts: the retrain
    # measures production beside its candidates, as their window baseline
    (project / "data/unlabelled/heldout.txt").write_text("\n".join(more[:20]) + "\n", encoding="utf-8")
    code, out = run_cli(project, prefect_api, "monitor")
    assert code == 1, out[-4000:]   # deployed nothing (docs/exit-codes.md)
    assert "verdict: retrain" in out and "Running stage 'train'" in out, out[-4000:]
    assert "the retrained teacher was rejected" in out, out[-4000:]
    assert f"production {new} is measured as the baseline of a retrain's candidates" in out, out[-4000:]
    # ... and its copy goes with the rejected teacher: a later validate of the kept one never reads it
    assert not (project / "data/unlabelled/production/version.json").exists()
    assert reg.alias() == new                                     # production untouched
    assert (project / "models/teacher/model.safetensors").read_bytes() == kept_teacher
    # the rejected retrain staged the retrained teacher to average with; the first one's copy is back
    assert (project / "data/feedback/kept_teacher/model/model.safetensors").read_bytes() == old_teacher
    assert (project / "dvc.lock").read_bytes() == lock_before
    assert (project / "data/feedback/labels.jsonl").read_text() == dataset_before
    rejected = [json.loads(line) for line in (project / "data/feedback/rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 1 and rejected[0]["rejected_teacher"]
    assert set(rejected[0]["teacher_gates"]["gates"]) == {"max_teacher_val_drop", "min_teacher_feedback_gain"}
    assert not rejected[0]["teacher_gates"]["passed"]
    run_dir = max(d for d in (project / "monitoring/reports").iterdir() if d.is_dir())
    done = json.loads((run_dir / "decision.json").read_text())["retrain"]
    assert done["outcome"] == "rejected" and done["deployed_version"] is None
    assert done["feedback"]["md5"] == rejected[0]["feedback_md5"]
    assert not done["teacher_gates"]["min_teacher_feedback_gain"]["passed"]
    assert "retrained teacher: min_teacher_feedback_gain FAILED" in out, out[-4000:]
    assert "(retrained teacher rejected)" in (project / "monitoring/reports/index.html").read_text()
    # the rejected retrain's labels stay in the content-addressed archive
    archived = (project / f"data/feedback/archive/{rejected[0]['feedback_md5']}.jsonl").read_text()
    assert {normalise(t) for t in more} <= {normalise(json.loads(line)["text"]) for line in archived.splitlines()}
    assert not (project / ".shrinkflow/retrain/before").exists()
