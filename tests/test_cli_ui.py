"""`shrinkflow ui` prints an address that opens a working Prefect UI.

Before: the README's `prefect server start` on any port but 4200, and the
address `shrinkflow schedule` printed, opened a UI saying "Can't connect to
Server API at http://127.0.0.1:4200/api": the UI asks the server which API to
call, and the server answered 4200 unless PREFECT_UI_API_URL (or
PREFECT_SERVER_API_PORT) said otherwise. flows.prefect_server.LocalPrefectServer,
which both commands use, now sets them to where it listens. The page is
rendered by headless Chromium, as a user's browser would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netports import free_port
from tests.conftest import PROJECT_ROOT, bare_project, chromium_dom, terminate_group, wait_for_line

CHROMIUM = "/usr/bin/chromium"




@pytest.mark.slow  # a real Prefect server starts (10-30 s here), then Chromium renders its UI
def test_the_printed_ui_address_opens_a_ui_connected_to_its_api(tmp_path):
    assert Path(CHROMIUM).is_file(), "headless Chromium is needed to render the UI"
    root = bare_project(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    port = free_port()  # not 4200: the port the UI used to assume
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--port", str(port)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url, lines = wait_for_line(proc, r"^Prefect UI: (http://\S+)", "ui")
        assert url == f"http://127.0.0.1:{port}", "".join(lines)
        dom = chromium_dom(f"{url}/runs", budget_ms=15000, timeout_s=180)
        assert "<title>Runs • Prefect Server" in dom, dom[-3000:]
        assert "Can't connect" not in dom, dom[-3000:]
        # the runs page rendered from the API's answer (an empty project: no runs yet)
        assert "Run a task or flow to get started" in dom, dom[-3000:]
    finally:
        rc = terminate_group(proc)
    assert rc == 0, "".join(lines)
    # the server went with it
    with pytest.raises(OSError):
        import urllib.request

        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
    assert (root / ".prefect" / "server.log").is_file()
