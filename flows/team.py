"""The team stack on one host: PostgreSQL, a Prefect server on it, a process
work pool, the project's deployments (``prefect.yaml``) and a worker.
``shrinkflow team up|down|status|env`` (flows/cli.py) is the way in.

Everything lives in ``.shrinkflow/team/``: the PostgreSQL cluster
(``postgres/``, ``shrinkflow.pgcluster``: its password in a 0600 passfile
there, never in a committed file), the Prefect server's home (``prefect/``),
and for each process it starts a pid file and a log (``server.pid`` /
``server.log``, ``worker.pid`` / ``worker.log``; ``deploy.log``). The server
and the worker are detached (``shrinkflow.detached``): they outlive the
command that started them, and ``down`` (or another ``up``) finds them by
their pid files. ``stack.json`` remembers the ports and names a second ``up``
reuses.

The schedules: prefect.yaml writes params.yaml's out (Prefect validates the
file before it fills any template, so an interval cannot be one); ``up``
deploys the validated params' (or its flags') through a copy of prefect.yaml
with them, ``.shrinkflow/team/prefect.yaml`` (``render_prefect_yaml``), and
tests/test_team.py keeps the committed two files in agreement. Every interval
schedule has the fixed anchor of ``shrinkflow.schedules``, so a redeploy does
not move its runs.

Pointing the same pieces elsewhere: with ``PREFECT_API_DATABASE_CONNECTION_URL``
set, the server uses that database and no cluster is created; with
``PREFECT_API_URL`` set, that server is used and neither PostgreSQL nor a
server is started (``up`` then creates the pool, deploys and starts the
worker).

A worker's death: Prefect runs each flow run in a process group of its own,
so a run outlives a worker killed with its whole group and finishes by
itself. When the run's process dies too (the host went down), nothing would
ever end the run: ``up`` marks the runs its own worker had in flight whose
process is gone Crashed before it starts a new worker
(``reconcile_lost_runs``), and on any host the server's automation
``ZOMBIE_AUTOMATION`` crashes a run whose heartbeats (every ``HEARTBEAT_S``
seconds, sent by the run's process) stop for ``ZOMBIE_AFTER_S`` seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from flows.prefect_server import IN_FLIGHT, LocalPrefectServer, run_alive, run_pid, thin_missed_runs
from shrinkflow.bootstrap import configure_env, telemetry_off
from shrinkflow.detached import Detached, kill_group
from shrinkflow.files import read_json, write_json
from shrinkflow.paths import STATE
from shrinkflow.pgcluster import PgCluster
from shrinkflow.ports import answers_200, free_port, listens_on, port_is_free
from shrinkflow.schedules import INTERVAL_ANCHOR_ISO, interval_next_run

# Not in shrinkflow/paths.py on purpose: no DVC stage reads it, and every
# stage depends on that file.
TEAM = STATE / "team"
DEFAULT_POOL = "shrinkflow"
DEPLOYMENT = "team"                     # both deployments' name in prefect.yaml
FLOWS = ("shrinkflow-lifecycle", "shrinkflow-monitor")
DEFAULT_UI_PORT = 4200                  # Prefect's own default
DATABASE = "prefect"
# A flow run's process emits a heartbeat event every HEARTBEAT_S seconds
# (Prefect's minimum is 30); the automation crashes a run that missed three.
HEARTBEAT_S = 30
ZOMBIE_AFTER_S = 90
ZOMBIE_AUTOMATION = "shrinkflow: crash flow runs whose heartbeats stopped"
STARTUP_TIMEOUT_ENV = "SHRINKFLOW_TEAM_STARTUP_TIMEOUT_S"   # how long up waits for the server (default 300 s)


class TeamError(RuntimeError):
    """A piece of the team stack could not start or be reached; the message
    names it, its log and what to do."""


ENTRYPOINTS = {"flows/lifecycle.py:lifecycle": "lifecycle", "flows/monitor.py:monitor": "monitor"}


@dataclass(frozen=True)
class Schedules:
    """The two deployments' schedules: for each flow exactly one of a cron
    (UTC) and an interval in seconds."""

    lifecycle_cron: Optional[str]
    lifecycle_interval_s: Optional[int]
    monitor_cron: Optional[str]
    monitor_interval_s: Optional[int]
    from_params: bool = True  # False when a flag gave one of them
    # How long each scheduled run waits for another writer holding the
    # project (monitor.scheduled_wait_minutes, in seconds): the flows'
    # wait_for_project_s parameter.
    wait_for_project_s: float = 0.0

    def entries(self, flow: str) -> list[dict]:
        """``flow``'s (lifecycle or monitor) ``schedules:`` in prefect.yaml's
        form: ``[{"cron": ..., "timezone": "UTC"}]`` or ``[{"interval":
        seconds, "anchor_date": INTERVAL_ANCHOR_ISO, "timezone": "UTC"}]``
        (a fixed anchor: a redeploy keeps the runs on the same instants;
        shrinkflow.schedules)."""
        cron, interval = ((self.lifecycle_cron, self.lifecycle_interval_s) if flow == "lifecycle"
                          else (self.monitor_cron, self.monitor_interval_s))
        return [{"cron": cron, "timezone": "UTC"} if cron else
                {"interval": int(interval), "anchor_date": INTERVAL_ANCHOR_ISO, "timezone": "UTC"}]

    @staticmethod
    def _say(cron: Optional[str], interval_s: Optional[int]) -> str:
        if cron:
            return f"cron {cron!r} (UTC)"
        return f"every {interval_s} s, next run {interval_next_run(interval_s):%Y-%m-%d %H:%M:%S} UTC"

    def describe(self) -> str:
        return (f"{FLOWS[0]}/{DEPLOYMENT} {self._say(self.lifecycle_cron, self.lifecycle_interval_s)}, "
                f"{FLOWS[1]}/{DEPLOYMENT} {self._say(self.monitor_cron, self.monitor_interval_s)}")


def declared_schedules(prefect_yaml: dict) -> dict[str, list[dict]]:
    """What prefect.yaml (parsed) declares: {"lifecycle": [...], "monitor":
    [...]}, each schedule entry without its comments. Raises KeyError when
    a deployment is missing."""
    by_entry = {d.get("entrypoint"): d for d in prefect_yaml.get("deployments") or []}
    return {flow: [dict(e) for e in by_entry[ep].get("schedules") or []] for ep, flow in ENTRYPOINTS.items()}


def render_prefect_yaml(text: str, schedules: Schedules) -> str:
    """prefect.yaml's ``text`` with each deployment's schedules replaced by
    ``schedules``' and its ``wait_for_project_s`` parameter set from them
    (what ``team up`` deploys). Raises KeyError when a deployment is
    missing."""
    import yaml

    doc = yaml.safe_load(text)
    declared_schedules(doc)  # both deployments are there
    for d in doc["deployments"]:
        if d.get("entrypoint") in ENTRYPOINTS:
            d["schedules"] = schedules.entries(ENTRYPOINTS[d["entrypoint"]])
            d["parameters"] = {**(d.get("parameters") or {}), "wait_for_project_s": schedules.wait_for_project_s}
    return "# Rendered by `shrinkflow team up` from prefect.yaml and the validated schedules; do not edit.\n" + \
        yaml.safe_dump(doc, sort_keys=False)


def deploy_env(root: Path, pool: str) -> dict[str, str]:
    """The variables prefect.yaml reads, for ``prefect deploy`` in
    ``root``: the project directory and the work pool."""
    return {"SHRINKFLOW_PROJECT_DIR": str(Path(root).resolve()), "SHRINKFLOW_WORK_POOL": pool}


def worker_name(root: Path) -> str:
    """This checkout's worker: the host and a hash of the project's path, so
    that two checkouts on one host (or two hosts) never share a name."""
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]
    return f"shrinkflow-{socket.gethostname()}-{digest}"


def _client(api_url: str):
    """A synchronous Prefect client for ``api_url`` (a context manager)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Scoped:
        def __enter__(self):
            self._settings = temporary_settings(updates={PREFECT_API_URL: api_url})
            self._settings.__enter__()
            self._client = get_client(sync_client=True)
            return self._client.__enter__()

        def __exit__(self, *exc):
            try:
                self._client.__exit__(*exc)
            finally:
                self._settings.__exit__(*exc)

    return _Scoped()


def _healthy(api_url: str, timeout_s: float = 3.0, route: str = "health") -> bool:
    """Whether the API answers 200 on ``route``: ``health`` (the server
    process answers) or ``ready`` (and its database does too)."""
    return answers_200(f"{api_url}/{route}", timeout_s)


def _ready(api_url: str, timeout_s: float = 3.0) -> bool:
    return _healthy(api_url, timeout_s, route="ready")


def in_flight_runs(client, pool: str, worker: str) -> list:
    """The flow runs of work pool ``pool`` that worker ``worker`` took
    (Prefect labels each run with its worker's name) and that are not
    finished: Pending, Running or Cancelling."""
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
                                                WorkPoolFilter, WorkPoolFilterName)
    from prefect.client.schemas.objects import StateType

    runs = client.read_flow_runs(
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
            any_=[StateType(s) for s in IN_FLIGHT]))))
    return [r for r in runs if (r.labels or {}).get("prefect.worker.name") == worker]


def crash_lost_run(client, run, worker: str, stopped_by_down: bool = False) -> str:
    """Mark ``run`` (its process gone with its worker) Crashed, saying so;
    returns the line to print. ``stopped_by_down``: the worker did not die,
    `team down` stopped it (a run it was starting then loses its process)."""
    from prefect.states import Crashed

    pid = run_pid(run)
    how = "was stopped by `shrinkflow team down`" if stopped_by_down else "died"
    message = (f"its worker {worker} {how} and its process " + (f"(pid {pid}) " if pid else "")
               + "is gone from this host: marked Crashed by shrinkflow team (docs/team.md); start it again by "
                 "hand, or wait for its next scheduled run")
    client.set_flow_run_state(run.id, Crashed(message=message), force=True)
    return f"Crashed: {message}"


def reconcile_lost_runs(client, pool: str, worker: str) -> list[tuple[str, str]]:
    """Mark Crashed each in-flight run of ``worker`` (``in_flight_runs``)
    whose process is gone from this host (``run_alive``; ``crash_lost_run``).
    A run whose process still lives (a worker killed alone) is left to
    finish by itself. Returns (flow run name, what happened) for each run,
    marked or left."""
    out = []
    for run in in_flight_runs(client, pool, worker):
        pid = run_pid(run)
        if run_alive(pid, str(run.id)):
            out.append((run.name, f"still running in its own process (pid {pid}) after its worker died: it "
                                  "finishes by itself and reports its end to the server"))
        else:
            out.append((run.name, crash_lost_run(client, run, worker)))
    return out


def skip_missed_runs(client, wait_for_project_s: float | None = None) -> list[str]:
    """Runs the scheduler made for a time that passed while no worker ran
    (a stack that was down a day holds a day of them): keep the newest of
    each deployment, which runs now, and mark the others Cancelled, so a
    worker that comes back runs one catch-up run per flow, not the whole
    backlog one after the other (``flows.prefect_server.thin_missed_runs``).
    With ``wait_for_project_s``, the kept run waits that long for the
    project (this ``up``'s, not the one its run was made with). Returns a
    line per deployment thinned."""
    return thin_missed_runs(client, [f"{flow}/{DEPLOYMENT}" for flow in FLOWS],
                            why="no worker started it (none ran, or it was busy with an earlier run)",
                            parameters=None if wait_for_project_s is None else
                            {"wait_for_project_s": wait_for_project_s})


def zombie_automation():
    """The automation that crashes a flow run whose heartbeats stopped
    (Prefect's documented zombie detection): after a heartbeat, expect
    another one, or the run's end, within ``ZOMBIE_AFTER_S`` seconds."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description=(f"A flow run's process sends a heartbeat every {HEARTBEAT_S} s (shrinkflow team up sets "
                     "PREFECT_FLOWS_HEARTBEAT_FREQUENCY); when none came for "
                     f"{ZOMBIE_AFTER_S} s, the process is gone: mark the run Crashed"),
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive, threshold=1, within=timedelta(seconds=ZOMBIE_AFTER_S)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {ZOMBIE_AFTER_S} s: the flow run's process is gone "
                                            "(marked by the automation shrinkflow team up created)")])


class TeamServer(LocalPrefectServer):
    """The team's Prefect server: ``prefect server start`` on PostgreSQL
    (``database_url``; the password from ``PGPASSFILE``), detached rather
    than tied to the CLI (``TeamStack`` starts and stops it)."""

    name = "the Prefect server"

    def __init__(self, home: Path, database_url: Optional[str], passfile: Optional[Path],
                 host: str, port: int):
        super().__init__(home, host=host, port=port, scheduler=True)
        self.database_url, self.passfile = database_url, passfile

    def command(self) -> list[str]:
        return [sys.executable, "-m", "prefect", "server", "start", "--host", self.host, "--port", str(self.port)]

    def environment(self) -> dict:
        """LocalPrefectServer's, plus the database and its passfile. A
        PREFECT_UI_API_URL / PREFECT_UI_URL the user set wins (a server on
        another --host than loopback is reached under a name this host
        cannot guess)."""
        env = super().environment()
        for key in ("PREFECT_UI_API_URL", "PREFECT_UI_URL"):
            if os.environ.get(key):
                env[key] = os.environ[key]
        if self.database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url
        if self.passfile is not None:
            env["PGPASSFILE"] = str(self.passfile)
        return env


@dataclass
class PieceStatus:
    """One piece of the stack: its name, whether it runs, and a line saying
    where (or why not)."""

    name: str
    running: bool
    detail: str
    working: Optional[bool] = None  # running and doing its job (None: same as running)

    @property
    def ok(self) -> bool:
        return self.running if self.working is None else self.working


@dataclass
class TeamStatus:
    pieces: list[PieceStatus]
    api_url: Optional[str]
    deployments: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)

    @property
    def all_running(self) -> bool:
        return all(p.ok for p in self.pieces)

    @property
    def none_running(self) -> bool:
        return not any(p.running for p in self.pieces)

    def text(self) -> str:
        out = [f"{p.name:<12} {'running' if p.running else 'stopped':<8} {p.detail}" for p in self.pieces]
        out += [f"deployment   {d}" for d in self.deployments]
        out += [f"in flight    {r}" for r in self.runs]
        return "\n".join(out)


class TeamStack:
    """The team stack of the project at ``root`` (see the module's
    docstring). ``emit`` receives each progress line. The constructor
    touches nothing on disk."""

    def __init__(self, root: Path, pool: Optional[str] = None, host: str = "127.0.0.1",
                 port: Optional[int] = None, emit: Callable[[str], None] = print,
                 environ: Optional[dict] = None):
        self.root = Path(root).resolve()
        self.dir = self.root / TEAM
        self._pool, self.host, self.port, self.emit = pool, host, port, emit
        self.environ = dict(os.environ if environ is None else environ)
        # PostgreSQL only ever serves the server beside it: loopback, whatever --host says.
        self.cluster = PgCluster(self.dir / "postgres")
        self.server = Detached("the Prefect server", self.dir / "server.pid", self.dir / "server.log")
        self.worker = Detached("the Prefect worker", self.dir / "worker.pid", self.dir / "worker.log")
        self.deploy_log = self.dir / "deploy.log"
        self.rendered_prefect_yaml = self.dir / "prefect.yaml"
        self.worker_name = worker_name(self.root)

    # ------------------------------------------------------------ state
    @property
    def _state_file(self) -> Path:
        return self.dir / "stack.json"

    def _state(self) -> dict:
        try:
            doc = read_json(self._state_file)
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def _save(self, **kw) -> None:
        write_json(self._state_file, {**self._state(), **kw})

    @property
    def pool(self) -> str:
        """The work pool: as given, else the last up's, else DEFAULT_POOL."""
        return self._pool or self._state().get("pool") or DEFAULT_POOL

    @property
    def external_api_url(self) -> Optional[str]:
        return self.environ.get("PREFECT_API_URL") or None

    @property
    def external_database(self) -> bool:
        return bool(self.environ.get("PREFECT_API_DATABASE_CONNECTION_URL"))

    def api_url(self) -> Optional[str]:
        """The API the stack uses: PREFECT_API_URL when set, else the local
        server's (as last started), else None."""
        return self.external_api_url or self._state().get("api_url")

    # --------------------------------------------------------------- up
    @contextmanager
    def _exclusive(self, what: str):
        """One ``team up`` or ``team down`` at a time in this checkout: an
        exclusive flock on ``.shrinkflow/team/team.lock`` held for the whole
        command. Raises TeamError naming the holder when another holds it
        (two concurrent ``up``s would start two workers under one name)."""
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.dir / "team.lock", "a+")
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise TeamError(f"another `shrinkflow team up` or `team down` is running in this checkout "
                                f"({holder}): wait for it to end, then run `shrinkflow team {what}` again") from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"team {what}, pid {os.getpid()}\n")
            fh.flush()
            yield
        finally:
            fh.close()  # releases the lock

    def up(self, schedules: Schedules) -> str:
        """``_up`` under ``_exclusive``: see there. Raises TeamError when
        another ``team up``/``down`` runs in this checkout."""
        with self._exclusive("up"):
            return self._up(schedules)

    def down(self, grace_s: float = 30.0) -> list[str]:
        """``_down`` under ``_exclusive``: see there. Raises TeamError when
        another ``team up``/``down`` runs in this checkout."""
        with self._exclusive("down"):
            return self._down(grace_s)

    def _up(self, schedules: Schedules) -> str:
        """Bring the stack up, reusing whatever already runs (and the data
        and ports of the last ``up``); deploy prefect.yaml with
        ``schedules`` unless nothing changed. Returns the UI's address.
        Raises TeamError (with the failing piece's log) or PgClusterError.

        Order: PostgreSQL, the server (Prefect's client is imported while it
        boots), the pool, the runs a dead worker left (``reconcile_lost_runs``,
        before a new worker could take a run), the automation, the worker
        (deploying while it boots), then its first heartbeat."""
        if not (self.root / "prefect.yaml").is_file():
            raise TeamError(f"no prefect.yaml in {self.root}: the deployments are declared there (git checkout "
                            "prefect.yaml)")
        self.dir.mkdir(parents=True, exist_ok=True)
        api_url = self.external_api_url
        if api_url:
            if not _ready(api_url, timeout_s=10):
                raise TeamError(f"the Prefect server at PREFECT_API_URL={api_url} does not answer {api_url}/ready "
                                "(it, or its database, is down): start it, or unset PREFECT_API_URL to run the team "
                                "stack's own")
            self.emit(f"Prefect server: {api_url} (PREFECT_API_URL; neither PostgreSQL nor a server is started)")
            ui_url = api_url[:-4] if api_url.endswith("/api") else api_url
        else:
            if self.port is not None and not self.server.running():
                self._server_port()   # a taken --port fails here, before PostgreSQL is started for nothing
            database_url, passfile = self._database()
            ui_url, api_url = self._start_server(database_url, passfile)
        self._save(api_url=api_url, ui_url=ui_url, pool=self.pool, worker=self.worker_name)
        with _client(api_url) as client:
            self._ensure_pool(client)
            worker_started = None
            if not self.worker.running():
                for name, what in reconcile_lost_runs(client, self.pool, self.worker_name):
                    self.emit(f"flow run {name!r}: {what}")
                for line in skip_missed_runs(client, schedules.wait_for_project_s):
                    self.emit(line)
                worker_started = self._launch_worker(api_url)
            self._ensure_automation(client)
            deployed = self._deployed(client)
        self._deploy(api_url, schedules, deployed)
        if worker_started is None:
            self.emit(f"worker: running (pid {self.worker.pid}, {self.worker_name})")
        else:
            self._await_worker(api_url, *worker_started)
        return ui_url

    def _database(self) -> tuple[Optional[str], Optional[Path]]:
        if self.external_database:
            self.emit("PostgreSQL: PREFECT_API_DATABASE_CONNECTION_URL (no cluster is started; its password from "
                      "PGPASSFILE or the URL)")
            return None, None
        if self.cluster.init():
            self.emit(f"PostgreSQL: initialised a cluster in {self.cluster.root.relative_to(self.root)}/ "
                      f"(password in {self.cluster.passfile.relative_to(self.root)}, mode 0600)")
        else:
            self.emit(f"PostgreSQL: reusing the cluster in {self.cluster.root.relative_to(self.root)}/ (its data)")
        was_running = self.cluster.running()
        self.cluster.start()
        port = self.cluster.last_port()
        self.emit(f"PostgreSQL: {'running' if was_running else 'started'} on {self.cluster.host}:{port} "
                  f"(log {self.cluster.log_file.relative_to(self.root)})")
        if self.cluster.create_database(DATABASE):
            self.emit(f"PostgreSQL: created the database {DATABASE!r}")
        return self.cluster.url(DATABASE).replace("postgresql://", "postgresql+asyncpg://", 1), self.cluster.passfile

    def _server_port(self) -> int:
        if self.port is not None:
            if not port_is_free(self.host, self.port):
                raise TeamError(f"port {self.port} on {self.host} is taken: choose another with --port")
            return self.port
        last = self._state().get("server_port")
        for candidate in (last, DEFAULT_UI_PORT):
            if candidate and port_is_free(self.host, int(candidate)):
                return int(candidate)
        port = free_port(self.host)
        self.emit(f"note: port {last or DEFAULT_UI_PORT} on {self.host} is taken: the Prefect server starts on "
                  f"{port} instead (teammates' PREFECT_API_URL must follow; `--port N` chooses one)")
        return port

    def _start_server(self, database_url: Optional[str], passfile: Optional[Path]) -> tuple[str, str]:
        state = self._state()
        if self.server.running() and state.get("api_url") and _healthy(state["api_url"]):
            # Its database may have just been started again: give its pool a moment.
            deadline = time.monotonic() + 30
            while not _ready(state["api_url"]) and time.monotonic() < deadline:
                time.sleep(0.5)
            if _ready(state["api_url"]):
                self.emit(f"Prefect server: running (pid {self.server.pid}), {state['ui_url']}")
                return state["ui_url"], state["api_url"]
            self.emit("Prefect server: runs but its database does not answer (/api/ready); restarting it")
        self.server.stop()  # a server that runs but does not answer
        port = self._server_port()
        server = TeamServer(self.dir / "prefect", database_url, passfile, self.host, port)
        server.home.mkdir(parents=True, exist_ok=True)
        log_start = self.server.log_file.stat().st_size if self.server.log_file.exists() else 0
        pid = self.server.start(server.command(), server.environment(), cwd=self.dir)
        self.emit(f"Prefect server: starting on {server.url} (pid {pid}, log "
                  f"{self.server.log_file.relative_to(self.root)}) ...")
        startup_s = float(self.environ.get(STARTUP_TIMEOUT_ENV, "300"))
        deadline = time.monotonic() + startup_s
        import prefect.client.orchestration  # noqa: F401  (seconds of imports, while the server boots)
        # Ready, and its own: a server another process started on the port
        # since it was found free would answer too (this one then exits).
        while not (_ready(server.api_url, timeout_s=2) and listens_on(self.server.pid or -1, port)):
            if not self.server.running():
                raise TeamError(f"the Prefect server exited while starting; log {self.server.log_file}:\n"
                                f"{self._log_since(self.server.log_file, log_start)}")
            if time.monotonic() > deadline:
                self.server.stop()
                raise TeamError(f"the Prefect server was not ready within {startup_s:.0f} s "
                                f"({STARTUP_TIMEOUT_ENV}); log "
                                f"{self.server.log_file}:\n{self._log_since(self.server.log_file, log_start)}")
            time.sleep(0.5)
        self._save(server_port=port)
        self.emit(f"Prefect server: healthy on {server.url} (database "
                  f"{'PREFECT_API_DATABASE_CONNECTION_URL' if self.external_database else DATABASE!r})")
        return server.url, server.api_url

    @staticmethod
    def _log_since(path: Path, offset: int, chars: int = 3000) -> str:
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def _ensure_pool(self, client) -> None:
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.exceptions import ObjectNotFound
        from prefect.workers.process import ProcessWorker

        try:
            pool = client.read_work_pool(self.pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=self.pool, type=ProcessWorker.type,
                base_job_template=ProcessWorker.get_default_base_job_template(),
                description="shrinkflow's flows, run by `prefect worker start` in the project's checkout"))
            self.emit(f"work pool: created {self.pool!r} (type process)")
            return
        if pool.type != ProcessWorker.type:
            raise TeamError(f"the work pool {self.pool!r} exists with type {pool.type!r}, not 'process': choose "
                            "another with --pool")
        self.emit(f"work pool: {self.pool!r} (type process) exists")

    def _ensure_automation(self, client) -> None:
        if client.read_automations_by_name(ZOMBIE_AUTOMATION):
            return
        client.create_automation(zombie_automation())
        self.emit(f"automation: {ZOMBIE_AUTOMATION!r} (no heartbeat for {ZOMBIE_AFTER_S} s -> Crashed)")

    def _child_env(self, api_url: str) -> dict:
        """What the deploy command and the worker (and so every flow run)
        get: this environment, telemetry off, Prefect's state in the
        project's .prefect/, the API, the project first on the import path,
        and flow-run heartbeats."""
        env = configure_env(self.root, telemetry_off(dict(self.environ)))
        env["PREFECT_API_URL"] = api_url
        env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)  # the server's, not the clients'
        env["PYTHONPATH"] = os.pathsep.join([str(self.root)] + [p for p in [env.get("PYTHONPATH")] if p])
        env.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S))
        env.setdefault("PREFECT_CLI_PROMPT", "false")
        return env

    def _deployed(self, client) -> bool:
        """Whether both deployments exist on the server."""
        from prefect.exceptions import ObjectNotFound

        try:
            for flow in FLOWS:
                client.read_deployment_by_name(f"{flow}/{DEPLOYMENT}")
        except ObjectNotFound:
            return False
        return True

    def _deploy(self, api_url: str, schedules: Schedules, deployed: bool) -> None:
        """``prefect deploy --all`` of prefect.yaml with ``schedules`` (the
        file rendered to ``rendered_prefect_yaml``), unless both deployments
        exist and were made by the last ``up`` from the same file, schedules,
        variables and server: a redeploy deletes the runs already scheduled
        and the scheduler makes them again (on the same instants: every
        interval has a fixed anchor, shrinkflow.schedules)."""
        import yaml

        text = (self.root / "prefect.yaml").read_text(encoding="utf-8")
        try:
            declared = declared_schedules(yaml.safe_load(text))
            rendered = render_prefect_yaml(text, schedules)
        except (KeyError, AttributeError, yaml.YAMLError) as exc:
            raise TeamError(f"prefect.yaml does not declare the deployments of {', '.join(ENTRYPOINTS)}: "
                            f"{type(exc).__name__}: {exc} (git checkout prefect.yaml)") from exc
        wanted = {flow: schedules.entries(flow) for flow in ENTRYPOINTS.values()}
        if declared != wanted and schedules.from_params:
            self.emit(f"note: prefect.yaml's schedules ({declared}) differ from params.yaml's ({wanted}), which "
                      "are deployed; a bare `prefect deploy --all` would deploy prefect.yaml's: copy params.yaml's "
                      "into it")
        variables = deploy_env(self.root, self.pool)
        recipe = hashlib.sha256(json.dumps({"prefect.yaml": rendered, "env": variables, "api": api_url},
                                           sort_keys=True).encode()).hexdigest()
        if deployed and self._state().get("deployed") == recipe:
            self.emit(f"deployments: unchanged since the last up ({schedules.describe()})")
            return
        last = self._state().get("schedules_from_flags")
        if schedules.from_params and last:
            # A recovery `up` (as `team status` advises) took params.yaml's
            # schedules over the flags the last `up` was given (a helper's
            # finding): said, so that it is not silent.
            self.emit(f"note: the last up deployed the schedules its flags gave ({last}); this up deploys "
                      f"params.yaml's ({schedules.describe()}): give the flags again to keep theirs")
        self.rendered_prefect_yaml.write_text(rendered, encoding="utf-8")
        env = {**self._child_env(api_url), **variables}
        self.deploy_log.parent.mkdir(parents=True, exist_ok=True)
        try:
            proc = subprocess.run([sys.executable, "-m", "prefect", "deploy", "--all", "--prefect-file",
                                   str(self.rendered_prefect_yaml)], cwd=self.root, env=env,
                                  capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired as exc:
            raise TeamError("`prefect deploy --all` did not finish within 600 s") from exc
        self.deploy_log.write_text(proc.stdout + proc.stderr, encoding="utf-8")
        if proc.returncode != 0:
            raise TeamError(f"`prefect deploy --all` failed (exit {proc.returncode}); log {self.deploy_log}:\n"
                            f"{(proc.stdout + proc.stderr)[-3000:]}")
        self._save(deployed=recipe, schedules_from_flags=None if schedules.from_params else schedules.describe())
        self.emit(f"deployed prefect.yaml to pool {self.pool!r}: {schedules.describe()}")

    def _launch_worker(self, api_url: str) -> tuple[float, int]:
        """Start the worker process; returns (when, its log's offset) for
        ``_await_worker``."""
        log_start = self.worker.log_file.stat().st_size if self.worker.log_file.exists() else 0
        started = time.time()
        pid = self.worker.start([sys.executable, "-m", "prefect", "worker", "start", "--pool", self.pool,
                                 "--type", "process", "--name", self.worker_name, "--limit", "1"],
                                self._child_env(api_url), cwd=self.root)
        self.emit(f"worker: starting {self.worker_name} (pid {pid}, log "
                  f"{self.worker.log_file.relative_to(self.root)}; one run at a time) ...")
        return started, log_start

    def _await_worker(self, api_url: str, started: float, log_start: int, timeout_s: float = 180.0) -> None:
        """Wait until the server has a heartbeat of the worker started at
        ``started``. Raises TeamError (with its log) when it exits or stays
        silent for ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with _client(api_url) as client:
            while True:
                if not self.worker.running():
                    raise TeamError(f"the worker exited while starting; log {self.worker.log_file}:\n"
                                    f"{self._log_since(self.worker.log_file, log_start)}")
                if self._worker_heartbeat(client) >= started - 2:
                    break
                if time.monotonic() > deadline:
                    raise TeamError(f"the worker did not report to the server within {timeout_s:.0f} s; log "
                                    f"{self.worker.log_file}:\n{self._log_since(self.worker.log_file, log_start)}")
                time.sleep(0.5)
        self.emit(f"worker: online in pool {self.pool!r}")

    def _worker_heartbeat(self, client) -> float:
        """The time (epoch seconds) of this checkout's worker's last
        heartbeat on the server, 0 when it never reported."""
        for w in client.read_workers_for_work_pool(self.pool):
            if w.name == self.worker_name and w.last_heartbeat_time is not None:
                return w.last_heartbeat_time.timestamp()
        return 0.0

    # ------------------------------------------------------------- down
    def _down(self, grace_s: float = 30.0) -> list[str]:
        """Stop what the stack started: the worker (so it starts nothing
        more), its flow runs still in flight on this host (their process
        groups; marked Crashed, "stopped by shrinkflow team down", unless
        they ended otherwise), the server, PostgreSQL. A run whose process was already gone
        is marked as ``reconcile_lost_runs`` does (and said through
        ``emit``). Idempotent. Returns a line per thing stopped."""
        from prefect.states import Crashed

        stopped = []
        api_url = self.api_url()
        # The worker first: while it lives it may start a scheduled run after
        # the runs below were listed, and that run would outlive the stack.
        # (A run has its own session: stopping the worker does not stop it.)
        worker_stopped = self.worker.stop(grace_s)
        live = []
        if api_url and _ready(api_url):
            with _client(api_url) as client:
                for run in in_flight_runs(client, self.pool, self.worker_name):
                    pid = run_pid(run)
                    if run_alive(pid, str(run.id)):
                        live.append((run, pid))
                    elif not self.worker.running():
                        self.emit(f"flow run {run.name!r}: "
                                  f"{crash_lost_run(client, run, self.worker_name, stopped_by_down=worker_stopped)}")
        for run, pid in live:
            try:
                group = os.getpgid(pid)
            except ProcessLookupError:
                continue
            if kill_group(group, grace_s):
                stopped.append(f"flow run {run.name!r} (pid {pid})")
        # Runs the server could not tell about (it is down, or the run had
        # not reported its process yet): found by the worker's name in their
        # environment, which Prefect sets.
        for group, run_id in self._run_groups().items():
            if kill_group(group, grace_s):
                stopped.append(f"flow run {run_id} (pid {group}; found on this host, not through the server)")
        if worker_stopped:
            stopped.append(f"the worker {self.worker_name}")
        if live:
            with _client(api_url) as client:
                for run, _ in live:
                    state = client.read_flow_run(run.id).state
                    if state is not None and state.type.value in IN_FLIGHT:
                        client.set_flow_run_state(run.id, Crashed(message="stopped by shrinkflow team down"),
                                                  force=True)
        if self.server.stop(grace_s):
            stopped.append("the Prefect server")
        if self.cluster.running():
            self.cluster.stop()
            stopped.append("PostgreSQL")
        return stopped

    def _run_groups(self) -> dict[int, str]:
        """The process groups of flow runs this checkout's worker started
        that still run on this host: {process group: flow run id}, from
        each process's PREFECT__WORKER_NAME and PREFECT__FLOW_RUN_ID."""
        import psutil

        groups = {}
        for proc in psutil.process_iter(["pid"]):
            try:
                env = proc.environ()
                if env.get("PREFECT__WORKER_NAME") == self.worker_name and env.get("PREFECT__FLOW_RUN_ID") \
                        and proc.status() != psutil.STATUS_ZOMBIE:
                    groups.setdefault(os.getpgid(proc.pid), env["PREFECT__FLOW_RUN_ID"])
            except (psutil.Error, ProcessLookupError):
                continue
        return groups

    # ----------------------------------------------------------- status
    def status(self) -> TeamStatus:
        """What runs: PostgreSQL, the server, the worker (and whether the
        server sees it), the deployments' next runs, the runs in flight.
        Starts and changes nothing."""
        pieces = []
        state = self._state()
        if self.external_database or self.external_api_url:
            pieces.append(PieceStatus("PostgreSQL", True, "the server's own (not managed here)"))
        elif self.cluster.initialized():
            up = self.cluster.running()
            pieces.append(PieceStatus("PostgreSQL", up, f"{self.cluster.host}:{self.cluster.last_port()}, data in "
                                      f"{self.cluster.root.relative_to(self.root)}/"))
        else:
            pieces.append(PieceStatus("PostgreSQL", False, "no cluster yet (shrinkflow team up creates it)"))
        api_url = self.api_url()
        answers = bool(api_url) and _healthy(api_url)
        healthy = answers and _ready(api_url)
        why = "" if healthy else (": answers, but its database does not (/api/ready)" if answers
                                  else ": does not answer")
        if self.external_api_url:
            pieces.append(PieceStatus("server", answers, f"{api_url} (PREFECT_API_URL){why}", healthy))
        else:
            pid = self.server.pid
            detail = (f"{state.get('ui_url')} (pid {pid}, log {self.server.log_file.relative_to(self.root)})"
                      if pid else self._gone(self.server))
            if pid and not healthy:
                detail += why
            pieces.append(PieceStatus("server", pid is not None and answers, detail, pid is not None and healthy))
        wpid = self.worker.pid
        deployments, runs = [], []
        online = False
        if healthy:
            with _client(api_url) as client:
                online = self._worker_heartbeat(client) > time.time() - 90
                deployments = self._deployments(client)
                for r in in_flight_runs(client, self.pool, self.worker_name):
                    pid = run_pid(r)
                    alive = run_alive(pid, str(r.id))
                    runs.append(f"{r.name} (id {r.id}): {r.state.name if r.state else '?'}, pid {pid}"
                                + ("" if alive else ": its process is gone (`shrinkflow team up` marks it Crashed)"))
        worker_detail = (f"{self.worker_name} (pid {wpid}, log {self.worker.log_file.relative_to(self.root)})"
                         if wpid else self._gone(self.worker))
        if wpid and healthy and not online:
            worker_detail += ": no recent heartbeat on the server"
        pieces.append(PieceStatus("worker", wpid is not None, worker_detail))
        return TeamStatus(pieces, api_url, deployments, runs)

    def _gone(self, piece: Detached) -> str:
        rec = piece.record()
        if rec is None:
            return "not started"
        return (f"pid {rec['pid']} in {piece.pid_file.name} is gone, it did not stop through `team down` (its log: "
                f"{piece.log_file.relative_to(self.root)}); `shrinkflow team up` starts it again")

    def _deployments(self, client) -> list[str]:
        from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                    FlowRunFilterState, FlowRunFilterStateType)
        from prefect.client.schemas.objects import StateType
        from prefect.client.schemas.sorting import FlowRunSort
        from prefect.exceptions import ObjectNotFound

        out = []
        for flow in FLOWS:
            try:
                dep = client.read_deployment_by_name(f"{flow}/{DEPLOYMENT}")
            except ObjectNotFound:
                out.append(f"{flow}/{DEPLOYMENT}: not deployed")
                continue
            nxt = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                    any_=[StateType.SCHEDULED]))), sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1)
            when = (f"next run {nxt[0].expected_start_time:%Y-%m-%d %H:%M:%S} UTC" if nxt
                    else "no scheduled run")
            out.append(f"{flow}/{DEPLOYMENT}: {'paused, ' if dep.paused else ''}{when}")
        return out
