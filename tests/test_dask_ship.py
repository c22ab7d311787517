"""Candidates built on a Dask cluster whose workers do not see the project
(compress.runner.dask_address, shrinkflow.compress.ship): a real `dask
scheduler` and two `dask worker` processes on loopback, each started in an
empty directory of its own and (where the machine allows it: root, here) in
a mount namespace where pytest's temporary directories (the project, the
tiny teacher) are hidden under an empty tmpfs. The inputs travel through
Dask, the candidates come back hash-checked into the candidate cache; a
worker killed mid-build is restarted by its nanny and the build completes on
a live worker."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from shrinkflow.config import Candidate, DistillStep, QuantizeStep
from tests.conftest import PROJECT_ROOT

# The tiny teacher has 2 layers: a 1-layer student of its layer 0.
STUDENT = Candidate(name="student", recipe=(DistillStep(layers=(0,), epochs=1), QuantizeStep()))
INT8 = Candidate(name="int8", recipe=(QuantizeStep(),))
# What a build imports, loaded by each worker's nanny before it forks the worker.
PRELOAD = ("torch", "transformers", "onnx", "onnxruntime", "tasks.compress", "shrinkflow.compress.ship")
# How the workers are kept from seeing pytest's temporary directories: an
# empty tmpfs mounted over them in a mount namespace of their own.
HIDE = ["unshare", "-m", "--propagation", "private", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$0" && exec "$@"']


def can_hide(path: Path) -> bool:
    """Whether this machine lets us mount over ``path`` in a private mount
    namespace (root, and a container that allows it); warns when not."""
    import warnings

    ok = shutil.which("unshare") is not None and subprocess.run(
        [*HIDE, str(path), "true"], capture_output=True).returncode == 0
    if not ok:
        warnings.warn("cannot hide the project from the Dask workers here (unshare/mount not permitted): "
                      "they run without the mount namespace and could read it")
    return ok


def dask_cli() -> str:
    return str(Path(sys.executable).with_name("dask"))


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory, prefect_api):
    """A `dask scheduler` and two `dask worker`s (one single-threaded worker
    process each, under a nanny) on loopback. Yields (address, a Client, the
    directory the processes run in, a function returning their logs, whether
    pytest's temporary directories are hidden from them)."""
    from distributed import Client

    from tests.netports import free_port

    base = Path(tempfile.mkdtemp(prefix="shrinkflow-dask-"))  # outside pytest's tree: the workers see it
    hidden = tmp_path_factory.getbasetemp()
    hide = can_hide(hidden)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = []

    def start(name: str, *args: str) -> None:
        home = base / name
        home.mkdir()
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "HOME": str(home), "TMPDIR": str(home),
               "PREFECT_HOME": str(home / ".prefect"), "PREFECT_API_URL": prefect_api,
               "SHRINKFLOW_CACHE_DIR": str(home / "cache"),
               # the nanny imports the build's libraries once (--preload-nanny) and
               # forks its worker process: a restarted worker is up in a second
               "DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD": "fork"}
        cmd = [dask_cli(), *args]
        if hide:
            cmd = [*HIDE, str(hidden), *cmd]
        log = open(base / f"{name}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))

    start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard")
    for name in ("worker-a", "worker-b"):
        start(name, "worker", address, "--host", "127.0.0.1", "--nworkers", "1", "--nthreads", "1",
              "--no-dashboard", "--name", name, "--local-directory", str(base / name),
              *[a for m in PRELOAD for a in ("--preload-nanny", m)])

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(base.glob("*.log")))

    try:
        client = Client(address, timeout=120)
        try:
            client.wait_for_workers(2, timeout=120)
        except Exception:
            raise AssertionError("the workers did not join:\n" + logs())
        yield address, client, base, logs, hide
        client.close()
    finally:
        # Throwaway processes holding nothing: their whole groups (nanny and
        # forked worker) go at once, not through a graceful close of each.
        for proc, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for proc, log in procs:
            proc.wait(timeout=30)
            log.close()
        shutil.rmtree(base, ignore_errors=True)


def dask_project(tmp_path: Path, tiny_teacher_dir: Path, small_splits, address: str, candidates) -> Path:
    """A project with the tiny teacher, the training split and ``candidates``,
    built on the scheduler at ``address`` (the workers do not share its disk)."""
    root = tmp_path / "proj"
    shutil.copytree(tiny_teacher_dir, root / "models" / "teacher")
    (root / "data" / "prepared").mkdir(parents=True)
    (root / "data" / "unlabelled" / "warm_start").mkdir(parents=True)
    (root / "data" / "unlabelled" / "texts.txt").write_text("")
    shutil.copy(PROJECT_ROOT / "dvc.yaml", root / "dvc.yaml")
    small_splits["train"].to_parquet(root / "data" / "prepared" / "train.parquet", index=False)
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["train"]["threads"] = 2
    params["compress"]["runner"] = {"kind": "dask", "max_workers": 2, "dask_address": address}
    params["compress"]["candidates"] = [c.model_dump(mode="json") for c in candidates]
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def worker_frames(logs: str, n: int = 6) -> str:
    """The last ``n`` traceback places (``file.py:line function``) in the
    processes' ``logs``, innermost first: where a build failed on a worker."""
    places = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', logs)[-n:]
    return " < ".join(f"{Path(f).name}:{line} {fn}" for f, line, fn in reversed(places)) or "none logged"


def compress_diagnosed(root: Path, logs) -> dict:
    """``compress(root)``; an exception from it carries the processes' logs
    and, last, the workers' last logged traceback (after which the suite's
    report hook says where it was raised here): a rare failure on CI shows
    that line."""
    try:
        return compress(root)
    except Exception as exc:
        if not isinstance(exc, AssertionError):
            text = logs()
            exc.add_note(text)
            exc.add_note(f"the workers' last traceback: {worker_frames(text)}")
        raise


def compress(root: Path) -> dict:
    from shrinkflow.files import read_json
    from shrinkflow.paths import METRICS_COMPRESS
    from stages.common import run_stage
    from stages.compress import compress as stage

    assert run_stage("compress", stage, root) == 0
    return read_json(root / METRICS_COMPRESS)["candidates"]


def built_by(record: dict) -> int:
    """The process id in a shipped build's ``built_on``."""
    return int(re.search(r"\(pid (\d+),", record["built_on"]).group(1))


def assert_in_cache(root: Path, name: str) -> None:
    """The candidate in the project is, file for file, an entry of the
    candidate cache, whose recorded sha256 its files match."""
    from shrinkflow.compress.cache import BUILD_INFO
    from shrinkflow.files import file_hashes, read_json
    from shrinkflow.paths import CANDIDATE_CACHE, CANDIDATES

    placed = file_hashes(root / CANDIDATES / name)
    assert any(read_json(entry / BUILD_INFO)["files"] == placed == file_hashes(entry / "model")
               for entry in (root / CANDIDATE_CACHE).iterdir() if not entry.name.startswith(".")), name


@pytest.mark.slow  # a scheduler, two workers and Prefect's test server: about 30 s
def test_candidates_built_on_workers_that_cannot_see_the_project(dask_cluster, tmp_path, tiny_teacher_dir,
                                                                  small_splits):
    """Two candidates (one distilled: its student sidecar comes back too) on
    two workers; the worker that starts a build first is SIGKILLed mid-build:
    its nanny restarts it, Dask runs the build again, and every
    candidate lands whole, built by a live worker, hash-checked in the
    candidate cache. A second run copies both from the client's cache."""
    from shrinkflow.files import file_hashes
    from shrinkflow.paths import CANDIDATES, STUDENTS
    from shrinkflow.predictors import load_predictor

    address, client, base, logs, hidden = dask_cluster
    root = dask_project(tmp_path, tiny_teacher_dir, small_splits, address, [INT8, STUDENT])
    seen = client.run(os.path.exists, str(root / "models" / "teacher"))
    assert len(seen) == 2
    if hidden:
        assert not any(seen.values()), seen  # the workers really cannot see the project
    before = client.run(os.getpid)
    named = {info["name"]: address for address, info in client.scheduler_info()["workers"].items()}
    killed: list[tuple[str, int]] = []

    def kill_the_first_builder():
        # mid-build: the worker has made its scratch project (ship.build_shipped)
        deadline = time.time() + 120
        while time.time() < deadline:
            for name, worker in named.items():
                if any((base / name).glob("shrinkflow-build-*")):
                    os.kill(before[worker], signal.SIGKILL)
                    killed.append((name, before[worker]))
                    return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_the_first_builder, daemon=True)
    watcher.start()
    records = compress_diagnosed(root, logs)
    watcher.join(timeout=5)
    assert killed, "no build was seen on a worker:\n" + logs()
    (killed_name, killed_pid), = killed
    assert set(records) == {"int8", "student"}, logs()
    for name, r in records.items():
        # built by a live worker process (not here, not the killed one), in its own temporary directory
        assert r["cached"] is False and built_by(r) not in (killed_pid, os.getpid()), (r, killed)
        assert str(base) in r["built_on"]
        assert_in_cache(root, name)
        assert load_predictor(root / CANDIDATES / name, threads=1).predict_logits(["a good film"]).shape == (1, 2)
    assert (root / STUDENTS / "student" / "student.safetensors").is_file()  # the sidecar came back too
    # the teacher's outputs stayed on the worker's host, in its own cache
    assert any((base / name / "cache" / "teacher_outputs").glob("*/entry.json") for name in named), logs()
    assert not (root / ".shrinkflow" / "cache" / "teacher_outputs").exists()
    assert not any((root / ".shrinkflow" / "incoming").iterdir())
    assert not any(p.name.startswith(".") for p in (root / CANDIDATES).iterdir())  # no half-written candidate
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed worker
    assert killed_pid not in client.run(os.getpid).values()
    # what SIGKILL leaves behind (docs/team.md): the dead build's scratch project, on the worker's host only
    assert any((base / killed_name).glob("shrinkflow-build-*"))

    # Prefect's record: the killed attempt is not left "Running"; each build's task run completed
    from prefect import get_client

    with get_client(sync_client=True) as prefect:
        shipped = [r for r in prefect.read_task_runs() if r.name.endswith("(shipped)")]
    assert sorted((r.name, r.state_name) for r in shipped) == [("build int8 (shipped)", "Completed"),
                                                              ("build student (shipped)", "Completed")]

    first = {n: file_hashes(root / CANDIDATES / n) for n in records}
    again = compress_diagnosed(root, logs)  # unchanged: copied from the client's cache, nothing shipped
    assert {n: r["cached"] for n, r in again.items()} == {n: True for n in records}
    assert all("built_on" not in r for r in again.values())
    assert {n: file_hashes(root / CANDIDATES / n) for n in again} == first


def test_shipped_files_are_checked_both_ways(tmp_path, tiny_teacher_dir, small_splits, monkeypatch):
    """In one process, the parts a worker and the client run: a warm-start
    sidecar travels with its candidate; a changed byte, a path out of the
    directory or other software is refused, and nothing is stored or placed."""
    from shrinkflow.compress.keys import candidate_keys
    from shrinkflow.compress.ship import (FileSet, build_shipped, pack_inputs, pack_warm_start, receive,
                                         receive_all)
    from shrinkflow.errors import RemoteBuildError
    from shrinkflow.paths import CANDIDATE_CACHE, CANDIDATES, STUDENTS, WARM_START

    monkeypatch.setenv("SHRINKFLOW_CACHE_DIR", str(tmp_path / "worker-cache"))
    root = dask_project(tmp_path, tiny_teacher_dir, small_splits, "tcp://127.0.0.1:1", [STUDENT])
    inputs = pack_inputs(root)
    assert pack_warm_start(root, STUDENT, inputs.teacher_hash) is None
    built = build_shipped(inputs, STUDENT, None, opset=17, threads=1)
    assert built.student is not None and built.record["cached"] is False

    def tampered(files: FileSet, name: str) -> FileSet:
        data = dict(files.data)
        data[name] = data[name][:-1] + bytes([data[name][-1] ^ 1])
        return FileSet(data, files.sha256)

    key = candidate_keys(root, [STUDENT], 17, 1, False)["student"]
    bad = [replace(built, model=tampered(built.model, "model.onnx")),
           replace(built, student=tampered(built.student, "student.safetensors")),
           replace(built, student=None),
           replace(built, model=FileSet({**built.model.data, "../evil": b"x"},
                                        {**built.model.sha256, "../evil": hashlib.sha256(b"x").hexdigest()}))]
    for b in bad:
        with pytest.raises(RemoteBuildError):
            receive(root, STUDENT, b, key)
        assert not (root / CANDIDATES / "student").exists() and not (root / STUDENTS / "student").exists()
        assert not (root / CANDIDATE_CACHE).exists() and not (tmp_path / "evil").exists()
    with pytest.raises(RemoteBuildError, match="do not match the sha256"):
        build_shipped(replace(inputs, files=tampered(inputs.files, "data/prepared/train.parquet")), INT8, None,
                      opset=17, threads=1)
    other = {**inputs.software, "code": "0" * 64}
    with pytest.raises(RemoteBuildError, match="other shrinkflow code"):
        build_shipped(replace(inputs, software=other), INT8, None, opset=17, threads=1)

    def failed_build():
        raise RuntimeError("the worker's build of 'broken' failed")

    # a failed build does not cost the candidates that came back: they land, then the failure is raised
    with pytest.raises(RuntimeError, match="build of 'broken' failed"):
        receive_all(root, [(Candidate(name="broken"), failed_build), (STUDENT, lambda: built)], {"student": key})
    assert_in_cache(root, "student")
    assert not (root / CANDIDATES / "broken").exists()
    assert receive(root, STUDENT, built, key)["built_on"] == built.built_on  # again: the cached entry stays
    assert_in_cache(root, "student")
    # the student as a re-compression stages it: the next build starts from it, on the worker
    shutil.copytree(root / STUDENTS / "student", root / WARM_START / "student")
    sidecar = pack_warm_start(root, STUDENT, inputs.teacher_hash)
    assert sidecar is not None and "data/unlabelled/warm_start/student/student.safetensors" in sidecar.data
    warm = build_shipped(inputs, STUDENT, sidecar, opset=17, threads=1)
    assert warm.record["warm_start_from"]


def test_an_unreachable_scheduler_is_one_clear_line(tmp_path, tiny_teacher_dir, small_splits, capsys):
    from tests.netports import free_port
    from shrinkflow.paths import CANDIDATES
    from stages.common import run_stage
    from stages.compress import compress as stage

    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    root = dask_project(tmp_path, tiny_teacher_dir, small_splits, address, [INT8])
    assert run_stage("compress", stage, root) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: compress: the Dask scheduler at {address} (compress.runner.dask_address) "
                              "does not answer: [Errno 111]"), err
    assert not (root / CANDIDATES).exists()  # nothing was built
