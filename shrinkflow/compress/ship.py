"""Build a candidate on a Dask worker that cannot see the project.

With ``compress.runner.dask_address`` set (and ``dask_shared_filesystem``
false, the default) nothing is read from or written to a disk the worker
shares with the client. The client packs what every build reads
(``pack_inputs``: the teacher's files, the training split, the unlabelled
text) and what one candidate's build reads besides (``pack_warm_start``: the
warm-start sidecar its distill step starts from), each file with its sha256.
The worker checks every file on arrival, builds into a temporary project of
its own (``build_shipped``) and sends the candidate's files (and a distilled
candidate's student sidecar) back with their sha256; the client checks them
again before anything is stored in the candidate cache or placed in the
project (``receive``). Any mismatch raises RemoteBuildError and writes
nothing there.

The worker also refuses to build when its shrinkflow code or model library
versions differ from the client's (``software``): the client stores the
result under a candidate-cache key that names its own.

What does not travel: the teacher-output cache. An entry of the default
teacher's split with its hidden states is ~0.45 GB, more than the teacher
itself, and which entry a build reads is decided inside the build (from the
token ids its recipe produces). A worker keeps its own instead, under
``$SHRINKFLOW_CACHE_DIR`` (default ``~/.cache/shrinkflow``)
``/teacher_outputs``, so the second distillation of a teacher on the same
worker host reuses it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from shrinkflow.compress.build import build_fresh, distils
from shrinkflow.compress.cache import CandidateCache
from shrinkflow.compress.warm import SOURCE, candidate_warm_start, chooses_on_val
from shrinkflow.config import Candidate
from shrinkflow.errors import MissingInput, RemoteBuildError
from shrinkflow.files import content_hash, fsync_tree, sha256_file
from shrinkflow.modeling import read_manifest
from shrinkflow.paths import (CANDIDATE_CACHE, CANDIDATES, STATE, STUDENTS, TEACHER, UNLABELLED,
                              UNLABELLED_PREPARED, WARM_START, WINDOW_HELDOUT, cache_dir, split_path)

# The module a worker runs: the software check hashes it and everything it
# imports (the build included), so client and worker agree on all of it.
SHIP_ENTRY = "shrinkflow.compress.ship"
# Where the client unpacks a returned candidate before it is verified and
# stored: inside the project's state dir, so the renames into the candidate
# cache and the project stay on one filesystem.
INCOMING = STATE / "incoming"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safe(rel: str) -> PurePosixPath:
    """``rel`` as a relative path that stays inside its directory; raises
    RemoteBuildError for an absolute path, ``..``, or an empty name."""
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or any(part in ("", ".", "..") for part in path.parts) or "\\" in rel:
        raise RemoteBuildError(f"refusing a shipped file named {rel!r}: not a plain relative path")
    return path


@dataclass(frozen=True)
class FileSet:
    """Files by relative POSIX path: their bytes (``data``) and the sha256
    the sender computed for each (``sha256``)."""

    data: dict[str, bytes]
    sha256: dict[str, str]

    @classmethod
    def read(cls, root: Path, paths=(".",)) -> FileSet:
        """Every file under each of ``paths`` (files or directories, relative
        to ``root``), keyed by its path relative to ``root``. Raises
        MissingInput when one of ``paths`` does not exist."""
        root = Path(root)
        data: dict[str, bytes] = {}
        for rel in paths:
            path = root / rel
            if path.is_file():
                files = [path]
            elif path.is_dir():
                files = sorted(f for f in path.rglob("*") if f.is_file())
            else:
                raise MissingInput(f"{path} is missing")
            for f in files:
                data[f.relative_to(root).as_posix()] = f.read_bytes()
        return cls(data, {name: _sha256(blob) for name, blob in data.items()})

    @property
    def size_bytes(self) -> int:
        return sum(len(blob) for blob in self.data.values())

    def check(self, what: str) -> None:
        """Raise RemoteBuildError, naming ``what`` and the files, unless every
        file's bytes match its sha256 and the two maps name the same files."""
        names = self.data.keys() | self.sha256.keys()
        bad = sorted(n for n in names if n not in self.data or n not in self.sha256
                     or _sha256(self.data[n]) != self.sha256[n])
        if bad:
            raise RemoteBuildError(f"{what}: {len(bad)} of {len(names)} files do not match the sha256 they were "
                                   f"sent with ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})")
        for name in names:
            _safe(name)

    def write(self, dest: Path, what: str) -> None:
        """``check``, then write every file under ``dest`` and check each one's
        sha256 again as read back from disk (RemoteBuildError naming ``what``)."""
        self.check(what)
        dest = Path(dest)
        for name, blob in self.data.items():
            path = dest / _safe(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
        bad = sorted(n for n, h in self.sha256.items() if sha256_file(dest / n) != h)
        if bad:
            raise RemoteBuildError(f"{what}: {len(bad)} files differ from their sha256 once written to {dest} "
                                   f"({', '.join(bad[:5])})")

    def only(self, prefix: PurePosixPath) -> dict[str, str]:
        """The sha256 of the files under ``prefix``, by path relative to it."""
        return {str(PurePosixPath(n).relative_to(prefix)): h for n, h in self.sha256.items()
                if PurePosixPath(n).is_relative_to(prefix)}


@dataclass(frozen=True)
class BuildInputs:
    """What every candidate's build reads, packed once per compress run, and
    the software the client keyed the builds with (``software``)."""

    files: FileSet  # by project-relative path
    software: dict

    @property
    def teacher_hash(self) -> str:
        """The teacher directory's content hash (as ``files.content_hash``
        over ``file_hashes(models/teacher)``)."""
        return content_hash(self.files.only(PurePosixPath(TEACHER.as_posix())))


@dataclass(frozen=True)
class BuiltCandidate:
    """A candidate built on a worker: its metrics/compress.json ``record``,
    how the build went (``run_stats``, which the cache keeps), the
    candidate's files (``model``, relative to its directory), a distilled
    candidate's student sidecar (``student``, else None) and where it was
    built (``built_on``: host, process id and directory)."""

    record: dict
    run_stats: dict
    model: FileSet
    student: FileSet | None
    built_on: str


def software() -> dict:
    """What must be the same on the client and every worker: the hash of
    shrinkflow's code that a shipped build runs (``SHIP_ENTRY`` and its
    imports, shrinkflow.compress.keys.code_hash) and the model libraries'
    versions (shrinkflow.lineage.MODEL_LIBRARIES)."""
    from shrinkflow.compress.keys import code_hash, package_root
    from shrinkflow.lineage import MODEL_LIBRARIES, library_versions

    return {"code": code_hash(package_root(), SHIP_ENTRY), "libraries": library_versions(MODEL_LIBRARIES)}


def pack_inputs(root: Path) -> BuildInputs:
    """The files every build in the project at ``root`` reads: the teacher
    directory, the training split, the production-window text, the
    production labels' training share and the user's prepared unlabelled
    text (each when there is one: shrinkflow.splits.read_unlabelled), with
    ``software()``. Raises MissingInput when the teacher, the split or the
    window file is missing."""
    root = Path(root)
    paths = [TEACHER, split_path("train"), UNLABELLED]
    # the production labels' texts, the window's held-out texts that filter them, the user's text
    for rel in (split_path("feedback_train"), WINDOW_HELDOUT, UNLABELLED_PREPARED):
        if (root / rel).is_file():
            paths.append(rel)
    return BuildInputs(FileSet.read(root, paths), software())


def pack_warm_start(root: Path, candidate: Candidate, teacher_hash: str) -> FileSet | None:
    """The warm-start sidecar ``candidate``'s distill step would start from in
    the project at ``root`` (shrinkflow.compress.warm.candidate_warm_start),
    with the record of the version it came from beside it (and the val
    split, when it chooses its interpolation on val), by project-relative
    path; None when it starts from none."""
    root = Path(root)
    sidecar = candidate_warm_start(root / WARM_START, candidate, teacher_hash)
    if sidecar is None:
        return None
    paths = [sidecar.relative_to(root)]
    if (root / WARM_START / SOURCE).is_file():
        paths.append(WARM_START / SOURCE)
    if chooses_on_val(candidate):   # its interpolation is chosen on the val split
        paths.append(split_path("val"))
    return FileSet.read(root, paths)


def worker_teacher_outputs() -> Path:
    """Where a worker keeps its own teacher-output cache (module docstring)."""
    return cache_dir() / "teacher_outputs"


def check_software(client: dict) -> None:
    """Raise RemoteBuildError unless this process runs the same shrinkflow
    code and model library versions as ``client`` (its ``software()``)."""
    mine = software()
    if mine["code"] != client["code"]:
        raise RemoteBuildError(
            f"worker {socket.gethostname()} runs other shrinkflow code than the client (code hash "
            f"{mine['code'][:12]} here, {client['code'][:12]} there): install the same shrinkflow version "
            "on every worker host and restart its worker (docs/team.md)")
    libs = {name: (v, client["libraries"].get(name)) for name, v in mine["libraries"].items()
            if v != client["libraries"].get(name)}
    if libs:
        diff = ", ".join(f"{name} {here} here, {there} there" for name, (here, there) in sorted(libs.items()))
        raise RemoteBuildError(f"worker {socket.gethostname()} has other model library versions than the "
                               f"client ({diff}): install the same versions on every worker host (docs/team.md)")


def arrived(inputs: BuildInputs) -> BuildInputs:
    """``inputs``, once every file is checked against its sha256 where this
    runs (RemoteBuildError otherwise): what a worker holds for the builds."""
    inputs.files.check(f"inputs received on {socket.gethostname()}")
    return inputs


def build_shipped(inputs: BuildInputs, candidate: Candidate, warm_start: FileSet | None, *, opset: int,
                  threads: int, fuse: bool = False) -> BuiltCandidate:
    """Build ``candidate`` from shipped ``inputs`` (and its ``warm_start``
    sidecar, from ``pack_warm_start``) in a temporary directory of this
    process's own, on ``threads`` torch threads, with this host's own
    teacher-output and prediction caches (under ``cache_dir()``). Nothing is read from
    the client's project. Returns the candidate's files and record.

    Raises RemoteBuildError when this process runs other software than the
    client (``check_software``) or a shipped file does not match its
    sha256, before anything is built.
    """
    check_software(inputs.software)
    host = socket.gethostname()
    with tempfile.TemporaryDirectory(prefix="shrinkflow-build-") as tmp:
        root = Path(tmp)
        built_on = f"{host} (pid {os.getpid()}, {root})"
        print(f"compress: building {candidate.name} on {built_on} from shipped inputs "
              f"({inputs.files.size_bytes / 1e6:.1f} MB)")
        inputs.files.write(root, f"inputs received on {host}")
        if warm_start is not None:
            warm_start.write(root, f"warm-start sidecar received on {host}")
        record, run_stats = build_fresh(root, candidate, opset=opset, threads=threads, fuse=fuse,
                                        teacher_outputs=worker_teacher_outputs(),
                                        predictions=cache_dir() / "predictions")
        student = root / STUDENTS / candidate.name
        return BuiltCandidate(record=record, run_stats=run_stats,
                              model=FileSet.read(root / CANDIDATES / candidate.name),
                              student=FileSet.read(student) if distils(candidate) else None,
                              built_on=built_on)


def receive(root: Path, candidate: Candidate, built: BuiltCandidate, key: str | None) -> dict:
    """Put a candidate built on a worker (``build_shipped``) into the project
    at ``root``: every file is checked against the sha256 the worker sent
    and written to a scratch directory under ``.shrinkflow/incoming`` (and
    checked again there); the candidate is then stored in the candidate
    cache under ``key`` and copied from it (checked a third time,
    CandidateCache.fetch) to ``models/candidates/<name>`` (and its sidecar to
    ``models/students/<name>``). Without a key it is renamed into place.
    Returns its metrics/compress.json record, with ``built_on``.

    Raises RemoteBuildError when a file does not match, a distilled
    candidate came back without its student sidecar, or the files are
    another candidate's; then nothing is stored or placed (the scratch
    directory is removed either way).
    """
    root = Path(root)
    name = candidate.name
    built.model.check(f"candidate {name} sent back from {built.built_on}")
    if distils(candidate) != (built.student is not None):
        raise RemoteBuildError(f"candidate {name} came back from {built.built_on} "
                               f"{'without' if distils(candidate) else 'with'} a student sidecar")
    if built.student is not None:
        built.student.check(f"student sidecar of {name} sent back from {built.built_on}")
    scratch = root / INCOMING / f"{name}.{uuid.uuid4().hex}"
    dest = root / CANDIDATES / name
    student_dest = root / STUDENTS / name if built.student is not None else None
    try:
        built.model.write(scratch / "model", f"candidate {name} from {built.built_on}")
        if built.student is not None:
            built.student.write(scratch / "student", f"student sidecar of {name} from {built.built_on}")
        if read_manifest(scratch / "model").get("candidate") != name:
            raise RemoteBuildError(f"the files sent back from {built.built_on} for candidate {name} are "
                                   "another candidate's")
        record = {**built.record, "built_on": built.built_on}
        if key:
            cache = CandidateCache(root / CANDIDATE_CACHE)
            cache.store(key, scratch / "model", record["build_seconds"], record.get("build_cpu_seconds"),
                        student=scratch / "student" if student_dest else None, run_stats=built.run_stats)
            if cache.fetch(key, dest, student_dest) is None:
                raise RemoteBuildError(f"candidate {name}: the candidate cache entry {key[:12]} did not verify "
                                       "after it was stored")
        else:
            fsync_tree(scratch)
            for part, target in (("model", dest), ("student", student_dest)):
                if target is not None:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.rmtree(target, ignore_errors=True)
                    (scratch / part).rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"compress: {name} built on {built.built_on} in {record['build_seconds']:.0f}s, "
          f"{built.model.size_bytes / 1e6:.1f} MB received, sha256 checked")
    return record


def receive_all(root: Path, pending: list[tuple[Candidate, Callable[[], BuiltCandidate]]],
                keys: dict[str, str]) -> dict[str, dict]:
    """``receive`` each candidate of ``pending`` (candidate, a function that
    waits for its build and returns it, or raises the build's error), in
    order, under its key in ``keys``. Every candidate that came back whole
    is received even when another failed, so the cache keeps it and the next
    run copies it; then the first failure (of a build or of a ``receive``)
    is raised. Returns each candidate's record by name."""
    records, failed = {}, []
    for candidate, result in pending:
        try:
            records[candidate.name] = receive(root, candidate, result(), keys.get(candidate.name))
        except Exception as exc:
            failed.append(exc)
    if failed:
        raise failed[0]
    return records
