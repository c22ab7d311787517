"""The monitor's reference cache (monitoring/reference_cache.py): the same
figures with and without it, a corrupted or mismatched entry rebuilt, and
the shadow teacher's length-sorted batches returning outputs in order."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from monitoring.reference_cache import ReferenceCache, directory_digest, texts_digest
from shrinkflow.config import MonitorParams
from shrinkflow.predlog import Prediction, PredictionLog, utc_now

PARAMS = MonitorParams(shadow_sample_rows=40, min_window_rows=10)
CREATED = "2026-01-01T00:00:00+00:00"


def logged(tmp, model_dir, texts):
    from monitoring.evidently_reports import softmax_positive
    from shrinkflow.predictors import load_predictor

    probs = softmax_positive(load_predictor(model_dir, threads=1).predict_logits(texts))
    log = PredictionLog(tmp / f"{uuid.uuid4().hex}.db").open()
    log.append([Prediction(uuid.uuid4().hex, utc_now(), "v0001", t, [1 - p, p], int(p >= 0.5), 2.0, truncated=False)
                for t, p in zip(texts, probs)])
    return log.window(last=1000)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_teacher_dir, small_splits):
    tmp = tmp_path_factory.mktemp("monitor_cache")
    s = small_splits
    window = logged(tmp, tiny_teacher_dir, s["shifted"]["text"].tolist() + s["test"]["text"].tolist()[:20])
    return tmp, window


def run(setup, tiny_teacher_dir, small_splits, name, cache_dir):
    from monitoring.evidently_reports import build

    tmp, window = setup
    return build(window, small_splits["val"], served_dir=tiny_teacher_dir, teacher_dir=tiny_teacher_dir,
                 train_texts=small_splits["train"]["text"].tolist(),
                 validated={"version": "v0001", "accuracy": 0.8, "agreement": 0.9, "agreement_rows": 60},
                 params=PARAMS, out_dir=tmp / "reports" / name, created=CREATED, cache_dir=cache_dir)


@pytest.fixture
def spy(monkeypatch):
    """The text lists the shadow teacher and the served model are run on."""
    import monitoring.evidently_reports as er

    calls = {"teacher": [], "served": []}
    teacher_call, served = er.ShadowTeacher.__call__, er.served_outputs

    def teacher(self, texts):
        calls["teacher"].append(list(texts))
        return teacher_call(self, texts)

    def served_spy(*a, **kw):
        calls["served"].append(list(a[1]))
        return served(*a, **kw)

    monkeypatch.setattr(er.ShadowTeacher, "__call__", teacher)
    monkeypatch.setattr(er, "served_outputs", served_spy)
    return calls


@pytest.mark.slow  # ~10 s: in the full suite, not the quick run
def test_cached_and_uncached_runs_give_the_same_summary(setup, tiny_teacher_dir, small_splits, tmp_path, spy):
    ref_texts = small_splits["val"]["text"].tolist()
    plain = run(setup, tiny_teacher_dir, small_splits, "plain", None)
    assert spy["served"] == [ref_texts] and ref_texts in spy["teacher"]
    cache = tmp_path / "cache"
    cold = run(setup, tiny_teacher_dir, small_splits, "cold", cache)
    assert sorted(p.name.split("-")[0] for p in cache.glob("*.npz")) == ["descriptors", "served", "teacher"]
    spy["served"].clear(), spy["teacher"].clear()
    warm = run(setup, tiny_teacher_dir, small_splits, "warm", cache)
    # warm: neither model ran on the reference split, only the teacher on the sample
    assert spy["served"] == [] and len(spy["teacher"]) == 1 and spy["teacher"][0] != ref_texts
    assert len(spy["teacher"][0]) == PARAMS.shadow_sample_rows
    a, b, c = (x.model_dump(mode="json") for x in (plain, cold, warm))
    assert a == b == c
    # and the figures are real ones
    assert plain.teacher.rows == 40 and plain.embedding is not None and plain.descriptors
    assert plain.teacher.validated_rows == 60


# ~8 s each: one kind of damage in the quick run, the others in the full suite
@pytest.mark.parametrize("damage", ["garbage", pytest.param("truncated", marks=pytest.mark.slow),
                                    pytest.param("other_key", marks=pytest.mark.slow)])
def test_a_corrupted_or_mismatched_entry_is_a_miss_and_is_rebuilt(setup, tiny_teacher_dir, small_splits, tmp_path,
                                                                  spy, damage):
    cache = tmp_path / "cache"
    first = run(setup, tiny_teacher_dir, small_splits, f"first-{damage}", cache)
    entries = {p.name.split("-")[0]: p for p in cache.glob("*.npz")}
    served = entries["served"]
    good = served.read_bytes()
    if damage == "garbage":
        served.write_bytes(b"not a numpy archive")
    elif damage == "truncated":
        served.write_bytes(good[: len(good) // 2])
    else:  # another entry's content under this entry's name: its stored key differs
        served.write_bytes(entries["descriptors"].read_bytes())
    spy["served"].clear()
    again = run(setup, tiny_teacher_dir, small_splits, f"again-{damage}", cache)
    assert spy["served"] == [small_splits["val"]["text"].tolist()]   # rebuilt
    assert again.model_dump(mode="json") == first.model_dump(mode="json")
    assert served.read_bytes() == good                               # and rewritten whole


def test_entries_are_keyed_by_everything_they_depend_on(tmp_path):
    built = []

    def build(n=3, value=1.0):
        built.append(value)
        return {"x": np.full((n, 2), value, dtype=np.float32), "flag": np.arange(n) % 2 == 0}

    cache = ReferenceCache(tmp_path)
    key = {"reference": texts_digest(["a", "b", "c"]), "served": "s1", "truncation": "head"}
    first = cache.get("served", key, 3, build)
    again = cache.get("served", key, 3, lambda: build(value=2.0))
    assert built == [1.0] and cache.hits == ["served"] and cache.misses == ["served"]
    assert again["x"].dtype == np.float32 and np.array_equal(again["x"], first["x"])
    assert again["flag"].dtype == bool and np.array_equal(again["flag"], first["flag"])
    # any part of the key changed: a miss
    for changed in ({**key, "served": "s2"}, {**key, "truncation": "head_tail"},
                    {**key, "reference": texts_digest(["a", "b", "c "])}):
        cache.get("served", changed, 3, lambda: build(value=3.0))
    assert built == [1.0, 3.0, 3.0, 3.0]
    # an entry whose arrays do not have the rows asked for is a miss too
    cache.get("served", key, 4, lambda: build(n=4, value=4.0))
    assert built[-1] == 4.0
    with pytest.raises(ValueError, match="4 rows"):
        cache.get("served", {**key, "served": "s9"}, 4, lambda: build(n=3))


def test_no_cache_dir_builds_every_time_and_writes_nothing(tmp_path):
    cache = ReferenceCache(None)
    n = []
    for _ in range(2):
        cache.get("served", {"k": 1}, 1, lambda: n.append(1) or {"x": np.zeros(1)})
    assert len(n) == 2 and list(tmp_path.iterdir()) == []


def test_an_unwritable_cache_costs_nothing_but_the_time(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    out = ReferenceCache(blocker).get("served", {"k": 1}, 2, lambda: {"x": np.ones(2)})
    assert np.array_equal(out["x"], np.ones(2))


def test_only_the_newest_entries_are_kept(tmp_path):
    import os

    cache = ReferenceCache(tmp_path, keep=2)
    for i in range(4):
        cache.get("served", {"k": i}, 1, lambda: {"x": np.zeros(1)})
        path = cache.path("served", {"kind": "served", "k": i})
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    cache.get("served", {"k": 9}, 1, lambda: {"x": np.zeros(1)})
    names = sorted(p.name for p in tmp_path.glob("*.npz"))
    assert len(names) == 2 and cache.path("served", {"kind": "served", "k": 9}).name in names


def test_the_stored_key_is_readable_json(tmp_path):
    cache = ReferenceCache(tmp_path)
    cache.get("teacher", {"teacher": "t"}, 1, lambda: {"embeddings": np.zeros((1, 4))})
    with np.load(next(tmp_path.glob("*.npz"))) as npz:
        meta = json.loads(str(npz["__key__"]))
    assert meta == {"key": {"kind": "teacher", "teacher": "t"}, "arrays": ["embeddings"]}


def test_directory_digest_changes_with_any_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"1")
    before = directory_digest(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"2")
    assert directory_digest(tmp_path) != before


def test_the_shadow_teacher_returns_outputs_in_the_texts_order(tiny_teacher_dir, small_splits):
    from monitoring.evidently_reports import ShadowTeacher

    texts = small_splits["test"]["text"].tolist()[:30] + ["", "short", "a much longer text " * 20]
    labels, embs = ShadowTeacher(tiny_teacher_dir, batch_size=8)(texts)
    assert labels.shape == (len(texts),) and embs.shape[0] == len(texts)
    one = ShadowTeacher(tiny_teacher_dir, batch_size=1)
    for i in (0, 7, 30, 31, 32):   # each text alone: the same answer, up to padding's float noise
        lab, emb = one([texts[i]])
        assert lab[0] == labels[i] and np.allclose(emb[0], embs[i], atol=1e-5)
    # the same list, the same arrays bit for bit
    again = ShadowTeacher(tiny_teacher_dir, batch_size=8)(texts)
    assert np.array_equal(again[0], labels) and np.array_equal(again[1], embs)
