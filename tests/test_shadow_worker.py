"""The shadow teacher in a process of its own (monitoring/shadow_worker.py):
the same answers as in the monitor's process, bit for bit, in the order
asked; a teacher that cannot load is an error that names it; the worker ends
when closed; the CLI's early start is handed to the run that matches it;
and a monitor run through the worker gives the same summary as without."""

from __future__ import annotations

import numpy as np
import pytest

import monitoring.shadow_worker as sw
from monitoring.evidently_reports import ShadowTeacher


@pytest.fixture
def texts(small_splits):
    base = small_splits["test"]["text"].tolist()[:30]
    return base + ["", "word " * 400, "\x00\x07 control"]


@pytest.mark.slow  # ~8 s: the quick run stays under 3 minutes; the full suite runs it
def test_the_worker_answers_as_the_teacher_here_in_the_order_asked(tiny_teacher_dir, texts):
    here_a = ShadowTeacher(tiny_teacher_dir)(texts)
    here_b = ShadowTeacher(tiny_teacher_dir)(texts[:7])
    worker = sw.ShadowTeacherProcess(tiny_teacher_dir)
    try:
        # submitted while the worker still loads; the first pass alone is larger than a
        # pipe's buffer (64 KiB), which a thread writes while this one goes on
        assert len("".join(texts).encode()) > 2 ** 16 // 32
        big = texts * 32
        a, b, c = worker.submit(texts), worker.submit(texts[:7]), worker.submit(big)
        assert len(c.result()[0]) == len(big)
        got_b, got_a = b.result(), a.result()   # collected out of order
        with pytest.raises(RuntimeError, match="already read"):
            a.result()
    finally:
        worker.close()
    for got, here in ((got_a, here_a), (got_b, here_b)):
        assert got[0].dtype == here[0].dtype and got[1].dtype == here[1].dtype
        assert np.array_equal(got[0], here[0]) and np.array_equal(got[1], here[1])   # bit for bit
    assert got_a[1].shape == (len(texts), here_a[1].shape[1])
    assert worker._proc.poll() == 0 and not worker._tmp.exists()
    worker.close()   # idempotent
    with pytest.raises(RuntimeError, match="not running"):
        worker.submit(texts)


def test_a_repeated_text_is_run_once_and_answered_on_every_row(tiny_teacher_dir, texts):
    distinct = texts[:10]
    rows = [distinct[i] for i in (3, 0, 3, 9, 0, 3)] + distinct   # repeats first, then each once
    teacher = ShadowTeacher(tiny_teacher_dir)
    calls = []
    model = teacher.load() or teacher._model
    teacher._model = lambda **kw: calls.append(kw["input_ids"].shape[0]) or model(**kw)
    labels, embs = teacher(rows)
    assert sum(calls) == len(distinct)                   # 16 rows, 10 texts run
    order = list(dict.fromkeys(rows))   # the distinct texts, in order of first appearance
    once_l, once_e = ShadowTeacher(tiny_teacher_dir)(order)
    by_text = {t: (once_l[k], once_e[k]) for k, t in enumerate(order)}
    for k, t in enumerate(rows):   # the same distinct texts in the same order: bit for bit
        assert labels[k] == by_text[t][0] and np.array_equal(embs[k], by_text[t][1])


@pytest.mark.slow  # a worker's start: ~5 s
def test_a_teacher_that_cannot_load_is_an_error_naming_it(tmp_path):
    broken = tmp_path / "teacher"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    worker = sw.ShadowTeacherProcess(broken)
    try:
        pending = worker.submit(["a text"])
        with pytest.raises(RuntimeError, match="could not load the teacher") as err:
            pending.result()
        assert str(broken) in str(err.value)
    finally:
        worker.close()
    assert worker._proc.poll() is not None


@pytest.mark.slow  # five workers started, each importing torch: ~20 s
def test_the_early_start_is_handed_to_the_run_that_matches_it(tiny_teacher_dir, tmp_path):
    first = sw.prestart(tiny_teacher_dir, "head")
    assert sw.take(tiny_teacher_dir, "head_tail") is None   # another truncation: not this worker
    first._proc.wait(timeout=60)                            # ... which is closed
    second = sw.prestart(tiny_teacher_dir, "head")
    try:
        assert sw.take(tmp_path / "other", "head") is None and second._proc.wait(timeout=60) is not None
        third = sw.prestart(tiny_teacher_dir, "head")
        assert sw.take(tiny_teacher_dir, "head") is third and sw.take(tiny_teacher_dir, "head") is None
        # the run's choice: the handed-over worker first, then by the number of texts
        sw.prestart(tiny_teacher_dir, "head")
        chosen = sw.shadow_teacher(tiny_teacher_dir, "head", 1)
        assert isinstance(chosen, sw.ShadowTeacherProcess)
        chosen.close()
        assert isinstance(sw.shadow_teacher(tiny_teacher_dir, "head", sw.WORKER_MIN_TEXTS - 1), ShadowTeacher)
        many = sw.shadow_teacher(tiny_teacher_dir, "head", sw.WORKER_MIN_TEXTS)
        assert isinstance(many, sw.ShadowTeacherProcess)
        many.close()
    finally:
        for w in (first, second):
            w.close()
        third.close()


@pytest.mark.slow  # two monitor runs on the tiny models: ~15 s
def test_a_monitor_run_through_the_worker_gives_the_same_summary(tiny_teacher_dir, small_splits, tmp_path,
                                                                 monkeypatch):
    import uuid

    from monitoring.evidently_reports import build, softmax_positive
    from shrinkflow.config import MonitorParams
    from shrinkflow.predictors import load_predictor
    from shrinkflow.predlog import Prediction, PredictionLog, utc_now

    texts = small_splits["shifted"]["text"].tolist() + small_splits["test"]["text"].tolist()[:20]
    probs = softmax_positive(load_predictor(tiny_teacher_dir, threads=1).predict_logits(texts))
    log = PredictionLog(tmp_path / "log.db").open()
    rows = [Prediction(uuid.uuid4().hex, utc_now(), "v0001", t, [1 - p, p], int(p >= 0.5), 2.0, truncated=False)
            for t, p in zip(texts, probs)]
    log.append(rows)
    for row in rows[::3]:   # feedback on a third: the teacher answers those rows too
        log.add_feedback(row.prediction_id, int(row.label == 0))
    window = log.window(last=1000)
    started = []
    real = sw.ShadowTeacherProcess.__init__

    def spy(self, *a, **kw):
        started.append(1)
        real(self, *a, **kw)

    def run(name, cache_dir):
        return build(window, small_splits["val"], served_dir=tiny_teacher_dir, teacher_dir=tiny_teacher_dir,
                     train_texts=small_splits["train"]["text"].tolist(),
                     validated={"version": "v0001", "accuracy": 0.8, "agreement": 0.9, "agreement_rows": 60,
                                "teacher_accuracy": 0.8},
                     params=MonitorParams(shadow_sample_rows=40, min_window_rows=10),
                     out_dir=tmp_path / name, created="2026-01-01T00:00:00+00:00", cache_dir=cache_dir)

    here = run("here", None)
    monkeypatch.setattr(sw.ShadowTeacherProcess, "__init__", spy)
    monkeypatch.setattr(sw, "WORKER_MIN_TEXTS", 1)
    there = run("there", tmp_path / "cache")     # the reference's pass and the window's, in the worker
    again = run("again", tmp_path / "cache")     # the reference's from the cache, the window's in the worker
    assert started == [1, 1]
    assert here.model_dump(mode="json") == there.model_dump(mode="json") == again.model_dump(mode="json")
    assert here.teacher.rows == 40 and here.embedding is not None and here.quality.teacher_labels
