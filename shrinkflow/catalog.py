"""The artifact catalog: each typed artifact's name, path and model.

In the spirit of Kedro's DataCatalog, but typed Python: a stage asks for
``load(VALIDATION)`` and gets a ``ValidationReport``, and saves one with
``save(VALIDATION, report)`` (atomic, ``shrinkflow.files.write_json``: sorted
keys, indent 2, so the files keep their shape and ``dvc metrics`` diffs
stay meaningful). Paths come from ``shrinkflow.paths``; models from
``shrinkflow.artifacts``. A registry version's manifest lives under the
registry's own root: ``Registry.version_manifest`` reads it.

Constants and two functions: importing this module touches nothing on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from shrinkflow.artifacts import (Artifact, CompressMetrics, DeploymentRecord, GatesReport, RetrainRecord,
                                  TrainMetrics, ValidationReport)
from shrinkflow.errors import DataContractError, MissingInput
from shrinkflow.files import read_json, write_json
from shrinkflow.paths import DEPLOYMENT as DEPLOYMENT_PATH
from shrinkflow.paths import GATES_JSON, METRICS_COMPRESS, METRICS_TRAIN, METRICS_VALIDATE, RETRAIN_RECORD

A = TypeVar("A", bound=Artifact)


class ArtifactInvalid(DataContractError):
    """A document that crosses a stage boundary exists but does not match its
    model; the message names the file, the stage that writes it and pydantic's
    first mismatches. A DataContractError, so a stage reports it in one line."""

    def __init__(self, message: str):
        ValueError.__init__(self, message)
        self.problems = [message]


@dataclass(frozen=True)
class Entry(Generic[A]):
    """One catalogued artifact: its ``name``, its ``path`` relative to the
    project root, the ``model`` its JSON validates as, and the stage that
    writes it (named in the error when it is missing)."""

    name: str
    path: Path
    model: type[A]
    written_by: str


# Written through the catalog by the train and compress stages, read by
# deploy. So shrinkflow/artifacts.py and this module are deps of train and
# compress in dvc.yaml: editing either makes the teacher's training stale in
# DVC's eyes (artifacts.py imports nothing of shrinkflow, so nothing else does).
TRAIN_METRICS: Entry[TrainMetrics] = Entry("train_metrics", METRICS_TRAIN, TrainMetrics, "train")
COMPRESS_METRICS: Entry[CompressMetrics] = Entry("compress_metrics", METRICS_COMPRESS, CompressMetrics, "compress")
VALIDATION: Entry[ValidationReport] = Entry("validation", METRICS_VALIDATE, ValidationReport, "validate")
GATES: Entry[GatesReport] = Entry("gates", GATES_JSON, GatesReport, "validate")
DEPLOYMENT: Entry[DeploymentRecord] = Entry("deployment", DEPLOYMENT_PATH, DeploymentRecord, "deploy")
# Written by the retrain flow (flows/retrain.py), not a stage; committed as
# {} (no retrain), read by validate and deploy.
RETRAIN: Entry[RetrainRecord] = Entry("retrain", RETRAIN_RECORD, RetrainRecord, "retrain flow")

CATALOG: dict[str, Entry] = {e.name: e for e in (TRAIN_METRICS, COMPRESS_METRICS, VALIDATION, GATES, DEPLOYMENT,
                                                 RETRAIN)}


def _writer(entry: Entry) -> str:
    """Who writes ``entry``'s document, for an error: "compress stage", "retrain flow"."""
    return entry.written_by if entry.written_by.endswith(" flow") else f"{entry.written_by} stage"


def load(entry: Entry[A], root: Path | str = ".") -> A:
    """``entry``'s document under ``root``, validated as its model. Raises
    MissingInput (naming the stage that writes it) when the file is missing,
    ArtifactInvalid (naming the file, its stage and the first mismatches) when
    it is not JSON or does not match the model."""
    from pydantic import ValidationError

    path = Path(root) / entry.path
    if not path.is_file():
        raise MissingInput(f"{path} is missing: run the {entry.written_by} stage first "
                           f"(dvc repro {entry.written_by})")
    try:
        doc = read_json(path)
    except ValueError as exc:   # not JSON at all (json.JSONDecodeError, a UnicodeDecodeError)
        raise ArtifactInvalid(f"{path} is not a valid {entry.name} document (written by the {_writer(entry)}): "
                              f"not JSON: {exc}") from None
    try:
        return entry.model.model_validate(doc)
    except ValidationError as exc:
        first = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(document)'}: {e['msg']}" for e in exc.errors()[:3])
        raise ArtifactInvalid(f"{path} is not a valid {entry.name} document (written by the {_writer(entry)}; "
                              f"{exc.error_count()} error(s): {first})") from None


def save(entry: Entry[A], obj: A, root: Path | str = ".") -> Path:
    """Write ``obj`` (an instance of ``entry.model``) to ``entry``'s path under
    ``root``, atomically. Raises TypeError for an object of another model."""
    if not isinstance(obj, entry.model):
        raise TypeError(f"{entry.name} holds a {entry.model.__name__}, not a {type(obj).__name__}")
    return write_json(Path(root) / entry.path, obj.to_json_dict())


def load_retrain_record(root: Path | str):
    """data/feedback/retrain.json under ``root`` as a RetrainRecord (through
    the catalog); an absent file reads as no retrain (``RetrainRecord()``)."""
    return load(RETRAIN, root) if (Path(root) / RETRAIN.path).is_file() else RetrainRecord()

