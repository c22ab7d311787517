"""Registry: immutable versions, atomic promotion, refusal, integrity.

Faults are injected from outside, as they happen: a promoting process is
killed with SIGKILL at many points of its work, and files are corrupted on
disk. Nothing in the registry is patched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from shrinkflow.config import Gates
from shrinkflow.gates import evaluate_gates
from shrinkflow.registry import IntegrityError, NothingToRollBack, PromotionRefused, Registry, RegistryError
from tests.conftest import PROJECT_ROOT

TEACHER = {"accuracy": 0.85, "latency_ms_p95_b1": 10.0, "size_mb": 90.0}
PASS = evaluate_gates("c", {"accuracy": 0.85, "latency_ms_p95_b1": 1.0, "size_mb": 1.0}, TEACHER, Gates())
FAIL = evaluate_gates("c", {"accuracy": 0.50, "latency_ms_p95_b1": 1.0, "size_mb": 1.0}, TEACHER, Gates())


def model_dir(tmp_path, name, payload: bytes, extra_files: int = 0, labels=("negative", "positive")):
    d = tmp_path / name
    d.mkdir()
    (d / "model.onnx").write_bytes(payload)
    for i in range(extra_files):
        (d / f"shard-{i:03d}.bin").write_bytes(os.urandom(256 * 1024))
    # the model's own manifest (shrinkflow.modeling.MANIFEST), written by hand
    manifest = {"format": "onnx", "max_seq_len": 32, "recipe": []}
    if labels is not None:
        manifest["labels"] = list(labels)
    (d / "shrinkflow_model.json").write_text(json.dumps(manifest))
    return d


def test_promote_versions_and_alias(tmp_path):
    reg = Registry(tmp_path / "reg")
    assert reg.production() is None and reg.versions() == []
    p1 = reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {"candidate": "a"})
    assert (p1.version, p1.previous, p1.same_model_as) == ("v0001", None, None)
    p2 = reg.promote(model_dir(tmp_path, "m2", b"two"), PASS, {"candidate": "b"})
    assert (p2.version, p2.previous) == ("v0002", "v0001")
    assert reg.alias() == "v0002" and reg.versions() == ["v0001", "v0002"]
    # v0001 is untouched and still loadable.
    assert (reg.load("v0001").path / "model.onnx").read_bytes() == b"one"
    man = reg.manifest("v0002")
    assert man["candidate"] == "b" and man["gates"]["min_accuracy"]["passed"]
    assert (reg.path("v0002") / "gates.json").is_file()
    assert [e.version for e in reg.history()] == ["v0001", "v0002"]


def test_identical_model_is_a_new_version_that_keeps_its_new_record(tmp_path):
    """Re-validated under new gates or data, an identical model is promoted as
    a new version: the new gate report, metrics and lineage are kept, and the
    manifest says which earlier version had the same files."""
    reg = Registry(tmp_path / "reg")
    reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {"metrics": {"accuracy": 0.80}})
    reg.promote(model_dir(tmp_path, "m2", b"two"), PASS, {})
    again = reg.promote(model_dir(tmp_path, "m3", b"one"), PASS, {"metrics": {"accuracy": 0.81}})
    assert (again.version, again.same_model_as, again.previous) == ("v0003", "v0001", "v0002")
    assert reg.alias() == "v0003" and reg.versions() == ["v0001", "v0002", "v0003"]
    assert reg.manifest("v0003")["metrics"] == {"accuracy": 0.81}
    assert reg.manifest("v0001")["metrics"] == {"accuracy": 0.80}
    assert reg.manifest("v0003")["content_hash"] == reg.manifest("v0001")["content_hash"]
    assert reg.history()[-1].same_model_as == "v0001"


def test_a_candidate_that_differs_from_what_was_validated_is_refused(tmp_path):
    from shrinkflow.files import file_hashes

    reg = Registry(tmp_path / "reg")
    m = model_dir(tmp_path, "m1", b"validated bytes")
    validated = file_hashes(m)
    (m / "model.onnx").write_bytes(b"swapped after validation")
    with pytest.raises(PromotionRefused, match=r"differs from the validated candidate .*model.onnx"):
        reg.promote(m, PASS, {}, expected_files=validated)
    assert reg.versions() == [] and reg.alias() is None


def test_failed_candidate_is_refused_and_nothing_changes(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {})
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "reg").rglob("*"))
    with pytest.raises(PromotionRefused, match=r"min_accuracy FAILED: 0.5 \(needs >= 0.82; margin -0.32\)"):
        reg.promote(model_dir(tmp_path, "bad", b"bad"), FAIL, {})
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "reg").rglob("*")) == before
    assert reg.alias() == "v0001"


def test_every_version_records_its_labels_from_the_model_and_refuses_a_mismatch(tmp_path):
    reg = Registry(tmp_path / "reg")
    three = ["billing", "bug", "sales"]
    v = reg.promote(model_dir(tmp_path, "m1", b"one", labels=three), PASS, {"labels": three}).version
    assert reg.manifest(v)["labels"] == three
    assert reg.describe_versions()[0].labels == three
    # without labels in the record, the model's own are recorded
    v2 = reg.promote(model_dir(tmp_path, "m2", b"two"), PASS, {}).version
    assert reg.manifest(v2)["labels"] == ["negative", "positive"]
    # validated for other classes than the model outputs: refused, nothing stored
    with pytest.raises(PromotionRefused, match=r"outputs the classes \['billing', 'bug', 'sales'\].*"
                                               r"validated for \['bug', 'billing', 'sales'\]"):
        reg.promote(model_dir(tmp_path, "m3", b"three", labels=three), PASS, {"labels": ["bug", "billing", "sales"]})
    with pytest.raises(PromotionRefused, match="has no valid 'labels'"):
        reg.promote(model_dir(tmp_path, "m4", b"four", labels=None), PASS, {})
    assert reg.versions() == [v, v2] and reg.alias() == v2


def test_refuses_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(PromotionRefused, match="not a shrinkflow model"):
        Registry(tmp_path / "reg").promote(tmp_path / "junk", PASS, {})


def test_every_load_verifies_the_files(tmp_path):
    reg = Registry(tmp_path / "reg")
    v = reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {}).version
    ref = reg.load()
    assert ref.version == v and (ref.path / "model.onnx").read_bytes() == b"one"
    (reg.path(v) / "model" / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match="model.onnx"):
        reg.load()
    with pytest.raises(IntegrityError):
        reg.load(v)


@pytest.mark.parametrize("bad", ["../../etc", "/tmp/x", "v1", "v0009", 7])
def test_alias_file_is_validated(tmp_path, bad):
    reg = Registry(tmp_path / "reg")
    reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {})
    (tmp_path / "reg" / "aliases.json").write_text(json.dumps({"production": bad}))
    with pytest.raises(RegistryError, match="production"):
        reg.alias()
    with pytest.raises(RegistryError):
        reg.load()


@pytest.mark.parametrize("raw", [b"", b'{"production": "v0001"', b"\xff\xfe{}"])
def test_an_unreadable_alias_file_is_a_registry_error_not_a_crash(tmp_path, raw):
    """A helper's finding: an empty or cut-short aliases.json raised
    JSONDecodeError out of every command (status, rollback, serve, monitor:
    "shrinkflow crashed" and a traceback)."""
    reg = Registry(tmp_path / "reg")
    reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {})
    (tmp_path / "reg" / "aliases.json").write_bytes(raw)
    with pytest.raises(RegistryError, match=r"aliases\.json: not valid JSON"):
        reg.alias()


PROMOTER = r"""
import sys, time
from shrinkflow.config import Gates
from shrinkflow.gates import evaluate_gates
from shrinkflow.registry import Registry
t = {"accuracy": 0.85, "latency_ms_p95_b1": 10.0, "size_mb": 90.0}
report = evaluate_gates("c", {"accuracy": 0.85, "latency_ms_p95_b1": 1.0, "size_mb": 1.0}, t, Gates())
reg = Registry(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
t0 = time.perf_counter()
reg.promote(sys.argv[2], report, {"candidate": "new"})
print(f"done {time.perf_counter() - t0:.4f}", flush=True)
"""


def _promoter(reg_dir, src):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", PROMOTER, str(reg_dir), str(src)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.slow  # ~5 s: the quick run stays under 3 minutes; the full suite runs it
def test_kill_9_anywhere_in_a_promotion_leaves_a_consistent_registry(tmp_path):
    """SIGKILL a real promoting process at points spread over its whole run:
    production is always the old or the new version, never a half-written
    one, every listed version verifies, and the next promotion works."""
    reg_dir = tmp_path / "reg"
    reg = Registry(reg_dir)
    reg.promote(model_dir(tmp_path, "base", b"base"), PASS, {})
    src = model_dir(tmp_path, "big", b"new", extra_files=40)  # ~10 MB: copy, hash, fsync take a while

    # How long one uninterrupted promotion takes, in a throwaway registry.
    probe = _promoter(tmp_path / "probe-reg", src)
    probe.stdin.write("go\n")
    probe.stdin.flush()
    duration = float(probe.stdout.readline().split()[1])
    probe.wait(timeout=60)

    # The kills are spread over the probe's duration; a promotion that ends
    # before its kill (the machine got faster than the probe) shortens the
    # spread for the next ones, up to 24 tries.
    killed_mid_way = 0
    for i in range(24):
        if i >= 12 and killed_mid_way >= 6:
            break
        proc = _promoter(reg_dir, src)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        time.sleep(duration * (i % 12 + 0.5) / 12)
        if proc.poll() is None:
            killed_mid_way += 1
        else:
            duration *= 0.7
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        fresh = Registry(reg_dir)
        alias = fresh.alias()  # validated: a real, complete version
        assert alias in fresh.versions()
        assert fresh.manifest(alias).get("candidate") in (None, "new")
        for v in fresh.versions():
            fresh.verify(v)
    assert killed_mid_way >= 6, f"only {killed_mid_way} kills landed mid-promotion; the test proved little"
    after = Registry(reg_dir).promote(model_dir(tmp_path, "next", b"next"), PASS, {})
    assert Registry(reg_dir).alias() == after.version
    assert not list((reg_dir / "versions").glob(".tmp-*"))


def test_rollback_to_previous_and_to_a_named_version(tmp_path):
    reg = Registry(tmp_path / "reg")
    for i, payload in enumerate((b"one", b"two", b"three"), 1):
        reg.promote(model_dir(tmp_path, f"m{i}", payload), PASS, {"candidate": f"c{i}"})
    back = reg.rollback()
    assert (back.previous, back.version) == ("v0003", "v0002") and reg.alias() == "v0002"
    # the version production had just before: a second rollback undoes the first
    assert reg.rollback().version == "v0003"
    assert reg.rollback(to="v0001").version == "v0001"
    assert reg.rollback(to="v0003").version == "v0003"
    assert [e.event for e in reg.history()] == ["promote"] * 3 + ["rollback"] * 4
    with pytest.raises(RegistryError, match="already production"):
        reg.rollback(to="v0003")
    with pytest.raises(RegistryError, match="no version 'v0042'"):
        reg.rollback(to="v0042")
    periods = reg.live_periods()
    assert len(periods["v0003"]) == 3 and periods["v0003"][-1].to is None
    assert all(p.to is not None for p in periods["v0001"] + periods["v0002"])
    rows = reg.describe_versions()
    assert [r.production for r in rows] == [False, False, True]
    assert rows[0].candidate == "c1" and len(rows[0].live) == 2 and len(rows[1].live) == 2


def test_rollback_refuses_a_corrupted_target_and_keeps_production(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {})
    reg.promote(model_dir(tmp_path, "m2", b"two"), PASS, {})
    (reg.path("v0001") / "model" / "model.onnx").write_bytes(b"rot")
    with pytest.raises(IntegrityError, match="v0001"):
        reg.rollback()
    assert reg.alias() == "v0002" and reg.history()[-1].event == "promote"


def test_rollback_with_nothing_or_no_history_says_what_to_do(tmp_path):
    reg = Registry(tmp_path / "reg")
    with pytest.raises(RegistryError, match="nothing is in production"):
        reg.rollback()
    reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {})
    # v0001 is the only version: no "name one with --to", there is none to name
    with pytest.raises(NothingToRollBack, match="v0001 is the only version .*: there is nothing to roll back to"):
        reg.rollback()
    with pytest.raises(NothingToRollBack, match="already production"):
        reg.rollback(to="v0001")


def test_rollback_and_versions_commands(tmp_path):
    """The CLI as a user runs it, in a project whose registry has two versions."""
    import shutil

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(PROJECT_ROOT / name, tmp_path / name)
    reg = Registry(tmp_path / "registry")
    reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {"candidate": "a", "metrics": {"accuracy": 0.85}})
    reg.promote(model_dir(tmp_path, "m2", b"two"), PASS, {"candidate": "b", "metrics": {"accuracy": 0.86}})

    def cli(*args):
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
        proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stdout + proc.stderr

    code, out = cli("versions", "--json")
    assert code == 0 and [r["production"] for r in json.loads(out)] == [False, True]
    code, out = cli("rollback")
    assert code == 0 and "production: v0002 -> v0001" in out and reg.alias() == "v0001"
    code, out = cli("versions")
    assert code == 0 and "* v0001" in out and "0.8500" in out
    code, out = cli("rollback", "--to", "v0099")
    assert code == 2 and "no version 'v0099'" in out and reg.alias() == "v0001"
    # while a run holds the project (it may deploy meanwhile), a rollback is refused and moves
    # nothing (a helper's finding: it went through, and the run's report took the move for its own)
    from tests.test_projectlock import HOLD

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        code, out = cli("rollback")
        assert code == 2 and f"`shrinkflow run --params A` (pid {holder.pid}, since " in out, out
        assert reg.alias() == "v0001" and [e.event for e in reg.history()].count("rollback") == 1
    finally:
        holder.kill()
        holder.wait()
    # a registry_dir that does not exist: nothing to roll back, and none created (a newcomer's finding)
    params = (tmp_path / "params.yaml").read_text()
    assert "registry_dir: registry" in params
    (tmp_path / "params.yaml").write_text(params.replace("registry_dir: registry", "registry_dir: no-such-registry"))
    code, out = cli("rollback")
    assert code == 4 and "no registry at" in out and not (tmp_path / "no-such-registry").exists()


def test_a_crash_between_the_alias_swap_and_the_history_loses_nothing_rollback_needs(tmp_path):
    """The previous production version is written with the swap itself; the
    history line that follows can be lost (here: cut off, as a crash would)."""
    reg = Registry(tmp_path / "reg")
    reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {})
    reg.promote(model_dir(tmp_path, "m2", b"two"), PASS, {})
    history = tmp_path / "reg" / "history.jsonl"
    history.write_text(history.read_text().splitlines(keepends=True)[0])  # v0002's line never written
    assert reg.alias() == "v0002" and reg.previous_production() == "v0001"
    assert reg.rollback().version == "v0001"
    assert reg.rollback().version == "v0002"  # and a second rollback undoes the first


def test_a_history_line_torn_by_a_crash_is_skipped_then_set_aside_and_another_bad_line_is_named(tmp_path):
    """A newcomer's finding: a torn last line of history.jsonl made
    `versions` exit with a pydantic error naming neither file nor line, and
    `rollback` appended its event onto it, so that line stayed unreadable."""
    reg = Registry(tmp_path / "reg")
    reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {})
    reg.promote(model_dir(tmp_path, "m2", b"two"), PASS, {})
    path = tmp_path / "reg" / "history.jsonl"
    whole = path.read_text()
    torn = whole.splitlines()[-1][:25]
    path.write_text(whole + torn)                         # a third append cut short
    assert len(reg.history()) == 2
    reg.rollback()
    events = reg.history()
    assert len(events) == 3 and (events[-1].event, events[-1].version) == ("rollback", "v0001")
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 3   # every line an event
    assert (tmp_path / "reg" / "history.jsonl.torn").read_text() == torn + "\n"
    path.write_text(path.read_text().rstrip("\n"))       # a whole event that lost only its newline: kept
    reg.rollback()
    assert len(reg.history()) == 4 and (tmp_path / "reg" / "history.jsonl.torn").read_text() == torn + "\n"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(RegistryError, match=r"history\.jsonl, line 2: not a history event"):
        reg.history()
