"""The candidate cache's keys: one sha256 per candidate over everything its
build reads.

That is: the candidate (name and recipe), the teacher's files and labels,
the training split and the unlabelled text (only when a step of the recipe
reads text, as its method says: shrinkflow.compress.steps), the warm-start
sidecar a distill step starts from and the params only a warm start reads
(only when there is one: an ordinary run's keys stay what they were; with
an interpolation grid, the val split it chooses on), the source of
every module the build imports, the model libraries' versions, the ONNX
opset, the fusion switch and the thread count (torch results depend on it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shrinkflow.codegraph import import_closure
from shrinkflow.compress.steps import reads_text
from shrinkflow.compress.warm import chooses_on_val, recipe_record
from shrinkflow.files import content_hash, file_hashes, sha256_file

# The module a build runs (shrinkflow.compress.build: cache lookup, reading
# the inputs, apply_recipe): the code hash covers it and everything it
# imports (shrinkflow.codegraph), so no list of modules is kept by hand.
BUILD_ENTRY = "shrinkflow.compress.build"


def build_modules(package_root: Path, entry: str = BUILD_ENTRY) -> list[Path]:
    """The source files a build runs: ``entry`` and every module it imports,
    transitively, relative to ``package_root``, sorted."""
    return sorted(import_closure(Path(package_root), entry), key=lambda p: p.as_posix())


def code_hash(package_root: Path, entry: str = BUILD_ENTRY) -> str:
    """sha256 over the path and content of every file ``build_modules`` lists."""
    root = Path(package_root)
    return hashlib.sha256("".join(f"{f.as_posix()}:{sha256_file(root / f)}\n"
                                  for f in build_modules(root, entry)).encode()).hexdigest()


def package_root() -> Path:
    """The directory holding shrinkflow/ (the project, in an editable install)."""
    return Path(__file__).resolve().parents[2]


def candidate_key(candidate, *, teacher_hash: str, train_hash: str, unlabelled_hash: str, code: str,
                  libraries: dict, opset: int, threads: int, fuse: bool = False, labels=(),
                  warm_start_hash: str | None = None, val_hash: str | None = None) -> str:
    """sha256 over everything a build reads (module docstring). ``labels``:
    the class names in id order; the teacher's hash covers them too (its
    manifest), but a candidate's soft labels are over exactly these classes,
    so they are part of the key in their own right. ``warm_start_hash``: the
    content hash of the sidecar its distill step starts from, None for none.
    ``val_hash``: the val split's sha256, in the key only when a warm start
    chooses its interpolation on val (``chooses_on_val``)."""
    data = reads_text(candidate)
    # {"name", "recipe"}: the candidate's model_dump, less what only a warm start reads.
    blob = {"candidate": {"name": candidate.name, "recipe": recipe_record(candidate, warm_start_hash is not None)},
            "teacher": teacher_hash, "labels": list(labels),
            "train": train_hash if data else None, "unlabelled": unlabelled_hash if data else None,
            "code": code, "libraries": libraries, "opset": opset, "threads": threads,
            "fuse": fuse}
    if warm_start_hash is not None:
        blob["warm_start"] = warm_start_hash
        if chooses_on_val(candidate):
            blob["val"] = val_hash
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def warm_start_hash(root: Path, candidate, teacher_hash: str) -> str | None:
    """The content hash of the warm-start sidecar ``candidate`` would start
    from in the project at ``root`` (compress.warm.candidate_warm_start), or None."""
    from shrinkflow.compress.warm import candidate_warm_start
    from shrinkflow.paths import WARM_START

    sidecar = candidate_warm_start(Path(root) / WARM_START, candidate, teacher_hash)
    return content_hash(file_hashes(sidecar)) if sidecar is not None else None


def inputs_hashes(root: Path) -> dict:
    """The data-dependent ``candidate_key`` arguments for the project at
    ``root``: content hashes of the teacher dir, the training split and the
    unlabelled text (``io.unlabelled_hash``), and the teacher's labels (from
    its manifest). Raises FileNotFoundError when one is missing."""
    from shrinkflow.splits import unlabelled_hash
    from shrinkflow.modeling import read_manifest
    from shrinkflow.paths import TEACHER, split_path

    root = Path(root)
    return {"teacher_hash": content_hash(file_hashes(root / TEACHER)),
            "train_hash": sha256_file(root / split_path("train")),
            "unlabelled_hash": unlabelled_hash(root),
            "labels": tuple(read_manifest(root / TEACHER)["labels"])}


def candidate_keys(root: Path, candidates, opset: int, threads: int, fuse: bool) -> dict[str, str]:
    """Each candidate's cache key (by name), from its own inputs in the
    project at ``root``, this code and the installed model libraries."""
    from shrinkflow.lineage import MODEL_LIBRARIES, library_versions

    from shrinkflow.paths import split_path

    hashes = inputs_hashes(root)
    code, libs = code_hash(package_root()), library_versions(MODEL_LIBRARIES)
    val = Path(root) / split_path("val")
    val_hash = sha256_file(val) if val.is_file() and any(chooses_on_val(c) for c in candidates) else None
    return {c.name: candidate_key(c, **hashes, code=code, libraries=libs, opset=opset, threads=threads, fuse=fuse,
                                  warm_start_hash=warm_start_hash(root, c, hashes["teacher_hash"]),
                                  val_hash=val_hash)
            for c in candidates}
