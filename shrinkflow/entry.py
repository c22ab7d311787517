"""What every entry point does first: telemetry off, Prefect state in the
project, and the params keys dvc.yaml declares for a stage.

Import-light on purpose: every DVC stage depends on this file.
"""

from __future__ import annotations

import os
from pathlib import Path

# Telemetry and update checks fail offline and only add noise.
OFFLINE_ENV = {
    "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "ITERATIVE_DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def configure_env(project_dir: Path | str, environ: dict | None = None) -> dict:
    """Turn telemetry off and keep Prefect's state inside the project.

    Called by every entry point (the CLI, each DVC stage command) before
    Prefect is imported, so ``dvc repro`` or ``dvc exp run`` typed directly
    behaves like ``shrinkflow run``. Never overrides what the user set.
    """
    from shrinkflow.paths import PREFECT_HOME

    env = os.environ if environ is None else environ
    for k, v in OFFLINE_ENV.items():
        env.setdefault(k, v)
    env.setdefault("PREFECT_HOME", str(Path(project_dir).resolve() / PREFECT_HOME))
    # Ephemeral Prefect starts a local API per process: slow on a loaded 2-core box.
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    return env


def declared_params(stage: str, project_dir: Path | str = ".") -> frozenset[str]:
    """The params.yaml keys dvc.yaml lists for ``stage`` (its ``params:``)."""
    import yaml

    from shrinkflow.paths import DVC_YAML, PARAMS

    doc = yaml.safe_load((Path(project_dir) / DVC_YAML).read_text())
    try:
        entries = doc["stages"][stage].get("params") or []
    except KeyError:
        raise KeyError(f"dvc.yaml has no stage {stage!r}") from None
    keys: set[str] = set()
    for entry in entries:
        if isinstance(entry, str):
            keys.add(entry)
        elif isinstance(entry, dict):  # {params.yaml: [keys]} form
            for file, names in entry.items():
                if Path(file) != PARAMS:
                    raise ValueError(f"stage {stage!r}: params from {file} are not supported")
                keys.update(names or [])
    return frozenset(keys)
