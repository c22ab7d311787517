"""`shrinkflow monitor` without PREFECT_API_URL starts Prefect's ephemeral
API server itself, in its own process, before it imports Evidently and torch
(flows.cli.ephemeral_api); the flow then uses that server, this process
never imports Prefect's server app, and the server is gone once the command
exits. Real Prefect, in a subprocess of its own (a fresh PREFECT_HOME, no API
URL), as a user's shell runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import PROJECT_ROOT, cmdline_of

SCRIPT = r"""
import json, os, sys
from shrinkflow.bootstrap import configure_env
configure_env(".")
from flows.cli import ephemeral_api
from prefect.settings import PREFECT_HOME

seen = {}
log = PREFECT_HOME.value() / "temporary-server.log"
def preload():
    seen["launched_before_preload"] = log.is_file()

from prefect import flow
from prefect.client.orchestration import get_client

@flow
def which_api() -> str:
    from prefect import get_run_logger
    from prefect.runtime import flow_run

    get_run_logger().info("marker-7d1f")
    seen["flow_run_id"] = flow_run.id
    with get_client(sync_client=True) as client:
        client.hello().raise_for_status()
        return str(client.api_url)

with ephemeral_api(preload) as api_url:
    seen["api_url"] = api_url
    seen["flow_api"] = which_api()
    # The CLI's end: Prefect's log and event workers flushed and stopped
    # while the server runs, so logging's shutdown has none left to wait on.
    from flows.cli import flush_prefect_workers
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    flush_prefect_workers()
    seen["log_workers_left"] = len(APILogWorker._instances)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[seen["flow_run_id"]])))
    seen["logged"] = [l.message for l in logs]
seen["server_app_imported"] = "prefect.server.api.server" in sys.modules
# this command's server only (other tests' servers run beside it): tied to this process
mine = f"[f]lows.prefect_server --parent-pid {os.getpid()} uvicorn"
seen["server_pids"] = [int(p) for p in os.popen(f"pgrep -f '{mine}'").read().split()]
print("RESULT " + json.dumps(seen), flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow  # a Prefect server on a fresh database: 15-20 s
def test_the_monitor_cli_starts_the_ephemeral_api_beside_its_imports_and_the_flow_uses_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / ".prefect"), PYTHONPATH=str(PROJECT_ROOT))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert seen["launched_before_preload"]   # the server starts first, the imports beside it
    assert seen["api_url"].startswith("http://127.0.0.1:") and seen["api_url"].endswith("/api")
    assert seen["flow_api"].rstrip("/") == seen["api_url"]   # one server: the one started early
    assert not seen["server_app_imported"]   # Prefect's client never started one of its own
    assert "marker-7d1f" in seen["logged"] and seen["log_workers_left"] == 0
    assert "Starting temporary server on" in proc.stdout + proc.stderr
    assert "Stopping temporary server on" in proc.stdout + proc.stderr
    # the run is logged, but with no link into a server that is gone when the command ends
    assert "Beginning flow run" in proc.stdout + proc.stderr and "View at" not in proc.stdout + proc.stderr
    ours = seen["server_pids"]   # the watchdog's process, which runs uvicorn
    assert ours, "no server process was running inside the command"
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in ours) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in ours), "the temporary server outlived the command"


def test_with_an_api_url_it_does_nothing(tmp_path):
    """No server to start, so nothing to overlap: the imports are left to the
    flow (a monitor run that stops early never pays for them)."""
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "PREFECT_HOME": str(tmp_path / ".prefect"),
           "PYTHONPATH": str(PROJECT_ROOT)}
    script = ("import sys\nfrom flows.cli import ephemeral_api\n"
              "calls = []\nwith ephemeral_api(lambda: calls.append(1)) as url:\n    pass\n"
              "print(calls, url, 'evidently' in sys.modules, 'prefect.server.api.server' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["[]", "None", "False", "False"], proc.stdout
    assert not (tmp_path / ".prefect" / "temporary-server.log").exists()


def test_a_stage_gets_this_processs_ui_address_or_none():
    """`shrinkflow run` under Prefect's own temporary server printed a dead
    "View at" link from the compress stage, which derived a UI address from
    the API address it was given."""
    from prefect.settings import PREFECT_UI_URL, temporary_settings

    from tasks.dvc import stage_prefect_env

    with temporary_settings(updates={PREFECT_UI_URL: ""}):
        assert stage_prefect_env("http://127.0.0.1:5/api") == {"PREFECT_API_URL": "http://127.0.0.1:5/api",
                                                               "PREFECT_UI_URL": ""}
    with temporary_settings(updates={PREFECT_UI_URL: "http://127.0.0.1:4200"}):   # a real server's UI
        assert stage_prefect_env("http://127.0.0.1:4200/api")["PREFECT_UI_URL"] == "http://127.0.0.1:4200"


def _tied_server(run: subprocess.Popen, timeout_s: float = 120.0):
    """The temporary Prefect server ``run`` started, once it has: the child
    running it under flows.prefect_server's parent watchdog."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert run.poll() is None, "the run ended before its temporary server started"
        for child in psutil.Process(run.pid).children(recursive=True):
            cmd = cmdline_of(child)
            if "flows.prefect_server" in cmd and "prefect.server.api.server:create_app" in cmd:
                return child
        time.sleep(0.2)
    raise AssertionError("no temporary Prefect server was started")


@pytest.mark.slow  # two Prefect server starts: ~40 s
def test_a_run_stopped_by_sigterm_or_killed_leaves_no_prefect_server_behind(tmp_path):
    """A helper's finding: `shrinkflow run` let Prefect's client start its
    own temporary server, untied to the CLI; SIGTERM (timeout, systemd,
    docker stop) or SIGKILL left it running, orphaned, ~230 MB each."""
    import signal

    import psutil

    from tests.e2e import copy_project

    project = copy_project(tmp_path / "project")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({"PREFECT_HOME": str(project / ".prefect"), "PYTHONPATH": str(PROJECT_ROOT)})
    for sig, code in ((signal.SIGTERM, 130), (signal.SIGKILL, -signal.SIGKILL)):
        run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run"], cwd=project, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            server = _tied_server(run)
            run.send_signal(sig)
            _, err = run.communicate(timeout=120)
            assert run.returncode == code, err[-3000:]
            if sig == signal.SIGTERM:       # said as an interrupt, as Ctrl-C is
                assert err.rstrip().endswith("interrupted"), err[-3000:]
            try:
                server.wait(timeout=60)     # SIGTERM: stopped on the way out; SIGKILL: by its watchdog
            except psutil.TimeoutExpired:
                server.kill()
                raise AssertionError(f"the temporary Prefect server outlived the run ({sig.name})") from None
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
