"""A versioned, directory-based model registry.

Layout::

    registry/
      versions/v0001/   immutable: model files + manifest.json (its ``labels``:
                        the class names in class-id order, from the model's own manifest)
                        [+ warm_start/: the distilled student the next re-compression
                        starts from; hashed in the manifest, not served, not in the size]
      aliases.json      {"production": "v0001"}; replaced atomically
      history.jsonl     append-only log of promotions and rollbacks
      .lock             serialises writers (flock)

Promotion builds the version in ``versions/.tmp-*`` and renames it into place,
then swaps the alias file with ``os.replace``. A crash at any point leaves the
previous production version serving: a reader sees either the old alias or
the new one, and the alias never names a half-written version. A long-running
server (see ROADMAP) can poll ``aliases.json`` and reload on change.

The registry lives outside every DVC out: DVC deletes a stage's outs before
re-running it, and earlier versions must survive that.

Readers return typed records, as MLflow's registry returns its entities:
``version_manifest`` a ``VersionManifest``, ``history`` ``HistoryEvent``s
(both in ``shrinkflow.artifacts``: the files' shapes), ``describe_versions``
a ``VersionSummary`` per version (defined here: what ``shrinkflow versions``
lists). ``manifest`` is the raw document, for readers that must survive a
version stored by hand.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shrinkflow.artifacts import HistoryEvent, Number, VersionManifest
from shrinkflow.errors import (IntegrityError, NothingToRollBack, PromotionRefused,  # noqa: F401  (re-exported)
                               RegistryError, UnknownVersion)
from shrinkflow.gates import GateReport
from shrinkflow.files import content_hash, file_hashes, fsync_dir, fsync_tree, read_json, write_json

PRODUCTION = "production"
# What production pointed at before its last move (rollback's default target).
PREVIOUS = "previous_production"
_VERSION_RE = re.compile(r"^v(\d{4,})$")


class _Summary(BaseModel):
    """A view of stored records (extra keys ignored: it reads a manifest for
    the few it shows); dumped with every field, None included."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    def to_json_dict(self) -> dict:
        """As ``shrinkflow versions --json`` prints it."""
        return self.model_dump(mode="json", by_alias=True)


class LivePeriod(_Summary):
    """One stretch as production, as ISO-8601 UTC times of the history:
    ``from`` (``from_`` in Python), ``to`` (None while it still is)."""

    from_: str = Field(alias="from")
    to: str | None


class VersionFigures(_Summary):
    """The figures ``shrinkflow versions`` shows of a version: its manifest's
    ``metrics`` (``artifacts.CandidateMeasurements``: test quality, val
    performance; same names, same units), None where a version lacks one."""

    split: str | None = None
    accuracy: Number | None = None
    macro_f1: Number | None = None
    accuracy_drop: Number | None = None
    latency_ms_p95_b1: Number | None = None
    size_mb: Number | None = None


class VersionSummary(_Summary):
    """One version as ``shrinkflow versions`` lists it, in the spirit of
    MLflow's ``ModelVersion``: name, source candidate, creation time,
    ``same_model_as`` (an earlier version with identical files), whether it
    is ``production`` now, when it was (``live``), its label set (None:
    stored before versions recorded it) and its key figures."""

    version: str
    candidate: str | None = None
    created_at: str | None = None
    same_model_as: str | None = None
    production: bool
    live: list[LivePeriod]
    labels: list[str] | None = None
    metrics: VersionFigures = VersionFigures()

    @field_validator("metrics", mode="before")
    @classmethod
    def _no_metrics(cls, value):
        return {} if value is None else value   # a version stored without figures


@dataclass(frozen=True)
class Promotion:
    version: str
    previous: str | None        # production before this promotion
    same_model_as: str | None   # an earlier version with identical model files


@dataclass(frozen=True)
class Rollback:
    version: str       # production now
    previous: str      # production before the rollback


@dataclass(frozen=True)
class ModelRef:
    """A verified version: its files matched their manifest hashes when loaded."""
    version: str
    path: Path                  # the model directory (load_predictor takes it)
    manifest: dict


def model_labels(model_dir: Path | str) -> list[str]:
    """The class names, in class-id order, from a model directory's own
    manifest (``shrinkflow_model.json``). Raises PromotionRefused when it has
    none: a version must say what its outputs mean."""
    path = Path(model_dir) / "shrinkflow_model.json"
    labels = read_json(path).get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise PromotionRefused(f"refusing to deploy: {path} has no valid 'labels' (class names in class-id "
                               f"order), got {labels!r}")
    return labels


class Registry:
    def __init__(self, root: Path | str):
        # Constructing a Registry touches nothing on disk; writers create it.
        self.root = Path(root)

    # ------------------------------------------------------------ reading
    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    def versions(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        names = [p.name for p in self.versions_dir.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)]
        return sorted(names, key=lambda n: int(_VERSION_RE.match(n).group(1)))

    def aliases(self) -> dict[str, str]:
        """Alias -> version, each checked: a version name, never a path, and
        present in the registry (aliases.json is read by long-running servers;
        a hand-edited or corrupted file must not point them anywhere else)."""
        path = self.root / "aliases.json"
        if not path.is_file():
            return {}
        try:
            aliases = read_json(path)
        except (ValueError, UnicodeDecodeError) as exc:   # empty, cut short, not UTF-8
            raise RegistryError(f"{path}: not valid JSON ({exc}): write it again by hand, "
                                '{"production": "vNNNN"}, with the version the last promotion or rollback in '
                                f"{self.root / 'history.jsonl'} names (or restore it from a backup)") from None
        if not isinstance(aliases, dict):
            raise RegistryError(f"{path}: not a mapping of alias -> version")
        for name, version in aliases.items():
            if not isinstance(version, str) or not _VERSION_RE.match(version):
                raise RegistryError(f"{path}: alias {name!r} -> {version!r} is not a version name (vNNNN)")
            if not (self.path(version) / "manifest.json").is_file():
                raise RegistryError(f"{path}: alias {name!r} -> {version!r}, which the registry does not hold")
        return aliases

    def alias(self, name: str = PRODUCTION) -> str | None:
        return self.aliases().get(name)

    def path(self, version: str) -> Path:
        if not _VERSION_RE.match(str(version)):
            raise RegistryError(f"{version!r} is not a version name (vNNNN)")
        return self.versions_dir / version

    def manifest(self, version: str) -> dict:
        path = self.path(version) / "manifest.json"
        if not path.is_file():
            raise KeyError(f"registry {self.root}: no version {version!r}")
        return read_json(path)

    def version_manifest(self, version: str) -> VersionManifest:
        """``version``'s manifest as a typed VersionManifest (what ``manifest``
        returns as a dict). Raises KeyError as ``manifest`` does, and
        pydantic.ValidationError when the file does not match the model (a
        version stored by hand or by a test with a partial record)."""
        return VersionManifest.model_validate(self.manifest(version))

    def production(self) -> tuple[str, dict] | None:
        version = self.alias(PRODUCTION)
        return (version, self.manifest(version)) if version else None

    def history(self) -> list[HistoryEvent]:
        """Every move of the production alias, oldest first (history.jsonl).
        A last line that a crash cut short (no newline after it, and not an
        event) is skipped: the alias, written atomically before it, holds
        the move. Raises RegistryError naming the file and line for any other
        line that is not an event. (A newcomer's finding: a torn last line
        made ``versions`` exit with a bare pydantic error.)"""
        path = self.root / "history.jsonl"
        if not path.is_file():
            return []
        text = path.read_text()
        lines = text.splitlines()
        events = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                events.append(HistoryEvent.model_validate_json(line))
            except ValueError as exc:
                if i == len(lines) and not text.endswith("\n"):
                    continue   # torn by a crash mid-append
                raise RegistryError(f"{path}, line {i}: not a history event ({str(exc).splitlines()[0]}): "
                                    f"{line[:120]!r}") from None
        return events

    def verify(self, version: str) -> dict:
        """Raise IntegrityError unless every model file matches its hash;
        return the manifest."""
        manifest = self.manifest(version)
        expected = manifest["files"]
        actual = file_hashes(self.path(version) / "model")
        if actual != expected:
            bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
            raise IntegrityError(f"version {version}: files changed or missing: {bad}")
        return manifest

    def warm_start(self, version: str) -> Path | None:
        """``version``'s warm-start sidecar (shrinkflow.compress.warm), verified
        against the hashes its manifest records; None when it was stored
        without one. Raises IntegrityError when a file changed or is missing."""
        expected = self.manifest(version).get("warm_start_files")
        if not expected:
            return None
        path = self.path(version) / "warm_start"
        actual = file_hashes(path)
        if actual != expected:
            bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
            raise IntegrityError(f"version {version}: warm-start files changed or missing: {bad}")
        return path

    def load(self, version: str | None = None) -> ModelRef:
        """The way to load a version (production by default): verified first,
        every time, so a corrupted or edited model is never served."""
        version = version or self.alias(PRODUCTION)
        if version is None:
            raise RegistryError(f"registry {self.root}: nothing is in production")
        manifest = self.verify(version)
        return ModelRef(version, self.path(version) / "model", manifest)

    # ------------------------------------------------------------ writing
    @contextmanager
    def _locked(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _set_production(self, version: str) -> None:
        """Point production at ``version`` and, in the same atomic write,
        remember what it pointed at: rollback needs that, and a crash between
        this write and the history append must not lose it."""
        aliases = self.aliases()
        previous = aliases.get(PRODUCTION)
        aliases[PRODUCTION] = version
        if previous is not None and previous != version:
            aliases[PREVIOUS] = previous
        write_json(self.root / "aliases.json", aliases)  # fsynced, then os.replace

    def _log(self, event: HistoryEvent) -> None:
        path = self.root / "history.jsonl"
        _set_aside_torn_line(path)
        with open(path, "a") as fh:
            fh.write(json.dumps(event.to_json_dict(), sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def promote(self, model_dir: Path | str, gate_report: GateReport, record: dict,
                expected_files: dict[str, str] | None = None, warm_start: Path | str | None = None) -> Promotion:
        """Store ``model_dir`` as a new immutable version and make it production.

        Refuses (PromotionRefused) a candidate that failed any gate, and one
        whose files differ from ``expected_files`` (the hashes recorded when it
        was validated): what was validated is what is deployed.

        Every promotion is a new version with its own gate report, metrics and
        lineage, even when its model files equal an earlier version's (then
        ``same_model_as`` names it): a re-validation under new gates or new
        data is a new fact about the model, and the history must keep it. The
        copy is hashed and fsynced before the alias moves to it.

        ``warm_start``: the candidate's distilled student (a sidecar directory,
        shrinkflow.compress.warm), stored as ``warm_start/`` beside the model,
        its hashes in the manifest (``warm_start_files``): read back, verified,
        by ``warm_start``; not a served file, so not in ``files`` or
        ``content_hash``.
        """
        if not gate_report.passed:
            raise PromotionRefused("refusing to deploy: " + gate_report.summary())
        model_dir = Path(model_dir)
        if not (model_dir / "shrinkflow_model.json").is_file():
            raise PromotionRefused(f"refusing to deploy: {model_dir} is not a shrinkflow model directory")
        labels = model_labels(model_dir)
        if "labels" in record and list(record["labels"]) != labels:
            raise PromotionRefused(f"refusing to deploy: {model_dir} outputs the classes {labels}, but it was "
                                   f"validated for {list(record['labels'])}; re-run validate")
        record = {**record, "labels": labels}
        hashes = file_hashes(model_dir)
        if expected_files is not None and hashes != expected_files:
            bad = sorted(k for k in set(hashes) | set(expected_files) if hashes.get(k) != expected_files.get(k))
            raise PromotionRefused(f"refusing to deploy: {model_dir} differs from the validated candidate "
                                   f"(files changed since validation: {bad}); re-run validate")
        digest = content_hash(hashes)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._locked():
            previous = self.alias(PRODUCTION)
            same = next((v for v in reversed(self.versions())
                         if self.manifest(v).get("content_hash") == digest), None)
            version = self._store(model_dir, hashes, digest, gate_report,
                                  {**record, "same_model_as": same}, now,
                                  Path(warm_start) if warm_start is not None else None)
            self._set_production(version)
            self._log(HistoryEvent(event="promote", version=version, previous=previous, same_model_as=same, at=now))
        return Promotion(version, previous, same)

    def previous_production(self) -> str | None:
        """The version that was production before the current one became it.

        aliases.json records it (``previous_production``) in the same atomic
        write that moves production, so a crash between that write and the
        history append loses nothing rollback needs. Registries written before
        that alias existed fall back to the history; with neither, there is no
        safe guess: None, and the caller must name a version.
        """
        recorded = self.alias(PREVIOUS)  # written with the swap itself
        if recorded is not None:
            return recorded
        current = self.alias(PRODUCTION)  # registries from before PREVIOUS existed
        for event in reversed(self.history()):
            if event.version == current:
                return event.previous
        return None

    def rollback(self, to: str | None = None) -> Rollback:
        """Move production back, atomically: to the version that was production
        just before the current one (so a second rollback undoes the first), or
        to ``to``. The target is verified first (a corrupted version is never
        made production) and the move is recorded in the history."""
        with self._locked():
            current = self.alias(PRODUCTION)
            if current is None:
                raise NothingToRollBack(f"registry {self.root}: nothing is in production, nothing to roll back")
            others = [v for v in self.versions() if v != current]
            if to is None and not others:
                raise NothingToRollBack(f"{current} is the only version in {self.root}: there is nothing to roll "
                                        "back to")
            target = to if to is not None else self.previous_production()
            if target is None:
                raise UnknownVersion(f"the history does not say which version was production before {current}: "
                                     f"name one with --to ({', '.join(others)})")
            if target not in self.versions():
                raise UnknownVersion(f"no version {target!r} in {self.root} (have: {', '.join(self.versions())})")
            if target == current:
                raise NothingToRollBack(f"{target} is already production")
            self.verify(target)
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self._set_production(target)
            self._log(HistoryEvent(event="rollback", version=target, previous=current, at=now))
        return Rollback(target, current)

    def live_periods(self) -> dict[str, list[LivePeriod]]:
        """When each version was production, by version, from the history
        (the last period's ``to`` is None while it still is)."""
        periods: dict[str, list[LivePeriod]] = {}
        live: str | None = None
        for event in self.history():
            if event.event not in ("promote", "rollback"):
                continue
            if live is not None:
                periods[live][-1] = periods[live][-1].model_copy(update={"to": event.at})
            live = event.version
            periods.setdefault(live, []).append(LivePeriod(from_=event.at, to=None))
        return periods

    def describe_versions(self) -> list[VersionSummary]:
        """Every version, oldest first: its key figures, when it was live, and
        whether it is production now. Read leniently (``VersionSummary``): a
        version whose manifest lacks a figure, or is not a full manifest, is
        still listed. Raises RegistryError for an unusable aliases file."""
        current = self.alias(PRODUCTION)
        periods = self.live_periods()
        return [VersionSummary.model_validate({**self.manifest(v), "version": v, "production": v == current,
                                               "live": periods.get(v, [])})
                for v in self.versions()]

    def _store(self, model_dir: Path, hashes: dict, digest: str, gate_report: GateReport,
               record: dict, now: str, warm_start: Path | None = None) -> str:
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.versions_dir.glob(".tmp-*"):  # left by a crashed promote
            shutil.rmtree(stale, ignore_errors=True)
        existing = self.versions()
        number = int(_VERSION_RE.match(existing[-1]).group(1)) + 1 if existing else 1
        version = f"v{number:04d}"
        tmp = self.versions_dir / f".tmp-{uuid.uuid4().hex}"
        try:
            shutil.copytree(model_dir, tmp / "model")
            if file_hashes(tmp / "model") != hashes:
                raise PromotionRefused(f"{model_dir} changed while it was being copied")
            if warm_start is not None:
                warm_hashes = file_hashes(warm_start)
                shutil.copytree(warm_start, tmp / "warm_start")
                if file_hashes(tmp / "warm_start") != warm_hashes or not warm_hashes:
                    raise PromotionRefused(f"{warm_start} is empty or changed while it was being copied")
                record = {**record, "warm_start_files": warm_hashes}
            write_json(tmp / "gates.json", gate_report.to_dict())
            write_json(tmp / "manifest.json", {**record, "version": version, "created_at": now,
                                                "files": hashes, "content_hash": digest,
                                                "gates": gate_report.to_dict()["gates"]})
            fsync_tree(tmp)
            os.rename(tmp, self.path(version))
            fsync_dir(self.versions_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return version


def _set_aside_torn_line(path: Path) -> None:
    """A last line of ``path`` that a crash cut short (no newline after it,
    and not a whole event: one that only lacks its newline gets it) is
    moved to ``<path>.torn`` (appended, kept for inspection) and cut off
    ``path``, so that the next event starts a line of its own and every
    line of the log stays an event."""
    if not path.is_file():
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        try:   # a whole event that only lacks its newline is kept: it gets the newline
            HistoryEvent.model_validate_json(data[keep:])
            fh.write(b"\n")
            fh.flush()
            os.fsync(fh.fileno())
            return
        except ValueError:
            pass
        with open(path.with_name(path.name + ".torn"), "ab") as aside:
            aside.write(data[keep:] + b"\n")
            aside.flush()
            os.fsync(aside.fileno())
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
