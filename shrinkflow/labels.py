"""The task's label set: what the data stage read, and what every model says.

The data stage reads the labels from the training data, strips surrounding
whitespace, sorts them and writes them once to ``data/prepared/labels.json``
(``shrinkflow.paths.LABELS_JSON``). From there on a label is an integer class
id, its index in that sorted tuple: the splits store ids, models output one
logit per id in that order, and every model manifest, the registry, ``status``
and the server carry the names.
"""

from __future__ import annotations

from pathlib import Path

from shrinkflow.errors import DataError
from shrinkflow.files import read_json, write_json

# The built-in task (movie-review sentiment): rating > 0 is positive.
BUILTIN_LABELS = ("negative", "positive")


def sort_labels(names) -> tuple[str, ...]:
    """Label names as the sorted tuple whose indices are the class ids.

    Names are stripped of surrounding whitespace and made strings. Integer
    labels (every name an integer, like ``3`` or ``"-1"``) sort numerically,
    so ``2`` comes before ``10``; any other set sorts as strings (code point
    order). Raises DataError on an empty name or an empty set.
    """
    stripped = sorted({str(n).strip() for n in names})
    if not stripped:
        raise DataError("the label set is empty")
    if "" in stripped:
        raise DataError("a label name is empty (or only whitespace)")

    def as_int(s: str):
        try:
            return int(s)
        except ValueError:
            return None

    ints = [as_int(s) for s in stripped]
    if all(i is not None for i in ints):
        return tuple(s for _, s in sorted(zip(ints, stripped)))
    return tuple(stripped)


def integer_names(names) -> bool:
    """Whether every name in ``names`` (strings) reads as an integer (``"3"``,
    ``"-1"``), as ``sort_labels`` decides to sort them numerically: such
    names are ids, whose meaning a renumbered label set changes. False for
    an empty set."""
    names = list(names)
    if not names:
        return False
    try:
        for n in names:
            int(str(n).strip())
    except ValueError:
        return False
    return True


def shown(name: str) -> str:
    """A class name as an error message prints it: ``repr(name)``, followed
    by its code points escaped (``ascii``) when the name is not
    NFC-normalised: an accent typed as a combining mark prints like the
    precomposed letter, yet is another class (``'café'`` typed two ways).
    E.g. ``'café' (as typed: 'cafe\\u0301')``. (``repr`` already escapes
    what does not print: a zero-width or non-breaking space.)"""
    import unicodedata

    if not isinstance(name, str) or unicodedata.is_normalized("NFC", name):
        return repr(name)
    return f"{name!r} (as typed: {ascii(name)})"


def shown_list(names) -> str:
    """``names`` as a list in an error message, each as ``shown`` prints it:
    ``['billing', 'café' (as typed: 'cafe\\u0301')]``."""
    return f"[{', '.join(shown(n) for n in names)}]"


def case_collisions(labels) -> list[tuple[str, ...]]:
    """Groups of label names that differ only by case (``["Billing", "billing"]``)
    or by Unicode form (``"facturé"`` composed, NFC, and decomposed, NFD:
    the same on screen, two strings; compared under NFKC), each sorted;
    empty when there are none. The data stage warns on each."""
    import unicodedata

    groups: dict[str, list[str]] = {}
    for name in labels:
        groups.setdefault(unicodedata.normalize("NFKC", str(name)).casefold(), []).append(str(name))
    return [tuple(sorted(g)) for g in groups.values() if len(g) > 1]


def write_labels(path: Path | str, labels) -> Path:
    """Write ``{"labels": [...]}`` atomically; ``labels`` must be sorted already."""
    labels = list(labels)
    if labels != list(sort_labels(labels)):
        raise ValueError(f"labels must be written in their sorted order, got {labels}")
    return write_json(path, {"labels": labels})


def read_labels(path: Path | str) -> tuple[str, ...]:
    """The label names, in class-id order, from a labels.json.

    Raises DataError naming the file when it is missing or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no label set; run the data stage first (dvc repro data)")
    try:
        labels = read_json(path)["labels"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a label set ({{\"labels\": [...]}}): {exc!r}") from None
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
        raise DataError(f"{path}: labels must be a list of at least 2 non-empty names, got {labels!r}")
    return tuple(labels)
