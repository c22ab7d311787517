"""What a monitor run computes on the reference split, kept between runs.

The served model's outputs on the reference split, the teacher's labels and
embeddings of it, and its text descriptors depend only on the deployed
version, the kept teacher, the reference (and training) texts and how texts
are cut: never on the window. Recomputing them every run cost a monitor run
most of its model time (the served model one text at a time on 528 texts,
the teacher on them all). They are kept here, one ``.npz`` per entry, named
by a hash of everything they depend on (``key``), under
``.shrinkflow/monitor/cache/`` (shrinkflow.paths.MONITOR_CACHE).

An entry holds its own key and is used only when that key is equal to the
one asked for, and every array the caller needs is in it; an entry that
cannot be read (truncated, corrupted, another format) or does not match is
a miss: it is rebuilt and rewritten (atomically: shrinkflow.files). A cache
that cannot be written (a full or read-only disk) costs the run nothing but
the time. The newest ``keep`` entries are kept.

No Prefect, no torch here: the builders are the caller's.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

# Inside each .npz, the JSON of the entry's key.
KEY = "__key__"
SUFFIX = ".npz"


def texts_digest(texts: list[str]) -> str:
    """sha256 of a list of texts, order and boundaries included."""
    return hashlib.sha256(json.dumps([str(t) for t in texts]).encode("utf-8", "surrogatepass")).hexdigest()


def directory_digest(path: Path | str) -> str:
    """One sha256 over every file under ``path`` (names and contents): a
    model directory's identity, whatever registry or stage wrote it."""
    from shrinkflow.files import content_hash, file_hashes

    return content_hash(file_hashes(path))


class ReferenceCache:
    """Arrays computed from the reference split, by key, under ``root``
    (None: no cache, every ``get`` builds). Constructing one touches nothing
    on disk."""

    def __init__(self, root: Path | str | None, keep: int = 16):
        self.root = None if root is None else Path(root)
        self.keep = keep
        self.hits: list[str] = []     # kinds served from disk in this run (reported, tested)
        self.misses: list[str] = []

    def path(self, kind: str, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40]
        return self.root / f"{kind}-{digest}{SUFFIX}"

    def get(self, kind: str, key: dict, rows: int, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The arrays of entry (``kind``, ``key``): read when a valid entry
        is on disk (``lookup``), else ``build()`` (a dict of arrays, names
        not starting with ``__``, each with ``rows`` rows), written (``put``),
        and returned.

        ``key``: JSON-serialisable, everything the arrays depend on. An
        entry is valid when its stored key equals ``key`` and it holds
        every array ``build`` returned last time it was written with
        ``rows`` rows each (checked against the names it stores). Numeric
        and bool arrays round-trip bit for bit; object arrays are not
        allowed (no pickle)."""
        found = self.lookup(kind, key, rows)
        return found if found is not None else self.put(kind, key, rows, build())

    def lookup(self, kind: str, key: dict, rows: int) -> dict[str, np.ndarray] | None:
        """The arrays of a valid entry (``kind``, ``key``) on disk (see
        ``get``), or None (no cache, no entry, or an invalid one)."""
        if self.root is None:
            return None
        full = {"kind": kind, **key}
        found = self._read(self.path(kind, full), full, rows)
        if found is not None:
            self.hits.append(kind)
        return found

    def put(self, kind: str, key: dict, rows: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Write ``arrays`` (each with ``rows`` rows) as entry (``kind``,
        ``key``) and return them. Raises ValueError for an array without
        ``rows`` rows; a cache that cannot be written is logged, not raised
        (the next run recomputes)."""
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        if any(a.ndim == 0 or len(a) != rows for a in arrays.values()):
            raise ValueError(f"monitor cache: the {kind} arrays must each hold {rows} rows")
        self.misses.append(kind)
        if self.root is not None:
            full = {"kind": kind, **key}
            self._write(self.path(kind, full), full, arrays)
        return arrays

    def _read(self, path: Path, key: dict, rows: int) -> dict[str, np.ndarray] | None:
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                stored = json.loads(str(npz[KEY]))
                if stored.get("key") != key:
                    log.info("monitor cache: %s holds another key: rebuilt", path.name)
                    return None
                arrays = {k: npz[k] for k in stored["arrays"]}
            if any(a.ndim == 0 or len(a) != rows for a in arrays.values()):
                log.warning("monitor cache: %s does not hold %d rows: rebuilt", path.name, rows)
                return None
            return arrays
        except Exception as exc:  # noqa: BLE001 - any unreadable entry is a miss, rebuilt below
            log.warning("monitor cache: %s could not be read (%s): rebuilt", path.name, exc)
            return None

    def _write(self, path: Path, key: dict, arrays: dict[str, np.ndarray]) -> None:
        from shrinkflow.files import atomic_write_bytes

        buf = io.BytesIO()
        meta = json.dumps({"key": key, "arrays": sorted(arrays)}, sort_keys=True)
        np.savez(buf, **{KEY: np.asarray(meta)}, **arrays)
        try:
            atomic_write_bytes(path, buf.getvalue())
            self._prune()
        except OSError as exc:
            log.warning("monitor cache: %s could not be written (%s): the next run recomputes it", path, exc)

    def _prune(self) -> None:
        entries = sorted(self.root.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[self.keep:]:
            old.unlink(missing_ok=True)
