"""Production windows as re-compression data.

A window's texts are split (by a hash of each text, so the split is stable)
into the part distillation learns from (``data/unlabelled/texts.txt``, a
compress dep) and a held-out part (``data/unlabelled/heldout.txt``, a
validate dep) on which the new candidate's agreement with the teacher is
gated. ``data/unlabelled/window.json`` says which window it was and which
monitor run asked for it; deploy copies it into the version's lineage.

Every snapshot is also archived, content-addressed, under ``data/windows/``
(tracked with ``dvc add``, so ``dvc push`` keeps it): the window any version
was compressed from can be restored from its md5 in that version's lineage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shrinkflow.errors import MissingInput
from shrinkflow.files import atomic_write_text
from shrinkflow.paths import UNLABELLED, WINDOW_HELDOUT, WINDOW_META, WINDOWS_ARCHIVE


def _clean(texts) -> list[str]:
    """One line per text: newlines inside a text become spaces; blanks and
    duplicates go (first occurrence kept)."""
    seen, out = set(), []
    for t in texts:
        t = " ".join(str(t).split())
        if t and t not in seen:
            seen.add(t)
            out.append(t)
    return out


def split_window(texts, heldout_fraction: float) -> tuple[list[str], list[str]]:
    """(distill, heldout): a text is held out when its hash falls below the
    fraction, so the same text always lands on the same side."""
    distill, heldout = [], []
    for t in _clean(texts):
        h = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big") / 2 ** 64
        (heldout if h < heldout_fraction else distill).append(t)
    return distill, heldout


def md5_text(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def _lines(texts: list[str]) -> str:
    return "".join(t + "\n" for t in texts)


def write_snapshot(root: Path, texts, heldout_fraction: float, meta: dict) -> dict:
    """Write the window into the compress/validate inputs and the archive.
    Returns window.json's content (md5s as DVC records them)."""
    root = Path(root)
    distill, heldout = split_window(texts, heldout_fraction)
    if not distill or not heldout:
        raise ValueError(f"a window of {len(distill) + len(heldout)} distinct texts is too small to split "
                         f"{1 - heldout_fraction:.0%}/{heldout_fraction:.0%} into distillation and held-out text")
    d_text, h_text = _lines(distill), _lines(heldout)
    archive = {}
    for kind, body in (("distill", d_text), ("heldout", h_text)):
        name = f"{md5_text(body)}.txt"
        target = root / WINDOWS_ARCHIVE / name
        if not target.is_file():
            atomic_write_text(target, body)
        archive[kind] = str(WINDOWS_ARCHIVE / name)
    doc = {**meta, "rows_distill": len(distill), "rows_heldout": len(heldout),
           "texts_md5": md5_text(d_text), "heldout_md5": md5_text(h_text), "archive": archive}
    atomic_write_text(root / UNLABELLED, d_text)
    atomic_write_text(root / WINDOW_HELDOUT, h_text)
    atomic_write_text(root / WINDOW_META, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return doc


def restore_window(root: Path, md5: str, dest: Path) -> Path:
    """Copy the archived window text whose md5 is ``md5`` (as in a version's
    lineage, ``unlabelled_md5``) to ``dest``. Run ``dvc pull data/windows.dvc``
    first on a machine that has not got the archive."""
    src = Path(root) / WINDOWS_ARCHIVE / f"{md5}.txt"
    if not src.is_file():
        raise MissingInput(f"no archived window with md5 {md5} in {WINDOWS_ARCHIVE}/ "
                           "(dvc pull data/windows.dvc, then retry)")
    body = src.read_text()
    if md5_text(body) != md5:
        raise ValueError(f"{src} does not hash to {md5}: the archive is corrupted")
    atomic_write_text(Path(dest), body)
    return Path(dest)
