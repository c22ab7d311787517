"""A local Prefect server with its scheduler, for ``shrinkflow schedule``.

Prefect's ephemeral API (what ``shrinkflow run`` uses) runs no scheduler
service, so a served deployment's schedule would never create a run. When no
``PREFECT_API_URL`` is set, ``schedule`` starts a real server on 127.0.0.1,
with its state in the project's ``.prefect/``, and stops it on the way out.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # If the CLI is killed outright (SIGKILL), the kernel sends the server
    # SIGTERM instead of leaving it running with nobody to stop it.
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalPrefectServer:
    def __init__(self, home: Path, host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout_s: float = 120.0):
        self.home, self.host, self.port = Path(home), host, port
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self) -> str:
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(self.host)
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env["PREFECT_HOME"] = str(self.home)
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", self.host, "--port", str(self.port)]
        log = open(self.log_path, "ab")
        # Its own process group: Ctrl-C reaches the CLI, which stops the
        # runner first and then the whole server group, in that order.
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Prefect server exited with {self.proc.returncode} while starting; "
                                   f"log {self.log_path}:\n{self._tail()}")
            if self.healthy():
                return self.api_url
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the Prefect server was not healthy within {self.startup_timeout_s:.0f}s; "
                           f"log {self.log_path}:\n{self._tail()}")

    def _tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # The uvicorn worker lives in the same group: make sure none is left.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
