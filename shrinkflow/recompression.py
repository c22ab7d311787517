"""The production model as a re-compression candidate, and what a
re-compression did.

Before a re-compression re-runs compress -> validate -> deploy, the model
in production is copied out of the registry (verified against its hashes)
into ``data/unlabelled/production/`` (a validate dep): validate measures it
like every built candidate, under ``PRODUCTION_CANDIDATE``, and when it is
the one selected, deploy promotes nothing. So a re-compression never deploys
something worse, by the gates and the objective, than keeping what runs.
A retrain after a re-compression copies it too, as the baseline of its
candidates' window gain alone (``stage_production_baseline``).

``recompress_outcome`` turns the gate report into what the monitor records
(decision.json ``recompress``) and shows (the Prefect artifact
``shrinkflow-recompress``): deployed, kept or nothing, and every
candidate's failed gates with their figures.

Library code: no Prefect; nothing happens at import. Not imported by any
stage (the registry it reads would become a validate dep in DVC's eyes).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

from shrinkflow.artifacts import PRODUCTION_ROLE_BASELINE, PRODUCTION_ROLE_CANDIDATE, GatesReport
from shrinkflow.files import write_json
from shrinkflow.paths import PRODUCTION_META, PRODUCTION_MODEL, WINDOW_PRODUCTION

# Outcomes of one re-compression.
DEPLOYED, KEPT, NOTHING = "deployed", "kept", "nothing"


def clear_production(root: Path | str) -> None:
    """Remove the production copy (``model/`` and ``version.json``), keeping
    the directory's README: validate then has no production candidate."""
    root = Path(root)
    (root / PRODUCTION_META).unlink(missing_ok=True)
    shutil.rmtree(root / PRODUCTION_MODEL, ignore_errors=True)


def snapshot_production(root: Path | str, registry_dir: str, role: str = PRODUCTION_ROLE_CANDIDATE) -> str | None:
    """Copy the production version's model directory out of the registry at
    ``root/registry_dir`` into ``data/unlabelled/production/model`` and record
    its version, content hash and ``role`` (``PRODUCTION_ROLE_CANDIDATE`` or
    ``PRODUCTION_ROLE_BASELINE``: what validate does with it) in ``version.json``.
    Returns the version, or None (and clears any earlier copy) when nothing
    is in production. Raises ValueError for another role.

    Raises shrinkflow.errors.IntegrityError when the version's files do not
    match its manifest (``Registry.load`` verifies them): a corrupted model is
    never measured as production's.
    """
    from shrinkflow.registry import Registry

    if role not in (PRODUCTION_ROLE_CANDIDATE, PRODUCTION_ROLE_BASELINE):
        raise ValueError(f"role must be {PRODUCTION_ROLE_CANDIDATE!r} or {PRODUCTION_ROLE_BASELINE!r}, not {role!r}")
    root = Path(root)
    registry = Registry(root / registry_dir)
    if registry.alias() is None:
        clear_production(root)
        return None
    ref = registry.load()
    (root / WINDOW_PRODUCTION).mkdir(parents=True, exist_ok=True)
    # Copied beside, then swapped in: a crash never leaves half a model.
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=root / WINDOW_PRODUCTION))
    try:
        shutil.copytree(ref.path, tmp / "model")
        clear_production(root)
        (tmp / "model").rename(root / PRODUCTION_MODEL)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(root / PRODUCTION_META, {"version": ref.version, "content_hash": ref.manifest["content_hash"],
                                        "role": role})
    return ref.version


def window_staged(root: Path | str) -> bool:
    """Whether a re-compression's window is staged: its record
    (``data/unlabelled/window.json``) is not the empty ``{}`` a fresh project
    holds, or its held-out texts (``data/unlabelled/heldout.txt``, what the
    window gates read) are not empty; every re-compression, finished or
    interrupted, leaves both. ``data/unlabelled/texts.txt`` alone does not
    count: it may hold the user's own unlabelled text (data/unlabelled/README.md).
    An unreadable record counts as staged (a re-compression wrote it)."""
    import json

    from shrinkflow.paths import WINDOW_HELDOUT, WINDOW_META

    root = Path(root)
    if (root / WINDOW_HELDOUT).is_file() and (root / WINDOW_HELDOUT).stat().st_size > 0:
        return True
    try:
        return json.loads((root / WINDOW_META).read_text(encoding="utf-8")) not in ({}, None)
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True


def production_for_run(root: Path | str, registry_dir: str,
                       validate_reruns: Callable[[], bool]) -> tuple[str | None, str | None]:
    """What a run that is not a re-compression or a retrain (``shrinkflow
    run``, a scheduled lifecycle run) does with the production copy, before
    its stages run. ``validate_reruns``: asked only when a window is staged,
    whether this run will run validate (DVC finds a build stage stale, or
    ``--revalidate``). Returns (the production version staged as a
    candidate, or None; a line to say, or None).

    Without a re-compression's window staged (``window_staged``) the copy is
    removed, as before: validate has no production candidate.

    With one staged, and validate not re-running, the copy is left exactly
    as the last validate read it: DVC then skips validate and deploy, and
    the run changes nothing (a rollback since stands; a student deployed
    through the agreement gain is not re-judged without its baseline).

    With one staged and validate re-running (another input changed, or an
    interrupted re-compression's window is still to be built), the current
    production is copied again, verified (``snapshot_production``), and
    measured as a candidate: the window's candidates are gated against what
    serves, as the re-compression gated them. Removing the copy instead, as
    runs did, left the window's gates without production: a plain run after
    an interrupted re-compression re-built the window's student, which missed
    the agreement floor, and deployed the int8 teacher at 1.5x production's
    p95 latency (a helper's finding). When nothing is in production, or the
    registry or production's files cannot be read or verified, the copy is
    removed and the line says why."""
    from shrinkflow.files import read_json

    root = Path(root)
    if not window_staged(root):
        clear_production(root)
        return None, None
    if not validate_reruns():
        try:
            version = read_json(root / PRODUCTION_META).get("version") if (root / PRODUCTION_META).is_file() else None
        except (OSError, ValueError, AttributeError):
            version = None
        return version, None
    try:
        version = snapshot_production(root, registry_dir, PRODUCTION_ROLE_CANDIDATE)
    except Exception as exc:  # noqa: BLE001 - IntegrityError, RegistryError, an unreadable manifest: not measured
        clear_production(root)
        return None, (f"production is not measured beside the staged re-compression window's candidates "
                      f"({type(exc).__name__}: {exc}); their window gates judge them without it")
    if version is None:
        return None, None
    return version, (f"a re-compression's window is staged (data/unlabelled/): production {version} is measured "
                     "as a candidate, as the re-compression measured it")


def stage_production_baseline(root: Path | str, registry_dir: str) -> str | None:
    """A retrain's production copy: the production version staged with
    ``PRODUCTION_ROLE_BASELINE`` when an earlier re-compression's window left
    held-out texts (``data/unlabelled/heldout.txt``, not empty), so that
    validate measures production's agreement with the retrained teacher
    there and a candidate can pass the window gate by its gain over it;
    otherwise any copy is cleared (no window gate: measuring production
    would decide nothing). Returns the version staged, or None. Raises as
    ``snapshot_production``."""
    from shrinkflow.paths import WINDOW_HELDOUT
    from shrinkflow.splits import read_lines

    root = Path(root)
    heldout = root / WINDOW_HELDOUT
    if not heldout.is_file() or not read_lines(heldout):
        clear_production(root)
        return None
    return snapshot_production(root, registry_dir, PRODUCTION_ROLE_BASELINE)


def gate_figures(gate) -> dict:
    """One gate verdict (a ``GateResult``) as JSON types: passed, enforced,
    value, threshold, direction, margin and its note when it has one."""
    return {"passed": gate.passed, "enforced": gate.enforced, "value": gate.value, "threshold": gate.threshold,
            "direction": gate.direction, "margin": gate.margin, **({"note": gate.note} if gate.note else {})}


def recompress_outcome(selection: GatesReport, deployed_version: str | None, kept_version: str | None) -> dict:
    """What one re-compression did, from validate's gate report
    (reports/gates.json) and what deploy did: ``outcome`` (``deployed``,
    ``kept``: production won and stays, or ``nothing``: no candidate passed,
    production keeps serving), the versions, the selection's ``reason``, and
    by candidate whether it ``passed`` and its ``failed`` gates (value,
    threshold, margin: how far from passing, in the gate's units). JSON types."""
    outcome = DEPLOYED if deployed_version else (KEPT if kept_version else NOTHING)
    return {"outcome": outcome, "deployed_version": deployed_version, "kept_version": kept_version,
            "production_version": selection.production, "selected": selection.selected,
            "reason": selection.reason, "candidates": candidate_failures(selection)}


def candidate_failures(selection: GatesReport) -> dict:
    """By candidate of a gate report (reports/gates.json): whether it
    ``passed`` every gate on val, and its ``failed`` gates by name, each with
    ``value``, ``threshold``, ``direction`` and ``margin`` (how far from
    passing, in the gate's units). JSON types."""
    candidates = {}
    for name, doc in selection.candidates.items():
        report = doc.to_report()
        candidates[name] = {"passed": report.passed,
                            "failed": {r.name: gate_figures(r) for r in report.failures}}
    return candidates


def gate_rows(candidates: dict) -> list[str]:
    """Markdown table rows (``| candidate | gate | value | threshold | margin |``)
    of ``candidate_failures``' dict: a line per failed gate, one for a
    candidate that passed every gate."""
    lines = []
    for name, c in candidates.items():
        if c["passed"]:
            lines.append(f"| {name} | every gate passed | | | |")
        for gate, f in c["failed"].items():
            rel = ">=" if f["direction"] == "min" else "<="
            lines.append(f"| {name} | {gate} {'passed' if f['passed'] else 'FAILED'} | {f['value']:.4g} | "
                         f"{rel} {f['threshold']:.4g} | {f['margin']:+.4g} |")
    return lines


def recompress_markdown(outcome: dict) -> str:
    """The Prefect artifact ``shrinkflow-recompress``: the outcome in one bold
    line, then each candidate's failed gates with value, threshold and margin."""
    prod = outcome.get("production_version")
    head = {DEPLOYED: f"**Deployed {outcome['deployed_version']}** ({outcome['selected']!r})"
                      + (f", replacing {prod}" if prod else ""),
            KEPT: f"**Kept production {outcome['kept_version']}**: it passed every gate and won the selection",
            NOTHING: "**Nothing deployed**: no candidate passed every gate"
                     + (f"; production {prod} keeps serving" if prod else "")}[outcome["outcome"]]
    lines = ["# Re-compression", "", head + ".", "", f"Selection: {outcome['reason']}", "",
             "| candidate | gate | value | threshold | margin |", "|---|---|---|---|---|",
             *gate_rows(outcome["candidates"])]
    return "\n".join(lines) + "\n"
