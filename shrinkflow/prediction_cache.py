"""What a model predicted on a list of texts, cached between validations.

A re-compression validates the teacher, the int8 teacher and the production
model again although none of them changed: only the re-distilled student is
new, and only the window's texts are new to the others. Their labels on val,
test, the reference and the shifted split, and their batch-invariance check
on val, are the same as last validation's, bit for bit: predicting them again
cost most of a re-compression's validate stage (bench/results/monitoring.md).
This cache keeps them outside every DVC out (under
``.shrinkflow/cache/predictions/``), keyed by the model's hash (every file's
sha256 and the manifest fields its predictor reads, ``model_hash``), what was computed (labels, batched or
one text per call; the invariance check with its batch size and seed), the
measuring threads and every text in order. Latency is never cached: it is
timed again, side by side, in every validation.

An entry is one JSON file written atomically (``files.atomic_write_text``) holding
the value and the sha256 of its canonical JSON; an entry that cannot be read
or whose hash does not match is a miss, deleted and computed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from shrinkflow.files import atomic_write_text, file_hashes

# Entries kept: the oldest beyond this (by modification time) are deleted
# after each store. A validation stores one per (model, split): about 30 for
# a re-compression's four models and seven splits.
MAX_ENTRIES = 512


def texts_digest(texts: list[str]) -> str:
    """sha256 over ``texts`` in order, each length-prefixed (so no two lists
    of strings share a digest by where their boundaries fall)."""
    h = hashlib.sha256(f"{len(texts)}\n".encode())
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(f"{len(b)}:".encode())
        h.update(b)
    return h.hexdigest()


def model_hash(model_dir: Path | str, hashes: dict[str, str] | None = None) -> str:
    """The hash a model's predictions are cached under: the sha256 of every
    file of ``model_dir`` but its manifest (``modeling.MANIFEST``), and of
    the manifest's fields its predictor reads (``format``, ``max_seq_len``).
    Not the whole manifest: a build records how it went there (rows
    distilled, the recipe), so the same weights rebuilt in another
    re-compression (production's student, scored on val by compress) would
    miss. ``hashes``: ``files.file_hashes(model_dir)``, when already known.
    Raises MissingInput without a manifest."""
    from shrinkflow.modeling import MANIFEST, read_manifest

    hashes = dict(file_hashes(model_dir) if hashes is None else hashes)
    hashes.pop(MANIFEST, None)
    manifest = read_manifest(Path(model_dir))
    reads = {k: manifest.get(k) for k in ("format", "max_seq_len")}
    return hashlib.sha256(_canonical({"files": hashes, "manifest": reads}).encode()).hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class PredictionCache:
    """Cached predictions under ``root``, one JSON file per key, at most
    ``max_entries`` of them. The constructor touches nothing on disk."""

    def __init__(self, root: Path | str, max_entries: int = MAX_ENTRIES):
        self.root = Path(root)
        self.max_entries = max_entries

    @staticmethod
    def key(model_hash: str, kind: str, texts: list[str], **settings: Any) -> str:
        """sha256 over the model's content hash, ``kind`` (``"labels"``,
        ``"probabilities"``, ``"invariance"``), the ``settings`` that change the result (per_row,
        threads, batch size, seed) and ``texts_digest(texts)``."""
        head = _canonical({"model": model_hash, "kind": kind, "settings": settings})
        return hashlib.sha256(f"{head}\n{texts_digest(texts)}".encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> Any | None:
        """The stored value, or None on a miss. An entry that cannot be read,
        or whose value does not match its recorded sha256, is a miss and is
        deleted."""
        path = self._path(key)
        try:
            doc = json.loads(path.read_text())
            value = doc["value"]
            if hashlib.sha256(_canonical(value).encode()).hexdigest() != doc["sha256"]:
                raise ValueError("hash mismatch")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # recently used: kept longest
        return value

    def get_or_put(self, key: str, compute) -> Any:
        """The value stored under ``key``, or ``compute()``'s, stored."""
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` (JSON-serialisable) atomically, then delete the
        least recently used entries beyond ``max_entries``."""
        self.root.mkdir(parents=True, exist_ok=True)
        body = _canonical(value)
        atomic_write_text(self._path(key), f'{{"sha256":"{hashlib.sha256(body.encode()).hexdigest()}","value":{body}}}\n')
        entries = []
        for p in self.root.glob("*.json"):
            try:
                entries.append((p.stat().st_mtime, p))
            except FileNotFoundError:  # deleted by another validation meanwhile
                pass
        for _, old in sorted(entries)[:max(0, len(entries) - self.max_entries)]:
            old.unlink(missing_ok=True)
