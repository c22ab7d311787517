"""shrinkflow.detached: a process that outlives its starter, found again by
its pid file, never mistaken for another process that got its pid, and
stopped with its whole process group."""

from __future__ import annotations

import os
import sys
import time

import psutil

from shrinkflow.detached import Detached, group_alive
from shrinkflow.files import read_json, write_json

# A parent that leaves a child in its group: stopping must end both.
PARENT_AND_CHILD = ("import subprocess, sys, time; "
                    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)")


def test_a_detached_process_runs_in_its_own_group_and_stops_with_it(tmp_path):
    d = Detached("sleeper", tmp_path / "run" / "sleeper.pid", tmp_path / "sleeper.log")
    assert d.record() is None and not d.running() and d.stop() is False
    pid = d.start([sys.executable, "-c", PARENT_AND_CHILD], dict(os.environ), cwd=tmp_path)
    assert d.pid == pid and os.getpgid(pid) == pid != os.getpgid(0)  # a session of its own
    assert read_json(d.pid_file)["command"][0] == sys.executable
    assert "starting sleeper:" in d.log_file.read_text()

    # Another process that got the same pid (simulated: another start time) is not ours.
    rec = read_json(d.pid_file)
    write_json(d.pid_file, {**rec, "create_time": rec["create_time"] - 3600})
    assert d.process() is None and not d.running()
    write_json(d.pid_file, rec)
    assert d.running()

    deadline = time.monotonic() + 60
    while not psutil.Process(pid).children() and time.monotonic() < deadline:
        time.sleep(0.1)
    (child,) = psutil.Process(pid).children()
    assert os.getpgid(child.pid) == pid
    assert d.stop(grace_s=5) is True
    assert not group_alive(pid) and not d.pid_file.exists()
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert d.stop() is False  # idempotent
