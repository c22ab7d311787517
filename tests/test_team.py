"""The team stack (issue 18, item 1): `shrinkflow team up|down|status` runs
a real PostgreSQL cluster, a real Prefect server on it, a process work pool,
the deployments of prefect.yaml and a real `prefect worker`, detached, in a
git+DVC copy of the project; the server's scheduler creates the runs and
the worker executes them. Then the worker is killed mid-run (SIGKILL to its
process group) and started again.

One stack for the module (starting it is most of the cost). The copy lives
under a 0755 directory in /tmp: PostgreSQL runs as the `postgres` user,
which cannot traverse pytest's 0700 temporary directories.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from shrinkflow.schedules import INTERVAL_ANCHOR
from tests.e2e import TINY, copy_project, run_cli, write_params

# The two tests on the stack (slow) start a real PostgreSQL, Prefect server
# and worker: about a minute in all; the two others take a second or two.

LIFECYCLE_EVERY_S = 5
MONITOR_EVERY_S = 20
# The worker asks for runs every second (Prefect's default is 10 s).
FAST = {"PREFECT_WORKER_QUERY_SECONDS": "1"}


def team(project: Path, *args: str) -> tuple[int, str]:
    return run_cli(project, None, "team", *args, extra_env=FAST)


@pytest.fixture(scope="module")
def stack():
    """The project copy with the stack up: the lifecycle every 5 s, the
    monitor every 20 s, and production v0003 in its registry (files that
    verify). Yields (project, what `team up` printed, the API's URL)."""
    from shrinkflow.detached import Detached
    from tests.registry_outputs import build

    base = Path(tempfile.mkdtemp(prefix="shrinkflow-team-"))
    os.chmod(base, 0o755)
    project = copy_project(base / "project")
    write_params(project / "params.yaml", TINY)
    build(project / "registry", "v0003")
    try:
        code, out = team(project, "up", "--interval", str(LIFECYCLE_EVERY_S),
                         "--monitor-interval", str(MONITOR_EVERY_S))
        assert code == 0, out
        api = re.search(r"\(API (http://127\.0\.0\.1:\d+/api)\)", out).group(1)
        yield project, out, api
    finally:
        from flows.team import TeamStack

        TeamStack(project).down(grace_s=0.5)  # `team down` itself is tested above, with its default grace
        for name in ("server", "worker"):
            assert not Detached(name, project / ".shrinkflow/team" / f"{name}.pid", Path("x")).running()
        shutil.rmtree(base, ignore_errors=True)


def client_for(api: str):
    from flows.team import _client

    return _client(api)


def runs_of(api: str, flow: str) -> list:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with client_for(api) as c:
        return c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
                                sort=FlowRunSort.EXPECTED_START_TIME_ASC)


def wait_for(pred, what: str, timeout_s: float = 120.0, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every_s)
    raise AssertionError(f"no {what} within {timeout_s:.0f} s")


def gone(pid: int) -> bool:
    """The process is dead (a zombie nobody reaped counts as dead)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pid_file(project: Path, name: str) -> int:
    from shrinkflow.detached import Detached

    pid = Detached(name, project / ".shrinkflow/team" / f"{name}.pid", Path("x")).pid
    assert pid is not None, f"no live {name}"
    return pid


@pytest.mark.e2e
@pytest.mark.slow
def test_up_puts_prefect_on_postgresql_with_the_params_schedules_and_no_password_in_files(stack):
    import psycopg

    from shrinkflow.pgcluster import PgCluster

    project, out, api = stack
    assert "PostgreSQL: initialised a cluster in .shrinkflow/team/postgres/" in out
    assert "work pool: created 'shrinkflow' (type process)" in out
    assert "worker: online in pool 'shrinkflow'" in out
    cluster = PgCluster(project / ".shrinkflow/team/postgres")
    # The server's state is in PostgreSQL: its deployment table holds both.
    with psycopg.connect(cluster.url("prefect"), passfile=str(cluster.passfile), connect_timeout=10) as con:
        names = sorted(r[0] for r in con.execute("SELECT name FROM deployment").fetchall())
    assert names == ["team", "team"]
    assert oct(cluster.passfile.stat().st_mode & 0o777) == "0o600"
    password = cluster.passfile.read_text().strip().rsplit(":", 1)[1]
    tracked = subprocess.run(["git", "ls-files"], cwd=project, capture_output=True, text=True).stdout.split()
    leaks = [f for f in tracked + [".shrinkflow/team/stack.json", ".shrinkflow/team/deploy.log"]
             if (project / f).is_file() and password in (project / f).read_text(errors="replace")]
    assert not leaks
    for name in ("server", "worker"):  # not on a command line either
        import psutil

        assert password not in " ".join(psutil.Process(pid_file(project, name)).cmdline())
    # prefect.yaml's schedules as the flags gave them, and where the runs start.
    with client_for(api) as c:
        life = c.read_deployment_by_name("shrinkflow-lifecycle/team")
        mon = c.read_deployment_by_name("shrinkflow-monitor/team")
    assert [s.schedule.interval for s in life.schedules] == [datetime.timedelta(seconds=LIFECYCLE_EVERY_S)]
    assert [s.schedule.interval for s in mon.schedules] == [datetime.timedelta(seconds=MONITOR_EVERY_S)]
    assert [s.schedule.anchor_date for s in life.schedules + mon.schedules] == [INTERVAL_ANCHOR] * 2
    assert life.work_pool_name == mon.work_pool_name == "shrinkflow"
    # a scheduled run waits monitor.scheduled_wait_minutes (params.yaml: 30) for a writer started by hand
    assert life.parameters == mon.parameters == {"project_dir": str(project), "wait_for_project_s": 1800.0}
    assert life.job_variables["working_dir"] == str(project)


def test_prefect_yaml_declares_params_yamls_schedules_and_prefect_reads_what_team_up_renders():
    """The committed prefect.yaml's schedules are the committed params.yaml's
    (as `team up` maps them); and what `team up` deploys (prefect.yaml with
    other schedules) passes Prefect's own prefect.yaml validation, and
    Prefect's deploy code reads its schedules back unchanged."""
    import yaml
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule

    from flows.cli import _schedule_of
    from flows.team import Schedules, declared_schedules, render_prefect_yaml
    from shrinkflow.config import load_params
    from tests.conftest import PROJECT_ROOT

    text = (PROJECT_ROOT / "prefect.yaml").read_text()
    m = load_params(PROJECT_ROOT / "params.yaml").monitor
    params = Schedules(*_schedule_of(None, None, m.lifecycle_cron, m.lifecycle_interval_minutes, ""),
                       *_schedule_of(None, None, m.cron, m.interval_minutes, "monitor-"))
    assert declared_schedules(yaml.safe_load(text)) == {f: params.entries(f) for f in ("lifecycle", "monitor")}
    # and its wait for a manual writer, as a bare `prefect deploy --all` deploys it
    assert [d["parameters"]["wait_for_project_s"] for d in yaml.safe_load(text)["deployments"]] == \
        [m.scheduled_wait_minutes * 60] * 2

    other = Schedules(None, 5, "*/15 * * * *", None, from_params=False, wait_for_project_s=90.0)
    doc = yaml.safe_load(render_prefect_yaml(text, other))
    # each scheduled run waits up to monitor.scheduled_wait_minutes for a manual writer
    assert [d["parameters"] for d in doc["deployments"]] == [
        {"project_dir": "{{ $SHRINKFLOW_PROJECT_DIR }}", "wait_for_project_s": 90.0}] * 2
    PrefectYamlModel.model_validate(doc)
    got = {d["entrypoint"]: [_schedule_config_to_deployment_schedule(e)["schedule"] for e in d["schedules"]]
           for d in doc["deployments"]}
    (life,), (mon,) = got["flows/lifecycle.py:lifecycle"], got["flows/monitor.py:monitor"]
    assert life.interval == datetime.timedelta(seconds=5) and mon.cron == "*/15 * * * *"
    assert life.anchor_date == INTERVAL_ANCHOR
    assert mon.timezone == "UTC"
    # everything else is prefect.yaml's
    assert [d["work_pool"] for d in doc["deployments"]] == [d["work_pool"]
                                                           for d in yaml.safe_load(text)["deployments"]]


def test_interval_runs_land_on_the_same_instants_whenever_they_are_deployed():
    """Prefect anchors an interval schedule at the moment it is deployed
    unless it is given an anchor. Two deploys a moment apart, each way this
    project deploys (the committed prefect.yaml as `prefect deploy --all`
    reads it, prefect.yaml as `team up` renders it, `shrinkflow schedule`'s
    deployments), give schedules whose next runs, as the server's scheduler
    computes them from what it stored, are the same instants, on the grid
    from 2000-01-01 00:00 UTC."""
    import asyncio

    import yaml
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.server.schemas.schedules import IntervalSchedule as StoredInterval

    from flows.cli import deployment_schedule
    from flows.monitor import monitor
    from flows.team import Schedules, render_prefect_yaml
    from shrinkflow.schedules import interval_next_run
    from tests.conftest import PROJECT_ROOT

    text = (PROJECT_ROOT / "prefect.yaml").read_text()

    def from_yaml(doc_text: str, entrypoint: str):
        (entry,) = next(d for d in yaml.safe_load(doc_text)["deployments"] if d["entrypoint"] == entrypoint)["schedules"]
        return _schedule_config_to_deployment_schedule(entry)["schedule"]

    deploys = {
        "prefect.yaml": lambda: from_yaml(text, "flows/monitor.py:monitor"),
        "team up": lambda: from_yaml(render_prefect_yaml(text, Schedules(None, 90, "0 3 * * 0", None)),
                                     "flows/lifecycle.py:lifecycle"),
        "schedule": lambda: monitor.to_deployment(name="t", **deployment_schedule(None, 7 * 60)).schedules[0].schedule,
    }
    start = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
    for how, deploy in deploys.items():
        first = deploy()
        time.sleep(0.02)                        # the second deploy, later
        second = deploy()
        runs = [asyncio.run(StoredInterval.model_validate(s.model_dump(mode="json")).get_dates(n=3, start=start))
                for s in (first, second)]
        assert runs[0] == runs[1], how
        every = first.interval
        assert runs[0] == [interval_next_run(int(every.total_seconds()), start) + k * every for k in range(3)], how
        assert (runs[0][0] - INTERVAL_ANCHOR).total_seconds() % every.total_seconds() == 0, how


@pytest.mark.e2e
@pytest.mark.slow
def test_a_killed_worker_leaves_no_run_running_and_the_stack_comes_back_on_its_data(stack):
    """The scheduler makes the runs, the worker runs them. SIGKILL to the
    worker's process group mid-run: the run's own process group (Prefect
    isolates it) survives; left alone it would finish and report (seen by
    hand, docs/team.md). When that process dies too (the host went down),
    the run stays Running on the server: `team down` stops the rest and
    leaves no process (twice: idempotent), and `team up` comes back on the
    same data and ports, marks the run Crashed and starts a worker that runs
    the next scheduled monitor run; the registry verifies. Last, the Prefect
    server is killed outright and `team up` brings it back with every
    run's record (they are in PostgreSQL)."""
    import psutil

    from shrinkflow.pgcluster import PgCluster

    project, _, api = stack
    worker = pid_file(project, "worker")

    # A scheduled lifecycle run, executed by a child process of the worker.
    def running_lifecycle():
        return next((r for r in runs_of(api, "shrinkflow-lifecycle")
                     if r.state_type.value == "RUNNING" and r.infrastructure_pid), None)

    run = wait_for(running_lifecycle, "running lifecycle run", 120)
    assert run.auto_scheduled and run.labels["prefect.worker.name"].startswith("shrinkflow-")
    engine = psutil.Process(int(run.infrastructure_pid))
    assert engine.ppid() == worker  # the worker started it, not a CLI
    with client_for(api) as c:  # one lifecycle run is enough here: no more of them
        c.pause_deployment(run.deployment_id)
        for r in runs_of(api, "shrinkflow-lifecycle"):
            if r.state_type.value == "SCHEDULED":
                c.delete_flow_run(r.id)

    os.killpg(worker, signal.SIGKILL)
    wait_for(lambda: gone(worker), "the killed worker gone", 10, 0.1)
    time.sleep(1.0)
    assert not gone(engine.pid)  # its own process group: the worker's death did not reach it
    # The host goes down with it: the run's process dies too.
    os.killpg(engine.pid, signal.SIGKILL)
    wait_for(lambda: gone(engine.pid), "the killed run's process gone", 10, 0.1)
    with client_for(api) as c:
        assert c.read_flow_run(run.id).state_type.value == "RUNNING"  # nothing on the server ends it
    from flows.team import TeamStack

    status = TeamStack(project).status()  # what `team status` prints, and its exit code 3
    out = status.text()
    assert not status.all_running and not status.none_running, out
    assert re.search(r"^worker\s+stopped\s+pid \d+ in worker.pid is gone", out, re.M), out
    assert f"{run.name} (id {run.id}): Running, pid {engine.pid}: its process is gone" in out

    # Up: the server and PostgreSQL run on; the lost run is marked Crashed, a new worker starts.
    code, out = team(project, "up", "--interval", str(LIFECYCLE_EVERY_S), "--monitor-interval", str(MONITOR_EVERY_S))
    assert code == 0, out
    assert "Prefect server: running" in out and "deployments: unchanged" in out, out
    assert f"flow run {run.name!r}: Crashed: its worker" in out, out
    new_worker = pid_file(project, "worker")
    with client_for(api) as c:
        state = c.read_flow_run(run.id).state
    assert state.type.value == "CRASHED" and f"(pid {engine.pid}) is gone" in state.message

    code, out = run_cli(project, None, "status")  # while the new worker starts its first run
    assert code == 0 and out.startswith("production: v0003 ") and "files verified" in out, out

    # The new worker runs the next scheduled monitor run to completion.
    def finished_monitor():
        return next((r for r in runs_of(api, "shrinkflow-monitor")
                     if r.state_type.value in ("COMPLETED", "FAILED", "CRASHED")
                     and r.start_time and r.start_time.timestamp() > psutil.Process(new_worker).create_time()),
                    None)

    mon = wait_for(finished_monitor, "monitor run by the new worker", 120)
    assert mon.state_type.value == "COMPLETED" and mon.auto_scheduled, mon.state
    worker_log = (project / ".shrinkflow/team/worker.log").read_text().rsplit("starting the Prefect worker", 1)[1]
    assert str(mon.id) in worker_log

    # The killed run had sent its heartbeat (the zombie automation's input), and the automation is there.
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    from flows.team import ZOMBIE_AFTER_S, ZOMBIE_AUTOMATION

    with client_for(api) as c:
        beats = c.read_events(EventFilter(event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                                          resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}"])),
                             limit=10)  # the client's default, 100, is over the server's limit of 50
        (automation,) = c.read_automations_by_name(ZOMBIE_AUTOMATION)
    assert beats.events, "no heartbeat of the killed run reached the server"
    assert automation.trigger.posture == "Proactive" and automation.trigger.within.total_seconds() == ZOMBIE_AFTER_S
    assert automation.actions[0].type == "change-flow-run-state" and automation.actions[0].state.value == "CRASHED"

    # Down: no process of the stack remains; down again has nothing to do.
    cluster = PgCluster(project / ".shrinkflow/team/postgres")
    pg_port, server = cluster.last_port(), pid_file(project, "server")
    code, out = team(project, "down")
    *lost_lines, last = out.strip().splitlines()
    # A run the worker was starting as `down` stopped it, whose process is
    # gone: marked Crashed and said so (never the killed run: `up` marked it).
    lost = [re.fullmatch(r"flow run '([^']+)': Crashed: its worker \S+ was stopped by `shrinkflow team down` and its process (?:\(pid \d+\) )?is gone "
                         r"from this host: marked Crashed by shrinkflow team \(docs/team\.md\); .*", line)
            for line in lost_lines]
    assert all(lost) and run.name not in {m.group(1) for m in lost}, out
    lost_runs = {m.group(1) for m in lost}
    # A monitor run in flight, if any: by name when the server listed it, by
    # id when only its environment named it (it started as `down` began).
    stopped = re.fullmatch(r"stopped: ((?:flow run (?:'[^']+' \(pid \d+\)|\S+ \(pid \d+; found on this host, not "
                           r"through the server\)), )*)the worker (\S+), the Prefect server, PostgreSQL", last)
    assert code == 0 and stopped and stopped.group(2) == run.labels["prefect.worker.name"], out
    stopped_runs = re.findall(r"flow run '([^']+)'", stopped.group(1))
    stopped_ids = re.findall(r"flow run (\S+) \(pid \d+; found on this host", stopped.group(1))
    left = [p.info for p in psutil.process_iter(["pid", "cmdline", "cwd", "status"])
            if p.info["status"] != psutil.STATUS_ZOMBIE  # dead; reaped by whoever adopted it
            and (p.pid in (server, new_worker) or str(project) in " ".join(p.info["cmdline"] or [])
                 or (p.info["cwd"] or "").startswith(str(project)))]
    assert not left and not cluster.running()
    assert TeamStack(project).down() == []  # `team down` again: "nothing of the team stack was running"

    # Up again: the same cluster, its data (the runs above) and the same ports.
    code, out = team(project, "up", "--interval", str(LIFECYCLE_EVERY_S), "--monitor-interval", str(MONITOR_EVERY_S))
    assert code == 0, out
    assert "PostgreSQL: reusing the cluster" in out and f"started on 127.0.0.1:{pg_port}" in out, out
    assert f"(API {api})" in out and "deployments: unchanged" in out, out
    with client_for(api) as c:
        assert c.read_flow_run(run.id).state_type.value == "CRASHED"
        assert c.read_flow_run(mon.id).state_type.value == "COMPLETED"
        for r in runs_of(api, "shrinkflow-monitor") + runs_of(api, "shrinkflow-lifecycle"):
            if r.name in lost_runs:  # e.g. a scheduled monitor run the worker was submitting
                assert r.state_type.value == "CRASHED" and "stopped by `shrinkflow team down`" in r.state.message, \
                    r.state
            if r.name in stopped_runs:  # marked by `down`, or by the run itself on the SIGTERM `down` sent
                assert r.state_type.value == "CRASHED" and r.state.message in (
                    "stopped by shrinkflow team down", "Execution was aborted by a termination signal."), r.state
            if str(r.id) in stopped_ids:  # marked by `down` or by `up`'s reconciliation, never left in flight
                assert r.state_type.value not in ("RUNNING", "PENDING"), r.state

    # The Prefect server killed outright (SIGKILL to its group): its records are PostgreSQL's, so
    # `team up` starts it again on the same port and every run's record is there as it was.
    server = pid_file(project, "server")
    os.killpg(server, signal.SIGKILL)
    wait_for(lambda: gone(server), "the killed Prefect server gone", 10, 0.1)
    assert not TeamStack(project).status().all_running
    code, out = team(project, "up", "--interval", str(LIFECYCLE_EVERY_S), "--monitor-interval", str(MONITOR_EVERY_S))
    assert code == 0 and "Prefect server: healthy on" in out and f"(API {api})" in out, out
    assert pid_file(project, "server") != server
    with client_for(api) as c:
        assert c.read_flow_run(run.id).state_type.value == "CRASHED"
        assert c.read_flow_run(mon.id).state_type.value == "COMPLETED"
    # A recovery `up` without the flags deploys params.yaml's schedules, and says so (a helper's finding: it
    # silently replaced the schedules the flags had given)
    code, out = team(project, "up")
    assert code == 0, out
    assert f"note: the last up deployed the schedules its flags gave (shrinkflow-lifecycle/team every " \
           f"{LIFECYCLE_EVERY_S} s" in out and "this up deploys params.yaml's" in out, out


def test_a_schedule_that_cannot_run_starts_nothing_and_env_prints_what_prefect_yaml_reads(tmp_path):
    from tests.conftest import bare_project

    root = bare_project(tmp_path)
    code, out = team(root, "up", "--cron", "0 0 31 2 *")
    assert code == 2 and "--cron '0 0 31 2 *'" in out, out
    assert sorted(p.name for p in root.iterdir()) == ["dvc.yaml", "params.yaml"]  # no .shrinkflow/team
    code, out = team(root, "env", "--pool", "ml")
    assert code == 0 and out.splitlines() == [f"export SHRINKFLOW_PROJECT_DIR={root}",
                                              "export SHRINKFLOW_WORK_POOL=ml"], out


def test_one_team_up_or_down_at_a_time_in_a_checkout(tmp_path):
    """Two `team up`s at once would start two workers under one name (one
    of them unknown to `team down`): while one holds the checkout's team
    lock, another up or down is refused naming it, and nothing is started."""
    import pytest as _pytest

    from flows.team import Schedules, TeamError, TeamStack

    holder = TeamStack(tmp_path)
    with holder._exclusive("up"):
        other = TeamStack(tmp_path)
        with _pytest.raises(TeamError, match=r"another `shrinkflow team up` or `team down` is running .*team up, pid"):
            other.down()
        with _pytest.raises(TeamError, match="another `shrinkflow team up`"):
            other.up(Schedules(None, 60, None, 60))
    assert sorted(p.name for p in (tmp_path / ".shrinkflow" / "team").iterdir()) == ["team.lock"]
    assert TeamStack(tmp_path).down() == []      # released: down runs (nothing to stop)


def test_a_taken_port_fails_before_postgresql_is_started(tmp_path):
    """`team up --port N` with N taken: refused at once, naming the port,
    with no PostgreSQL cluster initialised or started for nothing."""
    import shutil
    import socket

    import pytest as _pytest

    from flows.team import Schedules, TeamError, TeamStack
    from tests.conftest import PROJECT_ROOT

    shutil.copy(PROJECT_ROOT / "prefect.yaml", tmp_path / "prefect.yaml")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with _pytest.raises(TeamError, match=f"port {port} on 127.0.0.1 is taken"):
            TeamStack(tmp_path, port=port, emit=lambda _: None).up(Schedules(None, 60, None, 60))
    assert not (tmp_path / ".shrinkflow" / "team" / "postgres").exists()
