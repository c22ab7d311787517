"""The prediction cache validate reads before re-predicting a model it has
seen: keyed on everything that changes the labels, a damaged entry a miss,
and measure_interleaved's result the same with it as without it."""

from __future__ import annotations

import json

import numpy as np

import pytest

from shrinkflow.config import Candidate, LatencyParams
from shrinkflow.prediction_cache import PredictionCache, texts_digest


def test_an_entry_round_trips_and_every_setting_is_in_the_key(tmp_path):
    cache = PredictionCache(tmp_path / "c")
    key = cache.key("m1", "labels", ["ab", "c"], per_row=False, threads=2)
    assert cache.get(key) is None and not (tmp_path / "c").exists()  # a miss writes nothing
    cache.put(key, [0, 1])
    assert cache.get(key) == [0, 1]
    others = {cache.key("m2", "labels", ["ab", "c"], per_row=False, threads=2),   # another model
              cache.key("m1", "labels", ["a", "bc"], per_row=False, threads=2),   # same characters, other texts
              cache.key("m1", "labels", ["ab", "c", ""], per_row=False, threads=2),
              cache.key("m1", "labels", ["ab", "c"], per_row=True, threads=2),    # one text per call
              cache.key("m1", "labels", ["ab", "c"], per_row=False, threads=1),
              cache.key("m1", "invariance", ["ab", "c"], per_row=False, threads=2)}
    assert key not in others and len(others) == 6
    assert texts_digest(["ab", "c"]) != texts_digest(["a", "bc"]) != texts_digest(["abc"])


@pytest.mark.parametrize("damage", ["edited", "truncated", "not json"])
def test_a_damaged_entry_is_a_miss_and_is_deleted(tmp_path, damage):
    cache = PredictionCache(tmp_path)
    key = cache.key("m", "labels", ["x", "y"], per_row=False, threads=1)
    cache.put(key, [0, 1])
    path = tmp_path / f"{key}.json"
    text = path.read_text()
    path.write_text({"edited": text.replace("[0,1]", "[1,1]"), "truncated": text[:20],
                     "not json": "\x00\x01"}[damage])
    assert cache.get(key) is None
    assert not path.exists()
    cache.put(key, [0, 1])  # and computed again
    assert cache.get(key) == [0, 1]


def test_the_least_recently_used_entries_go_first(tmp_path):
    import os

    cache = PredictionCache(tmp_path, max_entries=2)
    keys = [cache.key("m", "labels", [str(i)], per_row=False, threads=1) for i in range(3)]
    cache.put(keys[0], [0])
    cache.put(keys[1], [1])
    os.utime(tmp_path / f"{keys[1]}.json", (1, 1))  # the oldest now
    cache.put(keys[2], [2])
    assert [cache.get(k) for k in keys] == [[0], None, [2]]


@pytest.fixture(scope="module")
def fp32_candidate(tmp_path_factory, tiny_teacher_dir):
    from shrinkflow.compress import apply_recipe

    return apply_recipe(tiny_teacher_dir, Candidate(name="fp32"), tmp_path_factory.mktemp("cand") / "fp32")


@pytest.mark.slow  # ~15 s: three measurements in spawned processes
def test_measure_interleaved_reads_what_it_predicted_before_and_only_for_the_same_model(
        tmp_path, tiny_teacher_dir, fp32_candidate, small_splits):
    from shrinkflow.evaluate import measure_interleaved

    lat = LatencyParams(threads=1, warmup_iters=1, iters_b1=5, iters_b32=3, rounds=2, retimes_when_busy=0)
    splits = {"val": small_splits["val"]["text"].tolist()[:60], "test": small_splits["test"]["text"].tolist()[:50],
              "window_heldout": small_splits["val"]["text"].tolist()[:30], "unlabelled": []}
    models = {"teacher": tiny_teacher_dir, "fp32": fp32_candidate}
    cache = PredictionCache(tmp_path / "cache")

    def measure(**kw):
        return measure_interleaved(models, splits, splits["val"], lat, log=lambda m: None,
                                   invariance_texts=splits["val"][:40], invariance_skip=frozenset({"teacher"}),
                                   probability_splits=frozenset({"window_heldout", "unlabelled"}), **kw)

    plain = measure()
    # probabilities for the splits asked (an empty one has none), from the
    # same logits as the labels
    for name in models:
        probs = np.asarray(plain[name]["probabilities"]["window_heldout"])
        assert set(plain[name]["probabilities"]) == {"window_heldout"} and probs.shape == (30, 2)
        assert np.allclose(probs.sum(axis=1), 1.0)
        assert probs.argmax(axis=1).tolist() == plain[name]["predictions"]["window_heldout"]
    first = measure(cache=cache)
    assert "cached_splits" not in plain["fp32"]
    assert first["teacher"]["cached_splits"] == [] and first["fp32"]["cached_splits"] == []
    for name in models:
        assert first[name]["predictions"] == plain[name]["predictions"]
        assert first[name]["probabilities"] == plain[name]["probabilities"]
    assert first["fp32"]["batch_invariance"] == plain["fp32"]["batch_invariance"]

    # Read back, not recomputed: a stored entry rewritten (with a valid
    # hash) is what the next measurement returns.
    from shrinkflow.prediction_cache import model_hash

    fp32_hash = model_hash(fp32_candidate)
    per_row = first["fp32"]["batch_invariance"]["per_row"]
    forged = [1 - y for y in first["fp32"]["predictions"]["test"]]
    cache.put(cache.key(fp32_hash, "labels", splits["test"], per_row=per_row, threads=1), forged)
    forged_probs = [[1.0, 0.0]] * 30
    cache.put(cache.key(fp32_hash, "probabilities", splits["window_heldout"], per_row=per_row, threads=1),
              forged_probs)
    second = measure(cache=cache)
    assert second["teacher"]["cached_splits"] == ["val", "test", "window_heldout"] == second["fp32"]["cached_splits"]
    assert second["fp32"]["predictions"]["test"] == forged
    assert second["fp32"]["probabilities"]["window_heldout"] == forged_probs
    assert second["teacher"]["probabilities"] == plain["teacher"]["probabilities"]
    assert second["teacher"]["predictions"] == plain["teacher"]["predictions"]
    assert second["fp32"]["batch_invariance"] == plain["fp32"]["batch_invariance"]
    # latency is measured every time
    assert second["fp32"]["performance"]["latency_ms_p95_b1"] > 0

    # Another model's bytes (here: another content hash handed in) hit nothing.
    third = measure(cache=cache, model_hashes={"fp32": "0" * 64})
    assert third["fp32"]["cached_splits"] == [] and third["teacher"]["cached_splits"] == ["val", "test", "window_heldout"]
    assert third["fp32"]["predictions"] == plain["fp32"]["predictions"]
    # labels cached without their probabilities: that split is predicted again
    teacher_hash = model_hash(tiny_teacher_dir)
    (tmp_path / "cache" / f"{cache.key(teacher_hash, 'probabilities', splits['window_heldout'], per_row=False, threads=1)}.json").unlink()
    fourth = measure(cache=cache)
    assert fourth["teacher"]["cached_splits"] == ["val", "test"]
    assert fourth["teacher"]["probabilities"] == plain["teacher"]["probabilities"]
    assert json.loads(next((tmp_path / "cache").glob("*.json")).read_text())["sha256"]


def test_the_model_hash_ignores_what_a_build_records_but_not_what_predicts(tmp_path, fp32_candidate):
    """Production's student rebuilt in a later re-compression records other
    stats in its manifest, with the same weights: the same hash. Other
    weights, another tokenizer or another max_seq_len: another hash."""
    import shutil

    from shrinkflow.files import read_json, write_json
    from shrinkflow.modeling import MANIFEST, TOKENIZER
    from shrinkflow.prediction_cache import model_hash

    base = model_hash(fp32_candidate)
    assert base == model_hash(fp32_candidate)

    def variant(name, change):
        d = tmp_path / name
        shutil.copytree(fp32_candidate, d)
        change(d)
        return model_hash(d)

    def restat(d):
        m = read_json(d / MANIFEST)
        write_json(d / MANIFEST, {**m, "stats": {**m.get("stats", {}), "distill_unlabelled_rows": 1234}})

    def seq_len(d):
        m = read_json(d / MANIFEST)
        write_json(d / MANIFEST, {**m, "max_seq_len": m["max_seq_len"] - 1})

    def weights(d):
        onnx = d / "model.onnx"
        onnx.write_bytes(onnx.read_bytes() + b"\0")

    def tokenizer(d):
        (d / TOKENIZER).write_text((d / TOKENIZER).read_text() + " ")

    assert variant("restat", restat) == base
    assert len({base, variant("seq", seq_len), variant("weights", weights), variant("tok", tokenizer)}) == 4


def test_built_accuracy_reads_and_stores_validates_labels(tmp_path, fp32_candidate, small_splits):
    """compress's scoring of a built share goes through the cache under the
    key validate uses, so each side reads what the other predicted."""
    import numpy as np

    from shrinkflow.compress.steps import built_accuracy
    from shrinkflow.prediction_cache import model_hash
    from shrinkflow.predictors import load_predictor

    texts = small_splits["val"]["text"].tolist()[:40]
    labels = small_splits["val"]["label"].to_numpy()[:40]
    cache = PredictionCache(tmp_path / "cache")
    plain = built_accuracy(fp32_candidate, texts, labels, 1)
    assert built_accuracy(fp32_candidate, texts, labels, 1, cache) == plain
    per_row = bool(load_predictor(fp32_candidate, threads=1).batch_dependent)
    key = cache.key(model_hash(fp32_candidate), "labels", texts, per_row=per_row, threads=1)
    stored = cache.get(key)
    assert stored is not None and len(stored) == 40
    assert float((np.asarray(stored) == labels).mean()) == plain
    # a forged entry under validate's key is what is read back: every label right
    cache.put(key, [int(y) for y in labels])
    assert built_accuracy(fp32_candidate, texts, labels, 1, cache) == 1.0
    # another thread count is another key: predicted, not read
    assert built_accuracy(fp32_candidate, texts, labels, 2, cache) == plain
