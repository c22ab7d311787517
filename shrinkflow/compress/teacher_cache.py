"""The teacher's outputs on the training split, cached between builds.

Every distillation (and every recovery that distils) needs the teacher's
logits on the training split and, for hidden-state matching, its layer
outputs: one teacher pass over the split per build, although the teacher and
the split rarely change. This cache keeps them outside every DVC out (under
``.shrinkflow/cache/teacher_outputs/``), keyed by the teacher's content hash,
the token ids asked for (so the texts and the tokenizer) and the layers asked
for. An entry is written to a temp directory and renamed; it records each
file's sha256, and an entry whose files no longer match (or that cannot be
read) is a miss: deleted, recomputed and stored again.

An entry holds ``logits.npy`` (float32 [n, classes]) and, when layers were
asked for, ``hidden.npy`` (float16 [total tokens, layers, hidden]: every
sequence's real tokens, concatenated) with ``offsets.npy`` (int64 [n + 1]).
The values are the ones ``distill.teacher_outputs`` returns, bit for bit, so
a build from a cached entry is the build without one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from shrinkflow.files import fsync_tree, sha256_file

INFO = "entry.json"
# Entries kept: the least recently used beyond this are deleted after each
# store. An entry of the default 6-layer teacher's train split with its
# hidden states is ~0.45 GB; a run needs one per (teacher, split, layers),
# and a re-compression reuses the run's.
MAX_ENTRIES = 4


def outputs_key(teacher_hash: str, seqs: list[list[int]], layers: tuple[int, ...], tokenizer_json: str = "") -> str:
    """sha256 over the teacher's content hash, the tokenizer the ids come from
    (a step that remaps the vocabulary changes it), every sequence's token ids
    (in order) and the layers whose outputs are asked for."""
    tok = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    h = hashlib.sha256(f"{teacher_hash}\n{tok}\n{list(layers)}\n".encode())
    for s in seqs:
        h.update(np.asarray(s, dtype=np.int64).tobytes())
        h.update(b"\n")
    return h.hexdigest()


class TeacherOutputCache:
    """Teacher outputs under ``root``, one directory per key, at most
    ``max_entries`` of them (least recently used deleted first). The
    constructor touches nothing on disk."""

    def __init__(self, root: Path | str, max_entries: int = MAX_ENTRIES):
        self.root = Path(root)
        self.max_entries = max_entries

    def entry(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str):
        """(logits, hidden) as ``distill.teacher_outputs`` returns them (hidden:
        a list of fp16 torch tensors [len, layers, hidden], empty when no
        layers were asked for), or None on a miss. A corrupted entry is a miss
        and is deleted."""
        src = self.entry(key)
        try:
            info = json.loads((src / INFO).read_text())
            if {name: sha256_file(src / name) for name in info["files"]} != info["files"]:
                raise ValueError("hash mismatch")
            logits = np.load(src / "logits.npy", allow_pickle=False)
            hidden = []
            if "hidden.npy" in info["files"]:
                import torch

                flat = torch.from_numpy(np.load(src / "hidden.npy", allow_pickle=False))
                offsets = np.load(src / "offsets.npy", allow_pickle=False)
                hidden = [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
                if len(hidden) != len(logits):
                    raise ValueError("row count mismatch")
        except FileNotFoundError:
            if src.exists():
                shutil.rmtree(src, ignore_errors=True)
            return None
        except (OSError, ValueError, KeyError, TypeError):
            shutil.rmtree(src, ignore_errors=True)
            return None
        try:
            os.utime(src / INFO)  # recently used: evicted last
        except OSError:
            pass
        return logits, hidden

    def entries(self) -> list[Path]:
        """Stored entries, least recently used (stored or loaded) first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]

        def used(p: Path) -> float:
            try:
                return (p / INFO).stat().st_mtime
            except OSError:
                return 0.0  # unreadable: first to go
        return sorted(found, key=used)

    def evict(self, keep: str | None = None) -> list[Path]:
        """Delete the least recently used entries beyond ``max_entries``,
        never ``keep`` (a key). Returns the entries deleted."""
        gone = []
        entries = [p for p in self.entries() if p.name != keep]
        room = self.max_entries - (1 if keep is not None and self.entry(keep).exists() else 0)
        for p in entries[:max(len(entries) - max(room, 0), 0)]:
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
        return gone

    def store(self, key: str, logits: np.ndarray, hidden: list) -> None:
        """Keep ``logits`` and ``hidden`` (as ``teacher_outputs`` returns them)
        under ``key``; a key already stored is kept as it is."""
        final = self.entry(key)
        if final.exists():
            return
        tmp = self.root / f".{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "logits.npy", np.asarray(logits, dtype=np.float32), allow_pickle=False)
        if hidden:
            import torch

            offsets = np.concatenate([[0], np.cumsum([h.shape[0] for h in hidden])]).astype(np.int64)
            np.save(tmp / "offsets.npy", offsets, allow_pickle=False)
            # Row by row into the file: no second copy of ~0.5 GB in memory.
            flat = np.lib.format.open_memmap(tmp / "hidden.npy", mode="w+", dtype=np.float16,
                                             shape=(int(offsets[-1]),) + tuple(hidden[0].shape[1:]))
            for i, h in enumerate(hidden):
                flat[offsets[i]:offsets[i + 1]] = h.numpy() if isinstance(h, torch.Tensor) else h
            flat.flush()
            del flat
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        (tmp / INFO).write_text(json.dumps({"files": files}, indent=2) + "\n")
        fsync_tree(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another build stored the same key first
            shutil.rmtree(tmp, ignore_errors=True)
        self.evict(keep=key)


def cached_teacher_outputs(cache: TeacherOutputCache | None, teacher_hash: str | None, model,
                           seqs: list[list[int]], layers: tuple[int, ...], tokenizer_json: str = ""):
    """``distill.teacher_outputs(model, seqs, layers)``, read from ``cache``
    when it holds them and stored there when computed. Returns (logits,
    hidden, hit). Without a cache or a teacher hash: computed, hit False."""
    from shrinkflow.compress.distill import teacher_outputs

    if cache is None or teacher_hash is None:
        return (*teacher_outputs(model, seqs, layers), False)
    key = outputs_key(teacher_hash, seqs, layers, tokenizer_json)
    found = cache.load(key)
    if found is not None:
        return (*found, True)
    logits, hidden = teacher_outputs(model, seqs, layers)
    cache.store(key, logits, hidden)
    return logits, hidden, False
