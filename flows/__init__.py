"""Prefect flows (wiring only) and the ``shrinkflow`` CLI.

The compress stage's flow is also started by DVC directly (``dvc repro``,
``dvc exp run``), outside the CLI. Telemetry and update checks fail offline
and only add noise, and Prefect's state belongs inside the project, so
importing this package configures both before Prefect is imported (without
overriding anything the user set).
"""

from pathlib import Path as _Path

from shrinkflow.entry import OFFLINE_ENV as _OFFLINE_ENV
from shrinkflow.entry import configure_env as _configure_env


def _project_root():
    here = _Path.cwd().resolve()
    return next((d for d in (here, *here.parents) if (d / "dvc.yaml").is_file()), None)


if (_root := _project_root()) is not None:
    _configure_env(_root)
else:
    import os as _os

    for _k, _v in _OFFLINE_ENV.items():
        _os.environ.setdefault(_k, _v)
