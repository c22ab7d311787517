"""Thin Prefect tasks used by the flows.

- ``tasks.dvc``: run one DVC stage (``dvc repro --single-item``); DVC decides
  what is stale. The stage commands themselves live in ``stages/``.
- ``tasks.compress``: build one candidate (the compress stage fans out).
- ``tasks.publish``: read stage outputs, publish the Prefect artifact.
"""
