"""compress: build every candidate of ``compress.candidates`` into
models/candidates (and each distilled candidate's warm-start sidecar into
models/students), and what each cost into metrics/compress.json.

Candidates are built in parallel, one Prefect task each, on the task runner
in ``compress.runner`` (flows.compress). A candidate whose own inputs did not
change is copied from the candidate cache instead of rebuilt
(shrinkflow.compress.keys). Each candidate lands in models/candidates by a
rename, so its dir is finished or absent.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from stages.common import main


def compress_metrics(results: dict, compute: dict):
    """metrics/compress.json: each candidate's build record (by name, as
    ``flows.compress.build_candidates`` returns them) and this run's compute
    meter (``ComputeMeter.result()``), as a ``CompressMetrics``. Raises
    pydantic.ValidationError when they do not match it."""
    from shrinkflow.artifacts import CompressMetrics

    return CompressMetrics(candidates=results, compute=compute)


def compress(params, root: Path):
    """Build every candidate of ``params.compress`` into models/candidates
    under ``root``;
    returns (and writes to metrics/compress.json) the per-candidate records
    and this run's compute, a ``CompressMetrics``."""
    # Prefect only now: run_stage has configured the environment first.
    from flows.compress import build_candidates
    from flows.prefect_server import ephemeral_api
    from shrinkflow.compress.keys import candidate_keys
    from shrinkflow.catalog import COMPRESS_METRICS, save
    from shrinkflow.cost import ComputeMeter
    from shrinkflow.splits import read_unlabelled
    from shrinkflow.paths import CANDIDATES, STUDENTS

    # ``root`` is absolute (run_stage): a Dask worker resolves it on its own
    # filesystem, never relative to whatever directory it started in.
    # Read every declared text dependency once, even when every candidate will
    # come from the cache: a corrupt or undecodable input fails the stage that
    # declares it, not a later stage that happens to read it first.
    read_unlabelled(root)
    runner = params.compress.runner
    shutil.rmtree(root / CANDIDATES, ignore_errors=True)
    # The distilled candidates' warm-start sidecars (shrinkflow.compress.warm):
    # an out even when no candidate distils (then empty).
    shutil.rmtree(root / STUDENTS, ignore_errors=True)
    (root / STUDENTS).mkdir(parents=True)
    threads = max(1, params.train.threads // runner.max_workers)
    candidates = list(params.compress.candidates)
    opset, fuse = params.compress.onnx_opset, params.compress.fuse_transformer_ops
    # Run by hand (`dvc repro`, no PREFECT_API_URL from a shrinkflow command),
    # the build's flow would start Prefect's own temporary server, which a
    # SIGTERM or the OOM killer of this process left running, orphaned
    # (~230 MB each; seen after killed benchmark stages). Started here it is
    # tied to this process (flows.prefect_server.TemporaryPrefectServer).
    with ComputeMeter(params.cost.country_iso_code) as meter, ephemeral_api(lambda: None):
        keys = candidate_keys(root, candidates, opset, threads, fuse)
        results = build_candidates(str(root), candidates, runner, opset=opset, threads=threads, keys=keys,
                                   fuse=fuse)
    # "compute": what this run spent (cached candidates cost ~nothing now);
    # each candidate's build_cpu_seconds: what its build cost when it was built.
    doc = compress_metrics(results, meter.result())
    save(COMPRESS_METRICS, doc, root)
    return doc


if __name__ == "__main__":
    main("compress", compress)
