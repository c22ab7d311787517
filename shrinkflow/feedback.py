"""Production labels as training data: the retrain verdict's dataset.

``data/feedback/labels.jsonl`` (shrinkflow.paths.FEEDBACK) holds one
``{"text": ..., "label": ...}`` per line: the text whitespace-normalised
(runs of whitespace, newlines included, become one space; blank texts are
dropped) and the label's *name*, so the file means the same whatever class
ids a model uses. It is deduplicated by text. A text labelled again with
another label takes the newer label, in place: feedback is a person's
correction, and the later one is the better informed (a row never holds two
labels for one text, which would teach the teacher both).

The data stage maps the names through the task's label set (a name the task
does not have is a DataError naming it) and splits the rows by a hash of the
text (``data.feedback_heldout_fraction``), so a text stays on its side as the
set grows: the retrained teacher is fine-tuned on one part and gated on the
other. Library code: pure functions and atomic writes; nothing at import.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from shrinkflow.errors import DataError
from shrinkflow.files import atomic_write_text


def normalise(text) -> str:
    """``text`` with every run of whitespace as one space, trimmed."""
    return " ".join(str(text).split())


def parse(body: str, where: str = "feedback") -> list[dict]:
    """The rows of a labels.jsonl body, in file order. Raises DataError naming
    ``where`` and the line when a line is not an object with a string text
    and label."""
    rows = []
    for n, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{where}:{n}: not JSON: {exc}") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) \
                or not isinstance(row.get("label"), str):
            raise DataError(f"{where}:{n}: expected {{\"text\": str, \"label\": str}}, got {line[:120]!r}")
        rows.append({"text": row["text"], "label": row["label"]})
    return rows


def read_feedback(path: Path | str) -> list[dict]:
    """The dataset at ``path`` (an absent file holds no rows)."""
    path = Path(path)
    return parse(path.read_text(encoding="utf-8"), str(path)) if path.is_file() else []


def dumps(rows: Sequence[dict]) -> str:
    """labels.jsonl's body: one compact, key-sorted object per line."""
    return "".join(json.dumps({"label": r["label"], "text": r["text"]}, ensure_ascii=False, sort_keys=True) + "\n"
                   for r in rows)


def merge(existing: Sequence[dict], new: Iterable[tuple[str, str]]) -> tuple[list[dict], dict]:
    """``existing`` rows with ``new`` (text, label name) pairs, oldest first,
    merged in: texts normalised, blanks dropped, one row per text, a later
    label replacing an earlier one in place. Returns (rows, counts: ``added``
    new texts, ``relabelled`` texts whose label changed, ``unchanged``
    pairs already there as they are, ``blank``)."""
    rows = [dict(r) for r in existing]
    at = {r["text"]: i for i, r in enumerate(rows)}
    counts = {"added": 0, "relabelled": 0, "unchanged": 0, "blank": 0}
    for text, label in new:
        text, label = normalise(text), str(label).strip()
        if not text or not label:
            counts["blank"] += 1
        elif text not in at:
            at[text] = len(rows)
            rows.append({"text": text, "label": label})
            counts["added"] += 1
        elif rows[at[text]]["label"] != label:
            rows[at[text]]["label"] = label
            counts["relabelled"] += 1
        else:
            counts["unchanged"] += 1
    return rows, counts


def md5_text(body: str) -> str:
    """md5 of the UTF-8 bytes: what DVC records for the file."""
    return hashlib.md5(body.encode("utf-8")).hexdigest()


def append_feedback(root: Path | str, pairs: Iterable[tuple[str, str]]) -> dict:
    """Merge ``pairs`` (text, label name) into the dataset under ``root``
    (shrinkflow.paths.FEEDBACK), write it atomically and archive the new
    version content-addressed (FEEDBACK_ARCHIVE/<md5>.jsonl). Returns the
    counts of ``merge`` with ``rows`` (in all), ``md5`` and ``archive``."""
    from shrinkflow.paths import FEEDBACK, FEEDBACK_ARCHIVE

    root = Path(root)
    rows, counts = merge(read_feedback(root / FEEDBACK), pairs)
    body = dumps(rows)
    md5 = md5_text(body)
    archived = root / FEEDBACK_ARCHIVE / f"{md5}.jsonl"
    if not archived.is_file():
        atomic_write_text(archived, body)
    atomic_write_text(root / FEEDBACK, body)
    return {**counts, "rows": len(rows), "md5": md5, "archive": str(FEEDBACK_ARCHIVE / f"{md5}.jsonl")}


def is_heldout(text: str, fraction: float) -> bool:
    """Whether ``text`` is held out at ``fraction``: its sha256 read as a
    number in [0, 1) falls below it (stable as the dataset grows)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2 ** 64 < fraction


def feedback_splits(rows: Sequence[dict], labels: Sequence[str], heldout_fraction: float, where: str = "feedback"):
    """(feedback_train, feedback_heldout): DataFrames (text, label as the
    class id in ``labels``, int64) in file order, split by ``is_heldout``.
    Raises DataError naming every label ``labels`` lacks, with ``where``."""
    import pandas as pd

    ids = {name: i for i, name in enumerate(labels)}
    unknown = sorted({r["label"] for r in rows} - set(ids))
    if unknown:
        raise DataError(f"{where}: label(s) {unknown} are not labels of this task {list(labels)}: fix or "
                        "remove those rows (the task's labels come from its training data)")
    parts = {True: [], False: []}
    for r in rows:
        parts[is_heldout(r["text"], heldout_fraction)].append(r)

    def frame(part):
        return pd.DataFrame({"text": pd.Series([r["text"] for r in part], dtype=object),
                             "label": pd.Series([ids[r["label"]] for r in part], dtype="int64")})

    return frame(parts[False]), frame(parts[True])

