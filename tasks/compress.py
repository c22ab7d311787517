"""Prefect task: build one compressed candidate from the kept teacher."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE


@task(name="build-candidate", task_run_name="build {name}", cache_policy=NO_CACHE)
def build_candidate(project_dir: str, params_path: str, name: str, threads: int) -> dict:
    # NO_CACHE: DVC decides when compress is stale. No retries: a failed
    # recipe is a bug or a bad param, not a transient fault.
    import pandas as pd

    from shrinkflow.compress import apply_recipe
    from shrinkflow.config import load_params
    from shrinkflow.modeling import read_manifest
    from tasks.stages import CANDIDATES, PREPARED, TEACHER

    root = Path(project_dir)
    params = load_params(root / params_path)
    cand = next(c for c in params.compress.candidates if c.name == name)
    train = pd.read_parquet(root / PREPARED / "train.parquet")
    unlabelled_file = root / params.compress.unlabelled_path
    unlabelled = unlabelled_file.read_text(encoding="utf-8").splitlines() if unlabelled_file.is_file() else []
    t0 = time.perf_counter()
    out = apply_recipe(root / TEACHER, cand, root / CANDIDATES / name, opset=params.compress.onnx_opset,
                       train_texts=train["text"].tolist(), train_labels=train["label"].to_numpy(),
                       threads=threads, progress=False, unlabelled_texts=unlabelled)
    seconds = round(time.perf_counter() - t0, 2)
    print(f"compress: {name} built in {seconds:.0f}s -> {out}")
    return {"name": name, "seconds": seconds, **read_manifest(out)["stats"]}
