"""Registry: immutable versions, atomic promotion, refusal, integrity."""

from __future__ import annotations

import os

import pytest

from shrinkflow.config import Gates
from shrinkflow.gates import evaluate_gates
from shrinkflow.modeling import write_manifest
from shrinkflow.registry import IntegrityError, PromotionRefused, Registry

TEACHER = {"accuracy": 0.85, "latency_ms_p95_b1": 10.0, "size_mb": 90.0}
PASS = evaluate_gates("c", {"accuracy": 0.85, "latency_ms_p95_b1": 1.0, "size_mb": 1.0}, TEACHER, Gates())
FAIL = evaluate_gates("c", {"accuracy": 0.50, "latency_ms_p95_b1": 1.0, "size_mb": 1.0}, TEACHER, Gates())


def model_dir(tmp_path, name, payload: bytes):
    d = tmp_path / name
    d.mkdir()
    (d / "model.onnx").write_bytes(payload)
    write_manifest(d, "onnx", 32)
    return d


def test_promote_versions_and_alias(tmp_path):
    reg = Registry(tmp_path / "reg")
    assert reg.production() is None and reg.versions() == []
    p1 = reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {"candidate": "a"})
    assert (p1.version, p1.created, p1.previous) == ("v0001", True, None)
    p2 = reg.promote(model_dir(tmp_path, "m2", b"two"), PASS, {"candidate": "b"})
    assert (p2.version, p2.previous) == ("v0002", "v0001")
    assert reg.alias() == "v0002" and reg.versions() == ["v0001", "v0002"]
    # v0001 is untouched and still loadable.
    assert (reg.path("v0001") / "model" / "model.onnx").read_bytes() == b"one"
    man = reg.manifest("v0002")
    assert man["candidate"] == "b" and man["gates"]["min_accuracy"]["passed"]
    assert (reg.path("v0002") / "gates.json").is_file()
    assert [e["version"] for e in reg.history()] == ["v0001", "v0002"]


def test_identical_model_is_not_stored_twice(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {})
    reg.promote(model_dir(tmp_path, "m2", b"two"), PASS, {})
    again = reg.promote(model_dir(tmp_path, "m3", b"one"), PASS, {})
    assert (again.version, again.created) == ("v0001", False)
    assert reg.alias() == "v0001" and reg.versions() == ["v0001", "v0002"]


def test_failed_candidate_is_refused_and_nothing_changes(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {})
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "reg").rglob("*"))
    with pytest.raises(PromotionRefused, match=r"min_accuracy FAILED: 0.5 \(needs >= 0.82; margin -0.32\)"):
        reg.promote(model_dir(tmp_path, "bad", b"bad"), FAIL, {})
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "reg").rglob("*")) == before
    assert reg.alias() == "v0001"


def test_crash_mid_promote_leaves_previous_version_serving(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "reg")
    reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {})

    def crash(src, dst):
        raise OSError("disk pulled out mid-deploy")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="mid-deploy"):
        reg.promote(model_dir(tmp_path, "m2", b"two"), PASS, {})
    monkeypatch.undo()
    assert reg.alias() == "v0001" and reg.versions() == ["v0001"]
    assert not list((tmp_path / "reg" / "versions").glob(".tmp-*"))
    # The next promotion works and numbers on from the last real version.
    assert reg.promote(model_dir(tmp_path, "m3", b"three"), PASS, {}).version == "v0002"


def test_crash_before_alias_swap_keeps_old_alias(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "reg")
    reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {})
    monkeypatch.setattr(Registry, "_set_alias", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        reg.promote(model_dir(tmp_path, "m2", b"two"), PASS, {})
    monkeypatch.undo()
    assert reg.alias() == "v0001"


def test_refuses_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(PromotionRefused, match="not a shrinkflow model"):
        Registry(tmp_path / "reg").promote(tmp_path / "junk", PASS, {})


def test_verify_detects_a_corrupted_artifact(tmp_path):
    reg = Registry(tmp_path / "reg")
    v = reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {}).version
    reg.verify(v)
    (reg.path(v) / "model" / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match="model.onnx"):
        reg.verify(v)
