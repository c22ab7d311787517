"""Shared fixtures: real data (a small slice), a tiny model, offline env.

Nothing is mocked: the data comes from the real vaderSentiment sdist (fetched
once from the package index, then cached), models are real (tiny) BERTs.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from shrinkflow.bootstrap import configure_env

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# The suite is an entry point like any other: the one bootstrap, except that
# Prefect's home is a temporary directory (set first; the bootstrap never
# overrides), so the tests never write to ~/.prefect or the checkout's .prefect/.
# Made only where none is set (xdist's workers inherit the controller's), and removed at exit.
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="shrinkflow-prefect-home-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
configure_env(PROJECT_ROOT)


# The longest files first (longest processing time first), so the xdist
# workers (``--dist loadfile --no-loadscope-reorder``, pyproject.toml) end
# together instead of one running a long end-to-end file alone at the end:
# xdist's default order puts the files with the most tests first, which puts
# these (few tests, minutes each) last. Rough seconds per file on the 2-core
# AMD EPYC (``pytest --durations``, 2026-12-01); order only, no test depends
# on another.
SLOW_FILES_FIRST = ("test_e2e.py",               # ~330 s: 16 tests, several full runs
                    "test_e2e_warm_start.py",    # ~160 s alone (Xeon): a run, a re-compression, two retrains
                    "test_e2e_lifecycle.py",     # ~160 s
                    "test_e2e_own_task.py",      # ~135 s alone, ~240 s beside the others: a run, a re-compression, a retrain
                    "test_monitor_robust.py",    # ~105 s
                    "test_team.py",              # ~100 s
                    "test_monitor_dashboard.py",  # ~50 s
                    "test_multiclass_serving.py",
                    "test_schedule.py",
                    "test_sweep.py",
                    "test_prediction_cache.py",
                    "test_multiclass_eval.py",
                    "test_cli_repro.py",
                    "test_cli_ui.py",
                    "test_data_files.py")


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject.toml): 3 workers for the full suite, 2 for the
    quick one (``-m "not slow"``), whatever the machine's cores.

    Measured on the 2-core AMD EPYC, the same code one run after the other
    (2026-12-02): the full suite 813 s with 3 workers against 872 s with 2
    (1.84 cores busy on average against 1.67: the end-to-end tests wait on
    servers, schedulers and child processes, and a third worker fills those
    waits); the quick suite 184 s against 172 s (its tests wait little, and
    each worker builds the session fixtures, the tiny teacher among them,
    once more). ``-n N`` on the command line overrides it."""
    markexpr = config.getoption("markexpr", "") or ""
    return 2 if "not slow" in markexpr else 3


def pytest_collection_modifyitems(config, items):
    """Run ``SLOW_FILES_FIRST`` first, in that order; every other file after
    them in its usual order (each file's tests keep theirs)."""
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    order = {id(item): n for n, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(Path(str(item.fspath)).name, len(rank)), order[id(item)]))


def cmdline_of(proc) -> str:
    """A process's command line joined by spaces, or "" for one that is a
    zombie or gone: a short-lived child in a tree (of a stage, DVC, a Prefect
    server), not yet reaped, raises psutil's ZombieProcess (a fresh-clone run
    of tests/test_sweep.py did)."""
    import psutil

    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):   # ZombieProcess is a NoSuchProcess
        return ""


def innermost_frames(tb, n: int = 6) -> str:
    """The innermost ``n`` places of traceback ``tb``, innermost first, as
    ``file.py:line function`` joined by " < "; a place repeated in a row (a
    recursion) is written once, with ``xN``."""
    import traceback
    from itertools import groupby, islice

    places = (f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(traceback.extract_tb(tb)))
    runs = ((place, sum(1 for _ in same)) for place, same in groupby(places))
    return " < ".join(p if k == 1 else f"{p} x{k}" for p, k in islice(runs, n))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failure that is not an assertion of the test's own (an exception
    raised anywhere below it) names where it was raised in its short-summary
    line (``-ra``), the last thing a CI log shows: ``[raised at f.py:12 g <
    ...]``. A rare failure on CI is then placed without its full report."""
    report = yield
    excinfo = call.excinfo
    if report.failed and excinfo is not None and not isinstance(excinfo.value, AssertionError):
        crash = getattr(report.longrepr, "reprcrash", None)
        if crash is not None:
            crash.message += f" [raised at {innermost_frames(excinfo.tb)}]"
    return report


def reopen_log_streams() -> list[str]:
    """Point every logging handler whose stream is closed at this moment's
    ``sys.stderr``; returns the names of the loggers it fixed.

    Prefect's console handler takes its stream once, when Prefect sets its
    logging up (``stream: ext://sys.stderr``, resolved then): set up inside
    a test that had replaced sys.stderr (click's CliRunner, capsys), it
    keeps that test's stream after it was closed. A later test of the same
    worker that runs a flow in this process then met "I/O operation on
    closed file" on every record, and the handlers' error reports recursed
    to a RecursionError (CI: test_projectlock, at random by which tests a
    worker ran first)."""
    import logging
    import sys

    fixed = []
    loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values()
                                      if isinstance(x, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            if stream is None or not getattr(stream, "closed", False):
                continue
            handler.acquire()   # not setStream: it flushes the closed stream first, and raises
            try:
                handler.stream = sys.stderr
            finally:
                handler.release()
            console = getattr(handler, "console", None)   # Prefect's: a rich Console on the same stream
            if console is not None:
                console.file = sys.stderr
            fixed.append(logger.name)
    return fixed


@pytest.fixture(autouse=True)
def _log_streams_open():
    """Every test starts with no logging handler writing to a closed stream
    (``reopen_log_streams``)."""
    reopen_log_streams()
    yield


def chromium_dom(url: str, budget_ms: int = 5000, timeout_s: float = 120) -> str:
    """The DOM of ``url`` after its scripts ran for ``budget_ms`` of virtual
    time, in Debian's headless Chromium (what a person's browser would show)."""
    chrome = shutil.which("chromium")
    assert chrome, "chromium is not installed (scripts/setup.sh installs Debian's package)"
    proc = subprocess.run([chrome, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def wait_for_line(proc: subprocess.Popen, pattern: str, what: str, timeout_s: float = 180) -> tuple[str, list[str]]:
    """Read ``proc``'s text stdout line by line until one matches
    ``pattern`` (re.search); return the match's first group and the lines
    read. Then a daemon thread keeps draining stdout into the same list, so
    the child never blocks on a full pipe. Fails the test, with the output,
    when the process exits or ``timeout_s`` passes first."""
    lines: list[str] = []
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        line = proc.stdout.readline()
        assert line, f"{what} exited early:\n" + "".join(lines)
        lines.append(line)
        found = re.search(pattern, line)
        if found:
            threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
            return found.group(1), lines
    raise AssertionError(f"{what} printed no line matching {pattern!r} in {timeout_s:.0f} s:\n" + "".join(lines))


def terminate_group(proc: subprocess.Popen, timeout_s: float = 60) -> int:
    """SIGTERM ``proc`` (a child started with ``start_new_session=True``) if it
    still runs and return its exit code; when it outlives ``timeout_s``, kill
    its whole process group and fail the test."""
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def bare_project(tmp_path: Path) -> Path:
    """A project directory holding only this checkout's dvc.yaml and params.yaml."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(PROJECT_ROOT / name, root / name)
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    default = Path.home() / ".cache" / "shrinkflow"
    path = Path(os.environ.get("SHRINKFLOW_CACHE_DIR", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def raw_archive(tmp_path_factory, cache_dir) -> Path:
    from shrinkflow.config import DataSource
    from shrinkflow.data import fetch_source

    return fetch_source(DataSource(), tmp_path_factory.mktemp("raw") / "source.tar.gz", cache_dir)


@pytest.fixture(scope="session")
def small_splits(raw_archive):
    from shrinkflow.config import DataParams
    from shrinkflow.data import prepare

    splits, _ = prepare(raw_archive, DataParams(max_rows=400, max_shifted_rows=60))
    return splits


# A small real-looking 3-class task (support tickets), for the user's-files
# path: ``three_class_rows(n)`` gives n distinct (text, label) rows per class.
TICKET_WORDS = {
    "billing": ("invoice", "refund", "charged", "payment", "card", "receipt", "price", "subscription"),
    "outage": ("down", "error", "crash", "timeout", "unreachable", "failing", "broken", "offline"),
    "feature": ("please", "add", "would", "like", "support", "option", "export", "dark mode"),
}


def three_class_rows(n_per_class: int = 20, seed: int = 0) -> list[tuple[str, str]]:
    """``n_per_class`` tickets for each of billing, feature, outage, in a
    seeded interleaved order; every text distinct (up to case and spaces)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n_per_class):
        for label, words in TICKET_WORDS.items():
            picked = rng.sample(words, 3)
            rows.append((f"ticket {i}: {picked[0]} {picked[1]}, {picked[2]} ({label[:2]}{i})", label))
    return rows


@pytest.fixture()
def three_class_csv(tmp_path) -> Path:
    """A project-like folder with data/user/tickets.csv (text,label; 20 rows
    of each of 3 classes). Returns the csv's path."""
    import csv

    path = tmp_path / "data" / "user" / "tickets.csv"
    path.parent.mkdir(parents=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(three_class_rows())
    return path


@pytest.fixture(scope="session")
def tiny_train_params():
    from shrinkflow.config import RandomInitModel, TrainParams

    return TrainParams(model=RandomInitModel(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
                       epochs=6, batch_size=16, learning_rate=3e-3, max_seq_len=32, threads=1)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, small_splits, tiny_train_params) -> Path:
    """A real (tiny, random-init) BERT fine-tuned for one epoch, saved to disk."""
    from shrinkflow.modeling import save_torch_model
    from shrinkflow.train import train_teacher

    model, tok, _ = train_teacher(small_splits["train"], small_splits["val"], tiny_train_params, progress=False)
    return save_torch_model(model, tok, tmp_path_factory.mktemp("teacher") / "teacher",
                            tiny_train_params.max_seq_len)


@pytest.fixture(scope="session")
def prefect_api():
    """Prefect's test harness (a temporary API server and database), shared by
    the tests that run flows. Yields its URL for subprocesses to report to."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def pg_cluster():
    """A throwaway real PostgreSQL cluster (``shrinkflow.pgcluster``: the
    machine's initdb and pg_ctl, as the ``postgres`` user when we are root)
    on a free loopback port, with a ``shrinkflow`` database, for one test
    module. PGPASSFILE points libpq (this process and its children) at the
    cluster's password while the module runs. No fsync: throwaway data."""
    from shrinkflow.pgcluster import PgCluster

    # Directly under /tmp: the postgres user cannot traverse pytest's 0700
    # temporary directories.
    cluster = PgCluster(Path(tempfile.mkdtemp(prefix="shrinkflow-pg-")), durable=False)
    old = os.environ.get("PGPASSFILE")
    try:
        cluster.init()
        cluster.start()
        os.environ["PGPASSFILE"] = cluster.env()["PGPASSFILE"]
        cluster.create_database("shrinkflow")
        yield cluster
    finally:
        if old is None:
            os.environ.pop("PGPASSFILE", None)
        else:
            os.environ["PGPASSFILE"] = old
        cluster.destroy()


def pg_schema_url(cluster, schema: str | None = None) -> str:
    """A URL into a new, empty schema of ``cluster``'s shrinkflow database
    (libpq's options=-csearch_path): each test gets its own tables without
    paying for a database of its own."""
    import uuid

    return cluster.create_schema("shrinkflow", schema or f"t_{uuid.uuid4().hex[:12]}")
