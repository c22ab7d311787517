"""Typed artifacts and their catalog (issue 16, item 1).

The fixtures under tests/data/artifacts/ are real files from the default
run, written by the code before the models existed: metrics/train.json and
metrics/compress.json (read by deploy), metrics/validate.json,
reports/gates.json, deploy/deployment.json and the registry's metadata
(aliases, history, every version's manifest.json and gates.json; v0001 and
v0002 predate macro-F1 and ``labels``, v0003 has them). Each must load
through its model and dump back byte for byte, so existing registries and
``dvc metrics`` keep working.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from shrinkflow.artifacts import (Aliases, CandidateGates, CompressMetrics, DeploymentRecord, GatesReport,
                                  HistoryEvent, TrainMetrics, ValidationReport, VersionManifest)
from shrinkflow.catalog import CATALOG, DEPLOYMENT, GATES, VALIDATION, ArtifactInvalid, load, save
from shrinkflow.errors import HANDLED
from shrinkflow.config import Gates, ValidateParams
from shrinkflow.errors import MissingInput
from shrinkflow.gates import GateReport, check_max, check_min
from shrinkflow.files import write_json
from shrinkflow.registry import Registry
from shrinkflow.validation import deployed_figures, validate_runs

DATA = Path(__file__).parent / "data" / "artifacts"
VERSIONS = ("v0001", "v0002", "v0003")
FILES = [("train.json", TrainMetrics), ("compress.json", CompressMetrics), ("validate.json", ValidationReport),
         ("gates.json", GatesReport), ("deployment.json", DeploymentRecord),
         ("registry/aliases.json", Aliases),
         *[(f"registry/versions/{v}/manifest.json", VersionManifest) for v in VERSIONS],
         *[(f"registry/versions/{v}/gates.json", CandidateGates) for v in VERSIONS]]


def dumped(obj) -> str:
    """What shrinkflow.files.write_json writes for ``obj``."""
    return json.dumps(obj.to_json_dict(), indent=2, sort_keys=True) + "\n"


# ------------------------------------------------------- real files, byte for byte
@pytest.mark.parametrize("name,model", FILES, ids=[f for f, _ in FILES])
def test_a_real_file_loads_and_dumps_back_byte_for_byte(name, model):
    text = (DATA / name).read_text()
    obj = model.model_validate_json(text)
    assert dumped(obj) == text


def test_a_real_history_loads_line_by_line():
    lines = (DATA / "registry" / "history.jsonl").read_text().splitlines()
    events = [HistoryEvent.model_validate_json(line) for line in lines]
    assert [e.version for e in events] == list(VERSIONS)
    assert [json.dumps(e.to_json_dict(), sort_keys=True) for e in events] == lines


def test_the_real_files_are_typed_not_passed_through():
    v = ValidationReport.model_validate_json((DATA / "validate.json").read_text())
    cand = v.candidates["student-l024-int8"]
    assert cand.latency_ms_p95_b1 == 4.34 and cand.batch_invariance.label_flips == 18
    assert isinstance(cand.n, int) and cand.per_class_n == {"negative": 799, "positive": 786}
    assert v.confirmation.gates.to_report().passed and v.labels == ["negative", "positive"]
    g = GatesReport.model_validate_json((DATA / "gates.json").read_text())
    assert g.selected == "student-l024-int8" and g.confirmation == v.confirmation
    c = CompressMetrics.model_validate_json((DATA / "compress.json").read_text())
    assert c.candidates["int8"].build_cpu_seconds == 8.64 and c.candidates["student-l024-int8"].vocab_size == 10429
    assert TrainMetrics.model_validate_json((DATA / "train.json").read_text()).compute.cpu_seconds == 438.09
    d = DeploymentRecord.model_validate_json((DATA / "deployment.json").read_text())
    assert d.roi.serving["b1"].break_even_predictions == 12577 and d.version == "v0003"


def test_a_registry_written_by_the_previous_code_still_loads(tmp_path):
    root = tmp_path / "registry"
    shutil.copytree(DATA / "registry", root)
    reg = Registry(root)
    assert reg.versions() == list(VERSIONS) and reg.alias() == "v0003" and reg.previous_production() == "v0002"
    manifests = {v: reg.version_manifest(v) for v in reg.versions()}
    # older versions lack the multi-class figures and labels: optional, absent, and dumped absent
    old, new = manifests["v0001"], manifests["v0003"]
    assert old.labels is None and old.metrics.macro_f1 is None and "labels" not in old.to_json_dict()
    assert new.labels == ["negative", "positive"] and new.metrics.macro_f1 == 0.848458
    for v, m in manifests.items():
        assert m.version == v and m.to_json_dict() == reg.manifest(v)
        gates = CandidateGates.model_validate_json((reg.path(v) / "gates.json").read_text())
        assert gates.candidate == m.candidate and gates.gates == m.gates
    assert [d.version for d in reg.describe_versions()] == list(VERSIONS)
    assert Aliases.model_validate_json((root / "aliases.json").read_text()).production == "v0003"


# ------------------------------------------------------- strict where it can be
def test_an_unknown_or_missing_key_fails_loudly():
    doc = json.loads((DATA / "validate.json").read_text())
    doc["candidates"]["int8"]["latency_ms_p95_b1_typo"] = 1.0
    with pytest.raises(ValidationError, match="latency_ms_p95_b1_typo"):
        ValidationReport.model_validate(doc)
    doc = json.loads((DATA / "deployment.json").read_text())
    del doc["content_hash"]
    with pytest.raises(ValidationError, match="content_hash"):
        DeploymentRecord.model_validate(doc)


def test_ints_stay_ints_and_floats_keep_their_repr():
    doc = json.loads((DATA / "registry" / "versions" / "v0003" / "gates.json").read_text())
    doc["gates"]["min_speedup"]["threshold"] = 2   # an int threshold, as a user may write it
    g = CandidateGates.model_validate(doc)
    assert g.gates["min_speedup"].threshold == 2 and isinstance(g.gates["min_speedup"].threshold, int)
    assert g.to_json_dict() == doc


def test_a_gate_report_converts_both_ways():
    report = GateReport("c", (check_min("min_accuracy", 0.9, 0.8), check_max("max_size_mb", 50.0, 40.0)))
    doc = CandidateGates.from_report(report)
    assert doc.passed is False and doc.to_json_dict() == report.to_dict()
    assert doc.to_report() == report


# ------------------------------------------------------- what validate_runs returns
def run(val, test, lat):
    return {"predictions": {"val": list(val), "test": list(test), "shifted": [1, 0]},
            "performance": {"latency_ms_p50_b1": lat, "latency_ms_p95_b1": lat, "latency_ms_p50_b32": 10 * lat,
                            "latency_ms_p95_b32": 10 * lat, "throughput_eps_b32": 100.0, "size_mb": 1.0,
                            "peak_rss_mb": 50, "cpu_ms_per_prediction_b1": lat, "cpu_ms_per_prediction_b32": lat},
            "batch_invariance": {"max_prob_diff": 0.0, "mean_prob_diff": 0.0, "label_flips": 0, "rows": 8,
                                 "batch_size": 32, "per_row": False, "labels_alone": [0] * 8}}


VAL, TEST = [0, 0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 0]
LABELS = {"val": VAL, "test": TEST, "shifted": [1, 0]}


def validated():
    gates = Gates(min_accuracy=0.5, max_accuracy_drop=0.2, max_latency_ms_p95_b1=100.0, max_size_mb=100.0,
                  min_speedup=1.0)
    return validate_runs(run(VAL, TEST, 20.0), {"small": run(VAL[:7] + [1], TEST, 5.0)}, LABELS,
                         ValidateParams(gates=gates), {"small": {"files": {"model.onnx": "ab"}, "content_hash": "cd"}},
                         ("negative", "positive"))


def test_what_validate_runs_returns_is_a_valid_report_and_dumps_unchanged():
    report, selection = validated()
    assert isinstance(report, ValidationReport) and isinstance(selection, GatesReport)
    # validating its dump again gives the same documents (nothing is lost in the file)
    assert ValidationReport.model_validate(report.to_json_dict()) == report
    assert GatesReport.model_validate(selection.to_json_dict()).to_json_dict() == selection.to_json_dict()
    assert selection.selected == "small" and report.candidates["small"].peak_rss_mb == 50
    assert report.candidates["small"].batch_invariance.per_row is False


def test_a_version_stored_as_deploy_stores_it_loads_as_a_manifest(tmp_path):
    report, selection = validated()
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"weights")
    (model / "shrinkflow_model.json").write_text(json.dumps({"format": "onnx", "labels": ["negative", "positive"]}))
    record = {"candidate": "small", "labels": report.labels, "serving": {}, "recipe": [],
              **deployed_figures(report, "small").to_json_dict(), "confirmation": report.confirmation.to_json_dict(),
              "selection": selection.reason, "roi": None, "lineage": {}}
    cand = selection.candidates["small"]
    VersionManifest.check_record(record, cand, {"model.onnx": "ab"}, "cd")
    with pytest.raises(ValidationError, match="selection"):
        VersionManifest.check_record({**record, "selection": None}, cand, {}, "")
    reg = Registry(tmp_path / "registry")
    v = reg.promote(model, cand.to_report(), record).version
    m = reg.version_manifest(v)
    assert m.metrics.split == "test" and m.selection_metrics.split == "val" and m.serving.to_json_dict() == {}
    assert m.to_json_dict() == reg.manifest(v)


# ------------------------------------------------------- the catalog
def test_the_catalog_saves_and_loads_typed_objects(tmp_path):
    report, selection = validated()
    assert set(CATALOG) == {"train_metrics", "compress_metrics", "validation", "gates", "deployment", "retrain"}
    path = save(VALIDATION, report, tmp_path)
    assert path == tmp_path / "metrics" / "validate.json"
    # the same bytes as a plain JSON writer of its dump (tests/test_typed_documents.py: as the code before the models)
    write_json(tmp_path / "before.json", report.to_json_dict())
    assert path.read_bytes() == (tmp_path / "before.json").read_bytes()
    assert load(VALIDATION, tmp_path) == report
    with pytest.raises(TypeError, match="validation holds a ValidationReport, not a GatesReport"):
        save(VALIDATION, selection, tmp_path)
    with pytest.raises(MissingInput, match=r"deploy/deployment.json is missing: run the deploy stage"):
        load(DEPLOYMENT, tmp_path)
    save(GATES, selection, tmp_path)
    assert (tmp_path / "reports" / "gates.json").is_file() and load(GATES, tmp_path).selected == "small"
    # a document that exists but breaks its model: one line naming the file, its stage and the key
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "deployment.json").write_text('{"version": "v0099"}')
    with pytest.raises(ArtifactInvalid, match=r"deployment.json is not a valid deployment document \(written by "
                                              r"the deploy stage; 5 error\(s\): previous: Field required"):
        load(DEPLOYMENT, tmp_path)
    # one that is not JSON at all (a newcomer's garbage retrain.json gave a raw traceback): the same one line
    (tmp_path / "deploy" / "deployment.json").write_text('{"version": "v00')
    with pytest.raises(ArtifactInvalid, match=r"deployment.json is not a valid deployment document \(written by "
                                              r"the deploy stage\): not JSON: "):
        load(DEPLOYMENT, tmp_path)
    assert isinstance(ArtifactInvalid("x"), HANDLED)


def test_the_performance_model_carries_every_performance_key():
    from shrinkflow.artifacts import Performance
    from shrinkflow.validation import PERFORMANCE_KEYS

    assert set(PERFORMANCE_KEYS) <= set(Performance.model_fields)
    m = VersionManifest.model_validate_json((DATA / "registry" / "versions" / "v0003" / "manifest.json").read_text())
    assert m.teacher_metrics.performance() == {k: m.to_json_dict()["teacher_metrics"][k] for k in PERFORMANCE_KEYS}


# ------------------------------------------------------- the Prefect tasks and the CLI read typed objects
def project_with(tmp_path, *names):
    for name in names:
        src = DATA / Path(name).name
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, tmp_path / name)
    return tmp_path


def test_the_lifecycle_tasks_read_the_documents_typed(tmp_path):
    from tasks.publish import read_deployment, read_validation

    root = project_with(tmp_path, "metrics/validate.json", "reports/gates.json")
    report, selection = read_validation.fn(str(root))
    assert isinstance(report, ValidationReport) and selection.selected == "student-l024-int8"
    assert read_deployment.fn(str(root), "registry") is None          # no deployment.json
    project_with(tmp_path, "deploy/deployment.json")
    shutil.copytree(DATA / "registry", root / "registry")
    record = read_deployment.fn(str(root), "registry")
    assert isinstance(record, DeploymentRecord) and record.version == "v0003" and record.roi.spent_cpu_seconds == 739.99
    # production rolled back to v0002: the registry still holds v0003, the record and the rollback stand
    write_json(root / "registry" / "aliases.json", {"production": "v0002"})
    assert read_deployment.fn(str(root), "registry") == record
    # the registry lost the version, or has nothing in production: the flow must deploy again
    shutil.rmtree(root / "registry" / "versions" / "v0003")
    assert read_deployment.fn(str(root), "registry") is None
    shutil.copytree(DATA / "registry" / "versions" / "v0003", root / "registry" / "versions" / "v0003")
    write_json(root / "registry" / "aliases.json", {})
    assert read_deployment.fn(str(root), "registry") is None
    # a record from before cost was recorded still loads
    old = json.loads((DATA / "deployment.json").read_text())
    del old["roi"]
    assert DeploymentRecord.model_validate(old).roi is None


def test_the_run_summary_names_each_failed_gate(tmp_path, capsys):
    from flows.cli import _print_summary
    from shrinkflow.config import load_params

    gates = json.loads((DATA / "gates.json").read_text())
    gates["candidates"]["int8"]["gates"]["min_accuracy"].update(passed=False, margin=-0.01)
    gates["candidates"]["int8"]["passed"] = False
    gates["selected"] = None
    result = {"stages": {"validate": {"status": "ran", "seconds": 1.0}}, "selected": None, "deployed_version": None,
              "gates": gates, "flow_run_id": "id", "flow_run_name": "name"}
    _print_summary(tmp_path, load_params(Path(__file__).parents[1] / "params.yaml"), result)
    out = capsys.readouterr().out
    assert "NOT DEPLOYED" in out and "  int8 (val): min_accuracy FAILED:" in out
    assert "student-l024-int8 (val)" not in out and "test confirmation" not in out


@pytest.mark.parametrize("deploy, says", [("ran", "DEPLOYED v0003 (candidate 'int8')"),
                                           ("skipped", "UP TO DATE: v0003 (candidate 'int8') was deployed by an "
                                                       "earlier run")])
def test_the_run_summary_says_deployed_only_when_this_run_deployed(tmp_path, capsys, deploy, says):
    """A newcomer's finding: an unchanged re-run, every stage skipped, said
    "DEPLOYED v0001" though it deployed nothing."""
    from flows.cli import _print_summary
    from shrinkflow.config import load_params

    gates = json.loads((DATA / "gates.json").read_text())
    result = {"stages": {"validate": {"status": deploy, "seconds": 1.0}, "deploy": {"status": deploy, "seconds": 1.0}},
              "selected": "int8", "deployed_version": "v0003", "production_version": "v0003",
              "gates": gates, "flow_run_id": "id", "flow_run_name": "name"}
    _print_summary(tmp_path, load_params(Path(__file__).parents[1] / "params.yaml"), result)
    out = capsys.readouterr().out
    assert says in out and "registry/versions/v0003" in out
    assert ("DEPLOYED" in out) == (deploy == "ran")


@pytest.mark.parametrize("production", ["v0006", "v0005"])
def test_the_run_summary_of_a_kept_production_says_it_once_and_names_a_rollback_since(tmp_path, capsys, production):
    """A helper's findings: the KEPT line said "nothing was promoted" twice
    (the deploy stage's reason says it already), and after a rollback from
    the kept version a run with nothing to do said KEPT v0006 with v0005
    serving."""
    from flows.cli import _print_summary
    from shrinkflow.config import load_params

    gates = json.loads((DATA / "gates.json").read_text())
    reason = "production v0006 passed every gate and won the selection; nothing was promoted"
    result = {"stages": {"validate": {"status": "skipped", "seconds": 0.0},
                         "deploy": {"status": "skipped", "seconds": 0.0}},
              "selected": "int8", "deployed_version": None, "kept_version": "v0006", "kept_reason": reason,
              "production_version": production, "gates": gates, "flow_run_id": "id", "flow_run_name": "name"}
    _print_summary(tmp_path, load_params(Path(__file__).parents[1] / "params.yaml"), result)
    out = capsys.readouterr().out
    assert f"KEPT production v0006: {reason}\n" in out and out.count("nothing was promoted") == 1, out
    assert ("production is v0005: a rollback from v0006 stands" in out) == (production == "v0005"), out
    assert "DEPLOYED" not in out and "NOT DEPLOYED" not in out


# ------------------------------------------------------- the deploy stage, end to end on the real documents
def deploy_project(tmp_path: Path) -> Path:
    """A project holding the default run's validate, train and compress
    documents and a stand-in for the chosen candidate's files (its hashes
    are written into validate.json, as validate would have recorded them)."""
    from shrinkflow.files import content_hash, file_hashes

    from tests.conftest import PROJECT_ROOT

    root = tmp_path / "project"
    for name in ("dvc.yaml", "dvc.lock", "params.yaml"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT_ROOT / name, root / name)
    # The recorded run's params: its student was the 3-layer default of before
    # 2026-12-07 (student-l024-int8, teacher layers 0, 2, 4).
    params = (root / "params.yaml").read_text()
    recorded = params.replace("- name: student-l0135-int8", "- name: student-l024-int8").replace(
        "layers: [0, 1, 3, 5]", "layers: [0, 2, 4]")
    assert recorded.count("student-l024-int8") == 1 and "[0, 2, 4]" in recorded, "the default student moved"
    (root / "params.yaml").write_text(recorded)
    project_with(root, "metrics/train.json", "metrics/compress.json", "reports/gates.json")
    model = root / "models" / "candidates" / "student-l024-int8"
    model.mkdir(parents=True)
    (model / "model.onnx").write_bytes(b"weights")
    (model / "tokenizer.json").write_text("{}")
    (model / "shrinkflow_model.json").write_text(json.dumps({"format": "onnx", "labels": ["negative", "positive"]}))
    doc = json.loads((DATA / "validate.json").read_text())
    hashes = file_hashes(model)
    doc["candidates"]["student-l024-int8"].update(files=hashes, content_hash=content_hash(hashes))
    write_json(root / "metrics" / "validate.json", doc)
    write_json(root / "data" / "unlabelled" / "window.json", {})
    return root


def run_deploy(root: Path, code: Path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(code)}
    return subprocess.run([sys.executable, "-m", "stages.deploy"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_deploy_stage_writes_typed_documents_from_typed_inputs(tmp_path):
    from tests.conftest import PROJECT_ROOT

    root = deploy_project(tmp_path)
    proc = run_deploy(root, PROJECT_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "deploy: student-l024-int8 is production as v0001" in proc.stdout
    record = load(DEPLOYMENT, root)
    assert record.version == "v0001" and record.previous is None and record.registry == "registry"
    m = Registry(root / "registry").version_manifest("v0001")
    assert record.content_hash == m.content_hash and m.labels == ["negative", "positive"]
    assert m.serving.per_row is True and m.serving.label_flips == 18       # the real run's batch invariance
    assert m.metrics.split == "test" and m.metrics.accuracy == 0.848485 and m.roi == record.roi
    assert record.roi.build_cpu_seconds == {"int8": 8.64, "student-l024-int8": 293.26}
    # the same bytes as the real run's deployment record, but for its version, previous and hash
    real = json.loads((DATA / "deployment.json").read_text())
    assert {**record.to_json_dict(), "version": "v0003", "previous": "v0002", "same_model_as": "v0002",
            "content_hash": real["content_hash"]} == real


def test_the_deploy_stage_refuses_what_validate_did_not_select(tmp_path):
    from tests.conftest import PROJECT_ROOT

    root = deploy_project(tmp_path)
    gates = json.loads((root / "reports" / "gates.json").read_text())
    write_json(root / "reports" / "gates.json", {**gates, "selected": None, "reason": "no candidate passed"})
    proc = run_deploy(root, PROJECT_ROOT)
    assert proc.returncode == 1 and "refusing to deploy: no candidate passed" in proc.stderr
    assert not (root / "registry").exists() and not (root / "deploy").exists()


@pytest.mark.parametrize("body", [b"", b'{"version": "v00', b"not json", b"\xff\xfe\x00garbage", b"{} {}"])
def test_a_stage_document_that_is_not_json_is_one_line_naming_the_file(tmp_path, body):
    """The whole kind, not only a newcomer's garbage retrain.json: empty,
    truncated, text, bytes that are not UTF-8, two documents in one file."""
    from shrinkflow.catalog import RETRAIN, load_retrain_record

    path = tmp_path / RETRAIN.path
    path.parent.mkdir(parents=True)
    path.write_bytes(body)
    with pytest.raises(ArtifactInvalid, match=r"retrain.json is not a valid retrain document \(written by .*\): "
                                              r"not JSON: "):
        load_retrain_record(tmp_path)
