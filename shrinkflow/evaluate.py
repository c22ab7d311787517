"""Measure a model: quality, latency, size on disk and peak memory.

Each model is measured in a fresh spawned process, one at a time, so that
  - peak RSS is that model's own (a process that loads it and serves the
    test split), not the max over everything the parent has touched;
  - an ONNX candidate is measured without torch even imported, as served;
  - threads are pinned per process and no two models compete for cores.
Latency is wall time of ``predict_logits`` (tokenize + forward) after
warm-up iterations that are excluded.

The child process only predicts and times; the statistics (accuracy, the
paired difference against the teacher, agreement) are in shrinkflow.stats.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import resource
import time
from pathlib import Path

import numpy as np

from shrinkflow.config import LatencyParams
from shrinkflow.io import dir_size_bytes


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


def predict_splits(predictor, splits: dict[str, list[str]]) -> dict[str, list[int]]:
    from shrinkflow.runtime import predict_labels

    return {name: predict_labels(predictor, texts).tolist() if texts else [] for name, texts in splits.items()}


def measure_here(model_dir: str, splits: dict[str, list[str]], latency_texts: list[str],
                 lat: LatencyParams) -> dict:
    """Predict every split, then time the model. Use ``measure_isolated``.

    Returns {"predictions": {split: [label, ...]}, "performance": {...}}:
    labels never enter this process, so what a split is used for (selection,
    confirmation, agreement only) is decided by the caller, not here.
    """
    from shrinkflow.runtime import load_predictor

    predictor = load_predictor(model_dir, threads=lat.threads)
    predictions = predict_splits(predictor, splits)
    rng = np.random.default_rng(lat.seed)
    b1 = [[latency_texts[i]] for i in rng.integers(0, len(latency_texts), lat.warmup_iters + lat.iters_b1)]
    t1 = time_calls(predictor.predict_logits, b1, lat.warmup_iters)
    warm32 = min(lat.warmup_iters, 3)
    b32 = [[latency_texts[i] for i in rng.integers(0, len(latency_texts), 32)]
           for _ in range(warm32 + lat.iters_b32)]
    t32 = time_calls(predictor.predict_logits, b32, warm32)
    p50_1, p95_1 = percentiles_ms(t1)
    p50_32, p95_32 = percentiles_ms(t32)
    performance = {
        "latency_ms_p50_b1": round(p50_1, 4), "latency_ms_p95_b1": round(p95_1, 4),
        "latency_ms_p50_b32": round(p50_32, 4), "latency_ms_p95_b32": round(p95_32, 4),
        "throughput_eps_b32": round(32 * len(t32) / sum(t32), 2),
        "size_mb": round(dir_size_bytes(model_dir) / 1e6, 4), "peak_rss_mb": round(peak_rss_mb(), 2)}
    return {"predictions": predictions, "performance": performance}


def measure_isolated(model_dir: Path | str, splits: dict[str, list[str]], latency_texts: list[str],
                     lat: LatencyParams) -> dict:
    """``measure_here`` in a fresh spawned process (see module docstring)."""
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(measure_here, str(model_dir), {k: list(v) for k, v in splits.items()},
                           list(latency_texts), lat).result()
