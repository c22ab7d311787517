"""Prefect flows (wiring only) and the ``shrinkflow`` CLI."""
