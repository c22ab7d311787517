"""Staging the production student for a re-compression's warm start.

The re-compression flow calls ``stage_warm_start`` before it snapshots the
window: the production version's distilled student (stored by deploy as
``registry/versions/vNNNN/warm_start/``, verified on read) is copied into the
compress dep ``data/unlabelled/warm_start/<candidate>/``, with
``source.json`` saying which version it came from. What it returns goes into
``data/unlabelled/window.json``, and from there into the new version's
lineage. Students staged by an earlier re-compression are removed first, so
the compress stage only ever sees production's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from shrinkflow.compress.warm import SOURCE, read_meta
from shrinkflow.errors import IntegrityError
from shrinkflow.files import atomic_write_text, content_hash, file_hashes
from shrinkflow.paths import WARM_START
from shrinkflow.registry import Registry

# Tracked files of data/unlabelled/warm_start/ that staging keeps.
KEPT = ("README.md", ".gitignore")


def clear_staged(root: Path) -> None:
    """Remove every staged student (and ``source.json``) under
    ``data/unlabelled/warm_start/``, keeping its tracked files."""
    staged = Path(root) / WARM_START
    if not staged.is_dir():
        return
    for entry in staged.iterdir():
        if entry.name in KEPT:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def stage_warm_start(root: Path, registry_dir: str, for_retrain: bool = False) -> dict | None:
    """Copy the production version's warm-start sidecar into
    ``data/unlabelled/warm_start/<candidate>/`` under ``root``. Returns what
    was staged (``version``, ``candidate``, ``content_hash`` of the sidecar's
    files, and ``for_retrain: true`` when ``for_retrain``), None when nothing
    is in production or its version has no sidecar, and ``{"version",
    "error"}`` when its sidecar fails verification (then nothing is staged:
    the re-distillation starts cold). ``for_retrain``: staged by the retrain
    flow, for the retrained teacher's students, whose teacher is not the one
    the sidecar was distilled from (``compress.warm.matching_sidecar``)."""
    root = Path(root)
    registry = Registry(root / registry_dir)
    clear_staged(root)
    version = registry.alias()
    if version is None:
        return None
    try:
        sidecar = registry.warm_start(version)
    except IntegrityError as exc:
        return {"version": version, "error": str(exc)}
    meta = read_meta(sidecar) if sidecar is not None else None
    if meta is None or not meta.get("candidate"):
        return None
    dest = root / WARM_START / str(meta["candidate"])
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(sidecar, tmp)
    tmp.rename(dest)
    staged = {"version": version, "candidate": meta["candidate"], "content_hash": content_hash(file_hashes(dest))}
    if for_retrain:
        staged["for_retrain"] = True
    atomic_write_text(root / WARM_START / SOURCE, json.dumps(staged, indent=2, sort_keys=True) + "\n")
    return staged


def warm_start_summary(production: str | None, staged: dict | None) -> str:
    """One line for the re-compression's log: what ``stage_warm_start``
    staged (``staged``, its return value) from ``production`` (the version
    in production, or None), and so whether the students re-distil warm or
    distil cold."""
    if production is None:
        return "warm start: nothing is in production; every student distils cold"
    if staged is None:
        return (f"warm start: production {production} keeps no distilled student (the int8 teacher, or a recipe "
                "without distill): every student distils cold")
    if "error" in staged:
        return (f"warm start: production {staged['version']}'s student failed verification, so it is not used "
                f"({staged['error']}): every student distils cold")
    return (f"warm start: production {staged['version']}'s student staged: candidate {staged['candidate']!r} "
            "re-distils from it")
