"""Real traffic for the monitoring loop, and the one split of the shifted
domain between what may be sent as traffic and what measures recovery.

Two domains (``shrinkflow simulate-traffic --domain``):

- ``in``: the ``test`` split (``data/prepared/test.parquet``), the domain the
  models were trained on: movie reviews for the built-in task, the user's
  test data for theirs (``data.source.kind: files``).
- ``shifted`` on the user's task (``data.source.kind: files``): their
  shifted split (``data/prepared/shifted.parquet``, from
  ``data.source.shifted_path``), cut by the same ``shifted_part`` hash into
  a traffic pool (two in three texts) and a recovery set
  (``user_shifted_split``).
- ``shifted`` on the built-in task: the tweets of Hutto & Gilbert (ICWSM 2014), shipped in the
  same pinned archive (``data/raw/source.tar.gz``) and used by no stage.
  Their 4,200 rated tweets give 4,136 after neutral ratings (4) and
  duplicates (60) are dropped, the same ``label_by_rating`` and
  ``deduplicate`` as the data stage. ``shifted_part`` puts each in the
  **traffic pool** (2,760 tweets, 68.3% positive) or the **recovery set**
  (1,376, 71.4% positive) by a hash of its normalised text: one tweet in
  three, deterministically, whatever the order or subset read, and a
  near-duplicate (case, spaces) lands on the same side. Only the pool is
  ever sent as traffic, so a re-compression distilled on the window is
  measured on tweets it never saw (``bench/monitoring.py``).

``simulate`` sends texts to a running ``shrinkflow serve``, one POST
/predict per text, then posts the true label of a seeded share of the
answered predictions to /feedback. I/O is httpx; nothing here imports
Prefect.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from shrinkflow.splits import read_parquet

from shrinkflow.errors import MissingInput

TWEETS_FILE = "hutto_ICWSM_2014/tweets_GroundTruth.txt"
DOMAINS = ("in", "shifted")
# One tweet in RECOVERY_EVERY goes to the recovery set (by hash): a third
# leaves 1,376 tweets to measure recovery on, enough for bench/monitoring.py's
# 1,000 evaluation tweets, and 2,760 for traffic windows (600 in the bench).
RECOVERY_EVERY = 3


def shifted_part(text: str) -> Literal["pool", "recovery"]:
    """Which side of the shifted domain ``text`` belongs to: ``recovery``
    when the first 8 bytes of the sha256 of its normalised form (lowercase,
    runs of whitespace as one space: ``shrinkflow.data.normalize``) are 0
    modulo 3, else ``pool``. Pure and deterministic."""
    from shrinkflow.data import normalize

    digest = hashlib.sha256(normalize(text).encode("utf-8", "surrogatepass")).digest()
    return "recovery" if int.from_bytes(digest[:8], "big") % RECOVERY_EVERY == 0 else "pool"


def shifted_texts(archive: Path | str) -> pd.DataFrame:
    """Every labelled, deduplicated tweet of the archive (columns text, label;
    label 1 = positive, mean human rating > 0), in file order.
    Raises shrinkflow.errors.DataError when the archive cannot be read."""
    from shrinkflow.data import deduplicate, label_by_rating, read_snippets

    df, _ = deduplicate(label_by_rating(read_snippets(Path(archive), TWEETS_FILE)))
    return df.reset_index(drop=True)


def shifted_split(archive: Path | str) -> dict[str, pd.DataFrame]:
    """The shifted domain cut once: ``{"pool": ..., "recovery": ...}``, each
    with columns text, label in file order (2,760 and 1,376 rows for the
    pinned archive)."""
    df = shifted_texts(archive)
    part = df["text"].map(shifted_part)
    return {name: df[(part == name).to_numpy()].reset_index(drop=True) for name in ("pool", "recovery")}


def user_shifted_split(path: Path | str) -> dict[str, pd.DataFrame]:
    """The user's shifted split (``data/prepared/shifted.parquet`` of a
    ``data.source.kind: files`` task: columns text, label as class ids) cut
    by ``shifted_part``: ``{"pool": ..., "recovery": ...}``, file order.
    Raises MissingInput (a FileNotFoundError) naming the file and what makes it."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path} (the shifted split: set data.source.shifted_path to labelled text "
                           "from another domain, then `shrinkflow run`)")
    df = read_parquet(path, columns=["text", "label"]).reset_index(drop=True)
    part = df["text"].map(shifted_part) if len(df) else pd.Series([], dtype=object)
    return {name: df[(part == name).to_numpy()].reset_index(drop=True) for name in ("pool", "recovery")}


def traffic_pool(domain: str, root: Path | str = ".", source_kind: str | None = None) -> pd.DataFrame:
    """The texts ``simulate-traffic`` may send for ``domain`` (columns text,
    label: class ids), read from the project at ``root``: the test split for
    ``in``; for ``shifted``, the traffic pool of the user's shifted split
    when ``source_kind`` is ``"files"`` (params ``data.source.kind``), else
    of the built-in tweets. Raises MissingInput (a FileNotFoundError) naming the missing file
    (run ``shrinkflow run`` or ``dvc pull`` first) and ValueError for an
    unknown domain."""
    from shrinkflow.paths import RAW, split_path

    root = Path(root)
    if domain == "in":
        path = root / split_path("test")
        if not path.is_file():
            raise MissingInput(f"{path} (the test split; `shrinkflow run` or `dvc pull` makes it)")
        return read_parquet(path, columns=["text", "label"]).reset_index(drop=True)
    if domain == "shifted" and source_kind == "files":
        return user_shifted_split(root / split_path("shifted"))["pool"]
    if domain == "shifted":
        path = root / RAW
        if not path.is_file():
            raise MissingInput(f"{path} (the pinned source archive; `dvc repro fetch` or `dvc pull` makes it)")
        return shifted_split(path)["pool"]
    raise ValueError(f"unknown domain {domain!r}: one of {', '.join(DOMAINS)}")


def traffic_order(pool: pd.DataFrame, n: int, seed: int) -> tuple[pd.DataFrame, int]:
    """``n`` rows of ``pool`` in a seeded random order, cycling through the
    pool (a fresh permutation each pass) when ``n`` is larger than it.
    Returns the rows and the number of passes started (1 when n <= len)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if len(pool) == 0:
        raise ValueError("the traffic pool is empty")
    rng = np.random.default_rng(seed)
    passes = math.ceil(n / len(pool))
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(passes)])[:n]
    return pool.iloc[order].reset_index(drop=True), passes


def feedback_count(answered: int, rate: float) -> int:
    """How many of ``answered`` predictions get their true label posted:
    ``rate * answered`` rounded half up (0.1 of 25 -> 3)."""
    return int(math.floor(rate * answered + 0.5))


def feedback_choice(answered: int, rate: float, seed: int) -> np.ndarray:
    """Which answered predictions (indices 0..answered-1, sorted) get
    feedback: exactly ``feedback_count(answered, rate)`` of them, drawn with
    a seed stream separate from ``traffic_order``'s."""
    k = feedback_count(answered, rate)
    return np.sort(np.random.default_rng([seed, 1]).choice(answered, size=k, replace=False))


def server_url(host: str, port: int) -> str:
    """The address a client on this machine reaches a server at that binds
    ``host``:``port`` (``serve.host``/``serve.port``): a wildcard bind
    (0.0.0.0, ::) is reached on loopback; an IPv6 host is bracketed."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


class ServerUnreachable(RuntimeError):
    """No shrinkflow server answered at the URL (``str()`` names it)."""


class ServedLabelsDiffer(ValueError):
    """The version the server answers with has other class names than the
    traffic's labels (a rollback across a change of the label set): its
    feedback would be stored under the served version's class of that
    name, which may be another class (``str()`` gives both lists)."""


def _served_labels(base: str, headers: dict) -> list[str] | None:
    """The class names of the version the server at ``base`` answers with
    (``GET /metadata``: ``deployed.labels``), or None when it does not say (a 401 without the
    token: every feedback post would get 401 too)."""
    import httpx

    try:
        r = httpx.get(f"{base}/metadata", headers=headers, timeout=30)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    try:
        labels = (r.json().get("deployed") or {}).get("labels")
    except (ValueError, AttributeError):
        return None
    return [str(x) for x in labels] if isinstance(labels, list) else None


@dataclass
class TrafficResult:
    """What ``simulate`` did. Status keys are HTTP codes as strings ("200";
    "200 (not a shrinkflow answer)" for one without its predictions), or an httpx
    error name ("ConnectError") for a request that got no answer."""

    sent: int
    predict_status: Counter = field(default_factory=Counter)
    feedback_status: Counter = field(default_factory=Counter)
    # per sent text: its prediction id when answered 200, else None
    prediction_ids: list = field(default_factory=list)
    feedback_posted: int = 0
    passes: int = 1

    @property
    def answered(self) -> int:
        return self.predict_status.get("200", 0)

    @property
    def ok(self) -> bool:
        return set(self.predict_status) <= {"200"} and set(self.feedback_status) <= {"200"}

    @property
    def unreachable(self) -> bool:
        """Nothing answered at all: every request failed at the transport."""
        return self.sent > 0 and all(not k[:3].isdigit() for k in self.predict_status)


def simulate(url: str, texts: list[str], labels: list[str | int], feedback_rate: float = 0.0, seed: int = 0,
             concurrency: int = 4, token: str | None = None, progress: bool | None = None,
             timeout_s: float = 60.0, label_names: list[str] | None = None) -> TrafficResult:
    """Send each of ``texts`` to the shrinkflow server at ``url`` as its own
    ``POST /predict`` (``concurrency`` at a time), then post the true label
    (``labels[i]``, a class index) of ``feedback_choice(answered,
    feedback_rate, seed)`` of the answered predictions to ``/feedback``: a
    label name as is (what a user's system posts), a class index as an int.

    ``token`` is sent as ``Authorization: Bearer``. Raises ServerUnreachable
    when ``GET /health`` gets no answer, or not a 200, before anything is
    sent. With ``label_names`` (the names ``labels`` come from) and feedback
    to post, raises ServedLabelsDiffer before anything is sent when the
    server's version (``GET /metadata``: its ``labels``) names another set
    of classes (the same names in another order are fine: feedback is
    posted by name). Failed requests are counted, never raised. Progress bars (tqdm) go
    to stderr; ``progress`` None: only when stderr is a terminal (redirected
    to a file, a bar's updates would pile up on one line).
    """
    import httpx
    from tqdm import tqdm

    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        health = httpx.get(f"{base}/health", timeout=10)
    except httpx.HTTPError as exc:
        raise ServerUnreachable(f"cannot reach a shrinkflow server at {base}: {type(exc).__name__}: {exc}") from None
    if health.status_code != 200:
        raise ServerUnreachable(f"{base}/health answered {health.status_code}, not 200: is `shrinkflow serve` "
                                "running at that URL?")
    if label_names is not None and feedback_rate > 0:
        served = _served_labels(base, headers)
        # Feedback goes by name: the same names in another order resolve
        # alike; a name the served version lacks, or another set that
        # shares some names, would not mean the same class.
        if served is not None and set(served) != set(label_names):
            raise ServedLabelsDiffer(
                f"the server answers with {health.json().get('model_version')}, whose classes are {served}, but "
                f"this traffic's labels are {list(label_names)}: its feedback would be stored as the served "
                "version's class of the same name, which may be another class")
    result = TrafficResult(sent=len(texts), prediction_ids=[None] * len(texts))
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(timeout=timeout_s, headers=headers, limits=limits) as client, \
            ThreadPoolExecutor(max_workers=concurrency) as pool:

        def post(path: str, body: dict) -> tuple[str, dict | None]:
            try:
                r = client.post(f"{base}{path}", json=body)
            except httpx.HTTPError as exc:
                return type(exc).__name__, None
            if r.status_code != 200:
                return str(r.status_code), None
            try:
                return "200", r.json()
            except ValueError:
                return "200 (not a shrinkflow answer)", None

        with tqdm(total=len(texts), desc="predict", unit="req", disable=_no_bar(progress)) as bar:
            def predict(i: int) -> None:
                status, body = post("/predict", {"texts": [texts[i]]})
                try:
                    pid = body["predictions"][0]["prediction_id"] if body is not None else None
                except (KeyError, IndexError, TypeError):  # a 200 that is not shrinkflow's answer
                    status, pid = "200 (not a shrinkflow answer)", None
                with lock:
                    result.predict_status[status] += 1
                    result.prediction_ids[i] = pid
                    bar.update(1)

            list(pool.map(predict, range(len(texts))))
        answered = [i for i, pid in enumerate(result.prediction_ids) if pid is not None]
        chosen = [answered[j] for j in feedback_choice(len(answered), feedback_rate, seed)]
        with tqdm(total=len(chosen), desc="feedback", unit="label",
                  disable=_no_bar(progress) if chosen else True) as bar:
            def feedback(i: int) -> None:
                label = labels[i] if isinstance(labels[i], str) else int(labels[i])
                status, _ = post("/feedback", {"prediction_id": result.prediction_ids[i], "label": label})
                with lock:
                    result.feedback_status[status] += 1
                    result.feedback_posted += status == "200"
                    bar.update(1)

            list(pool.map(feedback, chosen))
    return result


def _no_bar(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for ``progress``: None lets tqdm decide (no bar
    unless stderr is a terminal)."""
    return None if progress is None else not progress
