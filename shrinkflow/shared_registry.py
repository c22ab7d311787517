"""The registry on shared storage, so that every serving host serves the
production version (docs/team.md, "The production model on every serving
host"); no Prefect here.

The host that deploys *publishes* its registry to a URL every serving host
reaches: ``file:///mnt/models/shrinkflow`` (a shared mount) or
``ssh://user@host[:port]/srv/models/shrinkflow`` (an SFTP server), both
through fsspec (its local filesystem, and ``sshfs``, which dvc-ssh already
brings). A serving host *follows* it (``Follower``): it reads the shared
``production`` alias, copies a version it does not hold into a local cache
(itself a ``Registry``), verifies every file against the version's manifest
before the copy becomes visible there, then moves the cache's alias; the
server's hot reload (``ModelHolder.poll``) loads it, verifying again.

The shared layout is the registry's own (``versions/vNNNN/``,
``aliases.json``, ``history.jsonl``), written so that no reader ever sees
anything half-written:

- a version is uploaded under ``versions/.tmp-<uuid>/`` and renamed to its
  name only when every file is there (a directory rename: atomic on a local
  filesystem, and over SFTP); a killed upload leaves a ``.tmp-*`` directory,
  which no reader lists and the next publish removes;
- ``history.jsonl``, then ``aliases.json``, are written under a temporary
  name and renamed over the old file (``os.replace``; over SFTP OpenSSH's
  ``posix-rename``), after every version the alias names is in place.

Only ``file://`` and ``ssh://`` are accepted (``config.check_shared_registry_url``):
fsspec renames on object stores by copying, which a reader could see
half-done.

One registry publishes to a URL. A shared version whose files differ from
the local version of the same name is refused: two registries numbering
their versions each on their own would otherwise mix their models.

Credentials never come from params.yaml: the SSH key file is named by
``SHRINKFLOW_SHARED_REGISTRY_KEY`` (default: the user's own ``~/.ssh`` keys),
and the server's host key is checked against
``SHRINKFLOW_SHARED_REGISTRY_KNOWN_HOSTS`` (default ``~/.ssh/known_hosts``):
the hashes a serving host checks come from the server, so the server must be
the right one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import posixpath
import re
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from shrinkflow.config import check_shared_registry_url
from shrinkflow.errors import IntegrityError, RegistryError
from shrinkflow.files import atomic_write_bytes, fsync_dir, fsync_tree, read_json, write_json
from shrinkflow.registry import PREVIOUS, PRODUCTION, Registry

KEY_ENV = "SHRINKFLOW_SHARED_REGISTRY_KEY"
KNOWN_HOSTS_ENV = "SHRINKFLOW_SHARED_REGISTRY_KNOWN_HOSTS"
# A version's name, as the registry names them (never a path).
_VERSION_RE = re.compile(r"^v(\d{4,})$")
_TMP_PREFIX = ".tmp-"
# How often a dead SSH connection is probed (seconds), and how many probes
# go unanswered before it counts as lost (then the next call reconnects).
_KEEPALIVE_S, _KEEPALIVE_MISSES = 10, 3
# A version refused for its hashes is copied again at most this often
# (seconds) while production still names it: often enough that a repaired
# copy on the storage is picked up, rarely enough that a broken one is not
# downloaded on every poll.
RETRY_REFUSED_S = 60.0
# Where a registry remembers the shared registries it published to or pulled from.
PUBLISHED_RECORD = ".published.json"
# A versions/.tmp-* upload younger than this may be another host's in
# progress (seconds); older ones are a killed upload's leftovers.
STALE_UPLOAD_S = 3600.0


class SharedRegistryError(RegistryError):
    """The shared registry cannot be used: it cannot be reached or refused
    the login, a file there is unreadable, it names a version it does not
    hold, or it holds a version of the same name with other files (two
    registries publish to one URL). The message names the URL (which never
    holds a password) and the cause."""


class SharedRegistryDiverged(SharedRegistryError):
    """The shared registry and the local one each hold moves of production
    (promotions, rollbacks: ``history.jsonl``) the other lacks, or the
    local one lacks some of the shared one's: publishing would undo them,
    pulling would drop the local ones."""


class VersionRefused(IntegrityError):
    """A shared version whose files do not match its manifest's hashes (or
    that has no usable manifest): it is not copied into the cache and never
    served. ``version``: its name."""

    def __init__(self, message: str, version: str):
        self.version = version
        super().__init__(message)


@dataclass(frozen=True)
class Published:
    """What one ``SharedRegistry.publish`` did: the versions it uploaded
    (oldest first), the shared production alias before and after, and the
    versions whose shared copy failed its hashes and was uploaded again."""

    url: str
    uploaded: tuple[str, ...]
    production: str | None
    production_before: str | None
    repaired: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for a person: what was uploaded and where production is."""
        sent = ", ".join(self.uploaded) if self.uploaded else "no new version"
        moved = (f"production {self.production_before or 'none'} -> {self.production}"
                 if self.production != self.production_before else f"production {self.production} (unchanged)")
        fixed = (f"; the shared copy of {', '.join(self.repaired)} failed its hashes and was uploaded again"
                 if self.repaired else "")
        return f"published to {self.url}: {sent} uploaded; {moved}{fixed}"


@dataclass(frozen=True)
class Pulled:
    """What one ``SharedRegistry.pull`` did: the versions it copied into the
    local registry (oldest first), the production version there now, and
    what became of deploy/deployment.json (``deployment``: "restored",
    "already here", or why it was not restored)."""

    url: str
    copied: tuple[str, ...]
    production: str | None
    deployment: str = "not asked for"
    set_aside: str | None = None

    def describe(self) -> str:
        """Lines for a person."""
        sent = ", ".join(self.copied) if self.copied else "no new version"
        lines = [f"pulled from {self.url}: {sent} copied and verified; production is {self.production}"]
        if self.set_aside:
            lines.append(self.set_aside)
        if self.deployment in ("restored", "already here"):
            lines.append(f"deploy/deployment.json, the record dvc.lock pins: {self.deployment}")
        else:
            lines.append(f"deploy/deployment.json not restored: {self.deployment}")
        return "\n".join(lines)


@contextmanager
def _flock(path: Path):
    """An exclusive flock on ``path`` (created, with its directory), held
    for the block: serialises the publishes of one registry, and the
    followers (uvicorn workers) that share one cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_aliases(aliases, where: str) -> dict[str, str]:
    """``aliases`` when it is a mapping of alias -> version name, else
    SharedRegistryError (a version name is never a path: it is joined to
    build the paths a follower reads and writes)."""
    if not isinstance(aliases, dict):
        raise SharedRegistryError(f"{where}: not a mapping of alias -> version")
    for name, version in aliases.items():
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            raise SharedRegistryError(f"{where}: alias {name!r} -> {version!r} is not a version name (vNNNN)")
    return aliases


class SharedRegistry:
    """The registry at ``url`` (``file:///ABS`` or ``ssh://[user@]host[:port]/ABS``),
    read and written through fsspec. Constructing it checks the URL
    (ValueError) and touches nothing; the first call connects, and a call
    that fails drops the connection, so the next one reconnects (a restarted
    SSH server is picked up again). Every failure to reach or read it is a
    SharedRegistryError naming the URL. ``connect_timeout_s``: an SSH server
    that does not answer within this is reported unreachable."""

    def __init__(self, url: str, connect_timeout_s: float = 30.0):
        self.url = check_shared_registry_url(url)
        self.connect_timeout_s = connect_timeout_s
        parts = urlsplit(url)
        self.local = parts.scheme == "file"
        self.root = posixpath.normpath(parts.path) if parts.path else ""
        # The same place however the URL spells it (a trailing or doubled
        # slash, ``..``, the scheme's case): what a registry remembers.
        self.key = (f"file://{self.root}" if self.local else
                    f"ssh://{parts.username + '@' if parts.username else ''}{(parts.hostname or '').lower()}"
                    f":{parts.port or 22}{self.root}")
        self._fs = None

    # ------------------------------------------------------------ transport
    def _ssh_options(self) -> dict:
        """asyncssh's connect options: host, port and user from the URL; the
        key file from $SHRINKFLOW_SHARED_REGISTRY_KEY (else asyncssh's
        defaults, ~/.ssh/id_*); the host key checked against
        $SHRINKFLOW_SHARED_REGISTRY_KNOWN_HOSTS or ~/.ssh/known_hosts.
        Raises SharedRegistryError when neither known_hosts file exists
        (sshfs would otherwise skip the check), MissingInput for a key file
        that is not there."""
        from shrinkflow.remote import check_key_file

        parts = urlsplit(self.url)
        known = Path(os.environ.get(KNOWN_HOSTS_ENV) or Path.home() / ".ssh" / "known_hosts").expanduser()
        if not known.is_file():
            raise SharedRegistryError(
                f"the shared registry {self.url}: no known_hosts file at {known}, so the server's host key cannot "
                f"be checked: add it (ssh-keyscan -p {parts.port or 22} {parts.hostname} >> {known}, "
                f"after checking its fingerprint) or point ${KNOWN_HOSTS_ENV} at a file that holds it")
        options = {"host": parts.hostname, "port": parts.port or 22, "known_hosts": str(known),
                   "timeout": self.connect_timeout_s, "connect_timeout": self.connect_timeout_s,
                   "keepalive_interval": _KEEPALIVE_S, "keepalive_count_max": _KEEPALIVE_MISSES}
        if parts.username:
            options["username"] = parts.username
        key = os.environ.get(KEY_ENV)
        if key:
            options["client_keys"] = [str(check_key_file(key))]
        return options

    def _connect(self):
        if self._fs is None:
            import fsspec

            # sshfs connects in its constructor; a fresh instance each time
            # (fsspec would hand back a cached one with a dead connection).
            self._fs = (fsspec.filesystem("file") if self.local
                        else fsspec.filesystem("ssh", skip_instance_cache=True, **self._ssh_options()))
        return self._fs

    def close(self) -> None:
        """Drop the connection (the next call makes a new one)."""
        self._fs = None

    @contextmanager
    def _talking(self, what: str):
        """Run a block of calls to the storage; any failure but our own
        errors becomes a SharedRegistryError saying ``what`` failed, and
        drops the connection."""
        try:
            yield self._connect()
        except (RegistryError, IntegrityError):   # ours (SharedRegistryError is a RegistryError), or the local registry's
            raise
        except Exception as exc:  # noqa: BLE001  (asyncssh's, OSError, sshfs's own: reported with their type)
            self.close()
            text = str(exc) or (f"no answer within {self.connect_timeout_s:g} s"
                                if "Timeout" in type(exc).__name__ else repr(exc))
            if isinstance(exc, PermissionError):
                why = ("refused access (the files' permissions: every serving host's user must read them)"
                       if self.local else "refused the login or the access")
            elif isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)) or "Timeout" in type(exc).__name__:
                why = "cannot be reached"
            else:
                raise SharedRegistryError(f"the shared registry {self.url}: {what} failed: "
                                          f"{type(exc).__name__}: {text}") from None
            raise SharedRegistryError(f"the shared registry {self.url} {why} ({what}): "
                                      f"{type(exc).__name__}: {text}") from None

    def _path(self, *names: str) -> str:
        return posixpath.join(self.root, *names)

    def _rename(self, fs, src: str, dst: str) -> None:
        """Rename atomically: ``os.replace`` on a local filesystem (then the
        directory is fsynced), OpenSSH's posix-rename over SFTP (sshfs's
        ``mv``). A directory never replaces a non-empty one."""
        if self.local:
            os.replace(src, dst)
            fsync_dir(posixpath.dirname(dst))
        else:
            fs.mv(src, dst)

    def _replace_file(self, fs, name: str, data: bytes) -> None:
        """Write ``data`` to ``name`` under the root: under a temporary name,
        then renamed over the old file, so a reader sees the old or the new
        file whole."""
        if self.local:
            atomic_write_bytes(self._path(name), data)   # fsynced, os.replace, directory fsynced
            return
        head, base = posixpath.split(name)
        tmp = self._path(head, f".{base}.{uuid.uuid4().hex}.tmp")
        fs.pipe_file(tmp, data)
        self._rename(fs, tmp, self._path(name))

    # ------------------------------------------------------------ reading
    def aliases(self) -> dict[str, str]:
        """Alias -> version, as the shared ``aliases.json`` says (empty when
        nothing was published yet). Raises SharedRegistryError when it
        cannot be read or is not a mapping of alias -> version name."""
        with self._talking("reading aliases.json") as fs:
            try:
                raw = fs.cat_file(self._path("aliases.json"))
            except FileNotFoundError:
                return {}
        try:
            aliases = json.loads(raw)
        except ValueError as exc:
            raise SharedRegistryError(f"the shared registry {self.url}: aliases.json is not JSON ({exc})") from None
        return _check_aliases(aliases, f"the shared registry {self.url}: aliases.json")

    def versions(self) -> list[str]:
        """The complete versions it holds, oldest first (an upload in
        progress or killed, ``versions/.tmp-*``, is not one)."""
        with self._talking("listing versions/") as fs:
            try:
                names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(self._path("versions"), detail=False)]
            except FileNotFoundError:
                return []
        return _by_number(n for n in names if _VERSION_RE.match(n))

    def manifest(self, version: str) -> dict:
        """``version``'s manifest.json. Raises SharedRegistryError when it
        is missing or unreadable."""
        with self._talking(f"reading {version}/manifest.json") as fs:
            try:
                return json.loads(fs.cat_file(self._path("versions", version, "manifest.json")))
            except FileNotFoundError:
                raise SharedRegistryError(f"the shared registry {self.url} has no version {version}") from None

    def download(self, version: str, dest: Path) -> None:
        """Copy every file of ``version`` into the directory ``dest`` (made
        here). Raises SharedRegistryError when it does not hold the version
        or a copy fails. Nothing is verified here (``Follower`` does)."""
        src = self._path("versions", version)
        with self._talking(f"copying {version}") as fs:
            try:
                files = sorted(fs.find(src))
            except FileNotFoundError:
                files = []
            if not files:
                raise SharedRegistryError(f"the shared registry {self.url} names {version} but holds no such version")
            rels = [posixpath.relpath(f, src) for f in files]
            if any(r.startswith("..") or posixpath.isabs(r) for r in rels):
                raise SharedRegistryError(f"the shared registry {self.url}: {version} lists a file outside itself")
            targets = [dest / r for r in rels]
            for parent in {t.parent for t in targets}:
                parent.mkdir(parents=True, exist_ok=True)
            fs.get(files, [str(t) for t in targets])

    # ------------------------------------------------------------ writing
    def _upload_tmp(self, fs, local_dir: Path) -> str:
        """Upload ``local_dir`` (a version's directory) under a temporary
        name in ``versions/``, durable; returns that name."""
        tmp = self._path("versions", f"{_TMP_PREFIX}{uuid.uuid4().hex}")
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        rels = [p.relative_to(local_dir).as_posix() for p in files]
        for sub in sorted({posixpath.dirname(posixpath.join(tmp, r)) for r in rels}):
            fs.makedirs(sub, exist_ok=True)
        fs.put([str(p) for p in files], [posixpath.join(tmp, r) for r in rels])
        if self.local:
            fsync_tree(tmp)   # durable before the name says it is complete
        return tmp

    def _upload(self, fs, local_dir: Path, version: str) -> None:
        """Upload ``local_dir`` under a temporary name, then rename it to
        ``versions/<version>``."""
        self._rename(fs, self._upload_tmp(fs, local_dir), self._path("versions", version))

    def _replace_version(self, fs, local_dir: Path, version: str) -> None:
        """Upload ``local_dir`` again over a shared ``version`` whose copy is
        broken: the new copy is uploaded whole under a temporary name; then
        the broken one is renamed aside (a ``.tmp-`` name, which no reader
        lists) and the new one into place. Between the two renames a follower
        finds no such version and retries at its next poll; it never reads a
        mix of the two."""
        fresh = self._upload_tmp(fs, local_dir)
        aside = self._path("versions", f"{_TMP_PREFIX}broken-{uuid.uuid4().hex}")
        self._rename(fs, self._path("versions", version), aside)
        self._rename(fs, fresh, self._path("versions", version))
        fs.rm(aside, recursive=True)

    def broken_files(self, manifest: dict, version: str) -> list[str]:
        """The files of the shared ``version`` (paths relative to it) whose
        sha256 is not the one ``manifest`` (the local, verified version's)
        records, that are missing, or that it holds beyond them, under
        ``model/`` and ``warm_start/``: what a follower's verification would
        refuse. Reads every byte of the version (over SSH too). Raises
        SharedRegistryError when the storage cannot be read."""
        expected = {f"model/{k}": v for k, v in manifest["files"].items()}
        expected.update({f"warm_start/{k}": v for k, v in (manifest.get("warm_start_files") or {}).items()})
        base = self._path("versions", version)
        with self._talking(f"checking {version}'s files") as fs:
            try:
                held = {posixpath.relpath(f, base) for f in fs.find(base)}
            except FileNotFoundError:
                held = set()
            bad = sorted(r for r in held - set(expected) if r.split("/", 1)[0] in ("model", "warm_start"))
            for rel, digest in sorted(expected.items()):
                if rel not in held:
                    bad.append(rel)
                    continue
                sha = hashlib.sha256()
                with fs.open(posixpath.join(base, rel), "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        sha.update(chunk)
                if sha.hexdigest() != digest:
                    bad.append(rel)
        return sorted(bad)

    def _clear_stale_uploads(self, fs) -> None:
        """Remove what killed uploads left (``versions/.tmp-*``) once older
        than STALE_UPLOAD_S: a younger one may be another host's upload in
        progress."""
        try:
            entries = fs.ls(self._path("versions"), detail=True)
        except FileNotFoundError:
            return
        now = time.time()
        for entry in entries:
            path = entry["name"]
            if not posixpath.basename(path.rstrip("/")).startswith(_TMP_PREFIX):
                continue
            mtime = entry.get("mtime")
            mtime = mtime.timestamp() if hasattr(mtime, "timestamp") else mtime
            if mtime is None or now - float(mtime) > STALE_UPLOAD_S:
                fs.rm(path, recursive=True)

    def _read(self, name: str) -> bytes | None:
        """The bytes of ``name`` under the root; None when it is not there."""
        with self._talking(f"reading {name}") as fs:
            try:
                return fs.cat_file(self._path(name))
            except FileNotFoundError:
                return None

    def history_bytes(self) -> bytes:
        """The shared ``history.jsonl`` (b"" when there is none)."""
        return self._read("history.jsonl") or b""

    def exists(self) -> bool:
        """Whether the URL's directory exists (an unmounted share's does
        not, or is empty)."""
        with self._talking("looking for the directory") as fs:
            return bool(fs.exists(self.root))

    def publish(self, registry: Registry, deployment: Path | None = None, fresh: bool = False,
                check_all: bool = False) -> Published:
        """Make this shared registry match ``registry``: upload every version
        it lacks (each verified here first, then written under a temporary
        name and renamed when complete), then its history, then its aliases
        (production last of all, so it never names a version that is not
        whole). Then the shared copy of production (every version with
        ``check_all``) is read back and checked against its hashes and its
        manifest; a broken copy (storage that rotted, a hand edit) is
        uploaded again (``_replace_version``) and reported in
        ``Published.repaired``. ``deployment``: the project's
        deploy/deployment.json, also stored as ``deployments/<md5>.json`` so
        that ``pull`` in another clone restores the record its dvc.lock pins.
        Idempotent: a second call uploads nothing.

        Moves of production are never undone: the shared ``history.jsonl``
        must be where the local one started (its prefix). A registry that
        has not seen the shared registry's latest moves (another host
        rolled back or deployed since this one last published or pulled; a
        pull cut short) is refused (SharedRegistryDiverged): ``pull`` first.

        A registry remembers the URLs it published to (``.published.json`` in
        its root). When such a URL now holds nothing at all, the storage is
        not mounted or the URL is wrong: publishing would re-create the whole
        registry where no serving host looks, so it is refused unless
        ``fresh`` (a new, empty shared registry on purpose).

        Raises IntegrityError (a local version fails its hashes: nothing of
        it is uploaded), RegistryError (the local registry holds nothing, or
        its aliases are unusable), SharedRegistryDiverged (above) and
        SharedRegistryError (unreachable, refused, empty where this registry
        published before, a version of the same name with other files: two
        registries publish to this URL, or another host published the same
        version at the same moment)."""
        with _flock(registry.root / ".publish.lock"):
            # Aliases before versions: a promotion in between adds a version
            # (never removes one), so every version they name is listed.
            aliases = registry.aliases()
            local = registry.versions()
            if not local:
                raise RegistryError(f"registry {registry.root} holds no version: nothing to publish")
            history_bytes = _local_history(registry)
            with self._talking("publishing") as fs:
                shared = set(self.versions())
                before = self.aliases()
                if not shared and not before and not fresh:
                    self._refuse_if_published_before(registry)
                shared_history = self.history_bytes()
                if not history_bytes.startswith(shared_history):
                    raise SharedRegistryDiverged(self._diverged(registry, history_bytes, shared_history, "publish"))
                if aliases.get(PRODUCTION) is None and before.get(PRODUCTION) is not None:
                    raise SharedRegistryDiverged(
                        f"{registry.root} has nothing in production and the shared registry {self.url} has "
                        f"{before[PRODUCTION]}: publishing would take production away from every serving host. "
                        "`shrinkflow pull` (a pull cut short leaves versions without an alias)")
                self._clear_stale_uploads(fs)
                uploaded, repaired = [], []
                for version in local:
                    if version in shared:
                        if not self._check_same(registry, version, shared_history, history_bytes):
                            repaired.append(version)       # its manifest rotted or was edited
                        continue
                    registry.verify(version)       # never publish a corrupted version
                    registry.warm_start(version)
                    try:
                        self._upload(fs, registry.path(version), version)
                    except OSError as exc:
                        if version not in self.versions():
                            raise
                        raise SharedRegistryDiverged(
                            f"the shared registry {self.url}: another host published a {version} while this one "
                            f"uploaded its own ({type(exc).__name__}): one registry publishes to a URL. "
                            "`shrinkflow pull` shows which") from None
                    uploaded.append(version)
                production = aliases.get(PRODUCTION)
                checked = [v for v in local if v in shared] if check_all else [production] if production else []
                # Read back what is checked; send again what is broken (or whose manifest was damaged).
                for version in _by_number(set(checked) | set(repaired)):
                    if version in repaired or self.broken_files(registry.manifest(version), version):
                        registry.verify(version)     # the local copy is sound: send it again
                        registry.warm_start(version)
                        self._replace_version(fs, registry.path(version), version)
                        if self.broken_files(registry.manifest(version), version):
                            raise SharedRegistryError(
                                f"the shared registry {self.url}: {version} was uploaded again and its copy still "
                                "fails its hashes: the storage does not keep what is written to it")
                        if version not in repaired:
                            repaired.append(version)
                if deployment is not None and deployment.is_file():
                    self._store_deployment(fs, deployment.read_bytes())
                if history_bytes != shared_history:
                    self._replace_file(fs, "history.jsonl", history_bytes)
                if before != aliases:
                    self._replace_file(fs, "aliases.json",
                                       (json.dumps(aliases, indent=2, sort_keys=True) + "\n").encode())
            self._remember(registry, production)
        return Published(self.url, tuple(uploaded), production, before.get(PRODUCTION), tuple(_by_number(repaired)))

    def _diverged(self, registry: Registry, mine: bytes, theirs: bytes, doing: str) -> str:
        """Why ``doing`` is refused: the moves of production one side has
        and the other lacks, each as "rollback to v0004 (2026-…)"."""
        common = 0
        a, b = mine.splitlines(keepends=True), theirs.splitlines(keepends=True)
        while common < min(len(a), len(b)) and a[common] == b[common]:
            common += 1
        only_shared = [_event_text(line) for line in b[common:]]
        only_here = [_event_text(line) for line in a[common:]]
        if doing == "publish":
            head = (f"refusing to publish to {self.url}: it holds moves of production {registry.root} has not "
                    f"seen ({'; '.join(only_shared)}), which publishing would undo")
            if only_here:
                return (f"{head}, and this registry holds its own ({'; '.join(only_here)}): the two diverged. "
                        "`shrinkflow pull --discard-local` takes the shared registry's (this registry's own "
                        "versions are set aside, not deleted); then deploy or roll back again")
            return f"{head}. `shrinkflow pull` brings them here; then publish again"
        head = (f"refusing to pull from {self.url}: {registry.root} holds moves of production the shared "
                f"registry has not seen ({'; '.join(only_here)}), which pulling would drop")
        if only_shared:
            return (f"{head}, and the shared registry holds its own ({'; '.join(only_shared)}): the two diverged. "
                    "`shrinkflow pull --discard-local` takes the shared registry's (this registry's own versions "
                    "are set aside, not deleted)")
        return f"{head}. `shrinkflow publish` sends them there"

    def _store_deployment(self, fs, data: bytes) -> None:
        """Store a deploy record as ``deployments/<md5>.json`` (the md5 DVC
        records for it in dvc.lock), unless it is there."""
        name = posixpath.join("deployments", f"{hashlib.md5(data).hexdigest()}.json")
        if not fs.exists(self._path(name)):
            fs.makedirs(self._path("deployments"), exist_ok=True)
            self._replace_file(fs, name, data)

    def _refuse_if_published_before(self, registry: Registry) -> None:
        record = _published_record(registry).get(self.key)
        if record:
            raise SharedRegistryError(
                f"the shared registry {self.url} holds nothing, but {registry.root} published there before "
                f"(production {record.get('production')}, {record.get('at')}): the storage is not mounted, or the "
                "URL is wrong, and serving hosts do not look where this would write. Mount it (or fix "
                "shared_registry.url); for a new, empty shared registry on purpose, `shrinkflow publish --fresh`")

    def _remember(self, registry: Registry, production: str | None) -> None:
        """Record in the local registry that it published (or pulled) here."""
        record = _published_record(registry)
        record[self.key] = {"production": production, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_json(registry.root / PUBLISHED_RECORD, record)

    def _compare(self, registry: Registry, version: str, shared_history: bytes, local_history: bytes
                 ) -> tuple[str, dict, object]:
        """("same" | "damaged" | "other", the local manifest, the shared one).
        "damaged": the same version with a damaged shared manifest
        (unreadable, or other figures: rot or a hand edit), known by the
        shared history holding the very line (bytes) of the local history
        that promoted it; "other": another registry's version of that name.
        ``shared_history``/``local_history``: both history.jsonl's bytes.
        Raises SharedRegistryError when it cannot be read."""
        mine = registry.manifest(version)
        promoted_here = _promotion_line(local_history, version)
        ours = promoted_here is not None and promoted_here in shared_history.splitlines()
        try:
            theirs = self.manifest(version)
        except SharedRegistryError as exc:
            if "has no version" in str(exc) or "failed: " not in str(exc):
                raise
            return ("damaged" if ours else "other"), mine, None          # unreadable JSON
        if mine == theirs:
            return "same", mine, theirs
        return ("damaged" if ours else "other"), mine, theirs

    def _check_same(self, registry: Registry, version: str, shared_history: bytes, local_history: bytes) -> bool:
        """Whether the shared ``version``'s manifest is the local one's;
        False when it is the same version with a damaged manifest (the
        caller uploads it again). Raises SharedRegistryError when it is
        another registry's version (another creation time or model)."""
        kind, mine, theirs = self._compare(registry, version, shared_history, local_history)
        if kind != "other":
            return kind == "same"
        if not isinstance(theirs, dict):          # unreadable there
            theirs = {"created_at": "?", "content_hash": "?"}
        raise SharedRegistryError(
            f"the shared registry {self.url} holds a {version} that is not {registry.root}'s {version} (its "
            f"manifest differs: created {theirs.get('created_at')} there, {mine.get('created_at')} here; model "
            f"{str(theirs.get('content_hash'))[:12]} there, {str(mine.get('content_hash'))[:12]} here): another "
            "registry publishes to this URL. One "
            "registry publishes to a URL; nothing was changed there")

    # ------------------------------------------------------------ pulling into a checkout
    def pull(self, registry: Registry, dvc_lock: Path | None = None, deployment: Path | None = None,
             discard_local: bool = False) -> Pulled:
        """Make ``registry`` (a checkout's own, e.g. a second clone's) a copy
        of this shared registry: every version it lacks is copied and
        verified (as a serving host's cache is, ``fetch_version``), then its
        history and aliases are written. Then, when ``dvc_lock`` pins a
        deploy/deployment.json by md5 and the shared registry holds that
        record (``publish`` stores it), it is restored to ``deployment``, so
        that ``dvc status`` in the clone is clean and the deploy stage is not
        re-run.

        Moves of production are never dropped: the local history must be
        where the shared one started (its prefix), and the local registry
        may hold no version the shared one lacks. Else SharedRegistryDiverged
        unless ``discard_local``: then the local-only versions are moved
        aside to ``<registry>/set-aside/<UTC time>/`` (not deleted) and the
        shared registry's history and aliases replace the local ones.

        Raises SharedRegistryError (unreachable; it holds nothing; a
        version of the same name with other files), SharedRegistryDiverged
        (above), VersionRefused (a shared version fails its hashes: nothing
        of it is copied; ``publish --check-all`` on the deploying host
        uploads it again)."""
        aliases = self.aliases()
        shared = self.versions()
        if not shared or aliases.get(PRODUCTION) is None:
            where = "" if self.exists() else " (its directory does not exist)"
            raise SharedRegistryError(f"the shared registry {self.url} holds nothing in production{where}: nothing "
                                      "to pull (is the storage mounted, is the URL right?)")
        shared_history = self.history_bytes()
        copied, set_aside = [], None
        with _flock(registry.root / ".lock"):
            local = registry.versions()
            local_history = _local_history(registry)
            extra = _by_number(set(local) - set(shared))
            compared = {v: self._compare(registry, v, shared_history, local_history)[0]
                        for v in local if v in shared}
            others = [v for v in local if compared.get(v) == "other"]     # same name, another model
            damaged = [v for v in local if compared.get(v) == "damaged"]
            if damaged:
                raise SharedRegistryError(
                    f"the shared registry {self.url}: the manifest of {', '.join(damaged)} is damaged there: "
                    "`shrinkflow publish` on the deploying host uploads it again")
            diverged = not shared_history.startswith(local_history)
            if (extra or others or diverged) and not discard_local:
                if diverged:
                    raise SharedRegistryDiverged(self._diverged(registry, local_history, shared_history, "pull"))
                if others:
                    raise SharedRegistryDiverged(
                        f"{registry.root} holds a {others[0]} that is not the shared registry's {others[0]}: two "
                        "registries numbered versions on their own. `shrinkflow pull --discard-local` takes the "
                        "shared one's (this registry's are set aside, not deleted)")
                raise SharedRegistryDiverged(
                    f"{registry.root} holds {', '.join(extra)}, which the shared registry {self.url} lacks: pulling "
                    "would hide them. Publish them (`shrinkflow publish`), or `shrinkflow pull --discard-local` "
                    "(they are set aside, not deleted)")
            extra = _by_number(extra + others)
            if extra:
                stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
                aside = registry.root / "set-aside" / stamp
                aside.mkdir(parents=True, exist_ok=True)
                for version in extra:
                    os.rename(registry.path(version), aside / version)
                fsync_dir(registry.versions_dir)
                set_aside = (f"set aside {', '.join(extra)} (not in the shared registry) in {aside}")
            elif diverged:
                set_aside = "this registry's own moves of production were replaced by the shared registry's"
            for version in shared:
                if version in local and version not in extra:
                    continue                          # the same version (compared above)
                try:
                    fetch_version(self, registry, version, served_before=False)
                except VersionRefused as exc:
                    raise VersionRefused(
                        f"{exc}. Nothing was changed in {registry.root} but the versions copied before it "
                        f"({', '.join(copied) or 'none'}); on the deploying host, `shrinkflow publish "
                        "--check-all` uploads every broken shared version again, then pull again",
                        version) from None
                copied.append(version)
            atomic_write_bytes(registry.root / "history.jsonl", shared_history)
            write_json(registry.root / "aliases.json", {k: v for k, v in aliases.items() if v in shared})
        self._remember(registry, aliases[PRODUCTION])
        why = self._restore_deployment(dvc_lock, deployment) if deployment is not None else "not asked for"
        return Pulled(self.url, tuple(copied), aliases[PRODUCTION], why, set_aside)

    def _restore_deployment(self, dvc_lock: Path | None, deployment: Path) -> str:
        """Write the deploy record dvc.lock pins to ``deployment``; returns
        "restored", "already here", or why not."""
        import yaml

        try:
            lock = yaml.safe_load(dvc_lock.read_text()) if dvc_lock is not None and dvc_lock.is_file() else None
        except yaml.YAMLError as exc:
            return f"{dvc_lock} is not YAML ({exc})"
        rel = deployment.name if dvc_lock is None else deployment.relative_to(dvc_lock.parent).as_posix()
        outs = (((lock or {}).get("stages") or {}).get("deploy") or {}).get("outs") or []
        md5 = next((o.get("md5") for o in outs if isinstance(o, dict) and o.get("path") == rel), None)
        if md5 is None:
            return f"dvc.lock pins no {rel} (the deploy stage has not run in this history)"
        if deployment.is_file() and hashlib.md5(deployment.read_bytes()).hexdigest() == md5:
            return "already here"
        with self._talking("reading the deploy record") as fs:
            try:
                data = fs.cat_file(self._path("deployments", f"{md5}.json"))
            except FileNotFoundError:
                return (f"the shared registry holds no record {md5} (the one dvc.lock pins): it was deployed "
                        "before this shrinkflow published records, or dvc.lock is not the deploying host's "
                        "(git pull?)")
        if hashlib.md5(data).hexdigest() != md5:
            return f"the shared registry's record {md5} fails its md5: not restored"
        atomic_write_bytes(deployment, data)
        return "restored"


def _local_history(registry: Registry) -> bytes:
    """``registry``'s history.jsonl as it is on disk (b"" when there is none)."""
    path = registry.root / "history.jsonl"
    return path.read_bytes() if path.is_file() else b""


def _promotion_line(history: bytes, version: str) -> bytes | None:
    """The line of ``history`` (a history.jsonl's bytes) that promoted
    ``version``, without the newline; None when there is none."""
    for line in history.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "promote" and event.get("version") == version:
            return line
    return None


def _by_number(names) -> list[str]:
    """Version names (vNNNN) in numeric order."""
    return sorted(names, key=lambda n: int(n[1:]))


def _event_text(line: bytes) -> str:
    """One history.jsonl line for a person: "rollback to v0004 (time)"."""
    try:
        event = json.loads(line)
        return f"{event.get('event', 'move')} to {event.get('version')} ({event.get('at', '?')})"
    except (ValueError, AttributeError):
        return line.decode("utf-8", "replace").strip()[:80]


def _published_record(registry: Registry) -> dict:
    """URL -> {production, at} of the shared registries ``registry`` was
    published to or pulled from (``.published.json``; {} when none or
    unreadable)."""
    path = registry.root / PUBLISHED_RECORD
    try:
        record = read_json(path) if path.is_file() else {}
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


class Follower:
    """A serving host's side: keep ``cache`` (a local Registry, written only
    here) at the shared registry's production version. ``sync`` copies a
    version the cache lacks into ``<cache>/.incoming/``, verifies every file
    (model and warm-start) against its manifest, renames it into
    ``<cache>/versions/`` and only then moves the cache's alias, all under
    the cache's lock (uvicorn workers share one cache)."""

    def __init__(self, shared: SharedRegistry, cache: Registry, retry_refused_s: float = RETRY_REFUSED_S):
        self.shared, self.cache, self.retry_refused_s = shared, cache, retry_refused_s
        self._refused: VersionRefused | None = None
        self._refused_at = 0.0

    def sync(self) -> str | None:
        """Bring the cache's production to the shared one. Returns the
        version production now names in the cache (None: nothing was ever
        published there, and the cache has nothing either).

        Raises SharedRegistryError when the shared registry cannot be read,
        lacks the version it names, or has nothing in production while the
        cache has (publishing never removes production: the storage is not
        mounted, or the URL is wrong; the cache keeps serving), and
        VersionRefused when that version fails its hashes: the cache's alias stays where it was (the server
        keeps serving it). A refused version is copied again only after
        ``retry_refused_s`` seconds (a repaired copy is then picked up);
        until then the same refusal is raised at once."""
        shared = self.shared.aliases()
        version = shared.get(PRODUCTION)
        if version is None:
            cached = self._cached_production()
            if cached is not None:
                # Publishing never removes production: a shared registry
                # that lost it is an unmounted share or a wrong URL.
                raise SharedRegistryError(f"the shared registry {self.shared.url} has nothing in production "
                                          f"(no aliases.json there: is the storage mounted, is the URL right?); "
                                          f"{cached} from the cache keeps serving")
            return None
        if (self._refused is not None and self._refused.version == version
                and time.monotonic() - self._refused_at < self.retry_refused_s):
            raise VersionRefused(str(self._refused), version)   # a fresh one: re-raising would grow its traceback
        self._refused = None
        with _flock(self.cache.root / ".lock"):
            if version in self.cache.versions() and self._cached_production() != version \
                    and not self._sound(version):
                # about to serve a copy kept from before (a rollback to it): a
                # damaged one is copied again rather than refused forever
                try:
                    self._fetch(version)
                except VersionRefused as exc:
                    self._refused, self._refused_at = exc, time.monotonic()
                    raise
            elif version not in self.cache.versions():
                try:
                    self._fetch(version)
                except VersionRefused as exc:
                    self._refused, self._refused_at = exc, time.monotonic()
                    raise
            aliases = {PRODUCTION: version}
            previous = shared.get(PREVIOUS)
            if previous is not None and previous in self.cache.versions():
                aliases[PREVIOUS] = previous
            if self._raw_cache_aliases() != aliases:
                write_json(self.cache.root / "aliases.json", aliases)   # fsynced, then os.replace
        return version

    def _sound(self, version: str) -> bool:
        """Whether the cache's copy of ``version`` passes its hashes."""
        try:
            self.cache.verify(version)
            self.cache.warm_start(version)
        except (IntegrityError, KeyError, ValueError, OSError):
            return False
        return True

    def _cached_production(self) -> str | None:
        try:
            return self.cache.alias()
        except (RegistryError, ValueError, OSError):
            return None

    def _raw_cache_aliases(self):
        path = self.cache.root / "aliases.json"
        try:
            return read_json(path) if path.is_file() else None
        except ValueError:
            return None

    def _fetch(self, version: str) -> None:
        fetch_version(self.shared, self.cache, version)


def fetch_version(shared: SharedRegistry, cache: Registry, version: str, served_before: bool = True) -> None:
    """Copy ``version`` from ``shared`` into the local registry ``cache``:
    downloaded into ``<cache>/.incoming/``, every file (model and warm-start)
    verified against its manifest, then renamed into ``<cache>/versions/``
    (a damaged copy already there is replaced only then). The caller holds
    the cache's lock. Raises VersionRefused (hashes; ``served_before``: the
    message says the version served before stays), SharedRegistryError
    (copy)."""
    incoming_root = cache.root / ".incoming"
    shutil.rmtree(incoming_root, ignore_errors=True)   # a killed fetch's leftovers (we hold the lock)
    staged = Registry(incoming_root / uuid.uuid4().hex)
    try:
        shared.download(version, staged.path(version))
        try:
            manifest = staged.verify(version)           # every model file against its hash
            staged.warm_start(version)                  # and the warm-start sidecar's, if any
        except (IntegrityError, KeyError, ValueError, TypeError) as exc:
            raise VersionRefused(f"refused {version} from the shared registry {shared.url}: {exc} "
                                 + ("(not copied into the cache; the version served before stays)" if served_before
                                    else "(nothing of it was copied)"), version) from None
        if manifest.get("version", version) != version:
            raise VersionRefused(f"refused {version} from the shared registry {shared.url}: its manifest "
                                 f"says it is {manifest.get('version')!r}", version)
        fsync_tree(staged.path(version))
        cache.versions_dir.mkdir(parents=True, exist_ok=True)
        if cache.path(version).exists():       # a damaged copy: out of the way, removed with .incoming/
            os.rename(cache.path(version), incoming_root / f"damaged-{version}")
        os.rename(staged.path(version), cache.path(version))
        fsync_dir(cache.versions_dir)
    finally:
        shutil.rmtree(incoming_root, ignore_errors=True)


def publish_project(root: Path | str, params, fresh: bool = False) -> tuple[Published | None, str | None]:
    """Publish the project's registry (``deploy.registry_dir``), with its
    deploy record (deploy/deployment.json), to ``shared_registry.url``, as
    the lifecycle does after its deploy step. Returns (what was published,
    None), (None, None) when no URL is set, or (None, why it could not be
    published): a promotion stands locally either way, and the warning says
    how to send it later. Raises nothing for a shared registry that cannot
    be used. ``fresh``: see ``SharedRegistry.publish``."""
    from shrinkflow.paths import DEPLOYMENT

    url = params.shared_registry.url
    if url is None:
        return None, None
    registry = Registry(Path(root) / params.deploy.registry_dir)
    try:
        return SharedRegistry(url, params.shared_registry.connect_timeout_s).publish(
            registry, deployment=Path(root) / DEPLOYMENT, fresh=fresh), None
    except SharedRegistryDiverged as exc:
        production = _local_production(registry)
        return None, (f"did not publish the registry to {url}: {exc}. Production here is {production}; serving "
                      "hosts that follow the shared registry keep what it names (docs/team.md, \"The production "
                      "model on every serving host\")")
    except (RegistryError, IntegrityError, OSError) as exc:
        production = _local_production(registry)
        return None, (f"could not publish the registry to {url}: {exc}. Production here is {production}; serving "
                      "hosts that follow the shared registry keep what it named before. Run `shrinkflow publish` "
                      "once it answers (docs/team.md, \"The production model on every serving host\")")


def pull_project(root: Path | str, params, discard_local: bool = False) -> Pulled:
    """Copy ``shared_registry.url`` into the project's registry
    (``deploy.registry_dir``) and restore the deploy record its dvc.lock
    pins (``SharedRegistry.pull``): after ``dvc pull``, a second clone then
    has a clean ``dvc status`` and the same production version, verified.
    ``discard_local``: see ``SharedRegistry.pull``. Raises ValueError when
    no URL is set, and what ``pull`` raises."""
    from shrinkflow.paths import DEPLOYMENT

    url = params.shared_registry.url
    if url is None:
        raise ValueError("shared_registry.url is not set in the params: nothing to pull from")
    root = Path(root)
    return SharedRegistry(url, params.shared_registry.connect_timeout_s).pull(
        Registry(root / params.deploy.registry_dir), dvc_lock=root / "dvc.lock", deployment=root / DEPLOYMENT,
        discard_local=discard_local)


def _local_production(registry: Registry) -> str | None:
    try:
        return registry.alias()
    except (RegistryError, ValueError, OSError):
        return None
