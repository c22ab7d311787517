"""Monitoring's Evidently reports, read-only under /reports/ (same token rule
as the API)."""

from __future__ import annotations

from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles


class ReportFiles(StaticFiles):
    """The reports directory as static files (``index.html`` for a
    directory). 404 until the first monitor run creates the directory,
    rather than a 500 or a server that refuses to start."""

    def __init__(self, directory: Path):
        self.reports = Path(directory)
        super().__init__(directory=str(self.reports), html=True, check_dir=False)

    async def check_config(self) -> None:
        if self.reports.is_dir():
            await super().check_config()

    async def get_response(self, path, scope):
        if not self.reports.is_dir():
            raise HTTPException(status_code=404, detail="no monitoring reports yet: run `shrinkflow monitor`")
        return await super().get_response(path, scope)
