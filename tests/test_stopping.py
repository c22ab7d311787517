"""shrinkflow.stopping: the cooperative stop a build's loops check once per
step (the signal reaches only the main thread; the builds run in workers).
End to end, a compress stage sent SIGTERM mid-build: tests/test_sweep.py."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from shrinkflow.stopping import StopRequested, clear_stop, raise_if_stopped, request_stop, stop_requested


@pytest.fixture(autouse=True)
def cleared():
    clear_stop()
    yield
    clear_stop()


def test_a_stop_is_raised_by_every_loop_until_cleared():
    raise_if_stopped("nothing asked")   # no stop asked: returns
    assert not stop_requested()
    request_stop()
    request_stop()   # idempotent
    for where in ("distill [0]", "the teacher's pass"):
        with pytest.raises(StopRequested) as stopped:
            raise_if_stopped(where)
        assert str(stopped.value) == f"{where} stopped: the process was asked to stop"
    clear_stop()
    raise_if_stopped("after clear_stop")


def test_a_stop_is_not_an_exception_a_build_may_handle():
    """A BaseException, as KeyboardInterrupt: an ``except Exception`` lets it
    through, so no build treats a stop as a failure to recover from."""
    request_stop()
    with pytest.raises(StopRequested):
        try:
            raise_if_stopped("a loop")
        except Exception:   # noqa: BLE001  what a build's own handling would do
            pytest.fail("a requested stop was caught as an Exception")


def test_a_stop_asked_in_one_thread_ends_a_loop_in_another(tiny_teacher_dir, small_splits):
    """The distillation loop itself (kd_train, in a worker thread, as a task
    runner runs it) ends at its next step, and before the end of its epochs."""
    from shrinkflow.compress.distill import kd_train
    from shrinkflow.modeling import load_torch_model

    model = load_torch_model(tiny_teacher_dir)
    n = 64
    seqs = [[101, 2000 + i % 50, 102] for i in range(n)]
    labels = [i % 2 for i in range(n)]
    steps, outcome = [], {}

    def after_step():
        steps.append(1)
        if len(steps) == 3:
            request_stop()   # as the flow does when its main thread is interrupted

    def run():
        try:
            kd_train(model, seqs, np.zeros((n, 2), dtype=np.float32), np.asarray(labels), epochs=1000,
                     learning_rate=1e-3, temperature=2.0, alpha_kl=1.0, batch_size=8, warmup_fraction=0.0,
                     seed=0, threads=1, progress=False, after_step=after_step)
        except StopRequested as exc:
            outcome["stopped"] = str(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert outcome == {"stopped": "distill stopped: the process was asked to stop"}
    assert len(steps) == 3   # 1000 epochs of 8 steps asked; it ended at the step after the stop
