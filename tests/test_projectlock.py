"""shrinkflow.projectlock: one writer per project, across processes, and
the flows a scheduler starts refused while a run holds the project."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shrinkflow.projectlock import ProjectBusy, holder, project_lock
from tests.conftest import PROJECT_ROOT

HOLD = ("import sys, time\n"
        "from shrinkflow.projectlock import hold\n"
        "hold(sys.argv[1], 'shrinkflow run --params A')\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n")


@pytest.fixture()
def held(tmp_path):
    """The project at tmp_path/project held by another process."""
    root = tmp_path / "project"
    root.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert proc.stdout.readline().strip() == "held"
    yield root, proc
    proc.kill()
    proc.wait()


def test_a_block_is_refused_while_another_process_holds_the_project_and_runs_once_it_died(held):
    root, proc = held
    assert holder(root).startswith(f"`shrinkflow run --params A` (pid {proc.pid}, since ")
    ran = []
    with pytest.raises(ProjectBusy, match=rf"`shrinkflow run --params A` \(pid {proc.pid}, since .*\) is changing "
                                          r"this project .*nothing was started or changed"):
        with project_lock(root, "the shrinkflow-lifecycle flow"):
            ran.append(1)
    assert ran == []
    proc.kill()
    proc.wait()                                     # killed: the OS released its lock
    with project_lock(root, "the shrinkflow-lifecycle flow"):
        with project_lock(root, "the shrinkflow-recompress flow"):   # reentrant in one process
            ran.append(2)
        assert holder(root).startswith("`the shrinkflow-lifecycle flow`")
    assert ran == [2]
    with project_lock(root, "again"):               # released at the end of the block
        pass


@pytest.mark.slow  # Prefect's test harness: ~30 s when no other test started it
def test_the_lifecycle_flow_a_scheduler_starts_is_refused_while_a_run_holds_the_project(held, prefect_api):
    """The CLI's lock alone did not cover a flow run a `shrinkflow schedule`
    or a team worker starts: it met DVC's own lock part way instead."""
    from flows.lifecycle import lifecycle

    root, proc = held
    from shrinkflow.paths import PRODUCTION_MODEL

    marker = root / PRODUCTION_MODEL
    marker.mkdir(parents=True)                      # the lifecycle's first act removes it (clear_production)
    with pytest.raises(ProjectBusy, match=f"pid {proc.pid}"):
        lifecycle(project_dir=str(root))
    assert marker.is_dir()                          # nothing touched
