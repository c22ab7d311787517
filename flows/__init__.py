"""Prefect flows (wiring only) and the ``shrinkflow`` CLI.

The compress stage's flow is also started by DVC directly (``dvc repro``,
``dvc exp run``), outside the CLI; telemetry and update checks fail offline
and only add noise, so every entry point under flows/ turns them off before
Prefect is imported (without overriding anything the user set).
"""

import os as _os

from shrinkflow.pipeline import OFFLINE_ENV as _OFFLINE_ENV

for _k, _v in _OFFLINE_ENV.items():
    _os.environ.setdefault(_k, _v)
