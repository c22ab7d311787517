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

from pathlib import Path

from flows.prefect_server import TiedServer, tied_command


class EvidentlyUI(TiedServer):
    """``evidently ui --workspace WORKSPACE`` on ``host``:``port`` (a free
    port when 0), its output in ``log_path``."""

    name = "the Evidently UI"

    def __init__(self, workspace: Path, log_path: Path, host: str = "127.0.0.1", port: int = 0,
                 startup_timeout_s: float = 120.0):
        super().__init__(log_path, host, port, startup_timeout_s)
        self.workspace = Path(workspace)

    @property
    def health_url(self) -> str:
        return f"{self.url}/api/version"

    def command(self) -> list[str]:
        self.workspace.mkdir(parents=True, exist_ok=True)
        return tied_command("evidently.cli", ["ui", "--host", self.host, "--port", str(self.port),
                                              "--workspace", str(self.workspace)])
