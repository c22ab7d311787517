"""What the benchmarks share: where results go, the stamp every results
file starts with, and the prepared splits and kept teacher they read.

The benchmarks run as scripts (``python bench/<name>.py``), so this folder
is first on ``sys.path`` and they import this module as ``_common``.
"""

from __future__ import annotations

import platform
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def now_utc() -> str:
    """The current UTC time, ISO 8601 to the second (``measured_at``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def stamp() -> dict:
    """``measured_at`` (now, UTC) and ``machine`` (CPU and Python version):
    the first keys of every results document."""
    return {"measured_at": now_utc(),
            "machine": f"{cpu_model()}{platform.processor() or platform.machine()}, python {platform.python_version()}"}


def cpu_model() -> str:
    """The CPU's model name and a trailing ", " (from /proc/cpuinfo), or ""
    where it cannot be read: figures differ from one CPU to another."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + ", "
    except OSError:
        pass
    return ""


def splits(*names: str) -> dict:
    """The prepared splits ``names`` of this checkout (data/prepared/),
    each a DataFrame (text, label). Raises MissingInput when one is missing
    (run ``shrinkflow run`` first)."""
    from shrinkflow.splits import read_split

    return {s: read_split(s, ROOT) for s in names}


def teacher_and_tokenizer():
    """The kept teacher (models/teacher) as a torch model, and
    its tokenizer.json text."""
    from shrinkflow.modeling import TOKENIZER, load_torch_model
    from shrinkflow.paths import TEACHER

    return load_torch_model(ROOT / TEACHER), (ROOT / TEACHER / TOKENIZER).read_text()


def wait_until_ready(proc, url: str, what: str, timeout_s: float = 180.0) -> None:
    """Poll ``url`` (GET) until it answers 200, while ``proc`` (a Popen) runs.
    Exits the benchmark, naming ``what``, when the process ends first or
    ``timeout_s`` passes (the process is then killed)."""
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{what} did not become ready in {timeout_s:.0f} s")


def default_candidate(params):
    """The default student of ``params`` (a ``shrinkflow.config.Params``): its
    first candidate whose recipe distils. Raises SystemExit, naming the
    candidates, when none distils."""
    from shrinkflow.compress.build import distils

    for cand in params.compress.candidates:
        if distils(cand):
            return cand
    raise SystemExit("the params have no distilled candidate (the benchmark measures the default student): "
                     f"{[c.name for c in params.compress.candidates]}")


def default_student() -> str:
    """The name of the default student in this checkout's params.yaml
    (``student-l0135-int8`` since 2026-12-07, ``student-l024-int8`` before;
    ``default_candidate``). Raises SystemExit when no candidate distils."""
    from shrinkflow.config import load_params

    return default_candidate(load_params(ROOT / "params.yaml")).name
