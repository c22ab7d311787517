"""The model being served: the loaded, verified production version, and the
hot-reload logic that swaps in a new one."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from shrinkflow.errors import IntegrityError, RegistryError
from shrinkflow.registry import Registry
from shrinkflow.serving.schemas import ServedAs
from shrinkflow.shared_registry import Follower, VersionRefused
from shrinkflow.status import model_labels


@dataclass(frozen=True)
class LoadedModel:
    """A loaded, verified version. ``per_row``: each text is its own model
    call (``per_row_source`` says what decided it: ``manifest``, ``model
    graph`` or ``server``); ``specials``: the tokens the model reads for an
    empty text ([CLS] and [SEP]: 2), so a text with no more has nothing to
    classify."""

    version: str
    predictor: object
    labels: tuple[str, ...]
    per_row: bool = False
    per_row_source: str = "model graph"
    specials: int = 0

    def serving(self, truncation: str) -> ServedAs:
        """How this version is served, for /health and /metadata."""
        return ServedAs(per_row=self.per_row, per_row_decided_by=self.per_row_source,
                        batching="each text alone (the model's answers change with batching)" if self.per_row else "batched",
                        truncation=truncation)


class ModelHolder:
    """The model being served, and the reload logic around it.

    ``per_row``: None decides per loaded version (the registry manifest's
    ``serving.per_row``, else ``predictor.batch_dependent``); True or False
    forces it (benchmarks compare both).

    ``follower``: a ``shrinkflow.shared_registry.Follower`` whose cache is
    ``registry`` (``serve.registry: shared``): each poll first brings the
    cache to the shared production version (copied and verified there),
    then reloads from the cache as from any registry. None (default): the
    local registry alone."""

    def __init__(self, registry: Registry, threads: int, truncation: str = "head", per_row: bool | None = None,
                 follower: Follower | None = None):
        self.registry, self.threads, self.truncation, self.per_row = registry, threads, truncation, per_row
        self.follower = follower
        self.current: LoadedModel | None = None
        self.refused: dict | None = None      # {"version", "reason"} of a version refused on reload
        self._refused_by_follower = False
        self._lock = threading.Lock()

    def _load(self, version: str) -> LoadedModel:
        from shrinkflow.predictors import load_predictor

        ref = self.registry.load(version)     # verifies every file's hash first
        labels = model_labels(ref.path, ref.version)
        predictor = load_predictor(ref.path, self.threads, spin=False, truncation=self.truncation)
        declared = (ref.manifest.get("serving") or {}).get("per_row")
        if self.per_row is not None:
            per_row, source = self.per_row, "server"
        elif declared is not None:
            per_row, source = bool(declared), "manifest"
        else:   # deployed before validate recorded it: ask the graph
            per_row, source = bool(getattr(predictor, "batch_dependent", False)), "model graph"
        encoder = getattr(predictor, "encoder", None)
        specials = int(encoder([""]).tokens_seen[0]) if encoder is not None else 0
        return LoadedModel(ref.version, predictor, labels, per_row, source, specials)

    def load_production(self) -> LoadedModel:
        """Load the production version. Raises RegistryError when nothing is
        deployed or its manifest has no labels, IntegrityError when a file
        fails its hash check."""
        version = self.registry.alias()
        if version is None:
            raise RegistryError(f"nothing is deployed in {self.registry.root}: run `shrinkflow run` first")
        self.current = self._load(version)
        return self.current

    def follow(self) -> bool:
        """With a follower, bring the cache to the shared production
        version; True when it did (or there is no follower). When it cannot,
        False, and ``refused`` says why: with the version, one that failed
        its hashes; with none, a shared registry that cannot be read. The
        cache's alias has not moved then, so the version served stays."""
        if self.follower is None:
            return True
        try:
            self.follower.sync()
        except VersionRefused as exc:
            self.refused, self._refused_by_follower = {"version": exc.version, "reason": str(exc)}, True
            return False
        except (RegistryError, OSError) as exc:   # SharedRegistryError; a cache that cannot be written
            self.refused, self._refused_by_follower = {"version": None, "reason": str(exc)}, True
            return False
        if self._refused_by_follower:
            self.refused, self._refused_by_follower = None, False
        return True

    def poll(self) -> bool:
        """Load and swap in a new production version. True if swapped.

        With a follower, the shared registry is followed first (``follow``).
        An aliases file that cannot be read (say, half-written by a hand
        edit: not JSON yet) is reported in ``refused`` with no version, until
        it reads again, and so is a registry with no production alias while
        a version is served (its folder moved away or emptied); a version
        that fails to load, with its version."""
        with self._lock:
            if not self.follow():
                return False
            try:
                version = self.registry.alias()
            except (RegistryError, ValueError, OSError) as exc:
                self.refused = {"version": None, "reason": str(exc)}
                return False
            if self.refused and self.refused.get("version") is None:
                self.refused = None
            if version is None and self.current is not None:   # the registry moved or emptied under the server
                self.refused = {"version": None, "reason": f"registry {self.registry.root} has no production "
                                                           f"alias now (moved away, or no aliases.json, or none in "
                                                           f"it)"}
                return False
            if version is None or (self.current and version == self.current.version):
                return False
            if self.refused and self.refused.get("version") == version:
                return False
            try:
                loaded = self._load(version)
            except (IntegrityError, RegistryError, FileNotFoundError, ValueError) as exc:
                self.refused = {"version": version, "reason": str(exc)}
                return False
            self.current, self.refused = loaded, None
            return True
