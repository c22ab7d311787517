"""status, versions and /metadata render typed objects: what they show is
the fields of models (``shrinkflow.status``, ``shrinkflow.registry``,
``shrinkflow.artifacts``), read leniently where a listing must survive an
odd version and strictly where a version is shown whole. What they print is
pinned in tests/test_registry_outputs.py."""

from __future__ import annotations

import json
import shutil

import pytest

from shrinkflow.artifacts import CandidateMeasurements, TeacherMeasurements
from shrinkflow.errors import ExitCode, RegistryError
from shrinkflow.registry import LivePeriod, Registry, VersionFigures, VersionSummary
from shrinkflow.status import FIGURES_BESIDE_TEACHER, NOTHING_DEPLOYED, StatusReport, status_report, status_text
from tests.conftest import bare_project
from tests.registry_outputs import FIXTURE, build, deploy_record
from tests.test_cli import cli
from tests.test_registry import PASS, model_dir


def test_the_figures_shown_are_fields_of_the_measurements():
    """A figure renamed in artifacts.py fails here, not as a blank column."""
    assert set(VersionFigures.model_fields) <= set(CandidateMeasurements.model_fields)
    assert set(FIGURES_BESIDE_TEACHER) <= set(CandidateMeasurements.model_fields) & set(TeacherMeasurements.model_fields)


def test_versions_are_typed_and_dump_as_the_listing_printed_them(tmp_path):
    reg = Registry(build(tmp_path / "registry", "v0003"))
    rows = reg.describe_versions()
    assert all(isinstance(r, VersionSummary) for r in rows) and [r.version for r in rows] == ["v0001", "v0002", "v0003"]
    assert [r.production for r in rows] == [False, False, True] and rows[2].same_model_as == "v0002"
    assert rows[0].labels is None and rows[2].labels == ["negative", "positive"]   # v0001 predates labels
    assert rows[2].metrics.latency_ms_p95_b1 == 4.34 and rows[2].metrics.split == "test"
    assert rows[2].live == [LivePeriod(from_="2026-11-30T15:17:42+00:00", to=None)]
    doc = rows[0].to_json_dict()
    assert set(doc) == {"version", "candidate", "created_at", "same_model_as", "production", "live", "labels",
                        "metrics"}
    assert doc["live"] == [{"from": "2026-11-30T11:54:33+00:00", "to": "2026-11-30T13:29:04+00:00"}]
    assert set(doc["metrics"]) == {"split", "accuracy", "macro_f1", "accuracy_drop", "latency_ms_p95_b1", "size_mb"}
    assert doc["metrics"]["macro_f1"] is None   # absent from v0001: None, not missing


def test_a_version_stored_without_a_full_record_is_still_listed(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {})
    reg.promote(model_dir(tmp_path, "m2", b"two"), PASS, {"candidate": "b", "metrics": {"accuracy": 1}})
    old, new = reg.describe_versions()
    assert old.candidate is None and old.metrics == VersionFigures() and len(old.live) == 1
    assert new.metrics.accuracy == 1 and isinstance(new.metrics.accuracy, int)   # an int stays an int
    assert new.to_json_dict()["metrics"]["accuracy"] == 1 and new.production


def test_the_history_is_typed_and_written_as_before(tmp_path):
    """history.jsonl lines keep their keys: a promotion names same_model_as,
    a rollback does not."""
    reg = Registry(tmp_path / "reg")
    reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {})
    reg.promote(model_dir(tmp_path, "m2", b"two"), PASS, {})
    reg.rollback()
    lines = [json.loads(x) for x in (tmp_path / "reg" / "history.jsonl").read_text().splitlines()]
    assert [set(x) for x in lines] == [{"at", "event", "previous", "same_model_as", "version"}] * 2 + \
        [{"at", "event", "previous", "version"}]
    assert lines[0]["previous"] is None and lines[2]["event"] == "rollback"
    events = reg.history()
    assert [(e.event, e.version, e.previous) for e in events] == \
        [("promote", "v0001", None), ("promote", "v0002", "v0001"), ("rollback", "v0001", "v0002")]
    assert [e.to_json_dict() for e in events] == lines
    # the fixture's history, written by the deploy stage, reads the same way
    assert [e.version for e in Registry(FIXTURE).history()] == ["v0001", "v0002", "v0003"]


def test_nothing_deployed_is_a_report_with_a_message_and_nothing_else(tmp_path):
    report = status_report(Registry(tmp_path / "none"))
    assert report.to_json_dict() == {"deployed": None, "message": NOTHING_DEPLOYED}
    assert status_text(report) == NOTHING_DEPLOYED


def test_the_report_reads_back_as_its_model(tmp_path):
    """A script that reads `status --json` can validate it: the JSON is the
    model's, and reads back to the same JSON."""
    report = status_report(Registry(build(tmp_path / "registry", "v0003")))
    doc = report.to_json_dict()
    assert StatusReport.model_validate(doc).to_json_dict() == doc
    d = report.deployed
    assert d.integrity == "verified" and d.metrics.per_class_recall["negative"] == 0.855263
    assert d.serving.per_row is True and d.roi.serving["b1"].break_even_predictions == 12577
    assert report.teacher.metrics.split == "test" and report.versions == ["v0001", "v0002", "v0003"]


def test_a_version_that_is_not_a_version_manifest_is_named_not_rendered(tmp_path):
    """A version stored by hand (here: a record with no figures): status
    says which file and what it lacks, in one line, exit 3."""
    root = bare_project(tmp_path)
    reg = Registry(root / "registry")
    reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {"candidate": "a"})
    with pytest.raises(RegistryError, match=r"version v0001 \(.*manifest.json\) is not a version manifest "
                                            r"\(\d+ problems: recipe: Field required"):
        status_report(reg)
    out = cli(root, "status", "--json")
    assert out.returncode == ExitCode.CRASH and "is not a version manifest" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    # a version as the deploy stage records it renders
    reg.promote(model_dir(tmp_path, "m2", b"two"), PASS, deploy_record("b"))
    assert json.loads(cli(root, "status", "--json").stdout)["deployed"]["candidate"] == "b"


def test_the_fixture_registry_is_not_changed_by_building_from_it(tmp_path):
    before = {p.relative_to(FIXTURE): p.read_bytes() for p in FIXTURE.rglob("*") if p.is_file()}
    build(tmp_path / "registry", "v0002-variant")
    shutil.rmtree(tmp_path / "registry")
    assert {p.relative_to(FIXTURE): p.read_bytes() for p in FIXTURE.rglob("*") if p.is_file()} == before
