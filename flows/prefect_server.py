"""A local Prefect server, for ``shrinkflow schedule`` (with its scheduler)
and ``shrinkflow ui`` (to browse past runs).

Prefect's ephemeral API (what ``shrinkflow run`` uses) runs no scheduler
service, so a served deployment's schedule would never create a run. When no
``PREFECT_API_URL`` is set, ``schedule`` starts a real server on 127.0.0.1,
with its state in the project's ``.prefect/``, and stops it on the way out.

The UI the server serves asks the server for the API address to call
(``PREFECT_UI_API_URL``, which Prefect otherwise derives from
``PREFECT_SERVER_API_HOST``/``PORT``, 127.0.0.1:4200, whatever ``--port``
says): ``LocalPrefectServer`` sets all three to the address it really
listens on, so the address it prints opens a working UI.

Its lifetime is tied to the CLI's: it runs in its own process group, which
``stop()`` ends (called in ``finally``, at exit, and on SIGTERM/SIGHUP by
the CLI); and, for a CLI killed outright (SIGKILL), the server runs under
this module's watchdog (``python -m flows.prefect_server --parent-pid PID MODULE
ARGS...``), a thread that ends the group when its parent process is gone.

The scheduler's errors are logged only inside the server: ``ServerLogFollower``
echoes them from the local server's log, and ``ScheduleWatch`` checks through
the API (any server, external ones included) that every served deployment got
a scheduled run.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from shrinkflow.bootstrap import telemetry_off
from shrinkflow.ports import answers_200, free_port, listens_on, port_is_free


def tied_command(module: str, args: list[str]) -> list[str]:
    """The argv that runs ``python -m module args...`` under this module's
    parent watchdog (see ``watch_parent``), tied to the current process."""
    return [sys.executable, "-m", "flows.prefect_server", "--parent-pid", str(os.getpid()), module, *args]


def watch_parent(parent_pid: int, poll_s: float = 1.0, grace_s: float = 10.0) -> None:
    """Block until this process's parent is no longer ``parent_pid`` (it
    exited or was killed: the process was re-parented), then end this
    process's group: SIGTERM, and SIGKILL after ``grace_s``. Run on a daemon
    thread in a process started with ``start_new_session=True``."""
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    group = os.getpgrp()
    os.killpg(group, signal.SIGTERM)
    time.sleep(grace_s)
    os.killpg(group, signal.SIGKILL)


# Set by `shrinkflow schedule` to its pid before it serves: the flow runs its
# runner starts (child processes) inherit it (tie_to_scheduler).
SCHEDULER_PID_ENV = "SHRINKFLOW_SCHEDULER_PID"
_TIED: list[int] = []   # the scheduler this process's watchdog watches, once started


def _stop_children() -> None:
    """Stop every process this one started, each with its own children
    (``shrinkflow.detached.stop_pid_tree``: frozen, SIGTERM, SIGKILL after
    10 s), one tree after another. Never raises: the watchdog goes on to
    end the process."""
    import psutil

    from shrinkflow.detached import stop_pid_tree

    try:
        children = psutil.Process().children()
    except psutil.Error:
        return
    for child in children:
        try:
            stop_pid_tree(child.pid)
        except Exception:  # noqa: BLE001 - one tree that cannot be stopped does not keep the others
            pass


def tie_to_scheduler(poll_s: float = 1.0, grace_s: float = 20.0) -> bool:
    """In a flow run that ``shrinkflow schedule``'s runner started (the pid in
    ``SHRINKFLOW_SCHEDULER_PID`` is this process's parent), watch that parent
    on a daemon thread. When it is gone (``kill -9``: it had no chance to
    stop its runs), interrupt this process as Ctrl-C would (SIGINT, so a
    blocking call returns: KeyboardInterrupt unwinds the flow, which frees
    the project lock), stop every process it started (a stage's DVC tree:
    ``shrinkflow.detached.stop_pid_tree``, within 15 s; the interrupt reaches only
    the main thread, and a task's thread reads the stage), and end it
    outright ``grace_s`` seconds later if it is still running: Prefect's engine then retries
    reporting the crash to an API that, for the local server, died with
    the scheduler (measured: still retrying after 40 s). Before, such
    a run went on for minutes with no scheduler and no Prefect server to
    report to (a helper's finding). Returns whether this run is tied; a run
    started any other way (``shrinkflow run``, a team worker, a test) is
    not."""
    pid = os.environ.get(SCHEDULER_PID_ENV, "")
    if not pid.isdigit() or int(pid) != os.getppid():
        return False
    if _TIED:   # a subflow of a tied run (a re-compression's lifecycle): one watchdog is enough
        return True
    _TIED.append(int(pid))
    # A `schedule` started in the background by a script (`&`) passes SIGINT
    # on ignored, and Python then installs no KeyboardInterrupt handler: the
    # watchdog's interrupt would do nothing (seen in a suite run under nohup).
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def watch() -> None:
        while os.getppid() == int(pid):
            time.sleep(poll_s)
        try:   # the run's output went to the scheduler: a closed pipe now
            print(f"the `shrinkflow schedule` that started this run (pid {pid}) is gone: stopping the run",
                  file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
        # To the main thread itself, whose blocking call it must interrupt
        # (a process-directed signal may be delivered to any thread).
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        # The interrupt reaches the main thread only: a stage's `dvc repro`
        # read by a task's worker thread went on, holding the project (a
        # helper's finding: 2.5 minutes). Every process this run started is
        # stopped here, as a stage timeout stops one.
        time.sleep(min(2.0, grace_s))
        _stop_children()
        time.sleep(max(0.0, grace_s - 2.0))
        os._exit(130)

    threading.Thread(target=watch, name="scheduler-watchdog", daemon=True).start()
    return True


def refused_state(exc: BaseException):
    """For a deployment's run (a scheduled one: ``shrinkflow schedule``, a
    team worker) refused because another writer held the project past its
    wait (``ProjectBusy``): a Failed state carrying the reason, for the flow
    to return, so the run ends Failed with that message and no traceback
    (Prefect logged the exception's whole traceback, twice, for what is an
    expected refusal: a helper's finding). Any other run (``shrinkflow
    run`` or ``monitor`` by hand, a subflow): ``exc`` is raised again, as
    before, and the CLI exits 2 with the reason."""
    from prefect.context import FlowRunContext
    from prefect.states import Failed

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None or ctx.flow_run.deployment_id is None:
        raise exc
    print(f"refused: {exc}")
    return Failed(message=f"refused: {exc}")


class TiedServer:
    """A server run as a child in its own process group, tied to this
    process (``tied_command``: its watchdog ends the group when the parent
    goes), its output appended to ``log_path``. Subclasses give ``name`` (for
    errors), ``command()``, ``health_url``, ``environment()`` and what
    ``start`` returns (``started()``).

    With no ``port`` given, the OS picks a free one at launch; another
    process can take it before the server binds it (CI once saw a Dask
    scheduler of a parallel test answer there). The server is ready only
    when its health URL answers 200 *and* the socket listening on the port
    is this server's own; when the server exits while another process holds
    its port, it is launched again on a new one (``port_retries`` times)."""

    name = "the server"
    port_retries = 3

    def __init__(self, log_path: Path, host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout_s: float = 120.0):
        self._log_path, self.host, self.port = Path(log_path), host, port
        self._auto_port = not port   # None or 0: the OS picks
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self._log_path

    @property
    def url(self) -> str:
        """The server's address (the host in brackets when it is IPv6)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def health_url(self) -> str:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict:
        return telemetry_off(dict(os.environ))

    def started(self) -> str:
        return self.url

    def healthy(self) -> bool:
        """Whether ``health_url`` answers 200 now. Whatever else answers
        (no server, an error status, a server that does not speak HTTP, as a
        Dask scheduler on the port does) is False, never an exception."""
        return answers_200(self.health_url, timeout_s=2)

    def listens_here(self) -> bool:
        """Whether the socket listening on ``port`` belongs to this server's
        process or one of its children (``shrinkflow.ports.listens_on``)."""
        return self.proc is not None and listens_on(self.proc.pid, self.port)

    def start(self) -> str:
        """Start the server and wait until ``health_url`` answers 200;
        returns ``started()``. Raises RuntimeError (with the log's tail) when
        it exits or does not answer within ``startup_timeout_s``."""
        self.launch()
        return self.wait_ready()

    def launch(self) -> None:
        """Start the server's process and return at once (``wait_ready``
        waits for it). Its stop is registered at exit."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(self.host)
        self._retries_left = self.port_retries if self._auto_port else 0
        self._spawn()

    def _spawn(self) -> None:
        log = open(self.log_path, "ab")
        self._log_start = log.tell()
        # Its own process group: Ctrl-C reaches the CLI, which stops what it
        # runs first and then the whole server group, in that order.
        self.proc = subprocess.Popen(self.command(), env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self._launched = time.monotonic()
        atexit.register(self.stop)

    def wait_ready(self) -> str:
        """Wait until the launched server's ``health_url`` answers 200, at
        most ``startup_timeout_s`` from its launch; returns ``started()``.
        Raises RuntimeError (with the log's tail, the server stopped) when it
        exits or does not answer in time. A server that exits because another
        process took its OS-picked port is launched again on a new one (see
        the class)."""
        deadline = self._launched + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                self._end_group()   # a child it started may live on, holding the port
                if self._retries_left > 0 and self._port_was_taken():
                    taken, self._retries_left = self.port, self._retries_left - 1
                    self.port = free_port(self.host)
                    try:
                        with open(self.log_path, "a") as log:
                            log.write(f"shrinkflow: another process took port {taken} before {self.name} bound "
                                      f"it; starting it again on port {self.port}\n")
                    except OSError:
                        pass   # the log cannot take it (a full disk): the launch below says why it fails
                    self._spawn()
                    deadline = self._launched + self.startup_timeout_s
                    continue
                relaunched = self.port_retries - self._retries_left if self._auto_port else 0
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting"
                                   + (f" (launched {relaunched + 1} times, on a new port each time another process "
                                      "held the last)" if relaunched else "")
                                   + f"; log {self.log_path}:\n{self._tail()}")
            if self.healthy() and self.listens_here():
                return self.started()
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {self.startup_timeout_s:.0f}s; "
                           f"log {self.log_path}:\n{self._tail()}")

    def _end_group(self) -> None:
        """SIGKILL what is left of the exited server's process group."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.2)   # its sockets close with it

    def _port_was_taken(self) -> bool:
        """Whether the server, now exited, lost its port to another
        process: someone listens there now, or its log says the bind failed
        (a squatter may have gone again by the time the exit is seen)."""
        if not port_is_free(self.host, self.port):
            return True
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                said = f.read(1 << 20).decode(errors="replace").lower()
        except OSError:
            return False
        # uvicorn and Python: "[Errno 98] ... address already in use";
        # `prefect server start`'s own check: "Port N is already in use."
        return "already in use" in said or "errno 98" in said

    def serve_forever(self, poll_s: float = 0.5) -> None:
        """Block while the started server runs (Ctrl-C interrupts). Raises
        RuntimeError, naming its exit code and log, when it exits by itself."""
        while self.proc.poll() is None:
            time.sleep(poll_s)
        raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log {self.log_path}")

    def _tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> None:
        """End the server's process group (SIGTERM, then SIGKILL). Idempotent."""
        atexit.unregister(self.stop)
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # A worker (uvicorn's) lives in the same group: make sure none is left.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class PrefectApiServer(TiedServer):
    """A tied Prefect server: its API under ``/api``, healthy when
    ``/api/health`` answers; ``start`` and ``wait_ready`` return the API URL."""

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def health_url(self) -> str:
        return f"{self.api_url}/health"

    def started(self) -> str:
        return self.api_url


class LocalPrefectServer(PrefectApiServer):
    """``prefect server start`` on ``host``:``port`` (a free port when None),
    state in ``home``. ``scheduler``: run the scheduler service (False for a
    server that is only for browsing past runs)."""

    name = "the Prefect server"

    def __init__(self, home: Path, host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout_s: float = 120.0, scheduler: bool = True):
        super().__init__(Path(home) / "server.log", host, port, startup_timeout_s)
        self.home, self.scheduler = Path(home), scheduler

    def command(self) -> list[str]:
        return tied_command("prefect", ["server", "start", "--host", self.host, "--port", str(self.port)])

    def environment(self) -> dict:
        """The server's environment: this process's, telemetry off, its home,
        and its real address for the API and the UI (never another server's
        PREFECT_API_URL)."""
        env = telemetry_off({k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"})
        env.update({"PREFECT_HOME": str(self.home), "PREFECT_SERVER_API_HOST": self.host,
                    "PREFECT_SERVER_API_PORT": str(self.port), "PREFECT_UI_API_URL": self.api_url,
                    "PREFECT_UI_URL": self.url})
        if not self.scheduler:
            env["PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED"] = "false"
        return env


class TemporaryPrefectServer(PrefectApiServer):
    """Prefect's ephemeral API server for one CLI command, on a free loopback
    port: the app, flags and settings Prefect's own client starts when no
    ``PREFECT_API_URL`` is set (``prefect.server.api.server.
    SubprocessASGIServer``, Prefect 3: uvicorn on ``create_app``, the UI off,
    the ephemeral flags, this process's Prefect settings), its state in this
    process's ``PREFECT_HOME`` as there, its output in ``log_path``.

    Started here rather than by Prefect's client so that this process never
    imports Prefect's server app (about 4 s of a 2-core CPU here, holding
    the interpreter's lock against the command's own imports): ``launch()``
    returns at once, the command imports what it needs while the server
    starts in its own process, and ``wait_ready()`` returns its API URL for
    the command to use (flows.cli.ephemeral_api). Tied to this process like
    every ``TiedServer``: stopped at exit, and by its watchdog when this
    process is killed outright. ``startup_timeout_s``: None for Prefect's
    ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``."""

    name = "Prefect's temporary server"

    def __init__(self, log_path: Path, startup_timeout_s: float | None = None):
        if startup_timeout_s is None:
            from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

            startup_timeout_s = float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        super().__init__(log_path, "127.0.0.1", None, startup_timeout_s)

    def command(self) -> list[str]:
        import prefect

        return tied_command("uvicorn", ["--app-dir", str(Path(prefect.__file__).resolve().parent.parent),
                                        "--factory", "prefect.server.api.server:create_app",
                                        "--host", self.host, "--port", str(self.port),
                                        "--log-level", "error", "--lifespan", "on"])

    def environment(self) -> dict:
        """This process's environment with its Prefect settings (as Prefect
        passes them), telemetry off, and Prefect's ephemeral-server flags."""
        from prefect.settings import get_current_settings

        env = telemetry_off({k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"})
        env.update({k: str(v) for k, v in get_current_settings().to_environment_variables(exclude_unset=True).items()
                    if k != "PREFECT_API_URL" and v is not None})
        env.update({"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"})
        return env


# ------------------------------------------------------ surfacing its errors
# A record header in the server's log: "10:34:49.681 | ERROR   | logger - message"
# (Prefect's default console format), followed by traceback lines, if any.
_RECORD = re.compile(r"^\d\d:\d\d:\d\d(?:\.\d+)? \| (?P<level>[A-Z]+)\s*\| (?P<logger>\S+) - (?P<msg>.*)$")


class ServerLogFollower:
    """Follow a Prefect server's log file and report its errors, each kind once.

    The scheduler of a served deployment runs inside the server: a schedule it
    cannot compute (``CroniterBadDateError``) is only logged there, about once a
    minute, and no run is ever created. ``shrinkflow schedule`` starts the
    local server with its output in ``.prefect/server.log`` and follows that
    file with this class, so such errors reach the user's terminal.

    ``poll()`` reads what was appended since the last call (from ``offset``,
    default the current end of the file) and returns one line per new ERROR or
    CRITICAL record: logger, message and the exception's last line. A record is
    complete when the next record starts or when a poll finds nothing new. The
    same error repeated (the scheduler retries every loop) is reported once and
    counted in ``repeats``. ``start()`` polls on a daemon thread every
    ``poll_s`` seconds and passes each line to ``emit``; ``stop()`` flushes.
    """

    def __init__(self, path: Path, emit=None, offset: int | None = None, poll_s: float = 0.5):
        self.path, self.emit, self.poll_s = Path(path), emit, poll_s
        if offset is None:
            offset = self.path.stat().st_size if self.path.is_file() else 0
        self.offset = offset
        self.repeats = 0
        self._partial = b""
        self._record: list[str] | None = None
        self._seen: set[tuple[str, str, str]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _finish(self) -> list[str]:
        rec, self._record = self._record, None
        if not rec:
            return []
        head = _RECORD.match(rec[0])
        exc = next((line.strip() for line in reversed(rec[1:]) if line.strip()
                    and not line.startswith((" ", "\t")) and not line.startswith("Traceback")), "")
        key = (head["logger"], head["msg"], exc)
        if key in self._seen:
            self.repeats += 1
            return []
        self._seen.add(key)
        return [f"Prefect server {head['level']} ({head['logger']}): {head['msg']}"
                + (f" -> {exc}" if exc else "") + f"  [full record in {self.path}]"]

    def poll(self) -> list[str]:
        """New error lines since the last poll (see the class docstring)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            chunk = b""
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next poll
        out: list[str] = []
        for raw in lines:
            line = raw.decode("utf-8", errors="replace").rstrip("\r")
            head = _RECORD.match(line)
            if head:
                out += self._finish()
                if head["level"] in ("ERROR", "CRITICAL"):
                    self._record = [line]
            elif self._record is not None:
                self._record.append(line)
        if not chunk:  # nothing new since the last poll: the record is whole
            out += self._finish()
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            for line in self.poll():
                self.emit(line)

    def start(self) -> "ServerLogFollower":
        self._thread = threading.Thread(target=self._run, name="prefect-server-log", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for line in self.poll() + self._finish():
            self.emit(line)


def unscheduled_deployments(api_url: str, names: list[str]) -> list[str]:
    """The deployments among ``names`` ("flow/deployment") that have an active
    schedule but no flow run in the Scheduled state on the server at
    ``api_url``, each with a short reason. Prefect's scheduler creates a
    served deployment's upcoming runs within seconds (its recent-deployments
    loop runs every 5 s), so a deployment still without one a minute later has
    a schedule the server could not compute. Works against any Prefect API,
    which is all ``shrinkflow schedule`` can see of an external server.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out = []
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for name in names:
            dep = client.read_deployment_by_name(name)
            if not any(s.active for s in (dep.schedules or [])):
                continue
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
                limit=1)
            if not runs:
                out.append(f"{name} (id {dep.id}) has an active schedule but no scheduled run")
    return out


def _deployment_runs(client, name: str, states, before=None, newest_first: bool = False,
                     limit: int | None = None) -> list | None:
    """The runs of deployment ``name`` ("flow/deployment") whose state type
    is one of ``states`` (names: "RUNNING", "SCHEDULED", ...), due before
    ``before`` when given, newest first when asked; None when the server has
    no such deployment."""
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterExpectedStartTime, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import ObjectNotFound

    try:
        dep = client.read_deployment_by_name(name)
    except ObjectNotFound:
        return None
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(x) for x in states])),
            expected_start_time=FlowRunFilterExpectedStartTime(before_=before) if before else None),
        **({"sort": FlowRunSort.EXPECTED_START_TIME_DESC} if newest_first else {}),
        **({"limit": limit} if limit else {}))


# The states a flow run is in flight in: its process started or about to.
IN_FLIGHT = ("RUNNING", "PENDING", "CANCELLING")


def run_alive(pid: int | None, flow_run_id: str) -> bool:
    """Whether ``pid`` is a live process running flow run ``flow_run_id``
    (its environment's PREFECT__FLOW_RUN_ID; a process whose environment
    cannot be read counts as alive when its command line names Prefect)."""
    import psutil

    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        try:
            return proc.environ().get("PREFECT__FLOW_RUN_ID") == flow_run_id
        except psutil.AccessDenied:
            return "prefect" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def run_pid(run) -> int | None:
    """The pid Prefect recorded for ``run``'s process (its infrastructure_pid), or None."""
    raw = str(run.infrastructure_pid or "").rsplit(":", 1)[-1]  # older workers wrote "host:pid"
    return int(raw) if raw.isdigit() else None


def crash_lost_runs(client, names: list[str], why: str) -> list[str]:
    """Mark Crashed the in-flight runs (``IN_FLIGHT``) of the deployments
    among ``names`` ("flow/deployment") whose process is gone from this host
    (``run_alive``), the message saying ``why``; a run whose process still
    lives is left to finish. Returns a line per run marked. For ``shrinkflow
    schedule``: a run of an earlier session killed with it (``kill -9``)
    could not report its end to the local server, which died with it, and
    stayed Running in the UI (a helper's finding). A deployment the server
    does not have is skipped."""
    from prefect.states import Crashed

    out = []
    for name in names:
        for run in _deployment_runs(client, name, IN_FLIGHT) or []:
            pid = run_pid(run)
            if run_alive(pid, str(run.id)):
                continue
            client.set_flow_run_state(run.id, Crashed(
                message=f"its process {f'(pid {pid}) ' if pid else ''}is gone: {why}; marked Crashed when the "
                        "schedule was served again"), force=True)
            out.append(f"{name}: {run.name} was {run.state_name} with its process gone ({why}): marked Crashed")
    return out


def thin_missed_runs(client, names: list[str], why: str, before=None,
                     parameters: dict | None = None) -> list[str]:
    """The runs of the deployments among ``names`` ("flow/deployment") that
    are still waiting to start (Prefect's Scheduled state type: named
    "Scheduled" or "Late") though they were due before ``before`` (a
    timezone-aware datetime; default: now), on the server ``client`` (a sync
    Prefect client) talks to: the newest of each deployment is kept, and runs
    as soon as the deployment is served again (one catch-up run per flow);
    the older ones are marked Cancelled, their message saying when each was
    due and ``why`` nothing ran it. With ``parameters``, the kept run's
    parameters are replaced by them: Prefect made it with the parameters the
    deployment had then, which a redeploy does not update. Returns one line
    per deployment that had missed runs. A deployment the server does not
    have is skipped.

    Why: the scheduler creates a deployment's runs ahead of time. When no
    runner or worker served them (a stopped ``shrinkflow schedule``, a team
    stack that was down a day), they stay Late, and serving the deployment
    again ran all of them, one after the other, with the earlier session's
    ``wait_for_project_s`` (a helper's finding): Prefect replaces only a
    redeployed deployment's future runs. One missed monitor or lifecycle run
    is worth running (it reads the log and the project as they are now); a
    backlog of them is the same run again. Used by ``shrinkflow schedule``
    and ``shrinkflow team up``.
    """
    import datetime

    from prefect.states import Cancelled

    before = before or datetime.datetime.now(datetime.timezone.utc)
    stamp = "%Y-%m-%d %H:%M:%S"
    out = []
    for name in names:
        kept, cancelled, seen = None, 0, set()
        while True:   # a page at a time, newest first; a cancelled run no longer matches
            runs = _deployment_runs(client, name, ("SCHEDULED",), before=before, newest_first=True, limit=50)
            if runs is None:   # no such deployment
                break
            new = [r for r in runs if r.id not in seen]
            for run in new:
                seen.add(run.id)
                if kept is None:
                    kept = run
                    continue
                client.set_flow_run_state(run.id, Cancelled(
                    message=f"missed: due {run.expected_start_time:{stamp}} UTC while {why}; the newest missed "
                            f"run of {name} ran instead"), force=True)
                cancelled += 1
            if len(runs) < 50 or not new:   # the last page, or one the server would not cancel
                break
        if kept is None:
            continue
        if parameters is not None and kept.parameters != {**kept.parameters, **parameters}:
            client.update_flow_run(kept.id, parameters={**kept.parameters, **parameters})
        out.append(f"{name}: {cancelled} missed run(s) Cancelled (due while {why}); the newest, {kept.name}, "
                   f"due {kept.expected_start_time:{stamp}} UTC, runs now"
                   + (" with this session's parameters" if parameters is not None else ""))
    return out


class ScheduleWatch:
    """After ``after_s`` seconds, check once that each served deployment has a
    scheduled run (``unscheduled_deployments``) and pass a warning per missing
    one to ``emit``. On a daemon thread; a failed check is reported, never
    raised (the runner keeps serving)."""

    def __init__(self, api_url: str, names: list[str], emit, after_s: float = 90.0):
        self.api_url, self.names, self.emit, self.after_s = api_url, names, emit, after_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="schedule-watch", daemon=True)

    def _run(self) -> None:
        if self._stop.wait(self.after_s):
            return
        try:
            missing = unscheduled_deployments(self.api_url, self.names)
        except Exception as exc:  # noqa: BLE001 - a warning channel must not kill the runner
            self.emit(f"warning: could not check the schedules on {self.api_url}: {type(exc).__name__}: {exc}")
            return
        for m in missing:
            self.emit(f"warning: {m} {self.after_s:.0f} s after it was served, on {self.api_url}: the server's "
                      "scheduler could not compute its next run; the reason is in that server's log")

    def start(self) -> "ScheduleWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


def drain_api_logs(timeout_s: float = 5.0) -> None:
    """Send the log records Prefect's ``APILogWorker`` still holds, waiting
    up to ``timeout_s`` seconds; never raises. Called before a local server
    is stopped: the runner's last records (a run's cancellation, "Pausing
    all deployments") were otherwise sent after it, printing "--- Error
    logging to API --- All connection attempts failed" as ``schedule``
    ended (a helper's finding). A Ctrl-C during it ends the drain, not the
    caller's cleanup."""
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=timeout_s)
    except (Exception, KeyboardInterrupt):  # noqa: BLE001 - a log flush must not hide how the command ended,
        pass   # nor a second Ctrl-C skip the cleanup after it (server.stop): it only cuts the drain short


@contextmanager
def ephemeral_api(preload):
    """Where this process would use Prefect's ephemeral API (no
    PREFECT_API_URL: Prefect's client then starts a temporary server at the
    flow's first call), start that server now, in its own process
    (flows.prefect_server.TemporaryPrefectServer, log in PREFECT_HOME), call
    ``preload()`` (imports the command needs anyway) while it starts, wait
    until it answers, and run the body with PREFECT_API_URL set to it (this
    process's Prefect settings and its environment, which Prefect's worker
    threads read). The server is stopped at exit, after Prefect's own exit
    handlers have sent the runs' last logs. Yields the API URL.

    Against Prefect's own start at the flow's first call, the command's
    imports run beside the server's start-up instead of before it, and this
    process never imports Prefect's server app (about 4 s here). With
    PREFECT_API_URL set it does nothing and yields None: there is no start
    to overlap, and the flow imports what it needs when it needs it (a run
    that stops early, on a locked log, imports nothing). Raises RuntimeError
    (the server's log tail) when the server does not start in time."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings
    from prefect.settings import PREFECT_HOME as PREFECT_HOME_SETTING

    if PREFECT_API_URL.value():
        yield None
        return
    from prefect.logging import get_logger

    server = TemporaryPrefectServer(Path(PREFECT_HOME_SETTING.value()) / "temporary-server.log")
    server.launch()
    log = get_logger()   # "prefect", as Prefect's own start logs it
    log.info(f"Starting temporary server on {server.url} (Prefect's ephemeral API; log {server.log_path})")
    preload()
    started_on = server.url
    api_url = server.wait_ready()
    if server.url != started_on:
        log.info(f"Another process took that port: the temporary server runs on {server.url} instead")

    def stopping() -> None:
        log.info(f"Stopping temporary server on {server.url}")

    atexit.register(stopping)   # runs just before the server's stop, registered at its launch
    os.environ["PREFECT_API_URL"] = api_url
    # No "View at http://127.0.0.1:<port>/runs/..." per flow run: the
    # temporary server, and every link into it, is gone when the command
    # ends (a newcomer followed one). An empty UI URL makes Prefect's
    # url_for return None, as under its own ephemeral API. A UI URL the user
    # set is kept.
    ui = {} if os.environ.get("PREFECT_UI_URL") else {PREFECT_UI_URL: ""}
    if ui:
        os.environ["PREFECT_UI_URL"] = ""
    with temporary_settings(updates={PREFECT_API_URL: api_url, **ui}):
        yield api_url


def main(argv: list[str] | None = None) -> None:
    """``python -m flows.prefect_server --parent-pid PID MODULE [ARGS...]``: run
    ``python -m MODULE ARGS...`` in this process with the parent watchdog
    (``watch_parent``) on a daemon thread."""
    import argparse
    import runpy

    parser = argparse.ArgumentParser(prog="python -m flows.prefect_server", description=main.__doc__)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("module")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    threading.Thread(target=watch_parent, args=(ns.parent_pid,), name="parent-watchdog", daemon=True).start()
    sys.argv = [ns.module, *ns.args]
    runpy.run_module(ns.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
