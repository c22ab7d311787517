"""Measure models: quality, latency, CPU per prediction, size on disk and peak memory.

Each model is measured in its own fresh spawned process, so that
  - peak RSS is that model's own (a process that loads it and serves the
    test split), not the max over everything the parent has touched;
  - an ONNX candidate is measured without torch even imported, as served;
  - threads are pinned per process and no two models compete for cores.
Latency is wall time of ``predict_logits`` (tokenize + forward) after
warm-up iterations that are excluded.

``measure_interleaved`` (validate) keeps every model's process alive and
times them in alternating rounds over the same time window: a shared machine
drifts by tens of percent over minutes, and timing the teacher first and a
candidate two minutes later puts that drift into the speedup a gate checks.
Interleaved, drift lands on every model alike, and the ratio holds.

The child process only predicts and times; the statistics (accuracy, the
paired difference against the teacher, agreement) are in shrinkflow.stats.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import time
from pathlib import Path

import numpy as np

from shrinkflow.config import LATENCY_P95_B1, LatencyParams
from shrinkflow.gates import TOLERANCE
from shrinkflow.files import dir_size_bytes
from shrinkflow.prediction_cache import model_hash as prediction_model_hash


def percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    arr = np.asarray(seconds) * 1000.0
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 95))


def time_block(fn, inputs: list) -> tuple[list[float], float]:
    """Wall time of fn(x) for each x, and the process CPU seconds of the whole
    block (every thread: an ONNX Runtime or torch pool counts in full)."""
    cpu0 = time.process_time()
    out = []
    for x in inputs:
        t0 = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t0)
    return out, time.process_time() - cpu0


def interleaved_plan(names: list[str], rounds: int) -> list[list[str]]:
    """The visiting order of each round: every model once per round, the order
    rotated round by round so that no model always runs first (right after
    the pause) or last."""
    n = len(names)
    return [names[r % n:] + names[:r % n] for r in range(rounds)] if n else []


def time_interleaved(models: dict, warmup_inputs: list, round_inputs: list[list],
                     pause_s: float = 0.0) -> dict[str, dict]:
    """Time every model on the same inputs in alternating rounds.

    ``models`` maps a name to a handle with ``warm(inputs)`` (untimed) and
    ``time(inputs) -> (seconds, cpu_seconds)``. Every model first runs the
    warm-up inputs untimed, then each round gives every model the same inputs,
    so every model gets the same number of rounds and timed calls.
    ``pause_s`` between turns lets the previous model's idle thread pool stop
    spinning (OpenMP and ONNX Runtime spin-wait for a few ms) before the next
    model's clock starts.
    """
    for handle in models.values():
        handle.warm(warmup_inputs)
    out = {n: {"seconds": [], "round_seconds": [], "cpu_seconds": 0.0, "rounds": 0} for n in models}
    for r, order in enumerate(interleaved_plan(list(models), len(round_inputs))):
        for name in order:
            if pause_s:
                time.sleep(pause_s)
            seconds, cpu = models[name].time(round_inputs[r])
            out[name]["seconds"] += seconds
            out[name]["round_seconds"].append(list(seconds))
            out[name]["cpu_seconds"] += cpu
            out[name]["rounds"] += 1
    return out


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MB.

    VmHWM (the high-water mark of this address space) rather than
    getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a process
    spawned from a large parent would report the parent's peak, not its own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6  # kB
    except OSError:
        pass
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def predict_splits(predictor, splits: dict[str, list[str]], per_row: bool = False) -> dict[str, list[int]]:
    """Labels for every split: in length-sorted batches of 32, or one text per
    call (``per_row``, how the server runs a batch-dependent model)."""
    return predict_outputs(predictor, splits, per_row)[0]


def predict_outputs(predictor, splits: dict[str, list[str]], per_row: bool = False,
                    probability_splits: frozenset[str] = frozenset()
                    ) -> tuple[dict[str, list[int]], dict[str, list[list[float]]]]:
    """(labels by split, class probabilities by split): the labels of every
    split as ``predict_splits`` gives them, and for each split named in
    ``probability_splits`` its ``[N, C]`` softmax probabilities (float64, as
    lists), from the same logits as its labels. An empty split has no
    probabilities."""
    from shrinkflow.predictors import predict_logits_batched, predict_served, softmax

    def logits(texts):
        if per_row:
            return predict_served(predictor, texts, per_row=True).logits
        return predict_logits_batched(predictor, texts)

    labels, probs = {}, {}
    for name, texts in splits.items():
        if not texts:
            labels[name] = []
            continue
        z = logits(texts)
        labels[name] = z.argmax(axis=1).tolist()
        if name in probability_splits:
            probs[name] = softmax(z.astype(np.float64)).tolist()
    return labels, probs


# ------------------------------------------------------------ interleaved
def _serve_model(conn, model_dir: str, threads: int) -> None:
    """A measuring process: loads one model, then answers commands until told
    to stop. Labels never enter it; it only predicts and times.

    The tokenizer runs on the caller's thread whatever the parent's
    environment says (``TOKENIZERS_PARALLELISM=false``, as every stage and
    ``shrinkflow serve`` run by default): its own pool (Hugging Face
    tokenizers, one rayon thread per CPU) would add runnable threads beyond
    ``threads``; with it on, a quiet 2-core timing of the R8 models waited
    17-19% of the time for a CPU, against 1.1% with it off."""
    import traceback

    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # read by tokenizers at each batch, so set before any
    try:
        from shrinkflow.predictors import load_predictor

        predictor = load_predictor(model_dir, threads=threads)
        conn.send(("ok", None))
        while True:
            cmd, arg = conn.recv()
            if cmd == "stop":
                # Nothing to flush: exit at once instead of tearing down torch and
                # ONNX Runtime (0.5-1 s of the parent's join, every measurement).
                conn.close()
                os._exit(0)
            if cmd == "predict":
                splits, per_row, probability_splits = arg
                conn.send(("ok", predict_outputs(predictor, splits, per_row, probability_splits)))
            elif cmd == "warm":
                for x in arg:
                    predictor.predict_logits(x)
                conn.send(("ok", None))
            elif cmd == "time":
                conn.send(("ok", time_block(predictor.predict_logits, arg)))
            elif cmd == "rss":
                conn.send(("ok", peak_rss_mb()))
            elif cmd == "invariance":
                from shrinkflow.predictors import batch_invariance

                texts, batch_size, seed = arg
                conn.send(("ok", batch_invariance(predictor, texts, batch_size, seed)))
    except BaseException:  # reported to the parent, which raises it with the model's name
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class ModelProcess:
    """One model loaded in its own spawned process (see ``_serve_model``)."""

    def __init__(self, model_dir: Path | str, threads: int, wait: bool = True):
        ctx = mp.get_context("spawn")
        self.model_dir = str(model_dir)
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_model, args=(child, self.model_dir, threads), daemon=True)
        self._proc.start()
        child.close()
        self._loaded = False
        if wait:
            self.wait_loaded()

    @property
    def pid(self) -> int | None:
        """The measuring process's id (None before it started)."""
        return self._proc.pid

    def wait_loaded(self) -> None:
        """Wait for the model's load (or raise its error); once."""
        if not self._loaded:
            self._call(None)
            self._loaded = True

    def _call(self, message):
        if message is not None:
            self._conn.send(message)
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"measuring {self.model_dir}: its process died "
                               f"(exit code {self._proc.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"measuring {self.model_dir} failed:\n{value}")
        return value

    def predict(self, splits, per_row=False, probability_splits=frozenset()):
        """(labels by split, probabilities by split): ``predict_outputs`` in the model's process."""
        return self._call(("predict", (splits, per_row, frozenset(probability_splits))))

    def warm(self, inputs): return self._call(("warm", inputs))
    def time(self, inputs): return self._call(("time", inputs))
    def rss(self): return self._call(("rss", None))
    def invariance(self, texts, batch_size, seed): return self._call(("invariance", (texts, batch_size, seed)))

    def stop(self) -> None:
        """Ask the process to stop (it exits after its current command)."""
        if self._proc.is_alive():
            try:
                self._conn.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass

    def close(self) -> None:
        """Stop the process, wait up to 10 s for it to exit, then kill it."""
        self.stop()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()


def _predict_cached(proc: ModelProcess, splits: dict[str, list[str]], per_row: bool, cache, model_hash,
                    threads: int, probability_splits: frozenset[str] = frozenset()
                    ) -> tuple[dict[str, list[int]], dict[str, list[list[float]]], list[str]]:
    """``proc.predict(splits, per_row, probability_splits)``, the splits
    ``cache`` holds for this model read from it and the others predicted in
    one call and stored. A split in ``probability_splits`` is read from the
    cache only when its probabilities are there too. Returns (labels by
    split, in ``splits``' order; probabilities by split; the names of the
    non-empty splits read from the cache)."""
    if cache is None:
        return (*proc.predict(splits, per_row, probability_splits), [])
    keys = {n: cache.key(model_hash, "labels", t, per_row=per_row, threads=threads)
            for n, t in splits.items() if t}
    pkeys = {n: cache.key(model_hash, "probabilities", t, per_row=per_row, threads=threads)
             for n, t in splits.items() if t and n in probability_splits}
    got = {n: cache.get(k) for n, k in keys.items()}
    pgot = {n: cache.get(k) for n, k in pkeys.items()}
    hits = [n for n, v in got.items() if v is not None and len(v) == len(splits[n])
            and (n not in pkeys or (pgot[n] is not None and len(pgot[n]) == len(splits[n])))]
    todo = {n: t for n, t in splits.items() if n not in hits}
    fresh, fresh_probs = proc.predict(todo, per_row, probability_splits) if todo else ({}, {})
    for n, labels in fresh.items():
        if n in keys:
            cache.put(keys[n], labels)
    for n, probs in fresh_probs.items():
        cache.put(pkeys[n], probs)
    return ({n: got[n] if n in hits else fresh[n] for n in splits},
            {n: pgot[n] if n in hits else fresh_probs[n] for n in pkeys}, hits)


def latency_inputs(latency_texts: list[str], lat: LatencyParams):
    """(b1 warm-up, b1 rounds, b32 warm-up, b32 rounds): the same sentences
    for every model, drawn once with the latency seed."""
    rng = np.random.default_rng(lat.seed)
    pick = lambda k: [latency_texts[i] for i in rng.integers(0, len(latency_texts), k)]  # noqa: E731
    rounds_b1 = min(lat.rounds, lat.iters_b1)
    rounds_b32 = min(lat.rounds, lat.iters_b32)
    warm_b1 = [[t] for t in pick(lat.warmup_iters)]
    b1 = [[[t] for t in pick(n)] for n in _split_even(lat.iters_b1, rounds_b1)]
    warm_b32 = [pick(32) for _ in range(min(lat.warmup_iters, 3))]
    b32 = [[pick(32) for _ in range(n)] for n in _split_even(lat.iters_b32, rounds_b32)]
    return warm_b1, b1, warm_b32, b32


def quietest_timing(disturbance: list[float | None]) -> int:
    """The index of the timing to keep among repeated timings of the same
    models: the least disturbed one (``cpuload.disturbance``: the largest
    of the share of the CPUs other processes took, the share of the cgroup
    quota's periods that throttled the models and the share of the time the
    timed threads waited for a CPU; None, not measured, counts as 0), the
    first among equals. Chosen on the machine's load alone, never on the
    figures themselves, so keeping it does not favour a candidate.
    Raises ValueError on an empty list."""
    if not disturbance:
        raise ValueError("no timing to choose from")
    return min(range(len(disturbance)), key=lambda i: (disturbance[i] or 0.0, i))


def _disturbed(load) -> str:
    """How a timing was disturbed, in words (``cpuload.OtherCpu``)."""
    others = "others' load not measured" if load.cores is None else f"other processes took {load.cores:.2f} cores"
    throttled = ("" if not load.throttled_share else
                 f", the cgroup's CPU quota throttled {load.throttled_share:.1%} of its periods")
    wait = load.cpu_wait_share
    waited = "" if wait is None else f", the timed threads waited for a CPU {wait:.1%} of the time"
    return others + throttled + waited


def _split_even(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def performance_figures(b1: dict, b32: dict) -> dict:
    """Latency, throughput and CPU per prediction from one model's interleaved
    timings: the fields of ``shrinkflow.artifacts.Performance`` but size and
    peak RSS, by name (ms, examples/s)."""
    p50_1, p95_1 = percentiles_ms(b1["seconds"])
    p50_32, p95_32 = percentiles_ms(b32["seconds"])
    n1, n32 = len(b1["seconds"]), len(b32["seconds"])
    return {"latency_ms_p50_b1": round(p50_1, 4), LATENCY_P95_B1: round(p95_1, 4),
            "latency_ms_p50_b32": round(p50_32, 4), "latency_ms_p95_b32": round(p95_32, 4),
            "throughput_eps_b32": round(32 * n32 / sum(b32["seconds"]), 2),
            "cpu_ms_per_prediction_b1": round(1000 * b1["cpu_seconds"] / n1, 4),
            "cpu_ms_per_prediction_b32": round(1000 * b32["cpu_seconds"] / (32 * n32), 4),
            "timing_rounds_b1": b1["rounds"], "timing_rounds_b32": b32["rounds"]}


def measure_interleaved(model_dirs: dict[str, Path | str], splits: dict[str, list[str]],
                        latency_texts: list[str], lat: LatencyParams, log=print,
                        invariance_texts: list[str] | None = None,
                        invariance_skip: frozenset[str] = frozenset(),
                        max_batch_prob_diff: float = 0.0, cache=None,
                        model_hashes: dict[str, str] | None = None,
                        probability_splits: frozenset[str] = frozenset()) -> dict[str, dict]:
    """Every model in its own process; predictions one model at a time, then
    latency in interleaved rounds (batch 1, then batch 32) over the same
    window. Returns {name: {"predictions": {split: [label, ...]},
    "performance": {...}}}: labels never enter the measuring processes, so
    what a split is used for (selection, confirmation, agreement only) is
    decided by the caller.

    ``probability_splits``: the splits whose class probabilities are also
    returned, under ``"probabilities"`` ({split: [N, C] list}, non-empty
    splits only; absent when none is asked), computed with the labels from
    the same logits.

    With ``invariance_texts``, every model not in ``invariance_skip`` also
    predicts them alone and in mixed-length batches of 32
    (``runtime.batch_invariance``, seeded with ``lat.seed``), under the key
    ``"batch_invariance"``, first: a model whose probabilities move by more
    than ``max_batch_prob_diff`` (or whose labels change) is served one text
    per call, so its splits are predicted that way too (``"per_row": True``),
    and the figures are those of what will be served.

    ``cache`` (a ``prediction_cache.PredictionCache``, or None): labels and
    invariance checks a model already computed on the same texts (by its
    ``prediction_cache.model_hash``: ``model_hashes[name]``, else hashed here) are read from it
    and new ones stored; the result is the same as without it. Latency,
    size and RSS are always measured. Each run says which splits came from
    the cache (``"cached_splits"``).

    When other processes took more than ``cpuload.BUSY_CORES`` cores of
    this process's CPUs on average while the models were timed, the timed
    threads waited for a CPU more than ``cpuload.CPU_WAIT_SHARE`` of the
    time, or a cgroup CPU quota throttled them (``cpuload.is_disturbed``;
    for neither of the last two when the models run more threads than the
    quota, which throttles every timing alike and shows as wait),
    every model is timed again after ``lat.busy_retime_wait_s`` seconds, up to
    ``lat.retimes_when_busy`` times, and the least disturbed timing is kept
    (``quietest_timing``: chosen on the load, not the figures).
    ``performance`` says how many timings there were (``timing_attempts``)
    and, for the one kept, what others took (``timing_other_cores`` of
    ``timing_cpus``, the CPUs this process may run on; absent where /proc
    cannot be read), the cgroup's CPU quota in cores (``timing_cpu_quota``,
    absent when none) and the share of its periods that throttled the
    models (``timing_throttled_share``, absent without a quota), and how
    much of the time the timed threads were ready to run but waiting for a
    CPU (``timing_cpu_wait_share``: the measuring processes' run-queue delay
    per second, ``cpuload.run_delay_s``, over ``lat.threads``; absent where
    not readable)."""
    splits = {k: list(v) for k, v in splits.items()}
    warm_b1, b1, warm_b32, b32 = latency_inputs(list(latency_texts), lat)
    procs: dict[str, ModelProcess] = {}
    try:
        predictions, probabilities, invariance, cached = {}, {}, {}, {}
        # Every process starts (and loads its model) at once: the loads,
        # mostly imports, overlap each other and the first models'
        # predictions. Nothing is timed before every model is loaded.
        for name, path in model_dirs.items():
            procs[name] = ModelProcess(path, lat.threads, wait=False)
        for name, path in model_dirs.items():
            procs[name].wait_loaded()
            model_hash = None
            if cache is not None:
                model_hash = (model_hashes or {}).get(name) or prediction_model_hash(path)
            per_row = False
            if invariance_texts and name not in invariance_skip:
                texts = list(invariance_texts)

                def check(proc=procs[name]):
                    return proc.invariance(texts, 32, lat.seed)

                inv = check() if cache is None else cache.get_or_put(
                    cache.key(model_hash, "invariance", texts, batch_size=32, seed=lat.seed, threads=lat.threads), check)
                invariance[name] = dict(inv)
                # the gate's own rule (shrinkflow.gates.batch_gates), so the two never disagree
                per_row = inv["max_prob_diff"] > max_batch_prob_diff + TOLERANCE or inv["label_flips"] > 0
            predictions[name], probabilities[name], cached[name] = _predict_cached(
                procs[name], splits, per_row, cache, model_hash, lat.threads, frozenset(probability_splits))
            log(f"measure: {name} loaded; predicted every split"
                + (f" ({', '.join(cached[name])} from the prediction cache)" if cached[name] else ""))
            if name in invariance:
                invariance[name]["per_row"] = per_row
        log(f"measure: timing {len(procs)} models interleaved ({len(b1)} rounds at batch 1, "
            f"{len(b32)} at batch 32)")
        from shrinkflow.cpuload import OtherCpu, busy_warning, disturbance, is_disturbed, throttle_warning

        timings = []   # (OtherCpu of the timing, batch-1 timings, batch-32 timings)
        for attempt in range(1 + lat.retimes_when_busy):
            if attempt:
                log(f"measure: {_disturbed(timings[-1][0])} while the models were timed: waiting "
                    f"{lat.busy_retime_wait_s:g} s and timing them again ({attempt} of {lat.retimes_when_busy} "
                    "retimes_when_busy)")
                time.sleep(lat.busy_retime_wait_s)
            with OtherCpu(lambda: [os.getpid(), *(p.pid for p in procs.values())], threads=lat.threads) as load:
                if not attempt and load.quota_cores is not None and lat.threads > load.quota_cores:
                    log(f"measure: warning: validate.latency.threads {lat.threads} is more than this cgroup's CPU "
                        f"quota of {load.quota_cores:g} cores: the quota may throttle the models while they are "
                        "timed")
                t1 = time_interleaved(procs, warm_b1, b1, pause_s=0.05)
                t32 = time_interleaved(procs, warm_b32, b32, pause_s=0.05)
            timings.append((load, t1, t32))
            # more threads than the quota: the quota throttles every timing alike, so none is retimed for it
            over_quota = load.quota_cores is not None and lat.threads > load.quota_cores
            # a quota's stalls count as run-queue wait too, so neither is retimed for when over the quota
            if not is_disturbed(load.cores, None if over_quota else load.throttled_share,
                                None if over_quota else load.cpu_wait_share):
                break
        kept = quietest_timing([disturbance(x.cores, x.cpus, x.throttled_share, x.cpu_wait_share)
                                for x, _, _ in timings])
        load, t1, t32 = timings[kept]
        if len(timings) > 1:
            throttled = ("" if all(x.throttled_share is None for x, _, _ in timings) else
                         "; the cgroup's CPU quota throttled " + ", ".join(
                             "?" if x.throttled_share is None else f"{x.throttled_share:.1%}" for x, _, _ in timings)
                         + " of its periods")
            waited = ("" if all(x.cpu_wait is None for x, _, _ in timings) else
                      "; the timed threads waited for a CPU " + ", ".join(
                          "?" if x.cpu_wait is None else f"{x.cpu_wait_share:.1%}" for x, _, _ in timings)
                      + " of the time")
            log(f"measure: timed {len(timings)} times; kept timing {kept + 1}, the least disturbed (others took "
                f"{', '.join('?' if x.cores is None else f'{x.cores:.2f}' for x, _, _ in timings)} cores"
                f"{throttled}{waited})")
        for warning in (None if load.cores is None else busy_warning(load.cores, load.cpus),
                        throttle_warning(load.throttled_share, load.quota_cores, lat.threads)):
            if warning:
                log(f"measure: warning: {warning}")
        timing = {"timing_attempts": len(timings),
                  **({"timing_other_cores": round(load.cores, 3), "timing_cpus": load.cpus}
                     if load.cores is not None else {}),
                  **({"timing_cpu_quota": round(load.quota_cores, 3)} if load.quota_cores is not None else {}),
                  **({"timing_throttled_share": round(load.throttled_share, 4)}
                     if load.throttled_share is not None else {}),
                  **({"timing_cpu_wait_share": round(load.cpu_wait_share, 4)}
                     if load.cpu_wait is not None else {})}
        return {name: {"predictions": predictions[name],
                       **({"probabilities": probabilities[name]} if probabilities[name] else {}),
                       "performance": {**performance_figures(t1[name], t32[name]),
                                       "size_mb": round(dir_size_bytes(path) / 1e6, 4),
                                       "peak_rss_mb": round(procs[name].rss(), 2), **timing},
                       # per-round batch-1 wall times, for ratios computed round by round
                       "rounds_b1": t1[name]["round_seconds"],
                       **({"cached_splits": cached[name]} if cache is not None else {}),
                       **({"batch_invariance": invariance[name]} if name in invariance else {})}
                for name, path in model_dirs.items()}
    finally:
        for p in procs.values():   # all asked first, so their exits overlap
            p.stop()
        for p in procs.values():
            p.close()
