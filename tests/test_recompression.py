"""A re-compression against production: the production model copied out of
the registry and measured as a candidate, its window agreement the baseline
of the gain gate, kept when it wins, and what the monitor records when
nothing passes. Pure functions and small files; the flow end to end is
tests/test_e2e.py's monitor test."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from shrinkflow.config import ValidateParams
from shrinkflow.files import file_hashes, read_json
from shrinkflow.markdown import outcome_line, validation_markdown
from shrinkflow.paths import PRODUCTION_META, PRODUCTION_MODEL, WINDOW_PRODUCTION
from shrinkflow.validation import PRODUCTION_CANDIDATE, validate_runs
from tests.typed_cases import BINARY, GATES, TEST, VAL, _files, run

# The teacher's labels on five held-out window texts.
WINDOW = [1, 0, 1, 1, 0]


def runs(production_window, candidate_window, production_lat=6.0, candidate_lat=5.0, floor=0.9, gain=0.2):
    """validate_runs' arguments: a teacher, one built candidate ``small`` and
    the production model, differing only in window agreement and latency."""
    return dict(teacher_run=run(VAL, TEST, lat=20.0, diff=None, window=WINDOW),
                candidate_runs={"small": run(VAL, TEST, lat=candidate_lat, window=candidate_window),
                                PRODUCTION_CANDIDATE: run(VAL, TEST, lat=production_lat, window=production_window)},
                labels={"val": VAL, "test": TEST, "shifted": [1, 0]},
                params=ValidateParams(gates=GATES.model_copy(update={"min_window_agreement": floor,
                                                                     "min_window_agreement_gain": gain})),
                files=_files("small", PRODUCTION_CANDIDATE), label_names=BINARY, production_version="v0003")


def test_a_candidate_under_the_floor_deploys_on_its_gain_over_production():
    """Production agrees on 3 of 5 held-out texts (0.6), the candidate on 4
    (0.8): 0.2 over production is exactly the min gain, under the 0.9 floor."""
    report, sel = validate_runs(**runs(production_window=[1, 0, 0, 0, 0], candidate_window=[1, 0, 1, 0, 0]))
    assert sel.production == "v0003" and sel.selected == "small"
    small = sel.candidates["small"].gates
    assert small["min_window_agreement"].value == 0.8 and not small["min_window_agreement"].passed
    assert not small["min_window_agreement"].enforced
    assert small["min_window_agreement_gain"].passed and small["min_window_agreement_gain"].value == pytest.approx(0.2)
    assert "against production v0003's 0.6" in small["min_window_agreement_gain"].note
    prod = sel.candidates[PRODUCTION_CANDIDATE]
    assert not prod.passed and set(prod.gates) >= {"min_window_agreement"}
    assert "min_window_agreement_gain" not in prod.gates
    assert report.candidates[PRODUCTION_CANDIDATE].agreement["window_heldout"] == 0.6


def test_production_is_kept_when_it_passes_and_wins_the_selection():
    report, sel = validate_runs(**runs(production_window=WINDOW, candidate_window=WINDOW, production_lat=4.0))
    assert sel.selected == PRODUCTION_CANDIDATE and report.confirmation.candidate == PRODUCTION_CANDIDATE
    from shrinkflow.markdown import validation_markdown

    md = validation_markdown(report, sel)
    assert "**Production v0003 selected**" in md and "production v0003 was measured" in md
    assert "**Kept production v0003**" in validation_markdown(report, sel, None, True, kept="v0003")


def test_nothing_passes_and_the_outcome_carries_every_failed_gate_with_its_figures():
    from shrinkflow.recompression import recompress_markdown, recompress_outcome

    # candidate 0.6 against production 0.6: no gain (needs 0.2), under the floor; production under the floor
    _, sel = validate_runs(**runs(production_window=[1, 0, 0, 0, 0], candidate_window=[1, 0, 0, 0, 0]))
    assert sel.selected is None
    out = recompress_outcome(sel, None, None)
    assert out["outcome"] == "nothing" and out["production_version"] == "v0003"
    failed = out["candidates"]["small"]["failed"]
    assert set(failed) == {"min_window_agreement", "min_window_agreement_gain"}
    assert failed["min_window_agreement"]["value"] == 0.6 and failed["min_window_agreement"]["margin"] == \
        pytest.approx(-0.3)
    assert failed["min_window_agreement_gain"]["value"] == 0 and failed["min_window_agreement_gain"]["margin"] == \
        pytest.approx(-0.2)
    assert set(out["candidates"][PRODUCTION_CANDIDATE]["failed"]) == {"min_window_agreement"}
    json.dumps(out)  # what decision.json stores
    md = recompress_markdown(out)
    assert "**Nothing deployed**: no candidate passed every gate; production v0003 keeps serving." in md
    assert "| small | min_window_agreement_gain FAILED | 0 | >= 0.2 | -0.2 |" in md
    assert "| small | min_window_agreement FAILED | 0.6 | >= 0.9 | -0.3 |" in md

    _, won = validate_runs(**runs(production_window=WINDOW, candidate_window=WINDOW, production_lat=4.0))
    kept = recompress_outcome(won, None, "v0003")
    assert kept["outcome"] == "kept" and kept["candidates"][PRODUCTION_CANDIDATE] == {"passed": True, "failed": {}}
    assert "**Kept production v0003**" in recompress_markdown(kept)
    assert recompress_outcome(won, "v0004", None)["outcome"] == "deployed"


def test_snapshot_production_copies_the_verified_production_model(tmp_path):
    from shrinkflow.errors import IntegrityError
    from shrinkflow.recompression import clear_production, snapshot_production
    from tests.registry_outputs import build

    root = tmp_path / "project"
    (root / WINDOW_PRODUCTION).mkdir(parents=True)
    (root / WINDOW_PRODUCTION / "README.md").write_text("kept\n")
    registry = build(root / "registry", "v0003")
    assert snapshot_production(root, "registry") == "v0003"
    assert file_hashes(root / PRODUCTION_MODEL) == read_json(registry / "versions/v0003/manifest.json")["files"]
    assert read_json(root / PRODUCTION_META)["version"] == "v0003"
    # again, after production moved: the copy is replaced, not merged
    (registry / "aliases.json").write_text(json.dumps({"production": "v0002"}))
    (root / PRODUCTION_MODEL / "stale.bin").write_bytes(b"x")
    assert snapshot_production(root, "registry") == "v0002"
    assert file_hashes(root / PRODUCTION_MODEL) == read_json(registry / "versions/v0002/manifest.json")["files"]
    assert sorted(p.name for p in (root / WINDOW_PRODUCTION).iterdir()) == ["README.md", "model", "version.json"]
    # a corrupted production model is never copied
    (registry / "versions/v0002/model/model.onnx").write_bytes(b"rot")
    with pytest.raises(IntegrityError):
        snapshot_production(root, "registry")
    clear_production(root)
    assert sorted(p.name for p in (root / WINDOW_PRODUCTION).iterdir()) == ["README.md"]
    # nothing in production: no copy
    assert snapshot_production(root, "empty-registry") is None and not (root / PRODUCTION_META).exists()


def test_a_plain_run_measures_current_production_while_a_re_compressions_window_is_staged(tmp_path):
    """A helper's finding: a plain run after an interrupted re-compression
    removed the production copy, so the staged window's candidates were
    gated without production and the int8 teacher, 1.5x slower, was deployed.
    Now, with a window staged, a run whose validate re-runs measures the
    current production as a candidate; one whose validate does not leaves
    the copy as validate read it (a second helper's findings: re-copying it
    then re-ran validate, which undid a rollback and refused a student
    deployed through the agreement gain)."""
    from shrinkflow.paths import UNLABELLED, WINDOW_HELDOUT, WINDOW_META
    from shrinkflow.recompression import production_for_run, snapshot_production, window_staged
    from tests.registry_outputs import build

    root = tmp_path / "project"
    (root / WINDOW_PRODUCTION).mkdir(parents=True)
    for path in (UNLABELLED, WINDOW_HELDOUT):
        (root / path).write_text("")
    (root / WINDOW_META).write_text("{}\n")
    registry = build(root / "registry", "v0003")
    # no window staged (a fresh project's empty files): the copy goes, as before
    assert snapshot_production(root, "registry") == "v0003"
    assert not window_staged(root)
    assert production_for_run(root, "registry", lambda: True) == (None, None) and not (root / PRODUCTION_META).exists()
    # the user's own unlabelled text (texts.txt) is no re-compression window
    (root / UNLABELLED).write_text("the user's own unlabelled text\n")
    assert not window_staged(root) and production_for_run(root, "registry", lambda: True) == (None, None)
    # a re-compression's record (window.json), or its held-out texts alone, stage a window
    (root / WINDOW_META).write_text(json.dumps({"texts_md5": "0" * 32}))
    assert window_staged(root)
    (root / WINDOW_META).write_text("{}\n")
    (root / WINDOW_HELDOUT).write_text("a held-out production text\n")
    assert window_staged(root)
    # validate re-runs: production is copied, verified, as a candidate
    version, said = production_for_run(root, "registry", lambda: True)
    assert version == "v0003" and "production v0003 is measured as a candidate" in said
    meta = read_json(root / PRODUCTION_META)
    assert meta["version"] == "v0003" and meta["role"] == "candidate"
    assert file_hashes(root / PRODUCTION_MODEL) == read_json(registry / "versions/v0003/manifest.json")["files"]
    # production moved (a rollback, or the re-compression deployed) and validate does not re-run:
    # the copy stays exactly as validate read it, so DVC skips validate and deploy
    (registry / "aliases.json").write_text(json.dumps({"production": "v0002"}))
    stamp = {p: p.stat().st_mtime_ns for p in (root / WINDOW_PRODUCTION).rglob("*")}
    assert production_for_run(root, "registry", lambda: False) == ("v0003", None)
    assert {p: p.stat().st_mtime_ns for p in (root / WINDOW_PRODUCTION).rglob("*")} == stamp
    # ... and when validate does re-run, the current production replaces it
    assert production_for_run(root, "registry", lambda: True)[0] == "v0002"
    assert read_json(root / PRODUCTION_META)["version"] == "v0002"
    # production's files do not verify: not measured, and said; the run goes on
    (registry / "versions/v0002/model/model.onnx").write_bytes(b"rot")
    version, said = production_for_run(root, "registry", lambda: True)
    assert version is None and "production is not measured" in said and "IntegrityError" in said
    assert not (root / PRODUCTION_META).exists()
    # an unreadable manifest: the same, not a crash of the run
    (registry / "aliases.json").write_text(json.dumps({"production": "v0003"}))
    (registry / "versions/v0003/manifest.json").write_text("{not json")
    version, said = production_for_run(root, "registry", lambda: True)
    assert version is None and "production is not measured" in said
    # nothing in production: no copy
    (registry / "aliases.json").write_text(json.dumps({}))
    assert production_for_run(root, "registry", lambda: True) == (None, None)


def test_deploy_keeps_production_only_while_it_is_still_production(tmp_path):
    from shrinkflow.artifacts import GatesReport
    from shrinkflow.catalog import DEPLOYMENT, load
    from shrinkflow.errors import PromotionRefused
    from stages.deploy import keep_production
    from tests.registry_outputs import build

    root = tmp_path / "project"
    registry = build(root / "registry", "v0003")
    params = SimpleNamespace(deploy=SimpleNamespace(registry_dir="registry"))
    gates = GatesReport(selected=PRODUCTION_CANDIDATE, reason="'production': lowest latency_ms_p95_b1 of 2",
                        candidates={}, confirmation=None, production="v0003")
    keep_production(params, root, gates)
    record = load(DEPLOYMENT, root)
    assert record.kept and record.version == "v0003" and "production v0003 was kept" in record.reason
    assert json.loads((registry / "aliases.json").read_text())["production"] == "v0003"
    assert len(list((registry / "versions").iterdir())) == 3  # nothing promoted
    (registry / "aliases.json").write_text(json.dumps({"production": "v0002"}))
    with pytest.raises(PromotionRefused, match="measured production v0003 but the registry serves v0002"):
        keep_production(params, root, gates)


def test_the_monitor_run_records_the_re_compression_in_its_decision(tmp_path):
    from monitoring.run import record_recompress

    run_dir = tmp_path / "reports" / "20260101T000000_000000Z"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"created": "t", "window": {"rows": 3}}))
    (run_dir / "decision.json").write_text(json.dumps({"action": "recompress", "acted": True, "reasons": []}))
    outcome = {"outcome": "nothing", "deployed_version": None, "kept_version": None, "production_version": "v0003",
               "selected": None, "reason": "no candidate passed every gate", "candidates": {}}
    doc = record_recompress(run_dir, outcome)
    assert doc["recompress"] == outcome and doc["acted"] is True
    assert json.loads((run_dir / "decision.json").read_text())["recompress"]["outcome"] == "nothing"
    assert "(nothing passed the gates)" in (tmp_path / "reports" / "index.html").read_text()


def test_a_crashed_re_compression_is_recorded_in_the_decision_and_the_index(tmp_path):
    """A helper's finding: the re-compression raised (Prefect refused its
    parameters) and decision.json said nothing of it, while the window
    counted as acted on. Now the run says it crashed, and why."""
    from monitoring.run import record_crash

    run_dir = tmp_path / "reports" / "20260101T000000_000000Z"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"created": "t", "window": {"rows": 3}}))
    (run_dir / "decision.json").write_text(json.dumps({"action": "recompress", "acted": True, "reasons": []}))
    doc = record_crash(run_dir, "recompress", RuntimeError("x" * 5000))
    assert doc["recompress"]["outcome"] == "crashed" and doc["acted"] is True
    assert doc["recompress"]["error"].startswith("RuntimeError: xxx") and len(doc["recompress"]["error"]) == 2000
    assert "(crashed: RuntimeError: xxx" in (tmp_path / "reports" / "index.html").read_text()
    doc = record_crash(run_dir, "retrain", ValueError("bad"))
    assert doc["retrain"] == {"outcome": "crashed", "error": "ValueError: bad"}
    # a lone surrogate in the message (a helper's finding: the index then raised UnicodeEncodeError)
    doc = record_crash(run_dir, "recompress", RuntimeError("half a pair \ud800 here"))
    assert doc["recompress"]["error"] == "RuntimeError: half a pair \\ud800 here"
    assert "half a pair" in (tmp_path / "reports" / "index.html").read_text()


def test_the_flows_get_the_corpus_by_file_whatever_its_size(tmp_path):
    """A helper's finding: 2,001 Reuters articles passed as flow-run
    parameters were 609,329 bytes, and Prefect's API refuses more than
    524,288 ("422 ... Flow run parameters must be less than 524,288 bytes"):
    the re-compression crashed. The monitor writes the texts (and a retrain's
    pairs) to its run directory and passes the path; they read back exactly,
    texts with newlines, quotes and non-ASCII included."""
    from monitoring.run import load_flow_input, save_flow_input

    texts = [f"article {i}: " + "Crude oil \"prices\" rose — état\nline two. " * 12 for i in range(2001)]
    assert len(json.dumps(texts).encode()) > 524_288
    path = save_flow_input(tmp_path, "recompress_texts", texts)
    assert load_flow_input(path, "texts") == texts
    parameters = {"project_dir": str(tmp_path), "trigger": {"window_sha256": "a" * 64, "rows": 2001},
                  "texts_file": path}
    assert len(json.dumps(parameters).encode()) < 2_000
    pairs = [[t, "crude"] for t in texts[:5]]
    assert load_flow_input(save_flow_input(tmp_path, "retrain_pairs", pairs), "pairs", pairs=True) == pairs
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="holds a dict, not a list"):
        load_flow_input(tmp_path / "bad.json", "recompress texts_file")
    with pytest.raises(ValueError, match="recompress texts_file: cannot read"):
        load_flow_input(tmp_path / "missing.json", "recompress texts_file")
    for value, kind in (([1, "a"], {}), (["ab"], {"pairs": True}), ([["t"]], {"pairs": True}),
                        ([None], {"pairs": True}), ([["t", 3]], {"pairs": True})):   # a helper's findings
        (tmp_path / "bad.json").write_text(json.dumps(value))
        with pytest.raises(ValueError, match="item 0 of .* is not a"):
            load_flow_input(tmp_path / "bad.json", "what", **kind)


def test_the_production_copy_is_a_validate_dep_that_a_fresh_project_has_empty():
    """DVC never misses the dep (the directory is in git, with its README),
    and a default run measures no production candidate."""
    import subprocess

    import yaml

    from stages.validate import read_production
    from tests.conftest import PROJECT_ROOT

    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    assert str(WINDOW_PRODUCTION) in stages["validate"]["deps"]
    tracked = subprocess.run(["git", "ls-files", str(WINDOW_PRODUCTION)], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert sorted(tracked) == [f"{WINDOW_PRODUCTION}/.gitignore", f"{WINDOW_PRODUCTION}/README.md"]
    assert read_production(PROJECT_ROOT, BINARY) == (None, None)


def test_validate_skips_a_production_copy_whose_classes_differ(tmp_path, capsys):
    from shrinkflow.files import write_json
    from stages.validate import read_production

    (tmp_path / PRODUCTION_MODEL).mkdir(parents=True)
    write_json(tmp_path / PRODUCTION_META, {"version": "v0007", "content_hash": "h"})
    write_json(tmp_path / PRODUCTION_MODEL / "shrinkflow_model.json", {"format": "onnx", "labels": list(BINARY)})
    assert read_production(tmp_path, BINARY) == ("v0007", "candidate")   # a copy that names no role
    assert read_production(tmp_path, ("a", "b", "c")) == (None, None)
    assert "production v0007 is not measured: its classes" in capsys.readouterr().out


def test_validate_reads_the_production_copy_s_role_and_refuses_one_it_does_not_know(tmp_path, capsys):
    from shrinkflow.errors import DataError
    from shrinkflow.files import write_json
    from stages.validate import read_production

    (tmp_path / PRODUCTION_MODEL).mkdir(parents=True)
    write_json(tmp_path / PRODUCTION_MODEL / "shrinkflow_model.json", {"format": "onnx", "labels": list(BINARY)})
    write_json(tmp_path / PRODUCTION_META, {"version": "v0007", "content_hash": "h", "role": "baseline"})
    assert read_production(tmp_path, BINARY) == ("v0007", "baseline")
    assert "as the baseline of a retrain's candidates" in capsys.readouterr().out
    for role in ("Baseline", "", None, 1):
        write_json(tmp_path / PRODUCTION_META, {"version": "v0007", "content_hash": "h", "role": role})
        with pytest.raises(DataError, match="role .* is neither 'candidate' nor 'baseline'") as err:
            read_production(tmp_path, BINARY)
        assert str(tmp_path / PRODUCTION_META) in str(err.value)


@pytest.mark.parametrize("body, why", [
    ("", "is not JSON"), ("{not json", "is not JSON"), (b"\xff\xfe", "is not JSON"),
    ("[1]", "must be an object naming"), ('"baseline"', "must be an object naming"), ("{}", "must be an object"),
    ('{"content_hash": "h"}', "must be an object"), ('{"version": null}', "must be an object"),
    ('{"version": ""}', "must be an object"), ('{"version": 3}', "must be an object"),
    ('{"version": "v0007", "role": null}', "is neither"), ('{"version": "v0007", "role": ["baseline"]}', "is neither"),
])
def test_every_malformed_production_copy_record_is_refused_naming_the_file(tmp_path, body, why):
    """A helper's finding: a version.json that is not JSON, not an object or
    names no version gave a JSONDecodeError, AttributeError or KeyError
    traceback, or (``{}``) left production silently unmeasured."""
    from shrinkflow.errors import DataError
    from shrinkflow.files import write_json
    from stages.validate import read_production

    (tmp_path / PRODUCTION_MODEL).mkdir(parents=True)
    write_json(tmp_path / PRODUCTION_MODEL / "shrinkflow_model.json", {"format": "onnx", "labels": list(BINARY)})
    meta = tmp_path / PRODUCTION_META
    meta.write_bytes(body if isinstance(body, bytes) else body.encode())
    with pytest.raises(DataError, match=why) as err:
        read_production(tmp_path, BINARY)
    assert str(meta) in str(err.value)


def test_a_baseline_copy_counts_only_for_a_retrained_teacher():
    """A rejected retrain leaves its baseline copy; a later validate (`dvc
    repro`) of the teacher it kept must not measure production as a
    retrain's baseline (a helper's finding): only a teacher other than the
    one the retrain record measured before is a retrain's."""
    from shrinkflow.artifacts import PreviousTeacher, RetrainRecord
    from shrinkflow.validation import is_retrained

    record = RetrainRecord(previous_teacher=PreviousTeacher(content_hash="old", val_accuracy=0.9,
                                                            feedback_heldout_accuracy=0.5, feedback_heldout_rows=4))
    assert is_retrained(record, "new")
    assert not is_retrained(record, "old")            # the retrain was undone: the teacher it measured
    assert not is_retrained(RetrainRecord(), "new")   # no retrain recorded


def test_a_retrain_stages_production_as_a_baseline_only_where_a_held_out_window_gates(tmp_path):
    """An earlier re-compression's held-out window texts: production is
    staged with role "baseline"; none, or an empty file: any copy (a
    re-compression's candidate) is removed."""
    from shrinkflow.paths import WINDOW_HELDOUT
    from shrinkflow.recompression import snapshot_production, stage_production_baseline
    from tests.registry_outputs import build

    root = tmp_path / "project"
    build(root / "registry", "v0003")
    assert snapshot_production(root, "registry") == "v0003"           # a re-compression's copy
    assert read_json(root / PRODUCTION_META)["role"] == "candidate"
    assert stage_production_baseline(root, "registry") is None          # no window: removed
    assert not (root / PRODUCTION_META).exists() and not (root / PRODUCTION_MODEL).exists()
    (root / WINDOW_HELDOUT).parent.mkdir(parents=True, exist_ok=True)
    (root / WINDOW_HELDOUT).write_text("\n  \n", encoding="utf-8")
    assert stage_production_baseline(root, "registry") is None
    (root / WINDOW_HELDOUT).write_text("a held-out text\n", encoding="utf-8")
    assert stage_production_baseline(root, "registry") == "v0003"
    assert read_json(root / PRODUCTION_META)["role"] == "baseline" and (root / PRODUCTION_MODEL).is_dir()
    with pytest.raises(ValueError, match="role must be"):
        snapshot_production(root, "registry", "both")


def test_a_candidate_with_production_s_files_is_measured_once_as_production_s_baseline():
    # min gain 0: its gain over itself (0) passes, and it is selected
    args = runs(production_window=WINDOW, candidate_window=[1, 0, 1, 0, 0], gain=0.0)
    del args["candidate_runs"][PRODUCTION_CANDIDATE]
    report, sel = validate_runs(**{**args, "files": _files("small"), "production_as": "small"})
    assert set(sel.candidates) == {"small"} and sel.production == "v0003" and sel.production_as == "small"
    gain = sel.candidates["small"].gates["min_window_agreement_gain"]
    assert gain.value == 0 and "against production v0003's 0.8" in gain.note
    # selected, it is production: deploy keeps it, and gates.md says so (not "promotes it")
    assert sel.selected == "small"
    line = outcome_line(sel)
    assert "Production v0003 selected** (rebuilt as 'small'" in line and "promotes nothing" in line, line
    assert "promotes it" not in line
    md = validation_markdown(report, sel)
    assert "production v0003 was measured as the candidate 'small', which has its very files" in md, md
    # an ordinary run records no production_as
    args = runs(production_window=WINDOW, candidate_window=[1, 0, 1, 0, 0], floor=0.0)
    del args["candidate_runs"][PRODUCTION_CANDIDATE]
    _, plain = validate_runs(**{**args, "files": _files("small"), "production_version": None})
    assert plain.production is None and plain.production_as is None
    assert "promotes it" in outcome_line(plain)


def test_the_recompression_corpus_is_the_newest_rows_up_to_the_window(tmp_path):
    """monitor.recompress_last_n rows ending where the monitor's window ends:
    older rows before it, never rows logged after the window was read, and
    never fewer than the window."""
    from datetime import datetime, timedelta, timezone

    from monitoring.run import read_recompress_corpus
    from shrinkflow.config import MonitorParams, ServeParams
    from shrinkflow.predlog import Prediction, PredictionLog

    t0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
    log = PredictionLog(tmp_path / "predictions.sqlite").open()
    # whole seconds: isoformat() would drop the zero microseconds of a bare bound
    log.append([Prediction(f"id{i}", (t0 + timedelta(seconds=i)).isoformat(timespec="microseconds"), "v0001",
                           f"text {i}", [0.5, 0.5], 0, 1.0) for i in range(30)])
    def corpus(last_n, window_last):
        params = SimpleNamespace(serve=ServeParams(log_path="predictions.sqlite"),
                                 monitor=MonitorParams(recompress_last_n=last_n, window_last_n=window_last))
        window = log.window(last=window_last, until=(t0 + timedelta(seconds=25)).isoformat())  # rows 15..24
        return read_recompress_corpus(tmp_path, params, window)

    assert corpus(20, 10) == [f"text {i}" for i in range(5, 25)]  # not 25..29: logged after the window
    assert corpus(4, 10) == [f"text {i}" for i in range(15, 25)]   # at least the window
    assert corpus(100, 10) == [f"text {i}" for i in range(25)]


def _probs(labels, confidence):
    """Two-class probabilities giving each label ``confidence``."""
    return [[1 - confidence, confidence] if y == 1 else [confidence, 1 - confidence] for y in labels]


@pytest.mark.parametrize("candidate_conf, deploys", [(0.88, True),      # +0.006 soft agreement over production
                                                     (0.8799, False)])  # just under
def test_a_candidate_tied_on_labels_deploys_on_its_soft_agreement_gain(candidate_conf, deploys):
    """The candidate and production both miss the teacher's label on the
    last of five held-out texts (label agreement 0.8 each: under the 0.9
    floor, no label gain). The teacher is 0.9 sure of each label, production
    0.87 of its own and the candidate ``candidate_conf``: soft agreement
    (4 (1 - (0.9 - c)) + 1.1 - c) / 5, 0.822 for production, so the gain is
    0.6 (c - 0.87), against a min gain of 0.006 on probabilities.
    validate.json records both agreements."""
    students = WINDOW[:-1] + [1 - WINDOW[-1]]
    args = runs(production_window=students, candidate_window=students, gain=0.006)
    args["teacher_run"]["probabilities"] = {"window_heldout": _probs(WINDOW, 0.9)}
    args["candidate_runs"][PRODUCTION_CANDIDATE]["probabilities"] = {"window_heldout": _probs(students, 0.87)}
    args["candidate_runs"]["small"]["probabilities"] = {"window_heldout": _probs(students, candidate_conf)}
    report, sel = validate_runs(**args)
    small = report.candidates["small"]
    assert small.agreement["window_heldout"] == 0.8
    assert small.soft_agreement == {"window_heldout": pytest.approx((1.5 + 3 * candidate_conf) / 5, abs=1e-6)}
    assert report.candidates[PRODUCTION_CANDIDATE].soft_agreement == {"window_heldout": pytest.approx(0.822)}
    gain = sel.candidates["small"].gates["min_window_agreement_gain"]
    assert gain.passed is deploys and gain.value == pytest.approx(0.6 * (candidate_conf - 0.87), abs=1e-6)
    assert gain.note.startswith("soft agreement ") and "labels 0.8 against production v0003's 0.8 (+0)" in gain.note
    assert (sel.selected == "small") is deploys
    assert "soft_agreement" in json.dumps(report.to_json_dict())


def test_deploy_finds_its_own_earlier_deploy_in_production_and_promotes_nothing_again(tmp_path):
    """A helper's finding: a run stopped after deploy moved production, before
    DVC recorded the stage; the next run re-ran deploy and stored the same
    files as a new version. Production with the same files *and* the same
    lineage is that deploy; another lineage (a re-validation, new data) or
    other files is a new fact, and a new version."""
    from shrinkflow.registry import Registry
    from stages.deploy import already_deployed
    from tests.registry_outputs import build

    reg = Registry(build(tmp_path / "registry", "v0003"))
    manifest = reg.manifest("v0003")
    record = {"lineage": manifest["lineage"]}
    assert already_deployed(reg, manifest["content_hash"], record)
    assert not already_deployed(reg, "0" * 64, record)                          # other files
    other = json.loads(json.dumps(manifest["lineage"]))
    other["params_sha256"] = "another"
    assert not already_deployed(reg, manifest["content_hash"], {"lineage": other})   # another lineage
    # a change only deploy reads (the price in the cost and return): a new version
    full = {k: manifest[k] for k in ("lineage", "roi", "selection", "metrics", "candidate")}
    assert already_deployed(reg, manifest["content_hash"], full)
    pricier = json.loads(json.dumps(full))
    pricier["roi"]["price_per_core_hour"] = 0.5
    assert not already_deployed(reg, manifest["content_hash"], pricier)
    (tmp_path / "registry" / "aliases.json").write_text(json.dumps({"production": "v0002"}))
    assert not already_deployed(reg, manifest["content_hash"], record)          # production is another version
    assert not already_deployed(Registry(build(tmp_path / "none", "empty")), manifest["content_hash"], record)
