"""The compress stage's fan-out: one build-candidate task per candidate, on
the Prefect task runner chosen in ``compress.runner`` (local threads or
processes, or a Dask cluster).

The stage (stages/compress.py) calls ``build_candidates``; DVC still decides
whether compress is stale. The lifecycle flow passes its API URL down, so
these task runs appear in the same Prefect backend.

On a Dask cluster whose workers do not see the project
(``RunnerParams.ships_inputs``) the flow packs the inputs once, the workers
build from them, and each candidate comes back through ``ship.receive``
(shrinkflow.compress.ship).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from prefect import flow

from shrinkflow.config import Candidate, RunnerParams
from shrinkflow.stopping import clear_stop, request_stop
from tasks.compress import build_candidate, build_shipped_candidate


# The LocalCluster's workers (each Nanny sets this in its worker process)
# run without Dask's statistical profiler: it samples every thread's stack
# every 10 ms for a dashboard that is off here, and it is the one known
# source of RecursionErrors in a LocalCluster under CI (dask/distributed#5109,
# open); a Dask test failed once on CI with a RecursionError whose place the
# log did not show.
LOCAL_WORKER_CONFIG = {"distributed.worker.profile.enabled": False}


def make_task_runner(runner: RunnerParams):
    """The Prefect task runner ``runner`` names: ThreadPoolTaskRunner,
    ProcessPoolTaskRunner, or DaskTaskRunner (on ``dask_address``, else on a
    LocalCluster of ``max_workers`` single-threaded processes, their
    profiler off: ``LOCAL_WORKER_CONFIG``)."""
    if runner.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=runner.max_workers)
    if runner.kind == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=runner.max_workers)
    from prefect_dask import DaskTaskRunner

    if runner.dask_address:
        return DaskTaskRunner(address=runner.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": runner.max_workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None,
                                          "config": LOCAL_WORKER_CONFIG})


def check_scheduler(address: str, timeout_s: float = 10.0) -> None:
    """Raise shrinkflow.errors.ClusterUnreachable unless the Dask scheduler at
    ``address`` (tcp:// or tls://; Dask's defaults: tcp, port 8786) accepts a TCP
    connection within ``timeout_s``: one clear line before any flow starts,
    rather than Dask's traceback after its 30 s connect timeout. Other
    schemes are left to Dask."""
    import socket

    from distributed.comm.addressing import parse_address, parse_host_port

    from shrinkflow.errors import ClusterUnreachable

    scheme, location = parse_address(address)
    if scheme not in ("tcp", "tls"):
        return
    try:
        host, port = parse_host_port(location, default_port=8786)  # Dask's default
    except ValueError as exc:
        raise ClusterUnreachable(f"compress.runner.dask_address {address!r} is not a scheduler address: {exc}")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterUnreachable(f"the Dask scheduler at {address} (compress.runner.dask_address) does not answer: "
                                 f"{exc}; start it or fix the address (docs/team.md)") from None


@flow(name="shrinkflow-compress", log_prints=True)
def compress_candidates(project_dir: str, candidates: list, opset: int, threads: int,
                        keys: dict | None = None, fuse: bool = False, ship: bool = False) -> dict:
    """One build-candidate task per candidate, all submitted at once; each
    candidate's record by name. ``ship``: the workers do not see the project
    (``ship_candidates``)."""
    if ship:
        return ship_candidates(Path(project_dir), candidates, opset, threads, keys or {}, fuse)
    clear_stop()   # a stop asked of an earlier flow in this process is not this one's
    futures = [build_candidate.submit(project_dir, c, opset, threads, (keys or {}).get(c.name), fuse)
               for c in candidates]
    try:
        return {r["name"]: r for r in (f.result() for f in futures)}
    except Exception:
        raise            # a failed build: the others finish (and reach the candidate cache)
    except BaseException:
        # SIGTERM (Prefect's TerminationSignal) or Ctrl-C here, in the main
        # thread: the task runner waits for the running builds before the
        # process can exit, so end them at their next step (shrinkflow.stopping)
        request_stop()
        raise


def ship_candidates(root: Path, candidates: list, opset: int, threads: int, keys: dict, fuse: bool) -> dict:
    """Inside ``compress_candidates`` on a DaskTaskRunner: a candidate in the
    project's candidate cache is copied here; the others are built on the
    workers from inputs packed once (``ship.pack_inputs``) and each one's
    warm-start sidecar, and put in the project by ``ship.receive_all`` (which
    keeps every candidate that came back, then raises the first failure).
    Each candidate's record by name."""
    from prefect.context import FlowRunContext

    from shrinkflow.compress.build import cached_candidate
    from shrinkflow.compress.ship import arrived, pack_inputs, pack_warm_start, receive_all

    records = {c.name: cached_candidate(root, c, keys[c.name]) if keys.get(c.name) else None for c in candidates}
    todo = [c for c in candidates if records[c.name] is None]
    if not todo:
        return records
    inputs = pack_inputs(root)
    client = FlowRunContext.get().task_runner.client
    # The inputs enter the graph once, as the result of a task every build
    # depends on: workers fetch them from one another, and if every worker
    # holding them dies the scheduler computes them again from the task
    # (a client.scatter'ed value would be lost). Large by design (the
    # teacher), so Dask's large-graph warning says nothing here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
        held = client.submit(arrived, inputs, pure=False)
    futures = {c.name: build_shipped_candidate.submit(held, c, pack_warm_start(root, c, inputs.teacher_hash),
                                                      opset, threads, fuse)
               for c in todo}
    records.update(receive_all(root, [(c, futures[c.name].result) for c in todo], keys))
    return records


def build_candidates(project_dir: str, candidates: list[Candidate], runner: RunnerParams, *, opset: int,
                     threads: int, keys: dict[str, str], fuse: bool) -> dict[str, dict]:
    """Build every candidate into ``project_dir`` (absolute: a Dask worker
    with a shared filesystem resolves it on its own) on ``runner``'s task
    runner, each with ``threads`` torch threads and its cache key from
    ``keys``; on a cluster that does not share it, from shipped inputs
    (``runner.ships_inputs``). Returns each candidate's record
    (shrinkflow.compress.build.build_candidate) by name."""
    if runner.dask_address:
        check_scheduler(runner.dask_address)
    flow_ = compress_candidates.with_options(task_runner=make_task_runner(runner))
    return flow_(project_dir=project_dir, candidates=candidates, opset=opset, threads=threads, keys=keys,
                 fuse=fuse, ship=runner.ships_inputs)
