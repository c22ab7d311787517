"""The task's data: the built-in sentiment sentences, or the user's files.

Built-in (``data.source.kind: pypi_sdist``, the default): the rated sentences
of Hutto & Gilbert (2014), shipped in the vaderSentiment *source* archive on
PyPI (the wheel lacks them). Movie-review sentences are the training domain;
product-review sentences are a real shifted domain kept for drift checks.

The user's own (``kind: files``): labelled CSV, TSV, Parquet or JSON Lines
files under data/user/, any number of classes (strings or integers), an
optional fixed test set, shifted domain and unlabelled text.

Functions here are pure (frames in, frames out) except the I/O edges:
``fetch_raw``/``fetch_source`` (fetch stage) and ``read_snippets``/
``read_table`` (data stage). Everything is vectorised (pandas), so a
1,000,000-row file prepares in seconds (bench/results/data_scale.md).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
from shrinkflow.splits import read_parquet

from shrinkflow.config import DataParams, DataSource, FilesSource
from shrinkflow.errors import DataContractError, DataError, SourceUnreachable  # noqa: F401  (re-exported)
from shrinkflow.files import atomic_write_bytes, sha256_file
from shrinkflow.labels import BUILTIN_LABELS, case_collisions, sort_labels
from shrinkflow.labels import shown as shown_label
from shrinkflow.labels import shown_list

LABELS = BUILTIN_LABELS
SPLITS = ("train", "val", "test", "reference")
INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
MOVIE_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
PRODUCT_FILE = "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt"


# ------------------------------------------------------------------ fetch
def source_filename(source: DataSource) -> str:
    return f"vaderSentiment-{source.version}.tar.gz"


DEFAULT_INDEX = "https://pypi.org/simple"


def index_url() -> str:
    """The package index to fetch from: pip's PIP_INDEX_URL if set, else PyPI."""
    return os.environ.get("PIP_INDEX_URL", DEFAULT_INDEX).rstrip("/")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data):
        if self._href is not None:
            self.links.append((data.strip(), self._href))
            self._href = None


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (raised while reading from the index) is the network's
    or the server's passing failure, worth a retry: no connection, a
    timeout, a reset or a cut-off body, HTTP 408, 429 or 5xx. An HTTP 4xx
    (a page that is not there) and a local disk error are not."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in (408, 429) or exc.code >= 500
    return isinstance(exc, (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException))


def _read_failed(what: str, exc: BaseException) -> DataError:
    """``what`` failed with ``exc``: SourceUnreachable when a retry may
    succeed (``_unreachable``), else DataError."""
    return (SourceUnreachable if _unreachable(exc) else DataError)(f"{what}: {exc}")


def sdist_url(source: DataSource, index: str) -> str:
    """Find the sdist's download URL in a PEP 691 (JSON) or PEP 503 (HTML)
    simple index. Reads the index page only; downloads nothing. Raises
    SourceUnreachable when the index does not answer (``_unreachable``),
    DataError when it answers without the archive."""
    page = f"{index}/{_normalize(source.package)}/"
    req = urllib.request.Request(page, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            ctype, body = resp.headers.get("Content-Type", ""), resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise _read_failed(f"cannot read the package index page {page}", exc) from None
    if "json" in ctype:
        files = [(f["filename"], f["url"]) for f in json.loads(body)["files"]]
    else:
        parser = _Links()
        parser.feed(body.decode("utf-8", "replace"))
        files = parser.links
    suffix = f"-{source.version}.tar.gz"
    for filename, href in files:
        if filename.endswith(suffix) and _normalize(filename[:-len(suffix)]) == _normalize(source.package):
            return urllib.parse.urljoin(page, href).split("#", 1)[0]
    raise DataError(f"{page} lists no source archive for {source.package}=={source.version}")


def download_verified(url: str, sha256: str, dest: Path) -> Path:
    """Stream ``url`` to a temp file, hashing as it comes; only an archive
    whose sha256 matches the pin is moved to ``dest``. Nothing is unpacked,
    built or executed here: the bytes are checked before anything reads them.
    Raises DataError for a hash that does not match or a disk error, and
    SourceUnreachable when the download breaks off (``_unreachable``)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    h = hashlib.sha256()
    try:
        got = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=120) as resp:
            length = resp.headers.get("Content-Length")
            while block := resp.read(1 << 20):
                h.update(block)
                out.write(block)
                got += len(block)
        # http.client's read(n) ends quietly where a connection closed early:
        # a short body is a broken download, not an archive with another hash.
        if length is not None and length.isdigit() and got < int(length):
            raise ConnectionError(f"the connection closed after {got:,} of {int(length):,} bytes")
        if h.hexdigest() != sha256:
            raise DataError(f"{url}: sha256 {h.hexdigest()} does not match the pinned data.source.sha256 "
                            f"{sha256}; refused before unpacking")
        os.replace(tmp, dest)
    except (OSError, http.client.HTTPException) as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _read_failed(f"cannot download {url}", exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def fetch_source(source: DataSource, dest: Path, cache_dir: Path | None = None, index: str | None = None) -> Path:
    """Put the pinned sdist at ``dest``: from ``cache_dir`` if there, else the index.

    Sealed: the archive is downloaded as bytes (never with ``pip download``,
    which runs the package's build code to read its metadata) and checked
    against the pinned sha256 before anything unpacks it; a cached copy is
    checked the same way, so no cache or mirror can feed other bytes in.
    """
    dest = Path(dest)
    cached = Path(cache_dir) / source_filename(source) if cache_dir else None
    if cached is not None and cached.is_file() and sha256_file(cached) == source.sha256:
        atomic_write_bytes(dest, cached.read_bytes())
        return dest
    download_verified(sdist_url(source, index or index_url()), source.sha256, dest)
    if cached is not None:
        atomic_write_bytes(cached, dest.read_bytes())
    return dest


# Which params key names each role's file (FilesSource.files()), for messages.
_ROLE_KEYS = {"train": "path", "test": "test_path", "shifted": "shifted_path", "unlabelled": "unlabelled_path"}


def raw_name(role: str, user_path: str) -> str:
    """The canonical name of ``role``'s file in the raw directory: the role
    plus the user's file suffix (``data/user/Tickets.CSV`` -> ``train.CSV``).
    The fetch stage copies each file in under this name, so the data stage
    reads one directory whatever the user called the files."""
    return role + Path(user_path).suffix


def fetch_raw(source, raw_dir: Path, root: Path | str = ".", cache_dir: Path | None = None,
              index: str | None = None) -> list[Path]:
    """Fill ``raw_dir`` (the fetch stage's out) from ``source``, replacing it
    whole: the pinned archive as ``source.tar.gz`` (``kind: pypi_sdist``), or
    each of the user's files (``kind: files``, paths relative to ``root``)
    copied byte for byte as ``raw_name(role, path)``. Returns the files written.

    Built in a temp directory next to ``raw_dir`` and renamed into place, so
    a missing file (DataError naming it and the params key) or a refused
    archive leaves nothing behind.
    """
    raw_dir, root = Path(raw_dir), Path(root)
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: the folder gets the umask's permissions, as before.
    staging = raw_dir.parent / f".{raw_dir.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    staging.mkdir()
    try:
        if source.kind == "files":
            for role, path in source.files().items():
                src = root / path
                if not src.is_file():
                    raise DataError(f"{path}: no such file (data.source.{_ROLE_KEYS[role]}); put the export under "
                                    "data/user/ and name it there, or fix the path")
                shutil.copyfile(src, staging / raw_name(role, path))
        else:
            fetch_source(source, staging / "source.tar.gz", cache_dir, index)
        old = None
        if raw_dir.exists():
            old = Path(tempfile.mkdtemp(dir=raw_dir.parent, prefix=f".{raw_dir.name}.", suffix=".old"))
            os.replace(raw_dir, old / raw_dir.name)
        os.replace(staging, raw_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(raw_dir.iterdir())


# ------------------------------------------------------------------ parse
def read_snippets(archive: Path, member: str) -> pd.DataFrame:
    """Read one ground-truth file (id, mean rating, text) out of the sdist."""
    try:
        with tarfile.open(archive, "r:gz") as outer:
            inner_name = next(n for n in outer.getnames() if n.endswith(INNER_ARCHIVE))
            inner_bytes = outer.extractfile(inner_name).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            raw = inner.extractfile(member).read()
    except (tarfile.TarError, StopIteration, KeyError, AttributeError, OSError) as exc:
        raise DataError(f"{archive}: cannot read {member}: {exc!r}") from None
    return parse_snippets(raw.decode("latin-1"))


def parse_snippets(text: str) -> pd.DataFrame:
    df = pd.read_csv(io.StringIO(text), sep="\t", quoting=csv.QUOTE_NONE, header=None,
                     names=["id", "rating", "text"], dtype={"id": str, "text": str})
    df["text"] = df["text"].fillna("").str.strip()
    return df


def label_by_rating(df: pd.DataFrame) -> pd.DataFrame:
    """Positive iff the mean human rating is > 0; neutral (== 0) rows dropped."""
    kept = df[df["rating"] != 0]
    return pd.DataFrame({"text": kept["text"].to_numpy(),
                         "label": (kept["rating"] > 0).astype("int64").to_numpy()})


def _decode_error(path: Path, encoding: str, shown: str, named: str) -> DataError:
    """The first undecodable byte of ``path`` in ``encoding``, as a DataError
    giving its byte offset and line (streamed: the file is never held whole);
    ``named`` is the encoding as the user wrote it."""
    # utf-8-sig would count offsets after the byte-order mark; a BOM is
    # valid UTF-8, so plain UTF-8 finds the same bad byte at its real offset.
    encoding = "utf-8" if codecs.lookup(encoding).name == "utf-8-sig" else encoding
    decoder = codecs.getincrementaldecoder(encoding)()
    offset, line = 0, 1
    with open(path, "rb") as fh:
        while True:
            block = fh.read(1 << 20)
            pending = decoder.getstate()[0]
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                data = pending + block
                at = offset - len(pending) + exc.start
                line += data[:exc.start].count(b"\n") - pending.count(b"\n")
                bad = data[exc.start:exc.start + 4].hex(" ")
                with open(path, "rb") as head:
                    bom = head.read(2) in (b"\xff\xfe", b"\xfe\xff")   # UTF-16's byte-order marks
                hint = ("the file starts with a UTF-16 byte-order mark: set data.source.encoding to utf-16"
                        if bom else "set data.source.encoding to the file's encoding (e.g. latin-1, cp1252)")
                return DataError(f"{shown}: bytes not valid {named} at byte offset {at} (line {line}: {bad}); "
                                 f"{hint}, or re-export the file as UTF-8")
            if not block:
                break
            offset += len(block)
            line += block.count(b"\n")
    return DataError(f"{shown}: cannot be decoded as {named}; set data.source.encoding")


def _bad_json_line(path: Path, encoding: str, shown: str, exc: Exception) -> DataError:
    """The first line of a JSON Lines file that is not one JSON object."""
    with open(path, encoding=encoding) as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                if not isinstance(json.loads(line), dict):
                    raise ValueError("not a JSON object")
            except ValueError as bad:
                # json's own position counts lines within this one line: give the character instead
                why = str(bad)
                if isinstance(bad, json.JSONDecodeError):
                    at_end = bad.pos >= len(line.rstrip("\r\n"))
                    why = f"{bad.msg} at {'the end of the line' if at_end else f'character {bad.pos + 1}'}"
                return DataError(f"{shown}: line {number} is not a JSON object ({why}); JSON Lines holds one "
                                 "object per line, e.g. {\"text\": \"...\", \"label\": \"...\"}")
    return DataError(f"{shown}: cannot be read as JSON Lines: {exc}")


def _as_strings(values: pd.Series) -> pd.Series:
    """Any column as stripped strings, missing values as "" (vectorised).
    Integral floats (an integer column with gaps, as Parquet or JSON give it)
    read as integers: 3.0 -> "3"."""
    if pd.api.types.is_float_dtype(values.dtype):
        finite = values.dropna()
        if len(finite) and bool(np.all(np.mod(finite.to_numpy(), 1) == 0)):
            values = values.astype("Int64")
    if pd.api.types.is_bool_dtype(values.dtype) or not pd.api.types.is_object_dtype(values.dtype):
        values = values.astype("string")
    out = values.where(values.notna(), "").astype(str)
    return out.str.strip()


def read_table(path: Path, fmt: str, columns: dict[str, str], encoding: str = "utf-8",
               shown: str | None = None) -> pd.DataFrame:
    """Read the named columns of a CSV, TSV, Parquet or JSON Lines file.

    ``columns`` maps a params key (``text_column``) to the file's column name;
    the frame has one column per key (``text``, ``label``: the key without
    ``_column``), every value a stripped string, missing values "". A UTF-8
    byte-order mark is skipped; CRLF line ends and quoted newlines (CSV, TSV)
    are read by pandas' parser. Raises DataError naming ``shown`` (the user's
    path) for an unreadable file, a missing column (listing the columns
    found), or undecodable bytes (byte offset, line, encoding tried).
    """
    path = Path(path)
    shown = shown or str(path)
    if not path.is_file():
        raise DataError(f"{shown}: no such file; run the fetch stage first (dvc repro fetch)")
    text_enc = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    wanted = list(dict.fromkeys(columns.values()))

    def check(found) -> None:
        for key, col in columns.items():
            if col not in found:
                raise DataError(f"{shown}: no column {col!r} (data.source.{key}); the file has columns "
                                f"{[str(c) for c in found]}: set data.source.{key} to one of them")
            if list(found).count(col) > 1:   # pandas would read the first and rename the others (col.1)
                raise DataError(f"{shown}: {list(found).count(col)} columns are named {col!r} "
                                f"(data.source.{key}): which one holds the data is ambiguous; rename or drop "
                                "the others")

    try:
        if fmt in ("csv", "tsv"):
            sep = "," if fmt == "csv" else "\t"
            try:
                header = pd.read_csv(path, sep=sep, nrows=0, encoding=text_enc).columns
            except pd.errors.EmptyDataError:
                raise DataError(f"{shown}: the file is empty; it needs a header row naming its columns") from None
            with open(path, encoding=text_enc, newline="") as fh:   # the names as written (pandas renames twins)
                raw = next(csv.reader(fh, delimiter=sep), [])
            check(raw if len(raw) == len(header) else list(header))
            # Every column, not usecols: only then does pandas refuse a row
            # with more fields than the header (an unquoted separator in a
            # text), instead of silently reading its first fields.
            df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_filter=False, encoding=text_enc)
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            check(pq.read_schema(path).names)
            df = read_parquet(path, columns=wanted)
        elif fmt == "jsonl":
            try:
                df = pd.read_json(path, lines=True, dtype=False, convert_dates=False, encoding=text_enc)
            except UnicodeDecodeError:
                raise
            except ValueError as exc:
                raise _bad_json_line(path, text_enc, shown, exc) from None
            check(list(df.columns))
        else:
            raise DataError(f"{shown}: unknown format {fmt!r}; one of csv, tsv, parquet, jsonl")
    except UnicodeDecodeError:
        raise _decode_error(path, text_enc, shown, encoding) from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{shown}: cannot be read as {fmt.upper()}: {str(exc).strip()}") from None
    except OSError as exc:
        raise DataError(f"{shown}: cannot be read as {fmt}: {exc}") from None
    except Exception as exc:  # pyarrow's errors (not a Parquet file) share no base class with pandas'
        if type(exc).__module__.startswith("pyarrow"):
            raise DataError(f"{shown}: cannot be read as Parquet: {exc}") from None
        raise
    if fmt in ("jsonl", "parquet"):   # CSV and TSV are read as strings: nothing else to find there
        for col in columns.values():
            _refuse_structured(df[col], shown, col)
    return pd.DataFrame({key.removesuffix("_column"): _as_strings(df[col]) for key, col in columns.items()})


def _refuse_structured(values: pd.Series, shown: str, column: str) -> None:
    """Raise DataError when a column holds JSON lists or objects (JSON Lines,
    Parquet): their str() ("['a', 'list']") would be trained on as text (a
    newcomer's finding). Names how many and the first row (1-based)."""
    if not pd.api.types.is_object_dtype(values.dtype):
        return
    bad = values.map(lambda v: isinstance(v, (list, dict, tuple, np.ndarray))).to_numpy()
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(f"{shown}: column {column!r} holds {int(bad.sum())} value(s) that are a list or an object, "
                        f"not a text or a label (the first: row {first + 1}, {str(values.iloc[first])[:80]}): "
                        "write each as one string")


# ------------------------------------------------------------------ clean
_WHITESPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Key for duplicate detection: case- and whitespace-insensitive."""
    return re.sub(r"\s+", " ", text.strip().lower())


def normalized(texts: pd.Series) -> pd.Series:
    """``normalize`` over a column, vectorised (same result, same index)."""
    return texts.astype(str).str.strip().str.lower().str.replace(_WHITESPACE, " ", regex=True)


def clean(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop unusable rows from a (text, label) frame, counting each rule.

    In order: rows with an empty text or an empty (string) label
    (``empty``); every row of a normalized text (``normalize``) that occurs
    with more than one label (``conflicting``); then all but the first copy
    of each text: byte-identical copies (``exact_duplicates``) and copies
    that differ only in case or whitespace (``near_duplicates``). Returns the
    kept rows (first occurrences, original order, fresh index) and the counts.
    """
    empty = df["text"].astype(str).str.len() == 0
    if pd.api.types.is_object_dtype(df["label"].dtype):
        empty |= df["label"].astype(str).str.len() == 0
    n_empty = int(empty.sum())
    if n_empty:
        df = df[~empty.to_numpy()]
    key = normalized(df["text"])
    n_labels = df.groupby(key)["label"].transform("nunique")
    consistent = (n_labels == 1).to_numpy()
    df, key = df[consistent], key[consistent]
    exact = df["text"].duplicated().to_numpy()
    repeated = key.duplicated().to_numpy()
    out = df[~repeated].reset_index(drop=True)
    return out, {"empty": n_empty, "conflicting": int((~consistent).sum()),
                 "exact_duplicates": int(exact.sum()), "near_duplicates": int((repeated & ~exact).sum())}


def deduplicate(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep one copy of each text; drop texts whose copies disagree on label.

    Returns the frame and the number of rows removed (``clean``'s
    conflicting + exact + near duplicates; empty texts are kept here).
    """
    key = normalized(df["text"])
    n_labels = df.groupby(key)["label"].transform("nunique")
    consistent = df[(n_labels == 1).to_numpy()]
    out = consistent[~normalized(consistent["text"]).duplicated().to_numpy()].reset_index(drop=True)
    return out, len(df) - len(out)


# ------------------------------------------------------------------ split
def stratified_split(df: pd.DataFrame, params: DataParams,
                     held_out: tuple[str, ...] = ("test", "val", "reference")) -> dict[str, pd.DataFrame]:
    """Deterministic stratified split into train and the ``held_out`` splits
    (test, val, reference; without test when the user fixed one).

    Each label (in sorted order) is shuffled with the seed and cut by the
    same fractions, so every split keeps the class balance of the whole. A
    held-out split gets at least one row of every class that has rows to
    spare, and train always keeps at least one: a 3-row class gives one row
    each to test, val and train. Same params, same rows: same split.
    """
    rng = np.random.default_rng(params.seed)
    all_fractions = {"test": params.test_fraction, "val": params.val_fraction,
                     "reference": params.reference_fraction}
    fractions = {name: frac for name, frac in all_fractions.items() if name in held_out}
    names = ("train", *fractions)
    parts: dict[str, list[pd.DataFrame]] = {name: [] for name in names}
    for _, group in df.groupby("label", sort=True):
        order = rng.permutation(len(group))
        start = 0
        for name, frac in fractions.items():
            n = min(max(1, int(round(frac * len(group)))), max(0, len(group) - 1 - start))
            parts[name].append(group.iloc[order[start:start + n]])
            start += n
        parts["train"].append(group.iloc[order[start:]])
    return {name: pd.concat(parts[name]).sample(frac=1.0, random_state=params.seed).reset_index(drop=True)
            for name in SPLITS if name in parts}


def check_contract(splits: dict[str, pd.DataFrame], labels: tuple[str, ...] = BUILTIN_LABELS) -> None:
    """Raise DataContractError unless every split is usable and disjoint:
    columns exactly (text, label), rows, no empty text, labels that are class
    ids 0..len(labels)-1, and no normalized text in two splits (leakage)."""
    problems: list[str] = []
    keys: dict[str, pd.Series] = {}
    for name, df in splits.items():
        if list(df.columns) != ["text", "label"]:
            problems.append(f"{name}: columns {list(df.columns)} != ['text', 'label']")
            continue
        if len(df) == 0:
            problems.append(f"{name}: no rows")
            continue
        empty = int((df["text"].astype(str).str.strip() == "").sum())
        if empty:
            problems.append(f"{name}: {empty} empty text(s)")
        unknown = sorted(set(pd.unique(df["label"]).tolist()) - set(range(len(labels))))
        if unknown:
            named = ", ".join(f"{i} ({n})" for i, n in enumerate(labels))
            problems.append(f"{name}: unknown label(s) {unknown[:10]}; expected class ids {named}")
        keys[name] = normalized(df["text"]).drop_duplicates()
    names = sorted(keys)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            leaked = keys[a][keys[a].isin(keys[b])]
            if len(leaked):
                example = leaked.min()
                problems.append(f"leakage: {len(leaked)} text(s) in both {a} and {b}, e.g. {example[:60]!r}")
    if problems:
        raise DataContractError(problems)


# ------------------------------------------------------------------ prepare
@dataclass(frozen=True)
class Prepared:
    """What the data stage writes. ``splits``: train, val, test, reference,
    shifted (columns text, label: class ids, int64); ``unlabelled``: one
    column text (empty for the built-in task); ``labels``: names in class-id
    order; ``stats``: metrics/data.json; ``warnings``: for the user."""

    splits: dict[str, pd.DataFrame]
    unlabelled: pd.DataFrame
    labels: tuple[str, ...]
    stats: dict
    warnings: tuple[str, ...] = field(default_factory=tuple)


def prepare(archive: Path, params: DataParams) -> tuple[dict[str, pd.DataFrame], dict]:
    """The built-in task: raw archive -> validated splits (+ the shifted
    domain) and data stats. Labels are BUILTIN_LABELS (0 negative, 1 positive)."""
    movies, cleaned = clean(label_by_rating(read_snippets(archive, MOVIE_FILE)))
    if params.max_rows is not None and params.max_rows < len(movies):
        movies = movies.sample(n=params.max_rows, random_state=params.seed).reset_index(drop=True)
    splits = stratified_split(movies, params)
    check_contract(splits)
    shifted, cleaned_shifted = clean(label_by_rating(read_snippets(archive, PRODUCT_FILE)))
    if params.max_shifted_rows is not None and params.max_shifted_rows < len(shifted):
        shifted = shifted.sample(n=params.max_shifted_rows, random_state=params.seed).reset_index(drop=True)
    removed = cleaned["conflicting"] + cleaned["exact_duplicates"] + cleaned["near_duplicates"]
    stats = {"duplicates_removed": removed,
             **{f"rows_{k}": len(v) for k, v in splits.items()},
             **{f"positive_rate_{k}": round(float(v["label"].mean()), 4) for k, v in splits.items()},
             "rows_shifted": len(shifted),
             "cleaning": {"train": cleaned, "shifted": cleaned_shifted}}
    return {**splits, "shifted": shifted}, stats


def _class_ids(df: pd.DataFrame, labels: tuple[str, ...], shown: str, train_shown: str) -> pd.DataFrame:
    """Label names -> class ids; a name outside ``labels`` is a DataError."""
    codes = pd.Categorical(df["label"], categories=list(labels)).codes.astype("int64")
    unknown = sorted(set(df["label"][codes < 0]))
    if unknown:
        raise DataError(f"{shown}: label(s) {shown_list(unknown[:10])} do not occur in the training data "
                        f"{train_shown} (its classes: {shown_list(labels)}); a model can only be tested on classes "
                        "it is trained on: fix the labels or add such rows to the training data")
    return pd.DataFrame({"text": df["text"].to_numpy(), "label": codes})


def prepare_files(source: FilesSource, raw_dir: Path, params: DataParams) -> Prepared:
    """The user's files (as the fetch stage copied them into ``raw_dir``) ->
    validated splits, the label set, unlabelled text and stats.

    The training file is cleaned (``clean``), its labels stripped and sorted
    (``shrinkflow.labels.sort_labels``) into the class ids. With a fixed test
    file, its rows are cleaned the same way and training rows whose
    normalized text is in it are dropped (``train_rows_in_test``), and the
    random split makes train, val and reference only. Raises DataError naming
    the user's file and what to change: a single class, a class under
    ``params.min_rows_per_class`` rows, too few rows to fill the splits, or
    test/shifted labels the training data lacks.
    """
    raw_dir = Path(raw_dir)
    files = source.files()
    shown = files["train"]

    def read(role: str, columns: dict[str, str]) -> pd.DataFrame:
        return read_table(raw_dir / raw_name(role, files[role]), source.file_format(files[role]), columns,
                          source.encoding, shown=files[role])

    labelled = {"text_column": source.text_column, "label_column": source.label_column}
    pool, cleaning = clean(read("train", labelled))
    stats_cleaning = {"train": cleaning}
    if len(pool) == 0:
        raise DataError(f"{shown}: no usable rows (after dropping {cleaning['empty']} with an empty text or label "
                        f"and {cleaning['conflicting']} with conflicting labels); check data.source.text_column "
                        "and label_column")
    labels = sort_labels(pool["label"].unique())
    if len(labels) < 2:
        raise DataError(f"{shown}: column {source.label_column!r} holds a single class {shown_label(labels[0])} after "
                        "cleaning; a classifier needs at least 2: add rows of the other classes")
    warnings = tuple(f"labels {', '.join(ascii(n) for n in group)} differ only by case or Unicode form (the same "
                     "on screen); they are kept as separate classes: if they are one class, make them the same in "
                     "the data" for group in case_collisions(labels))
    pool = _class_ids(pool, labels, shown, shown)

    test = None
    train_rows_in_test = 0
    if "test" in files:
        test_raw, stats_cleaning["test"] = clean(read("test", labelled))
        if len(test_raw) == 0:
            raise DataError(f"{files['test']}: no usable rows after cleaning (data.source.test_path)")
        test = _class_ids(test_raw, labels, files["test"], shown)
        pool_norm, test_norm = normalized(pool["text"]), normalized(test["text"])
        in_test = pool_norm.isin(set(test_norm)).to_numpy()
        train_rows_in_test = int(in_test.sum())
        if train_rows_in_test:   # the two files disagree on some of these texts: say so, not only count them
            test_label = dict(zip(test_norm, test["label"]))
            clash = [(t, int(y), int(test_label[n])) for t, n, y in zip(
                pool["text"][in_test], pool_norm[in_test], pool["label"][in_test]) if int(test_label[n]) != int(y)]
            if clash:
                t, y, ty = clash[0]
                warnings += (f"{len(clash)} training row(s) whose text is in {files['test']} carry another label "
                             f"there (e.g. {t[:60]!r}: {shown_label(labels[y])} in {shown}, "
                             f"{shown_label(labels[ty])} in the test file); they are dropped from training with the "
                             f"other {train_rows_in_test - len(clash)} text(s) the test file holds: if the two files "
                             "disagree, one of them is wrong",)
        pool = pool[~in_test].reset_index(drop=True)

    if params.max_rows is not None and params.max_rows < len(pool):
        pool = pool.sample(n=params.max_rows, random_state=params.seed).reset_index(drop=True)
    counts = np.bincount(pool["label"].to_numpy(), minlength=len(labels))
    small = [(labels[i], int(n)) for i, n in enumerate(counts) if n < params.min_rows_per_class]
    if small:
        listed = ", ".join(f"{shown_label(name)} has {n} row(s)" for name, n in small)
        raise DataError(f"{shown}: class {listed} after cleaning, fewer than data.min_rows_per_class = "
                        f"{params.min_rows_per_class}: add rows of that class, merge it into another, or remove "
                        "it from the file (or lower data.min_rows_per_class)")

    held_out = ("val", "reference") if test is not None else ("test", "val", "reference")
    splits = stratified_split(pool, params, held_out)
    if test is not None:
        splits["test"] = test
    splits = {name: splits[name] for name in SPLITS}
    empty = [name for name in SPLITS if len(splits[name]) == 0]
    if empty:
        raise DataError(f"{shown}: {len(pool)} row(s) after cleaning are too few to fill the splits: "
                        f"{', '.join(empty)} would be empty; add rows (at least a few per class)")
    check_contract(splits, labels)
    # A class too small to reach a held-out split is trained on but never
    # measured: no recall on val or test, and the gates cannot see it lose.
    for name in ("val", "test"):
        seen = set(splits[name]["label"].tolist())
        unseen = [labels[i] for i in range(len(labels)) if i not in seen]
        if unseen:
            warnings += (f"{name} holds no row of class(es) {', '.join(shown_label(n) for n in unseen)}: their recall "
                         f"cannot be measured there and no gate sees them; add rows of them (or raise "
                         "data.min_rows_per_class to refuse such a class)",)

    shifted = pd.DataFrame({"text": pd.Series([], dtype=object), "label": pd.Series([], dtype="int64")})
    if "shifted" in files:
        shifted_raw, stats_cleaning["shifted"] = clean(read("shifted", labelled))
        shifted = _class_ids(shifted_raw, labels, files["shifted"], shown)
        if params.max_shifted_rows is not None and params.max_shifted_rows < len(shifted):
            shifted = shifted.sample(n=params.max_shifted_rows, random_state=params.seed).reset_index(drop=True)

    unlabelled = pd.DataFrame({"text": pd.Series([], dtype=object)})
    unlabelled_in_eval = 0
    if "unlabelled" in files:
        texts = read("unlabelled", {"text_column": source.text_column})
        texts["label"] = 0
        texts, stats_cleaning["unlabelled"] = clean(texts)
        # Distillation must not see the sentences candidates are gated and
        # confirmed on, even teacher-labelled.
        held = pd.concat([normalized(splits[n]["text"]) for n in ("val", "test", "reference")])
        in_eval = normalized(texts["text"]).isin(set(held)).to_numpy()
        unlabelled_in_eval = int(in_eval.sum())
        unlabelled = pd.DataFrame({"text": texts["text"][~in_eval].to_numpy()})

    splits["shifted"] = shifted
    stats = {"source": "files", "n_classes": len(labels),
             **{f"rows_{k}": len(v) for k, v in splits.items()},
             "rows_unlabelled": len(unlabelled),
             "cleaning": stats_cleaning, "train_rows_in_test": train_rows_in_test,
             "unlabelled_rows_in_eval_splits": unlabelled_in_eval,
             "duplicates_removed": cleaning["conflicting"] + cleaning["exact_duplicates"]
             + cleaning["near_duplicates"]}
    return Prepared(splits, unlabelled, labels, stats, warnings)


def class_counts(splits: dict[str, pd.DataFrame], labels: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Rows of each class in each split, by label name."""
    return {name: {labels[i]: int(n) for i, n in
                   enumerate(np.bincount(df["label"].to_numpy().astype("int64"), minlength=len(labels)))}
            for name, df in splits.items()}


# The truncation share of a larger split is estimated on a seeded sample of
# this many texts (95% interval at most +-0.44 points): tokenizing costs
# ~75 us a text here, 75 s for a 1,000,000-row file, ~4 s for 50,000.
TRUNCATION_SAMPLE_ROWS = 50_000


def truncated_shares(splits: dict[str, pd.DataFrame], tokenizer_file: Path | str, max_seq_len: int,
                     sample_rows: int = TRUNCATION_SAMPLE_ROWS, chunk_rows: int = 10_000) -> dict[str, float]:
    """Share of each split's texts (0..1) that the tokenizer in
    ``tokenizer_file`` turns into more than ``max_seq_len`` tokens, special
    tokens included: the texts a model reading ``max_seq_len`` tokens cuts.
    A split of more than ``sample_rows`` texts is measured on a seeded random
    sample of that many (the same one every run). Empty splits are left out.
    Encodes in chunks, so memory stays flat."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.no_truncation()
    tok.no_padding()
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: twice as fast
    shares = {}
    for name, df in splits.items():
        texts = df["text"]
        if len(texts) == 0:
            continue
        if len(texts) > sample_rows:
            texts = texts.iloc[np.sort(np.random.default_rng(0).choice(len(texts), sample_rows, replace=False))]
        texts = texts.astype(str).tolist()
        cut = 0
        for start in range(0, len(texts), chunk_rows):
            cut += sum(len(e.ids) > max_seq_len for e in encode(texts[start:start + chunk_rows]))
        shares[name] = round(cut / len(texts), 6)
    return shares


def prepare_raw(raw_dir: Path, params: DataParams, tokenizer_file: Path | str | None = None,
                max_seq_len: int | None = None) -> Prepared:
    """The data stage's work: ``raw_dir`` (the fetch stage's out) -> Prepared,
    by ``params.source.kind``. With a tokenizer, stats also hold each split's
    ``truncated_share_<split>`` at ``max_seq_len``; always the rows of each
    class in each split (``class_counts``) and any label warnings."""
    raw_dir = Path(raw_dir)
    if params.source.kind == "files":
        prepared = prepare_files(params.source, raw_dir, params)
    else:
        splits, stats = prepare(raw_dir / "source.tar.gz", params)
        prepared = Prepared(splits, pd.DataFrame({"text": pd.Series([], dtype=object)}), BUILTIN_LABELS,
                            {"source": "pypi_sdist", "n_classes": len(BUILTIN_LABELS), **stats, "rows_unlabelled": 0})
    stats = {**prepared.stats, "labels": list(prepared.labels),
             "class_counts": class_counts(prepared.splits, prepared.labels),
             "label_warnings": list(prepared.warnings)}
    if tokenizer_file is not None:
        stats["max_seq_len"] = max_seq_len
        stats["truncated_share_sample_rows"] = TRUNCATION_SAMPLE_ROWS
        stats.update({f"truncated_share_{k}": v
                      for k, v in truncated_shares(prepared.splits, tokenizer_file, max_seq_len,
                                                    sample_rows=TRUNCATION_SAMPLE_ROWS).items()})
    return Prepared(prepared.splits, prepared.unlabelled, prepared.labels, stats, prepared.warnings)
