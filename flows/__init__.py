"""Prefect flows (wiring only) and the ``shrinkflow`` CLI.

Importing this package does nothing: the environment bootstrap
(``shrinkflow.bootstrap.configure_env``: telemetry off, offline, Prefect's state
in the project) is called explicitly by each entry point, before Prefect is
imported: the CLI's Typer callback, and ``stages.common.run_stage`` for the
DVC stage commands (``dvc repro`` typed directly included).
"""
