"""`shrinkflow monitor` without PREFECT_API_URL starts Prefect's ephemeral
API in a background thread while it imports Evidently and torch
(flows.cli.overlap_ephemeral_api); the flow then uses that server, not a
second one. Real Prefect, in a subprocess of its own (a fresh PREFECT_HOME,
no API URL), as a user's shell runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT

SCRIPT = r"""
import json, threading, time
from shrinkflow.bootstrap import configure_env
configure_env(".")
from flows.cli import overlap_ephemeral_api
from prefect.server.api.server import SubprocessASGIServer

seen = {}
def preload():
    seen["threads"] = sorted(t.name for t in threading.enumerate())
    seen["running_during_preload"] = SubprocessASGIServer().running

overlap_ephemeral_api(preload)
server = SubprocessASGIServer()
seen["running_after"] = server.running and server.server_process.poll() is None

from prefect import flow
from prefect.client.orchestration import get_client

@flow
def which_api() -> str:
    with get_client(sync_client=True) as client:
        client.hello().raise_for_status()
        return str(client.api_url)

seen["flow_api"] = which_api()
seen["server_api"] = server.api_url
print("RESULT " + json.dumps(seen))
"""


@pytest.mark.slow  # a Prefect server on a fresh database: 15-20 s
def test_the_monitor_cli_starts_the_ephemeral_api_beside_its_imports_and_the_flow_uses_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / ".prefect"), PYTHONPATH=str(PROJECT_ROOT))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert "prefect-ephemeral-api" in seen["threads"]   # started before the imports, beside them
    assert seen["running_after"]
    assert seen["flow_api"].rstrip("/") == seen["server_api"].rstrip("/")   # one server: the one started early


def test_with_an_api_url_it_does_nothing(tmp_path):
    """No server to start, so nothing to overlap: the imports are left to the
    flow (a monitor run that stops early never pays for them)."""
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "PREFECT_HOME": str(tmp_path / ".prefect"),
           "PYTHONPATH": str(PROJECT_ROOT)}
    script = ("import sys\nfrom flows.cli import overlap_ephemeral_api\n"
              "calls = []\noverlap_ephemeral_api(lambda: calls.append(1))\n"
              "from prefect.server.api.server import SubprocessASGIServer\n"
              "print(calls, SubprocessASGIServer().running, 'evidently' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["[]", "False", "False"], proc.stdout
