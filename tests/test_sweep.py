"""The compress stage (stages/compress.py): its candidate sweep on Prefect task runners (real Dask)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT, cmdline_of


def sweep_project(tmp_path: Path, tiny_teacher_dir: Path, small_splits, runner: dict) -> Path:
    root = tmp_path / "proj"
    shutil.copytree(tiny_teacher_dir, root / "models" / "teacher")
    (root / "data" / "prepared").mkdir(parents=True)
    (root / "data" / "unlabelled").mkdir(parents=True)
    (root / "data" / "unlabelled" / "texts.txt").write_text("")
    shutil.copy(PROJECT_ROOT / "dvc.yaml", root / "dvc.yaml")
    small_splits["train"].to_parquet(root / "data" / "prepared" / "train.parquet", index=False)
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["train"]["threads"] = 2
    params["compress"]["runner"] = runner
    params["compress"]["candidates"] = [
        {"name": "int8", "recipe": [{"method": "quantize"}]},
        {"name": "vocab-int8", "recipe": [{"method": "vocab_prune"}, {"method": "quantize"}]},
    ]
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


@pytest.mark.parametrize("runner", [
    # a LocalCluster of worker processes starts in about 15 s
    pytest.param({"kind": "dask", "max_workers": 2}, marks=pytest.mark.slow),
    # slow too: the only quick test that would start Prefect's test server (about 20 s)
    pytest.param({"kind": "threads", "max_workers": 2}, marks=pytest.mark.slow)], ids=["dask-localcluster", "threads"])
def test_sweep_builds_every_candidate(tmp_path, tiny_teacher_dir, small_splits, prefect_api, runner):
    from stages.compress import compress
    from shrinkflow.files import read_json
    from shrinkflow.modeling import read_manifest
    from shrinkflow.paths import METRICS_COMPRESS
    from shrinkflow.predictors import load_predictor
    from stages.common import run_stage

    root = sweep_project(tmp_path, tiny_teacher_dir, small_splits, runner)
    assert run_stage("compress", compress, root) == 0
    doc = read_json(root / METRICS_COMPRESS)
    results = doc["candidates"]
    assert set(results) == {"int8", "vocab-int8"}
    # what the stage spent, and what each build cost, from the kernel's accounting
    assert doc["compute"]["cpu_seconds"] > 0 and doc["compute"]["wall_seconds"] > 0
    assert all(r["build_cpu_seconds"] > 0 for r in results.values())
    assert results["vocab-int8"]["vocab_size"] < 30522 and "vocab_size" not in results["int8"]
    for name in results:
        out = root / "models" / "candidates" / name
        assert read_manifest(out)["candidate"] == name
        assert load_predictor(out, threads=1).predict_logits(["a good film"]).shape == (1, 2)


@pytest.mark.slow
def test_local_cluster_workers_run_without_the_profiler():
    # the cluster the dask runner starts, from its own kwargs: no profiler
    # callbacks in the workers (dask/distributed#5109), the rest of their
    # config as the client's
    import dask
    from distributed import Client, LocalCluster

    from flows.compress import make_task_runner
    from shrinkflow.config import RunnerParams

    runner = make_task_runner(RunnerParams(kind="dask", max_workers=1))
    with LocalCluster(**runner.cluster_kwargs) as cluster, Client(cluster) as client:
        (callbacks,) = client.run(lambda dask_worker: sorted(dask_worker.periodic_callbacks)).values()
        (target,) = client.run(lambda: dask.config.get("distributed.worker.memory.target")).values()
    assert "heartbeat" in callbacks and not {"profile", "profile-cycle"} & set(callbacks)
    assert target == dask.config.get("distributed.worker.memory.target")


def test_make_task_runner_kinds():
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.compress import make_task_runner
    from shrinkflow.config import RunnerParams

    assert isinstance(make_task_runner(RunnerParams()), ThreadPoolTaskRunner)
    assert isinstance(make_task_runner(RunnerParams(kind="processes", max_workers=2)), ProcessPoolTaskRunner)
    assert isinstance(make_task_runner(RunnerParams(kind="dask", dask_address="tcp://127.0.0.1:8786")),
                      DaskTaskRunner)
    with pytest.raises(ValueError, match="dask_address is set"):
        RunnerParams(kind="threads", dask_address="tcp://127.0.0.1:8786")
    # a scheduler's workers get the inputs shipped unless they share the project's disk
    assert RunnerParams(kind="dask", dask_address="tcp://127.0.0.1:8786").ships_inputs
    assert not RunnerParams(kind="dask", dask_address="tcp://127.0.0.1:8786", dask_shared_filesystem=True).ships_inputs
    assert not RunnerParams(kind="dask").ships_inputs and not RunnerParams().ships_inputs
    with pytest.raises(ValueError, match="dask_shared_filesystem is set without dask_address"):
        RunnerParams(kind="dask", dask_shared_filesystem=True)


def test_a_worker_that_cannot_see_the_project_says_so(tmp_path):
    """The project location is explicit (absolute); a Dask worker on a machine
    without the project at that path fails with a message that says why."""
    from shrinkflow.config import Candidate
    from tasks.compress import build_candidate

    with pytest.raises(FileNotFoundError, match="same absolute path on every worker"):
        build_candidate.fn("relative/project", Candidate(name="c"), 17, 1)
    with pytest.raises(FileNotFoundError, match=r"no teacher at .*/models/teacher"):
        build_candidate.fn(str(tmp_path), Candidate(name="c"), 17, 1)


@pytest.mark.slow  # two compress flows through Prefect: about 10 s
def test_changing_one_recipe_rebuilds_only_that_candidate(tmp_path, tiny_teacher_dir, small_splits, prefect_api):
    """The per-candidate cache: a second compress run copies unchanged
    candidates (byte for byte) and rebuilds only the edited one; new window
    text rebuilds only the candidates whose recipe reads text; a corrupted
    cache entry is rebuilt, never served."""
    from stages.compress import compress
    from shrinkflow.config import load_params
    from shrinkflow.files import file_hashes, read_json
    from shrinkflow.paths import CANDIDATE_CACHE, METRICS_COMPRESS, UNLABELLED
    from stages.common import run_stage

    root = sweep_project(tmp_path, tiny_teacher_dir, small_splits, {"kind": "threads", "max_workers": 1})

    def run() -> dict:
        assert run_stage("compress", compress, root) == 0
        return {n: r["cached"] for n, r in read_json(root / METRICS_COMPRESS)["candidates"].items()}

    def files(name):
        return file_hashes(root / "models" / "candidates" / name)

    assert run() == {"int8": False, "vocab-int8": False}
    first = {n: files(n) for n in ("int8", "vocab-int8")}
    assert run() == {"int8": True, "vocab-int8": True}  # nothing changed: nothing rebuilt
    assert {n: files(n) for n in first} == first

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["compress"]["candidates"][1]["recipe"][0]["min_count"] = 2  # edit one recipe
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    load_params(root / "params.yaml")
    assert run() == {"int8": True, "vocab-int8": False}
    assert files("int8") == first["int8"]

    (root / UNLABELLED).write_text("a brand new production sentence\n")  # a window: vocab reads text
    assert run() == {"int8": True, "vocab-int8": False}

    for entry in (root / CANDIDATE_CACHE).iterdir():  # rot every cached model file
        for f in (entry / "model").iterdir():
            f.write_bytes(b"rot")
    assert run() == {"int8": False, "vocab-int8": False}
    assert files("int8") == first["int8"]  # rebuilt, identical to the first build


@pytest.mark.slow  # ~20 s: a Prefect server starts
def test_a_compress_stage_run_by_hand_and_stopped_mid_distillation_ends_at_once_and_leaves_no_prefect_server(
        tmp_path, tiny_teacher_dir, small_splits):
    """`python -m stages.compress` run by hand (as `dvc repro` runs it, no
    PREFECT_API_URL) starts a Prefect server for its build flow. Killed by
    SIGTERM (or the OOM killer), Prefect's own server was left running,
    orphaned (~230 MB each; seen after killed benchmark stages); the stage's
    server is tied to it now and ends with it.

    SIGTERM mid-distillation: the stage ran on until the distillation ended
    (38 s later for 300 epochs; the lifecycle SIGKILLs a stage 10 s after
    its SIGTERM, before its flow run recorded a state). Now the build ends at its
    next step (shrinkflow.stopping): the stage exits by the signal within
    seconds, its task recorded Crashed by the stop, and no candidate, whole
    or half-built, is left. This distillation would take minutes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from tests.conftest import PROJECT_ROOT

    root = sweep_project(tmp_path, tiny_teacher_dir, small_splits, {"kind": "threads", "max_workers": 1})
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["compress"]["candidates"] = [{"name": "long", "recipe": [
        {"method": "distill", "layers": [0], "epochs": 1000, "learning_rate": 3e-3}]}]
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=str(PROJECT_ROOT), PREFECT_HOME=str(tmp_path / "prefect-home"))
    log = tmp_path / "stage.log"
    with log.open("w") as out:
        stage = subprocess.Popen([sys.executable, "-m", "stages.compress"], cwd=root, env=env,
                                 stdout=out, stderr=subprocess.STDOUT)
    work = root / "models" / "candidates" / ".long.tmp"
    try:
        deadline, servers = time.time() + 120, []
        while time.time() < deadline and not (servers and work.exists()):
            time.sleep(0.5)
            assert stage.poll() is None, "the stage ended before its build started: " + log.read_text()[-3000:]
            servers = servers or [c for c in psutil.Process(stage.pid).children(recursive=True)
                                  if "prefect" in (cmd := cmdline_of(c)) and "server" in cmd]
        assert servers and work.exists(), log.read_text()[-3000:]
        time.sleep(3)   # into the build: the teacher's pass, or the distillation
        servers = [c for c in psutil.Process(stage.pid).children(recursive=True)]   # the server's whole tree
        stage.send_signal(signal.SIGTERM)
        stage.wait(timeout=30)
        assert stage.returncode == -signal.SIGTERM
        text = log.read_text()
        # stopped in the teacher's pass or in the distillation, whichever the signal found running
        assert "StopRequested: " in text and "stopped: the process was asked to stop" in text, text[-3000:]
        assert "Finished in state Crashed" in text, text[-3000:]
        assert "student in" not in text, text[-3000:]   # the distillation did not run to its end
        assert not work.exists() and not (root / "models" / "candidates" / "long").exists()
        _, alive = psutil.wait_procs(servers, timeout=30)
        leftover = [cmdline_of(p) for p in alive]
        for p in alive:   # a failing run leaves nothing behind either
            p.kill()
        assert not leftover, leftover
    finally:
        if stage.poll() is None:
            stage.kill()
