"""shrinkflow.projectlock: one writer per project, across processes, and
the flows a scheduler starts refused while a run holds the project."""

from __future__ import annotations

import os
import subprocess
import sys
import time

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
        assert holder(root).startswith("the shrinkflow-lifecycle flow (pid ")
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
    marker.mkdir(parents=True)                      # the lifecycle removes it first (production_for_run: no window)
    with pytest.raises(ProjectBusy, match=f"pid {proc.pid}"):
        lifecycle(project_dir=str(root))
    assert marker.is_dir()                          # nothing touched
    # a scheduled run (wait_for_project_s: monitor.scheduled_wait_minutes) waits, then is refused
    from flows.monitor import monitor

    t0 = time.monotonic()
    with pytest.raises(ProjectBusy, match=rf"pid {proc.pid}, .*: the shrinkflow-monitor flow \(acting\) waited 2 s"):
        monitor(project_dir=str(root), wait_for_project_s=2)
    assert time.monotonic() - t0 >= 2


HOLD_AND_REPRO = ("import sys\n"
                  "from shrinkflow.dvcrun import repro_stage\n"
                  "from shrinkflow.projectlock import hold\n"
                  "hold(sys.argv[1], 'shrinkflow run')\n"
                  "repro_stage('toy', sys.argv[1], echo=lambda line: None)\n")


def test_a_writer_that_may_wait_runs_once_the_holder_ends_and_is_refused_after_its_wait(tmp_path):
    """A scheduled run that met a run someone started by hand failed at
    once; the next firing was an interval (the lifecycle: a week) away."""
    root = tmp_path / "project"
    root.mkdir()
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    brief = subprocess.Popen([sys.executable, "-c", HOLD.replace("time.sleep(120)", "time.sleep(2)"), str(root)],
                             stdout=subprocess.PIPE, text=True, env=env)
    assert brief.stdout.readline().strip() == "held"
    said, ran = [], []
    t0 = time.monotonic()
    with project_lock(root, "the shrinkflow-lifecycle flow", wait_s=60, on_wait=said.append):
        ran.append(time.monotonic() - t0)           # entered only once the holder had ended (~2 s)
    assert brief.wait(timeout=30) == 0
    assert ran[0] >= 1.0
    assert len(said) == 1 and said[0].startswith(f"`shrinkflow run --params A` (pid {brief.pid}, since ")
    assert said[0].endswith("): the shrinkflow-lifecycle flow waits up to 60 s for it to end")
    long = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert long.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(ProjectBusy, match=rf"pid {long.pid}, .*: the shrinkflow-lifecycle flow waited 1 s for it "
                                              r"and was refused \(nothing was started or changed\)"):
            with project_lock(root, "the shrinkflow-lifecycle flow", wait_s=1):
                ran.append("entered")
        assert 1 <= time.monotonic() - t0 < 30 and len(ran) == 1
    finally:
        long.kill()
        long.wait()


def _dvc_project(root, files: dict) -> dict:
    """A DVC project (no git) at ``root`` holding ``files``; returns the
    environment its runs use (this checkout importable, this Python's DVC)."""
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(text)
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, env=env, check=True,
                   timeout=120)
    return env


def _stage_pid(run: subprocess.Popen, pid_file) -> int:
    """The pid the run's stage writes to ``pid_file`` once it has started."""
    deadline = time.monotonic() + 120
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        assert run.poll() is None, "the run ended before its stage started"
        time.sleep(0.2)
    return int(pid_file.read_text())


def _ended(pid: int) -> bool:
    """The process is gone, or a zombie (ended, not yet reaped by init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


def test_a_holder_killed_mid_stage_leaves_the_project_held_until_its_dvc_child_ends(tmp_path):
    """A helper's finding: ``kill -9`` of a run freed the lock while its
    orphaned ``dvc repro`` still wrote the stage's outs and dvc.lock; a
    second writer started beside it. DVC now shares the lock's descriptor."""
    import signal

    from tests.test_cli_repro import DVC_YAML, TOY

    root = tmp_path / "toy"
    # in.txt "sleep": the stage writes sleeper.pid, then sleeps
    env = _dvc_project(root, {"toy.py": TOY, "dvc.yaml": DVC_YAML, "in.txt": "sleep\n"})
    run = subprocess.Popen([sys.executable, "-c", HOLD_AND_REPRO, str(root)], env=env)
    stage_pid = _stage_pid(run, root / "sleeper.pid")
    try:
        run.kill()                                  # SIGKILL: no cleanup, DVC goes on
        run.wait()
        with pytest.raises(ProjectBusy, match=rf"`shrinkflow run` \(pid {run.pid}, since .*\), which no longer "
                                              r"runs, left a DVC process it started that still holds the project "
                                              r"\(it stops within seconds"):
            with project_lock(root, "shrinkflow run"):
                pass
    finally:
        os.kill(stage_pid, signal.SIGKILL)          # the stage ends; DVC reports it failed and exits
    deadline = time.monotonic() + 60
    while True:
        try:
            with project_lock(root, "shrinkflow run"):
                break
        except ProjectBusy:
            assert time.monotonic() < deadline, "the project stayed held after DVC ended"
            time.sleep(0.2)


STUBBORN_STAGE = """\
import os, pathlib, signal, sys, time
from stages.common import run_stage


def body(params, root):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # as a stage whose Prefect flow catches SIGTERM
    pathlib.Path("stage.pid").write_text(str(os.getpid()))
    time.sleep(300)
    pathlib.Path("out.txt").write_text("done")


sys.exit(run_stage("stubborn", body))
"""


@pytest.mark.parametrize("how", ["SIGTERM to the run's process group", "SIGKILL to the run"])
def test_no_stage_outlives_the_run_that_started_it(tmp_path, how):
    """A helper's findings: `timeout` (SIGTERM to the whole group) killed
    `dvc repro` at once while the stage, whose Prefect flow catches SIGTERM,
    went on writing after the run released the project lock; after a
    `kill -9` of the run, DVC died at its next output line and left the
    stage behind. The stage watches the run that started it and ends with it."""
    import signal

    root = tmp_path / "project"
    env = _dvc_project(root, {
        "stubborn.py": STUBBORN_STAGE, "params.yaml": (PROJECT_ROOT / "params.yaml").read_text(),
        "dvc.yaml": "stages:\n  stubborn:\n    cmd: python stubborn.py\n    deps: [stubborn.py]\n"
                    "    outs: [out.txt]\n"})
    run = subprocess.Popen([sys.executable, "-c", HOLD_AND_REPRO.replace("'toy'", "'stubborn'"), str(root)],
                           env=env, start_new_session=True)
    stage = _stage_pid(run, root / "stage.pid")
    try:
        if how.startswith("SIGTERM"):
            os.killpg(run.pid, signal.SIGTERM)
        else:
            run.kill()
        run.wait(timeout=60)
        deadline = time.monotonic() + 20
        while not _ended(stage) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _ended(stage), f"the stage (pid {stage}) outlived the run ({how})"
        assert not (root / "out.txt").exists()
    finally:
        try:
            os.kill(stage, signal.SIGKILL)
        except ProcessLookupError:
            pass
