"""Evidently's UI over the project's monitoring workspace, for ``shrinkflow
monitor ui``: the dashboard of drift over time (monitoring.workspace).

Started like the local Prefect server (flows.prefect_server): ``evidently ui``
as a child process in its own process group, under the parent watchdog, so
it goes when the CLI goes (Ctrl-C, SIGTERM, or the CLI killed outright), on
127.0.0.1. Its telemetry is off (``DO_NOT_TRACK``, set by the CLI's
bootstrap and again here); the UI's assets ship in Evidently's wheel, so it
works offline.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from flows.prefect_server import free_port, tied_command
from shrinkflow.bootstrap import telemetry_off


def port_is_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class EvidentlyUI:
    """``evidently ui --workspace WORKSPACE`` on ``host``:``port`` (a free
    port when 0), its output in ``log_path``."""

    def __init__(self, workspace: Path, log_path: Path, host: str = "127.0.0.1", port: int = 0,
                 startup_timeout_s: float = 120.0):
        self.workspace, self.log_path = Path(workspace), Path(log_path)
        self.host, self.port, self.startup_timeout_s = host, port, startup_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/version", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self) -> str:
        """Start the UI and wait until it answers; returns its address.
        Raises RuntimeError (with the log's tail) when it exits or does not
        answer within ``startup_timeout_s``."""
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(self.host)
        cmd = tied_command("evidently.cli", ["ui", "--host", self.host, "--port", str(self.port),
                                             "--workspace", str(self.workspace)])
        env = telemetry_off(dict(os.environ))
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        atexit.register(self.stop)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Evidently UI exited with {self.proc.returncode} while starting; "
                                   f"log {self.log_path}:\n{self._tail()}")
            if self.healthy():
                return self.url
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the Evidently UI did not answer within {self.startup_timeout_s:.0f}s; "
                           f"log {self.log_path}:\n{self._tail()}")

    def _tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 20.0) -> None:
        """End the UI's process group (SIGTERM, then SIGKILL). Idempotent."""
        atexit.unregister(self.stop)
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
