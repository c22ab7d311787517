"""Real sentiment data, offline: the rated sentences of Hutto & Gilbert (2014).

They ship in the vaderSentiment *source* archive on PyPI (the wheel lacks
them). Movie-review sentences are the training domain; product-review
sentences are a real shifted domain kept for drift checks.

Functions here are pure (frames in, frames out) except ``fetch_source`` and
``read_snippets``, the I/O edges.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd

from shrinkflow.config import DataParams, DataSource
from shrinkflow.errors import DataContractError, DataError  # noqa: F401  (re-exported)
from shrinkflow.io import atomic_write_bytes, sha256_file

LABELS = ("negative", "positive")
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


def sdist_url(source: DataSource, index: str) -> str:
    """Find the sdist's download URL in a PEP 691 (JSON) or PEP 503 (HTML)
    simple index. Reads the index page only; downloads nothing."""
    page = f"{index}/{_normalize(source.package)}/"
    req = urllib.request.Request(page, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            ctype, body = resp.headers.get("Content-Type", ""), resp.read()
    except OSError as exc:
        raise DataError(f"cannot read the package index page {page}: {exc}") from None
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
    built or executed here: the bytes are checked before anything reads them."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=120) as resp:
            while block := resp.read(1 << 20):
                h.update(block)
                out.write(block)
        if h.hexdigest() != sha256:
            raise DataError(f"{url}: sha256 {h.hexdigest()} does not match the pinned data.source.sha256 "
                            f"{sha256}; refused before unpacking")
        os.replace(tmp, dest)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise DataError(f"cannot download {url}: {exc}") from None
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


def normalize(text: str) -> str:
    """Key for duplicate detection: case- and whitespace-insensitive."""
    return re.sub(r"\s+", " ", text.strip().lower())


def deduplicate(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep one copy of each text; drop texts whose copies disagree on label.

    Returns the frame and the number of rows removed.
    """
    key = df["text"].map(normalize)
    n_labels = df.groupby(key)["label"].transform("nunique")
    consistent = df[(n_labels == 1).to_numpy()]
    out = consistent[~consistent["text"].map(normalize).duplicated()].reset_index(drop=True)
    return out, len(df) - len(out)


# ------------------------------------------------------------------ split
def stratified_split(df: pd.DataFrame, params: DataParams) -> dict[str, pd.DataFrame]:
    """Deterministic stratified split into train/val/test/reference.

    Each label is shuffled with the seed and cut by the same fractions, so
    every split keeps the label balance of the whole.
    """
    rng = np.random.default_rng(params.seed)
    fractions = {"test": params.test_fraction, "val": params.val_fraction,
                 "reference": params.reference_fraction}
    parts: dict[str, list[pd.DataFrame]] = {name: [] for name in SPLITS}
    for _, group in df.groupby("label", sort=True):
        order = rng.permutation(len(group))
        start = 0
        for name, frac in fractions.items():
            n = max(1, int(round(frac * len(group))))
            parts[name].append(group.iloc[order[start:start + n]])
            start += n
        parts["train"].append(group.iloc[order[start:]])
    return {name: pd.concat(frames).sample(frac=1.0, random_state=params.seed).reset_index(drop=True)
            for name, frames in parts.items()}


def check_contract(splits: dict[str, pd.DataFrame]) -> None:
    """Raise DataContractError unless every split is usable and disjoint."""
    problems: list[str] = []
    keys: dict[str, set[str]] = {}
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
        unknown = sorted(set(df["label"].tolist()) - {0, 1})
        if unknown:
            problems.append(f"{name}: unknown label(s) {unknown}; expected 0 ({LABELS[0]}) or 1 ({LABELS[1]})")
        keys[name] = set(df["text"].astype(str).map(normalize))
    names = sorted(keys)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            leaked = keys[a] & keys[b]
            if leaked:
                example = min(leaked)
                problems.append(f"leakage: {len(leaked)} text(s) in both {a} and {b}, e.g. {example[:60]!r}")
    if problems:
        raise DataContractError(problems)


def prepare(archive: Path, params: DataParams) -> tuple[dict[str, pd.DataFrame], dict]:
    """Raw archive -> validated splits (+ the shifted domain) and data stats."""
    movies, removed = deduplicate(label_by_rating(read_snippets(archive, MOVIE_FILE)))
    if params.max_rows is not None and params.max_rows < len(movies):
        movies = movies.sample(n=params.max_rows, random_state=params.seed).reset_index(drop=True)
    splits = stratified_split(movies, params)
    check_contract(splits)
    shifted, _ = deduplicate(label_by_rating(read_snippets(archive, PRODUCT_FILE)))
    if params.max_shifted_rows is not None and params.max_shifted_rows < len(shifted):
        shifted = shifted.sample(n=params.max_shifted_rows, random_state=params.seed).reset_index(drop=True)
    stats = {"duplicates_removed": removed,
             **{f"rows_{k}": len(v) for k, v in splits.items()},
             **{f"positive_rate_{k}": round(float(v["label"].mean()), 4) for k, v in splits.items()},
             "rows_shifted": len(shifted)}
    return {**splits, "shifted": shifted}, stats
