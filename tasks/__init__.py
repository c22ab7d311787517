"""Prefect tasks and the DVC stage entrypoints they drive.

- ``tasks.stages``: one function per DVC stage (the ``cmd`` in dvc.yaml). Each
  loads its inputs, calls one library function, and saves its outputs. They
  run in DVC's subprocess, so DVC decides what is stale.
- ``tasks.dvc`` and ``tasks.report``: thin Prefect tasks used by the flows.
"""
