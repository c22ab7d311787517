"""The production version as one document: what `shrinkflow status --json`
prints and what the server's /metadata returns; and the label names a
version answers with (``model_labels``: the server and the monitor read them)."""

from __future__ import annotations

from pathlib import Path

from shrinkflow.errors import IntegrityError, RegistryError
from shrinkflow.files import read_json
from shrinkflow.registry import Registry


def version_labels(registry: Registry, version: str, manifest: dict) -> list[str] | None:
    """A version's class names in class-id order: its manifest's ``labels``,
    or, for a version stored before the registry recorded them, its model's
    own manifest. None when neither says."""
    if manifest.get("labels"):
        return list(manifest["labels"])
    path = registry.path(version) / "model" / "shrinkflow_model.json"
    return (read_json(path).get("labels") or None) if path.is_file() else None


def model_labels(model_dir: Path, version: str = "") -> tuple[str, ...]:
    """The label names of a model directory, in class-id order, from its
    manifest (``shrinkflow_model.json``, hash-verified by Registry.load).
    Raises RegistryError when the manifest has no usable ``labels`` (a list
    of two or more distinct non-empty names): there is no default."""
    from shrinkflow.modeling import MANIFEST, read_manifest

    labels = read_manifest(Path(model_dir)).get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or len(set(labels)) != len(labels) or \
            not all(isinstance(x, str) and x for x in labels):
        raise RegistryError(f"{'version ' + version + ' ' if version else ''}({Path(model_dir) / MANIFEST}): the "
                            f"manifest has no usable `labels` (a list of two or more distinct label names in "
                            f"class-id order; it has {labels!r}): re-deploy it with this shrinkflow")
    return tuple(labels)


def status_document(registry: Registry, version: str | None = None, integrity: str | None = None) -> dict:
    """``version`` (default: production) with its label set (``labels``, class
    names in class-id order), test figures (accuracy, macro-F1, per-class
    recall, the paired drops), gates, confirmation, lineage and recipe, the
    teacher baseline, and whether its files still match their hashes.

    ``integrity``: that verdict when the caller already has it (the server
    verified the version when it loaded it into memory); None hashes every
    file of the version now."""
    version = version or registry.alias()
    if version is None:
        return {"deployed": None, "message": "nothing is deployed yet: run `shrinkflow run`"}
    m = registry.manifest(version)
    if integrity is None:
        try:
            registry.verify(version)
            integrity = "verified"
        except IntegrityError as exc:
            integrity = f"FAILED: {exc}"
    return {"deployed": {"version": version, "candidate": m["candidate"], "recipe": m["recipe"],
                         "created_at": m["created_at"], "path": str(registry.path(version)),
                         "integrity": integrity, "same_model_as": m.get("same_model_as"),
                         "labels": version_labels(registry, version, m),
                         "metrics": m["metrics"], "selection_metrics": m["selection_metrics"],
                         "gates": m["gates"], "confirmation": m["confirmation"], "lineage": m["lineage"],
                         # cost and return of compressing (None: deployed before it was recorded)
                         "roi": m.get("roi"),
                         # how the server runs it: per_row when validate found it not
                         # batch-invariant ({} : deployed before it was recorded)
                         "serving": m.get("serving") or {}},
            "teacher": {"metrics": m["teacher_metrics"],
                        "description": "fp32 teacher, torch eager, as trained; same test sentences"},
            "versions": registry.versions()}
