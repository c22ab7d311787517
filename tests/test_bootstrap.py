"""Entry points: telemetry off, Prefect state in the project, params read
once per stage and per run, and scoped to dvc.yaml."""

from __future__ import annotations

import os
import shutil

import pytest

from shrinkflow.bootstrap import OFFLINE_ENV, configure_env, declared_params
from tests.conftest import PROJECT_ROOT


@pytest.fixture
def project(tmp_path):
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(PROJECT_ROOT / name, tmp_path / name)
    return tmp_path


def test_configure_env_turns_telemetry_off_and_keeps_prefect_home_in_the_project(tmp_path):
    env = configure_env(tmp_path, {"DO_NOT_TRACK": "0"})
    assert env["DO_NOT_TRACK"] == "0"  # what the user set wins
    assert {k: env[k] for k in OFFLINE_ENV if k != "DO_NOT_TRACK"} == {
        k: v for k, v in OFFLINE_ENV.items() if k != "DO_NOT_TRACK"}
    assert env["PREFECT_HOME"] == str(tmp_path.resolve() / ".prefect")


def test_declared_params_read_dvc_yaml(project):
    assert declared_params("train", project) == {"train", "cost.country_iso_code"}
    assert declared_params("compress", project) == {"compress", "train.threads", "cost.country_iso_code"}
    with pytest.raises(KeyError, match="no stage 'nope'"):
        declared_params("nope", project)


def test_a_stage_gets_only_its_declared_keys(project, capsys):
    from stages.common import run_stage

    seen = {}

    def body(params, root):
        seen["threads"] = params.train.threads
        params.train.epochs  # not declared for compress

    with pytest.raises(AttributeError, match="stage 'compress' read params key 'train.epochs'"):
        run_stage("compress", body, project)
    assert seen["threads"] == 2


def test_a_stage_fails_if_params_change_while_it_runs(project, capsys):
    """DVC records params.yaml as it is when the stage ends: a stage whose
    outputs came from the old values must fail rather than be committed."""
    from stages.common import run_stage

    def body(params, root):
        assert root == project.resolve()
        text = (project / "params.yaml").read_text()
        (project / "params.yaml").write_text(text.replace("seed: 0", "seed: 1", 1))

    assert run_stage("data", body, project) == 1
    assert "params.yaml changed while the stage ran" in capsys.readouterr().err
    assert run_stage("data", lambda p, root: None, project) == 0


def test_bad_params_exit_2_before_the_stage_body(project, capsys):
    from stages.common import run_stage

    (project / "params.yaml").write_text("train: {epochs: -1}\n")
    called = []
    assert run_stage("train", lambda p, root: called.append(p), project) == 2
    assert not called and "train.epochs" in capsys.readouterr().err


STAGE_MAIN = """
import atexit, sys, threading, time
from pathlib import Path
from stages.common import main

def body(params, root):
    atexit.register(lambda: Path("atexit.txt").write_text("ran"))
    def late():
        time.sleep(0.3)
        Path("thread.txt").write_text("joined")
    threading.Thread(target=late).start()
    print("unflushed", end="")
    print("to stderr", end="", file=sys.stderr)
    if sys.argv[1] == "handled":
        from shrinkflow.errors import MissingInput
        raise MissingInput("a missing input")
    if sys.argv[1] == "bug":
        raise ZeroDivisionError("a bug")

main("data", body)
"""


@pytest.mark.parametrize("how, code", [("ok", 0), ("handled", 1), ("bug", 1)])
def test_a_stage_command_exits_with_its_code_after_threads_atexit_and_output(project, how, code):
    """stages.common.main skips only the interpreter's teardown: the code is
    run_stage's, non-daemon threads finish, atexit handlers run, and output
    still unflushed at exit arrives. A bug exits the usual way, traceback
    and all."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run([sys.executable, "-c", STAGE_MAIN, how], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == "unflushed"
    assert proc.stderr.startswith("to stderr")
    assert ("error: data: a missing input" in proc.stderr) == (how == "handled")
    assert ("ZeroDivisionError: a bug" in proc.stderr) == (how == "bug")
    assert (project / "atexit.txt").read_text() == "ran"
    assert (project / "thread.txt").read_text() == "joined"


def test_a_run_never_mixes_two_versions_of_params(project):
    from shrinkflow.errors import ParamsChanged
    from shrinkflow.dvcrun import check_params_unchanged, params_fingerprint

    fp = params_fingerprint(project)
    check_params_unchanged(project, fp, "data")
    (project / "params.yaml").write_text((project / "params.yaml").read_text() + "\n# edited\n")
    with pytest.raises(ParamsChanged, match="before stage 'train'"):
        check_params_unchanged(project, fp, "train")


def test_the_libraries_never_import_prefect_and_importing_them_touches_nothing(tmp_path):
    """Every module of shrinkflow/ and monitoring/, imported in a clean
    interpreter from an empty directory: no Prefect, tasks or flows loaded,
    no heavy framework imported eagerly, and no file or directory created."""
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT

    code = """
import importlib, pkgutil, sys
import shrinkflow, monitoring
names = []
for pkg in (shrinkflow, monitoring):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(m.name)
        names.append(m.name)
bad = sorted(k for k in sys.modules if k.split(".")[0] in ("prefect", "tasks", "flows", "torch", "evidently"))
print(len(names), bad)
"""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(PROJECT_ROOT), "HOME": str(tmp_path / "home")}
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    count, bad = proc.stdout.split(" ", 1)
    assert int(count) > 20 and bad.strip() == "[]", proc.stdout
    assert list(work.iterdir()) == [] and not (tmp_path / "home").exists()
