"""A versioned, directory-based model registry.

Layout::

    registry/
      versions/v0001/   immutable: model files + manifest.json
      aliases.json      {"production": "v0001"}; replaced atomically
      history.jsonl     append-only log of promotions
      .lock             serialises writers (flock)

Promotion builds the version in ``versions/.tmp-*`` and renames it into place,
then swaps the alias file with ``os.replace``. A crash at any point leaves the
previous production version serving: a reader sees either the old alias or
the new one, and the alias never names a half-written version. A long-running
server (see ROADMAP) can poll ``aliases.json`` and reload on change.

The registry lives outside every DVC out: DVC deletes a stage's outs before
re-running it, and earlier versions must survive that.
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

from shrinkflow.gates import GateReport
from shrinkflow.io import read_json, sha256_file, write_json

PRODUCTION = "production"
_VERSION_RE = re.compile(r"^v(\d{4,})$")


class PromotionRefused(RuntimeError):
    """The candidate may not be deployed (failed gates, or bad artifacts)."""


class IntegrityError(RuntimeError):
    """A stored version's files do not match the hashes in its manifest."""


@dataclass(frozen=True)
class Promotion:
    version: str
    created: bool          # False when an identical version already existed
    previous: str | None   # production before this promotion


def file_hashes(model_dir: Path) -> dict[str, str]:
    root = Path(model_dir)
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file()}


def content_hash(hashes: dict[str, str]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


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
        path = self.root / "aliases.json"
        return read_json(path) if path.is_file() else {}

    def alias(self, name: str = PRODUCTION) -> str | None:
        return self.aliases().get(name)

    def path(self, version: str) -> Path:
        return self.versions_dir / version

    def manifest(self, version: str) -> dict:
        path = self.path(version) / "manifest.json"
        if not path.is_file():
            raise KeyError(f"registry {self.root}: no version {version!r}")
        return read_json(path)

    def production(self) -> tuple[str, dict] | None:
        version = self.alias(PRODUCTION)
        return (version, self.manifest(version)) if version else None

    def history(self) -> list[dict]:
        path = self.root / "history.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def verify(self, version: str) -> None:
        """Raise IntegrityError unless every model file matches its hash."""
        expected = self.manifest(version)["files"]
        actual = file_hashes(self.path(version) / "model")
        if actual != expected:
            bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
            raise IntegrityError(f"version {version}: files changed or missing: {bad}")

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

    def _set_alias(self, name: str, version: str) -> None:
        aliases = self.aliases()
        aliases[name] = version
        write_json(self.root / "aliases.json", aliases)

    def _log(self, event: dict) -> None:
        with open(self.root / "history.jsonl", "a") as fh:
            fh.write(json.dumps(event, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def promote(self, model_dir: Path | str, gate_report: GateReport, record: dict) -> Promotion:
        """Store ``model_dir`` as a new immutable version and make it production.

        Refuses (PromotionRefused) a candidate that failed any gate. An
        identical model (same file hashes) is not stored twice: its existing
        version is re-pointed to instead.
        """
        if not gate_report.passed:
            raise PromotionRefused("refusing to deploy: " + gate_report.summary())
        model_dir = Path(model_dir)
        if not (model_dir / "shrinkflow_model.json").is_file():
            raise PromotionRefused(f"refusing to deploy: {model_dir} is not a shrinkflow model directory")
        hashes = file_hashes(model_dir)
        digest = content_hash(hashes)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._locked():
            previous = self.alias(PRODUCTION)
            existing = next((v for v in self.versions() if self.manifest(v).get("content_hash") == digest), None)
            if existing:
                version, created = existing, False
            else:
                version, created = self._store(model_dir, hashes, digest, gate_report, record, now), True
            self._set_alias(PRODUCTION, version)
            self._log({"event": "promote", "version": version, "previous": previous,
                       "created": created, "at": now})
        return Promotion(version, created, previous)

    def _store(self, model_dir: Path, hashes: dict, digest: str, gate_report: GateReport,
               record: dict, now: str) -> str:
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
            write_json(tmp / "gates.json", gate_report.to_dict())
            write_json(tmp / "manifest.json", {**record, "version": version, "created_at": now,
                                                "files": hashes, "content_hash": digest,
                                                "gates": gate_report.to_dict()["gates"]})
            os.rename(tmp, self.path(version))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return version
