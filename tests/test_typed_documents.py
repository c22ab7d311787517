"""The typed stage documents are written byte for byte as before (issue 16, item 1).

tests/data/typed_before/ holds what the dict-based code (commit fc418a7)
wrote for the fixed cases of tests/typed_cases.py: metrics/validate.json,
reports/gates.json, the validate headline, reports/gates.md and the
lifecycle's markdown, a deployed version's figures and the cost-and-return
markdown. Since then, two deliberate changes: a gate's value and margin are
stored without the float noise of a subtraction (0.1, not 0.09999999999999998; +0, not +5.551e-17 in
gates.md), and the files of the cases it touched were rewritten with only
those digits changed; and the test split's size is counted in "texts", not
"sentences" (any task's rows), with only that word changed. The typed code
must reproduce every file exactly; the train and compress stages' documents are rebuilt from the real files under
tests/data/artifacts/ (written by the old code) and must match them too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shrinkflow.artifacts import (CandidateMeasurements, CostReturn, GatesReport, GateResult, TeacherMeasurements,
                                  ValidationReport)
from shrinkflow.catalog import COMPRESS_METRICS, GATES, TRAIN_METRICS, VALIDATION, load, save
from shrinkflow.files import write_json
from shrinkflow.headline import validate_headline
from shrinkflow.markdown import roi_markdown, validation_markdown
from shrinkflow.validation import deployed_figures, validate_runs
from tests.typed_cases import cases

DATA = Path(__file__).parent / "data"
BEFORE = DATA / "typed_before"
CASES = cases()


def json_bytes(doc) -> bytes:
    """What shrinkflow.files.write_json writes for a plain document."""
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def test_every_case_has_its_reference_files():
    assert sorted(p.name for p in BEFORE.iterdir() if p.is_dir()) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_runs_writes_the_same_documents_byte_for_byte(case, tmp_path):
    report, selection = validate_runs(**CASES[case])
    assert isinstance(report, ValidationReport) and isinstance(selection, GatesReport)
    assert all(isinstance(c, CandidateMeasurements) for c in report.candidates.values())
    assert isinstance(report.teacher, TeacherMeasurements)
    save(VALIDATION, report, tmp_path)
    save(GATES, selection, tmp_path)
    assert (tmp_path / VALIDATION.path).read_bytes() == (BEFORE / case / "validate.json").read_bytes()
    assert (tmp_path / GATES.path).read_bytes() == (BEFORE / case / "gates.json").read_bytes()
    # and what the catalog reads back is the same object
    assert load(VALIDATION, tmp_path) == report and load(GATES, tmp_path) == selection


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_reports_render_the_typed_documents_as_before(case):
    report, selection = validate_runs(**CASES[case])
    assert json_bytes(validate_headline(report)) == (BEFORE / case / "headline.json").read_bytes()
    assert validation_markdown(report, selection) == (BEFORE / case / "gates.md").read_text()
    if selection.selected:
        assert (validation_markdown(report, selection, "v0007", True)
                == (BEFORE / case / "lifecycle.md").read_text())


@pytest.mark.parametrize("case", sorted(c for c in CASES if (BEFORE / c / "deployed.json").is_file()))
def test_a_deployed_versions_figures_are_the_same(case):
    report, selection = validate_runs(**CASES[case])
    figures = deployed_figures(report, selection.selected)
    assert json_bytes(figures.to_json_dict()) == (BEFORE / case / "deployed.json").read_bytes()
    assert figures.metrics.split == "test" and figures.selection_metrics.files is None


def test_the_cases_cover_every_shape_of_the_documents():
    """The reference files are worth comparing: they hold a rejected
    confirmation, a report-only one, no selection, a per-row advisory gate,
    a window gate and a macro-F1 gate, and several classes."""
    gates = {c: json.loads((BEFORE / c / "gates.json").read_text()) for c in CASES}
    assert gates["bad_on_test"]["selected"] is None and gates["bad_on_test"]["confirmation"]["passed"] is False
    assert gates["reported_only"]["selected"] == "small" and not gates["reported_only"]["confirmation"]["enforced"]
    assert gates["nothing_passes"]["confirmation"] is None
    assert gates["per_row"]["candidates"]["int8"]["gates"]["max_batch_prob_diff"]["enforced"] is False
    assert "min_window_agreement" in gates["binary"]["candidates"]["small"]["gates"]
    assert "max_macro_f1_drop" in gates["multiclass"]["confirmation"]["gates"]["gates"]
    assert json.loads((BEFORE / "multiclass" / "validate.json").read_text())["teacher"]["f1"] is None


def test_the_cost_and_return_markdown_is_the_same():
    roi = CostReturn.model_validate(json.loads((DATA / "artifacts" / "deployment.json").read_text())["roi"])
    assert roi_markdown(roi) == (BEFORE / "roi.md").read_text()
    assert roi_markdown(None) == ""


# ------------------------------------------------------- train and compress through the catalog
def test_the_train_stage_writes_metrics_train_json_as_before(tmp_path):
    from shrinkflow.train import TrainResult
    from stages.train import train_metrics

    old = json.loads((DATA / "artifacts" / "train.json").read_text())
    fields = {k: v for k, v in old.items() if k not in ("labels", "compute")}
    doc = train_metrics(TrainResult(**fields), tuple(old["labels"]), old["compute"])
    save(TRAIN_METRICS, doc, tmp_path)
    assert (tmp_path / TRAIN_METRICS.path).read_bytes() == (DATA / "artifacts" / "train.json").read_bytes()
    # what the old stage wrote from the same inputs: {**result.__dict__, "labels": ..., "compute": ...}
    write_json(tmp_path / "before.json", {**TrainResult(**fields).__dict__, "labels": old["labels"],
                                          "compute": old["compute"]})
    assert (tmp_path / TRAIN_METRICS.path).read_bytes() == (tmp_path / "before.json").read_bytes()


def test_a_train_result_that_grows_a_field_fails_before_anything_is_written():
    from pydantic import ValidationError

    from shrinkflow.train import TrainResult
    from stages.train import train_metrics

    result = TrainResult(best_epoch=1, best_val_accuracy=0.8)
    result.new_figure = 1.0
    with pytest.raises(ValidationError, match="new_figure"):
        train_metrics(result, ("a", "b"), {"cpu_seconds": 1.0, "wall_seconds": 1.0})


def test_the_compress_stage_writes_metrics_compress_json_as_before(tmp_path):
    from stages.compress import compress_metrics

    old = json.loads((DATA / "artifacts" / "compress.json").read_text())
    doc = compress_metrics(old["candidates"], old["compute"])
    save(COMPRESS_METRICS, doc, tmp_path)
    assert (tmp_path / COMPRESS_METRICS.path).read_bytes() == (DATA / "artifacts" / "compress.json").read_bytes()
    # a step's own figures pass through, and what deploy reads is typed
    assert doc.candidates["student-l024-int8"].build_cpu_seconds == 293.26 and doc.compute.cpu_seconds == 302.38


def test_one_definition_of_a_gate_verdict():
    """The gates return the model a stored gate report holds (no mirror)."""
    from shrinkflow import gates
    from shrinkflow.artifacts import CandidateGates

    assert gates.GateResult is GateResult and CandidateGates.model_fields["gates"].annotation == dict[str, GateResult]
    r = gates.check_min("min_accuracy", 0.9, 0.8)
    assert isinstance(r, GateResult) and r.model_fields_set == set(GateResult.model_fields)


# ------------------------------------------------------- a key is spelled in one place
def test_the_p95_latency_key_is_a_string_only_in_config():
    """Everywhere else it is the model's field (``.latency_ms_p95_b1``) or the
    constant ``config.LATENCY_P95_B1``: a string literal equal to it, anywhere
    in the library, the stages, the tasks or the flows, fails here."""
    import ast

    from shrinkflow.config import LATENCY_P95_B1
    from tests.conftest import PROJECT_ROOT

    spelled = set()
    for package in ("shrinkflow", "stages", "tasks", "flows", "monitoring"):
        for path in (PROJECT_ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            if any(isinstance(n, ast.Constant) and n.value == LATENCY_P95_B1 for n in ast.walk(tree)):
                spelled.add(path.relative_to(PROJECT_ROOT).as_posix())
    assert spelled == {"shrinkflow/config.py"}
