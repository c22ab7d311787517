"""Measure a model: quality, latency, size on disk and peak memory.

Each model is measured in a fresh spawned process, one at a time, so that
  - peak RSS is that model's own (a process that loads it and serves the
    test split), not the max over everything the parent has touched;
  - an ONNX candidate is measured without torch even imported, as served;
  - threads are pinned per process and no two models compete for cores.
Latency is wall time of ``predict_logits`` (tokenize + forward) after
warm-up iterations that are excluded.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shrinkflow.config import LatencyParams
from shrinkflow.io import dir_size_bytes


@dataclass(frozen=True)
class ModelMetrics:
    accuracy: float
    f1: float
    latency_ms_p50_b1: float
    latency_ms_p95_b1: float
    latency_ms_p50_b32: float
    latency_ms_p95_b32: float
    throughput_eps_b32: float
    size_mb: float
    peak_rss_mb: float
    n_test: int
    # Accuracy on the shifted domain (product reviews): compressed models tend
    # to lose more out of domain than in it. None when not measured.
    accuracy_shifted: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def accuracy_f1(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """Accuracy and F1 of the positive class (label 1)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    acc = float((y_true == y_pred).mean()) if len(y_true) else 0.0
    tp = int(((y_pred == 1) & (y_true == 1)).sum())
    fp = int(((y_pred == 1) & (y_true == 0)).sum())
    fn = int(((y_pred == 0) & (y_true == 1)).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return acc, f1


def percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    arr = np.asarray(seconds) * 1000.0
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 95))


def time_calls(fn, inputs: list, warmup: int) -> list[float]:
    """Wall time of fn(x) for each x; the first ``warmup`` calls are dropped."""
    for x in inputs[:warmup]:
        fn(x)
    out = []
    for x in inputs[warmup:]:
        t0 = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t0)
    return out


def peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def measure_here(model_dir: str, texts: list[str], labels: list[int], lat: LatencyParams,
                 shifted: tuple[list[str], list[int]] | None = None) -> dict:
    """Measure in the current process. Use ``measure_isolated`` from stages."""
    from shrinkflow.runtime import load_predictor, predict_labels

    predictor = load_predictor(model_dir, threads=lat.threads)
    y_pred = predict_labels(predictor, texts)
    acc, f1 = accuracy_f1(np.asarray(labels), y_pred)
    acc_shifted = None
    if shifted is not None:
        acc_shifted, _ = accuracy_f1(np.asarray(shifted[1]), predict_labels(predictor, shifted[0]))
        acc_shifted = round(acc_shifted, 6)

    rng = np.random.default_rng(lat.seed)
    b1 = [[texts[i]] for i in rng.integers(0, len(texts), lat.warmup_iters + lat.iters_b1)]
    t1 = time_calls(predictor.predict_logits, b1, lat.warmup_iters)
    warm32 = min(lat.warmup_iters, 3)
    b32 = [[texts[i] for i in rng.integers(0, len(texts), 32)] for _ in range(warm32 + lat.iters_b32)]
    t32 = time_calls(predictor.predict_logits, b32, warm32)
    p50_1, p95_1 = percentiles_ms(t1)
    p50_32, p95_32 = percentiles_ms(t32)
    return ModelMetrics(
        accuracy=round(acc, 6), f1=round(f1, 6),
        latency_ms_p50_b1=round(p50_1, 4), latency_ms_p95_b1=round(p95_1, 4),
        latency_ms_p50_b32=round(p50_32, 4), latency_ms_p95_b32=round(p95_32, 4),
        throughput_eps_b32=round(32 * len(t32) / sum(t32), 2),
        size_mb=round(dir_size_bytes(model_dir) / 1e6, 4),
        peak_rss_mb=round(peak_rss_mb(), 2), n_test=len(texts), accuracy_shifted=acc_shifted).to_dict()


def measure_isolated(model_dir: Path | str, texts: list[str], labels: list[int],
                     lat: LatencyParams, shifted: tuple[list[str], list[int]] | None = None) -> ModelMetrics:
    """Measure one model in a fresh spawned process (see module docstring)."""
    ctx = mp.get_context("spawn")
    if shifted is not None:
        shifted = (list(shifted[0]), [int(x) for x in shifted[1]])
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        result = pool.submit(measure_here, str(model_dir), list(texts), [int(x) for x in labels], lat,
                             shifted).result()
    return ModelMetrics(**result)
