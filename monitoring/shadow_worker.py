"""The shadow teacher in a process of its own, beside the monitor's other work.

A monitor run spends most of its time on one core: importing Evidently,
pandas and scikit-learn (about 4 s on a 2-core CPU), importing torch and
transformers and loading the teacher (about 5 s), running the teacher over
the shadow sample (about 4 s for 1,000 texts), and Evidently's reports. The
imports hold the interpreter's lock, so threads cannot overlap them; a
process can. ``ShadowTeacherProcess`` runs ``monitoring.evidently_reports.
ShadowTeacher`` in ``python -m monitoring.shadow_worker``: it imports torch
and transformers and loads the teacher while the monitor's process imports
Evidently and computes the text descriptors and the drift report, then
answers the teacher passes the monitor submitted
(bench/results/monitor_speed.md has the figures).

The answers are those of ``ShadowTeacher`` in the monitor's own process, bit
for bit: the same class, threads and batches, each submitted list its own
pass.

A run over a few texts gains nothing from a second process (the tests' tiny
windows: their process has usually imported torch already, for the served
model), so ``shadow_teacher`` starts one only for ``WORKER_MIN_TEXTS`` texts
or more. The CLI starts the worker early (``prestart``), while Prefect's
temporary server starts, and the run's ``build`` takes it (``take``).

Protocol (private to this module): the parent writes one JSON line per pass
to the worker's stdin, ``{"texts": [...]}``; the worker answers each, in
order, on its stdout with one JSON line, ``{"npz": path}`` (labels and
embeddings in a file of the parent's temporary directory) or ``{"error":
message}``. Before any answer it writes ``{"ready": true}`` once the teacher
is loaded, or ``{"error": message}`` and exits. End of its stdin (the parent
closed it, or died) ends the worker. Its stderr goes to a file, quoted in
the parent's error when the worker fails.

Importing this module imports neither torch nor Evidently.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

# Fewer texts than this: the teacher runs in the monitor's own process. A
# worker's start costs about 5 s of CPU (its own imports of torch and
# transformers, the teacher's load) that only overlap work the monitor's
# process has left to do; 1,000 texts take about 4 s of the real 6-layer
# teacher on 2 cores, 256 about 1 s.
WORKER_MIN_TEXTS = 256


class ShadowTeacherProcess:
    """The kept teacher at ``teacher_dir`` in shadow, in a worker process
    started at construction (see the module's docstring); the same inputs
    and outputs as ``ShadowTeacher`` (texts in; labels [N] int64 and
    mean-pooled last-layer embeddings [N, D] float32 out).

    ``submit(texts)`` sends a pass and returns at once; the returned
    ``Pending.result()`` waits for it. Passes are answered in the order
    they were submitted. Raises RuntimeError, with the worker's stderr tail,
    when the worker cannot load the teacher, fails a pass, or exits. Close
    it (``close()``, or at exit) to end the worker."""

    def __init__(self, teacher_dir: Path, truncation: str = "head", threads: int = 2, batch_size: int | None = None):
        from monitoring.evidently_reports import TEACHER_BATCH

        self.teacher_dir, self.truncation = Path(teacher_dir).resolve(), truncation
        self.threads, self.batch_size = threads, batch_size or TEACHER_BATCH
        self._tmp = Path(tempfile.mkdtemp(prefix="shrinkflow-shadow-"))
        self._stderr_path = self._tmp / "worker.log"
        self._lock = threading.Lock()
        self._sent = self._answered = 0
        self._replies: dict[int, dict] = {}
        self._ready = self._closed = False
        root = str(Path(__file__).resolve().parents[1])   # where `monitoring` is importable from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        with open(self._stderr_path, "wb") as err:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "monitoring.shadow_worker", "--teacher", str(self.teacher_dir),
                 "--truncation", truncation, "--threads", str(threads), "--batch-size", str(self.batch_size),
                 "--out-dir", str(self._tmp)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env, text=True, encoding="utf-8")
        # Passes are written by a thread of their own: a pass larger than the
        # pipe's buffer (64 KiB, about 600 texts) would otherwise block
        # submit() until the worker has loaded the teacher and reads.
        self._outbox: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_passes, name="shadow-teacher-writer", daemon=True)
        self._writer.start()
        atexit.register(self.close)

    def _write_passes(self) -> None:
        while (line := self._outbox.get()) is not None:
            try:
                self._proc.stdin.write(line)
                self._proc.stdin.flush()
            except (OSError, ValueError):   # the worker is gone: _answer reports it, with its stderr
                return
        try:
            self._proc.stdin.close()
        except OSError:
            pass

    def matches(self, teacher_dir: Path, truncation: str) -> bool:
        """Whether this worker runs the teacher at ``teacher_dir`` with this
        truncation (and is still running)."""
        return (self._proc.poll() is None and Path(teacher_dir).resolve() == self.teacher_dir
                and truncation == self.truncation)

    def submit(self, texts: list[str]) -> "Pending":
        """Send one pass over ``texts``; returns its Pending."""
        if self._closed or self._proc.poll() is not None:
            raise self._failed("is not running (closed, or exited): it cannot take a pass")
        self._outbox.put(json.dumps({"texts": [str(t) for t in texts]}, ensure_ascii=False) + "\n")
        self._sent += 1
        return Pending(self, self._sent, len(texts))

    def _answer(self, number: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if not self._ready:
                self._read_ready()
            while number not in self._replies:   # answers come in order: keep earlier ones
                if self._answered >= number:
                    raise RuntimeError("the shadow teacher's pass was already read")
                reply = self._read_line("a pass")
                self._answered += 1
                self._replies[self._answered] = reply
            reply = self._replies.pop(number)
        if "error" in reply:
            raise self._failed(f"failed a pass: {reply['error']}")
        path = Path(reply["npz"])
        with np.load(path, allow_pickle=False) as npz:
            labels, embs = npz["labels"], npz["embeddings"]
        path.unlink(missing_ok=True)
        if len(labels) != rows:
            raise self._failed(f"answered {len(labels)} rows for {rows} texts")
        return labels, embs

    def _read_ready(self) -> None:
        reply = self._read_line("loading the teacher")
        if "error" in reply:
            raise self._failed(f"could not load the teacher: {reply['error']}")
        self._ready = True

    def _read_line(self, what: str) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            raise self._failed(f"exited with {self._proc.returncode} while {what}")
        return json.loads(line)

    def _failed(self, what: str) -> RuntimeError:
        try:
            tail = self._stderr_path.read_text(errors="replace")[-3000:]
        except OSError:
            tail = ""
        return RuntimeError(f"the shadow teacher's process ({self.teacher_dir}) {what}"
                            + (f"; its stderr:\n{tail}" if tail.strip() else ""))

    def close(self) -> None:
        """End the worker and remove its temporary files. Idempotent. A
        worker waiting for a pass exits at once at the end of its stdin; one
        still loading the teacher, or running a pass nobody will collect (a
        run that stopped early), is killed after 1 s: it holds nothing
        worth keeping (its answers go only to this process)."""
        atexit.unregister(self.close)
        if not self._closed:
            self._closed = True
            self._outbox.put(None)   # the writer closes the worker's stdin after what it holds
        if self._proc.poll() is None:
            try:
                self._proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._writer.join(timeout=5)   # returns: the worker has exited, so a blocked write fails
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        shutil.rmtree(self._tmp, ignore_errors=True)


class Pending:
    """One submitted pass; ``result()`` waits for (labels, embeddings)."""

    def __init__(self, worker: ShadowTeacherProcess, number: int, rows: int):
        self._worker, self._number, self._rows = worker, number, rows

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self._worker._answer(self._number, self._rows)


# ---------------------------------------------------------- started early
_prestarted: ShadowTeacherProcess | None = None


def prestart(teacher_dir: Path, truncation: str = "head") -> ShadowTeacherProcess:
    """Start a worker now for a monitor run this process will make (the CLI,
    while Prefect's temporary server starts); the run's ``shadow_teacher``
    takes it. Replaces (closes) one started earlier and never taken."""
    global _prestarted
    if _prestarted is not None:
        _prestarted.close()
    _prestarted = ShadowTeacherProcess(teacher_dir, truncation)
    return _prestarted


def take(teacher_dir: Path, truncation: str) -> ShadowTeacherProcess | None:
    """The worker ``prestart`` started, when it runs this teacher with this
    truncation (it is handed over: a second call returns None); else None
    (a mismatched one is closed)."""
    global _prestarted
    worker, _prestarted = _prestarted, None
    if worker is not None and not worker.matches(teacher_dir, truncation):
        worker.close()
        return None
    return worker


def shadow_teacher(teacher_dir: Path, truncation: str, texts: int):
    """What runs the teacher's passes of one monitor run whose window pass
    holds ``texts`` texts: the worker started early for it (``take``), a new
    one for ``WORKER_MIN_TEXTS`` texts or more, else an in-process
    ShadowTeacher (the tests' tiny windows: their process has usually
    imported torch already).
    Either has ``submit(texts) -> Pending`` and ``close()``."""
    from monitoring.evidently_reports import ShadowTeacher

    worker = take(teacher_dir, truncation)
    if worker is not None:
        return worker
    if texts >= WORKER_MIN_TEXTS:
        return ShadowTeacherProcess(teacher_dir, truncation)
    return ShadowTeacher(teacher_dir, truncation=truncation)


# ---------------------------------------------------------------- the worker
def main(argv: list[str] | None = None) -> None:
    """``python -m monitoring.shadow_worker --teacher DIR --out-dir DIR
    [--truncation T] [--threads N] [--batch-size B]``: the worker's loop
    (the module's docstring has the protocol)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m monitoring.shadow_worker", description=main.__doc__)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--truncation", default="head")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, required=True)
    ns = ap.parse_args(argv)
    # The protocol owns fd 1; anything a library prints goes to stderr.
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def say(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    from shrinkflow.bootstrap import telemetry_off

    telemetry_off(os.environ)   # as the parent's (inherited): never the hub, no analytics
    from monitoring.evidently_reports import ShadowTeacher

    teacher = ShadowTeacher(ns.teacher, threads=ns.threads, batch_size=ns.batch_size, truncation=ns.truncation)
    try:
        teacher.load()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        say({"error": f"{type(exc).__name__}: {exc}"})
        return
    say({"ready": True})
    for k, line in enumerate(sys.stdin):
        try:
            labels, embs = teacher(json.loads(line)["texts"])
            path = ns.out_dir / f"pass-{k}.npz"
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, labels=labels, embeddings=embs)
            os.replace(tmp, path)
            say({"npz": str(path)})
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
            say({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()
    # Every answer is written and flushed: exit without the interpreter's
    # teardown of torch and transformers (1.2-1.4 s here, which the
    # monitor's close() would wait for).
    sys.stderr.flush()
    os._exit(0)
