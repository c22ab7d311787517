"""`shrinkflow schedule`: a schedule that cannot run is refused up front, and
the scheduler's errors reach the terminal (issue 14, item 7).

The cron check is compared with Prefect's own server-side schedule (the code
its scheduler runs); the surfacing test starts the real local Prefect server
through the CLI and puts a deployment with a 31-February schedule on it.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from flows.prefect_server import ServerLogFollower, unscheduled_deployments
from shrinkflow.config import cron_next_run
from tests.conftest import PROJECT_ROOT, bare_project, cmdline_of


def cli_env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_HOME", None)  # the CLI puts Prefect's home in the project's .prefect/
    return env


# ------------------------------------------------------------- the cron check
START = datetime.datetime(2026, 1, 1, 0, 0)  # a Thursday


@pytest.mark.parametrize("expr, first", [
    ("0 3 * * 0", datetime.datetime(2026, 1, 4, 3, 0)),       # Sunday 03:00
    ("*/15 * * * *", datetime.datetime(2026, 1, 1, 0, 0)),     # at the start: on or after it
    ("5/15 * * * *", datetime.datetime(2026, 1, 1, 0, 5)),
    ("0 0 29 2 *", datetime.datetime(2028, 2, 29, 0, 0)),      # the next leap day
    ("0 12 L 2 *", datetime.datetime(2026, 2, 28, 12, 0)),     # last day of February
    ("0 0 31 2 *", None),                                      # 31 February: never
    ("0 0 30 2 *", None),
    ("0 0 31 4 *", None),                                      # 31 April
    ("61 * * * *", None),                                      # not a cron expression
    ("not cron", None),
])
def test_the_next_run_is_the_one_prefects_scheduler_computes(expr, first):
    from prefect.server.schemas.schedules import CronSchedule

    if first is None:
        with pytest.raises(ValueError):
            cron_next_run(expr, after=START)
        with pytest.raises(ValueError):  # Prefect refuses it too: at validation, or when its scheduler runs
            CronSchedule(cron=expr, timezone="UTC")._get_dates_generator(
                n=1, start=START.replace(tzinfo=datetime.timezone.utc)).__next__()
        return
    assert cron_next_run(expr, after=START) == first
    prefect_first = next(CronSchedule(cron=expr, timezone="UTC")._get_dates_generator(
        n=1, start=START.replace(tzinfo=datetime.timezone.utc)))
    assert prefect_first.timestamp() == first.replace(tzinfo=datetime.timezone.utc).timestamp()


@pytest.mark.parametrize("flags, expr", [
    (["--cron", "0 0 31 2 *"], "0 0 31 2 *"),
    (["--monitor-cron", "0 0 30 2 *"], "0 0 30 2 *"),
    (["--cron", "0 25 * * *"], "0 25 * * *"),
])
def test_schedule_refuses_a_cron_with_no_next_run_and_starts_nothing(tmp_path, flags, expr):
    root = bare_project(tmp_path)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "schedule", *flags], cwd=root, env=cli_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    flag = flags[0]
    assert proc.stderr.startswith(f"error: {flag} {expr!r} ")
    assert "starting a local Prefect server" not in proc.stdout
    assert time.perf_counter() - t0 < 15
    assert sorted(p.name for p in root.iterdir()) == ["dvc.yaml", "params.yaml"]  # no .prefect/


# ------------------------------------------------------ following the log
# The record the real server wrote (Prefect 3.9.1, this machine) for a
# deployment scheduled "0 0 31 2 *", between two ordinary records.
BAD_DATE_RECORD = """\
10:34:49.681 | ERROR   | prefect.server.services.scheduler - Error scheduling deployment UUID('44024139-5993-40b9-aff3-2ce8c2e8df6e').
Traceback (most recent call last):
  File "/work/main/.venv/lib/python3.11/site-packages/prefect/server/services/scheduler.py", line 186, in _collect_flow_runs
    await models.deployments._generate_scheduled_flow_runs(
  File "/work/main/.venv/lib/python3.11/site-packages/prefect/server/schemas/schedules.py", line 698, in <lambda>
    wall_times = iter(lambda: cron.get_next(datetime.datetime), None)
                              ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/work/main/.venv/lib/python3.11/site-packages/prefect/_vendor/croniter/croniter.py", line 752, in _calc
    raise CroniterBadDateError("failed to find next date")
prefect._vendor.croniter.croniter.CroniterBadDateError: failed to find next date
"""
INFO = "10:34:50.002 | INFO    | prefect.server.services.scheduler - Scheduled 0 runs.\n"


def test_the_follower_reports_each_error_once_with_its_exception(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("old run\n" + BAD_DATE_RECORD)  # before the follower: not reported
    lines: list[str] = []
    f = ServerLogFollower(log, emit=lines.append)
    assert f.poll() == []
    with open(log, "a") as out:
        out.write(INFO + BAD_DATE_RECORD[:300])  # a record cut mid-line by the reader
    assert f.poll() == []
    with open(log, "a") as out:
        out.write(BAD_DATE_RECORD[300:])
    got = f.poll() + f.poll()  # the record is whole once a poll finds nothing new
    expected = ("Prefect server ERROR (prefect.server.services.scheduler): Error scheduling deployment "
                "UUID('44024139-5993-40b9-aff3-2ce8c2e8df6e'). -> prefect._vendor.croniter.croniter."
                f"CroniterBadDateError: failed to find next date  [full record in {log}]")
    assert got == [expected]
    with open(log, "a") as out:  # the scheduler's next loop: the same error again, then an info line
        out.write(BAD_DATE_RECORD + INFO)
    assert f.poll() + f.poll() == [] and f.repeats == 1


@pytest.mark.slow  # about 26 s here: a real Prefect server starts
def test_schedule_echoes_the_local_servers_scheduler_errors(tmp_path):
    """A deployment with a 31-February schedule reaches the server another
    way (the CLI refuses it): its scheduler error is echoed on the CLI's
    stderr within seconds, and the API check names that deployment only."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = bare_project(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "schedule", "--cron", "0 3 * * 0",
                             "--monitor-interval", "86400"], cwd=root, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=lambda s=s, b=b: b.extend(iter(s.readline, "")), daemon=True)
               for s, b in ((proc.stdout, out), (proc.stderr, err))]
    for t in readers:
        t.start()

    def wait_for(pred, what: str, timeout: float = 150.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            got = pred()
            if got:
                return got
            assert proc.poll() is None, f"schedule exited {proc.returncode}:\n{''.join(out)}\n{''.join(err)}"
            time.sleep(0.5)
        raise AssertionError(f"no {what} within {timeout}s:\n{''.join(out)}\n{''.join(err)}")

    try:
        line = wait_for(lambda: next((x for x in out if x.startswith("serving deployments")), None), "serving")
        api_url = re.search(r"against (http://\S+/api);", line).group(1)
        assert "cron '0 3 * * 0', next run " in line
        assert "waits up to 30 min (monitor.scheduled_wait_minutes)" in line
        # a second `schedule` of the same project is refused before it starts anything (a helper's finding:
        # two Prefect servers on one .prefect/ state, each running its share of the runs)
        second = subprocess.run([sys.executable, "-m", "flows.cli", "schedule", "--monitor-interval", "86400"],
                                cwd=root, env=cli_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"`shrinkflow schedule` (pid {proc.pid}, since " in second.stderr
        assert "already serves this project's schedules" in second.stderr and "Prefect UI" not in second.stdout
        with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            wait_for(lambda: any(d.name == "scheduled" for d in client.read_deployments()), "deployment")
            flow_id = client.create_flow_from_name("elsewhere")
            bad_id = client.create_deployment(flow_id=flow_id, name="feb31", schedules=[
                DeploymentScheduleCreate(schedule=CronSchedule(cron="0 0 31 2 *"), active=True)])
        echoed = wait_for(lambda: next((x for x in err if "CroniterBadDateError" in x), None), "echoed error", 60)
        assert echoed.startswith("Prefect server ERROR (prefect.server.services.scheduler): Error scheduling "
                                 f"deployment UUID('{bad_id}')")
        assert "failed to find next date" in echoed
        # The lifecycle's runs are scheduled within seconds; the bad one's never.
        expected = [f"elsewhere/feb31 (id {bad_id}) has an active schedule but no scheduled run"]
        wait_for(lambda: unscheduled_deployments(
            api_url, ["elsewhere/feb31", "shrinkflow-lifecycle/scheduled"]) == expected, "unscheduled check", 30)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=90)
        for t in readers:
            t.join(timeout=10)
    assert rc == 0, "".join(err)
    assert "stopped the local Prefect server" in "".join(out)
    assert sum("CroniterBadDateError" in x for x in err) == 1  # once, however often the server logged it


# ------------------------------------------------- the server's lifetime
PARENT = """
import subprocess, sys, time
from flows.prefect_server import tied_command
child = subprocess.Popen(tied_command("http.server", ["--bind", "127.0.0.1", "0"]), start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(child.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.slow  # ~4 s: the quick run stays under 3 minutes; the full suite runs it
def test_a_tied_server_ends_when_the_cli_is_killed_outright(tmp_path):
    """SIGKILL leaves the CLI no chance to stop its Prefect server: the
    watchdog in the server's process (flows.prefect_server, no prctl, no preexec_fn)
    ends the server's process group when its parent is gone."""
    import psutil

    parent = subprocess.Popen([sys.executable, "-c", PARENT], env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
                              stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        deadline = time.time() + 60  # forked; on a loaded box the exec and imports take a while
        while "flows.prefect_server" not in " ".join(child.cmdline()) and time.time() < deadline:
            time.sleep(0.2)
        assert "flows.prefect_server" in " ".join(child.cmdline())
        time.sleep(2.0)  # its watchdog is running by now
        assert child.is_running()  # alive while its parent is
        parent.kill()
        parent.wait(timeout=10)
        child.wait(timeout=30)  # raises psutil.TimeoutExpired if it outlives its parent
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_cron_expression_has_exactly_five_fields():
    """croniter (and Prefect) read a sixth field as seconds: "0 3 * * 0 5"
    would fire at 03:00:05, not what a five-field reader means."""
    with pytest.raises(ValueError, match="has 6 fields"):
        cron_next_run("0 3 * * 0 5", after=START)
    assert cron_next_run("0 3 * * 0", after=START) == datetime.datetime(2026, 1, 4, 3, 0)


# ------------------------------------------------- runs missed between sessions
def test_a_served_again_schedule_runs_one_missed_run_with_its_parameters_and_cancels_the_rest(prefect_api):
    """A helper's finding: restarting `shrinkflow schedule` ran all of the
    earlier session's Late runs, one after the other, with that session's
    wait_for_project_s. Of the past-due waiting runs (Scheduled or Late) of
    a served deployment, the newest is kept (one catch-up run) with the
    parameters given, and the others are cancelled with the reason, over
    more than a page of the API's answers; a future run, a running or
    finished one, and another deployment's past-due run are left as they
    are; a deployment the server does not have is skipped."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Late, Running, Scheduled

    from flows.prefect_server import thin_missed_runs

    now = datetime.datetime.now(datetime.timezone.utc)
    past, future = now - datetime.timedelta(hours=2), now + datetime.timedelta(hours=2)
    newest = past + datetime.timedelta(minutes=5)
    tag = uuid.uuid4().hex[:8]  # the harness's API is shared by the session: names of this test's own
    old = {"project_dir": "/p", "wait_for_project_s": 60}
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(f"shrinkflow-monitor-{tag}")
        served = client.create_deployment(flow_id=flow_id, name="scheduled")
        other = client.create_deployment(flow_id=flow_id, name="elsewhere")
        runs = {what: client.create_flow_run_from_deployment(dep, state=state, name=f"{what}-{tag}", parameters=old)
                for what, dep, state in (("scheduled-past", served, Scheduled(scheduled_time=past)),
                                         ("late", served, Late(scheduled_time=newest)),
                                         ("future", served, Scheduled(scheduled_time=future)),
                                         ("running", served, Running()),
                                         ("done", served, Completed()),
                                         ("other-past", other, Scheduled(scheduled_time=past)))}
        # more than a page of the API's answers (50): a laptop shut for a day on a 30-minute schedule
        extra = [client.create_flow_run_from_deployment(served, state=Scheduled(
            scheduled_time=past - datetime.timedelta(minutes=30 * (i + 1))), name=f"older-{i}-{tag}")
            for i in range(52)]
        name = f"shrinkflow-monitor-{tag}/scheduled"
        got = thin_missed_runs(client, [name, "no-such-flow/scheduled"], why="nothing served it",
                               parameters={"wait_for_project_s": 1800})
        after = {what: client.read_flow_run(r.id) for what, r in runs.items()}
        assert all(client.read_flow_run(r.id).state.type.value == "CANCELLED" for r in extra)
        # once thinned, one run is left, and nothing to cancel
        assert thin_missed_runs(client, [name], why="nothing served it") == [
            f"{name}: 0 missed run(s) Cancelled (due while nothing served it); the newest, late-{tag}, "
            f"due {newest:%Y-%m-%d %H:%M:%S} UTC, runs now"]
    assert got == [f"{name}: 53 missed run(s) Cancelled (due while nothing served it); the newest, late-{tag}, "
                   f"due {newest:%Y-%m-%d %H:%M:%S} UTC, runs now with this session's parameters"]
    assert {w: r.state.type.value for w, r in after.items()} == {
        "scheduled-past": "CANCELLED", "late": "SCHEDULED", "future": "SCHEDULED", "running": "RUNNING",
        "done": "COMPLETED", "other-past": "SCHEDULED"}
    assert after["late"].parameters == {"project_dir": "/p", "wait_for_project_s": 1800}
    assert after["other-past"].parameters == after["future"].parameters == old
    assert after["scheduled-past"].state.message == (
        f"missed: due {past:%Y-%m-%d %H:%M:%S} UTC while nothing served it; the newest missed run of {name} "
        "ran instead")


def test_a_served_again_schedule_marks_crashed_the_runs_whose_process_is_gone(prefect_api):
    """A helper's finding: a run killed with `shrinkflow schedule` (kill -9)
    could not report its end to the local server, which died with it, and
    stayed Running. Served again, the schedule marks Crashed the in-flight
    runs of its deployments whose process is gone, and leaves one whose
    process lives, a finished run and another deployment's run alone."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Pending, Running

    from flows.prefect_server import crash_lost_runs

    tag = uuid.uuid4().hex[:8]
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(f"shrinkflow-lifecycle-{tag}")
        served = client.create_deployment(flow_id=flow_id, name="scheduled")
        other = client.create_deployment(flow_id=flow_id, name="elsewhere")
        runs = {what: client.create_flow_run_from_deployment(dep, state=state, name=f"{what}-{tag}")
                for what, dep, state in (("dead", served, Running()), ("pending", served, Pending()),
                                         ("alive", served, Running()), ("done", served, Completed()),
                                         ("other", other, Running()))}
        live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                env={**os.environ, "PREFECT__FLOW_RUN_ID": str(runs["alive"].id)})
        try:
            for what, pid in (("dead", gone), ("alive", live.pid), ("other", gone)):
                client.update_flow_run(runs[what].id, infrastructure_pid=f"host:{pid}")
            name = f"shrinkflow-lifecycle-{tag}/scheduled"
            got = crash_lost_runs(client, [name, "no-such-flow/scheduled"], why="it ended with its scheduler")
            after = {what: client.read_flow_run(r.id).state for what, r in runs.items()}
        finally:
            live.kill()
            live.wait()
    assert sorted(got) == sorted([
        f"{name}: dead-{tag} was Running with its process gone (it ended with its scheduler): marked Crashed",
        f"{name}: pending-{tag} was Pending with its process gone (it ended with its scheduler): marked Crashed"])
    assert {w: st.type.value for w, st in after.items()} == {
        "dead": "CRASHED", "pending": "CRASHED", "alive": "RUNNING", "done": "COMPLETED", "other": "RUNNING"}
    assert after["dead"].message == (f"its process (pid {gone}) is gone: it ended with its scheduler; marked "
                                     "Crashed when the schedule was served again")


SCHEDULER = """
import os, subprocess, sys, time
from flows.prefect_server import SCHEDULER_PID_ENV
os.environ[SCHEDULER_PID_ENV] = str(os.getpid())
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(child.pid, flush=True)
time.sleep(600)
"""
RUN = """
import os, subprocess, sys, threading, time
from flows.prefect_server import tie_to_scheduler
tied = tie_to_scheduler(poll_s=0.2, grace_s=10)
stage = []

def task():   # a Prefect task's thread reading a stage's output, as shrinkflow.dvcrun.repro_stage does
    proc = subprocess.Popen(["sh", "-c", "sleep 600; echo done"], stdout=subprocess.PIPE, text=True)
    stage.append(proc.pid)
    for _ in proc.stdout:
        pass

threading.Thread(target=task, daemon=True).start()
try:
    while not stage:
        time.sleep(0.05)
    with open(sys.argv[1] + ".started.tmp", "w") as f:   # whole, or not there (the suite once read it empty)
        f.write(f"{tied} {stage[0]}")
    os.replace(sys.argv[1] + ".started.tmp", sys.argv[1] + ".started")
    time.sleep(600)                    # a blocking call, as a wait for the project is
except KeyboardInterrupt:
    open(sys.argv[1], "w").write("unwound")
    time.sleep(600)                    # the thread still reads: only the watchdog ends it
"""


@pytest.mark.slow  # ~5 s
def test_a_scheduled_run_unwinds_when_its_scheduler_is_killed_outright(tmp_path):
    """A helper's finding: kill -9 of `shrinkflow schedule` left its
    in-flight flow-run process running for minutes. A run whose parent is
    the scheduler that set SHRINKFLOW_SCHEDULER_PID is tied to it: when the
    scheduler dies, it is interrupted as Ctrl-C would (KeyboardInterrupt
    unwinds it, out of a blocking call) and ends. A run started any other
    way is not tied. The process a task's thread reads (a stage's DVC) is
    stopped too: the interrupt reaches only the main thread."""
    import psutil

    marker = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    scheduler = subprocess.Popen([sys.executable, "-c", SCHEDULER, RUN, str(marker)], env=env,
                                 stdout=subprocess.PIPE, text=True)
    try:
        run = psutil.Process(int(scheduler.stdout.readline()))
        deadline = time.time() + 60
        while not (tmp_path / "run.started").exists() and time.time() < deadline:
            time.sleep(0.1)
        tied, stage = (tmp_path / "run.started").read_text().split()
        assert tied == "True"
        stage = psutil.Process(int(stage))
        time.sleep(1.0)
        assert run.is_running() and stage.is_running() and not marker.exists()   # alive while its scheduler is
        scheduler.kill()
        scheduler.wait(timeout=10)
        # the stage a worker thread read is stopped too (a helper's finding: it ran on, holding the project)
        stage.wait(timeout=20)
        assert marker.read_text() == "unwound"
        run.wait(timeout=45)                               # raises psutil.TimeoutExpired if it outlives it
    finally:
        if scheduler.poll() is None:
            scheduler.kill()
    # not started by a scheduler (the variable names another process, or none)
    plain = subprocess.run([sys.executable, "-c", RUN.replace("    time.sleep(600)", "    pass"),
                            str(tmp_path / "plain")], env={**env, "SHRINKFLOW_SCHEDULER_PID": "1"}, timeout=60)
    assert plain.returncode == 0 and (tmp_path / "plain.started").read_text().startswith("False ")


SLOW_STAGE = "sleep 300 && echo done"


def slow_stage_project(tmp_path) -> tuple:
    """A git and DVC project whose one stage runs for 5 minutes, and the
    environment to serve it with a 5-second scheduler loop: (root, env)."""
    root = bare_project(tmp_path)
    (root / "dvc.yaml").write_text(f"stages:\n  fetch:\n    cmd: {SLOW_STAGE} > out.txt\n"
                                   "    outs:\n      - out.txt\n")
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, env=cli_env())
    return root, {**cli_env(), "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
                  "PREFECT_RUNNER_POLL_FREQUENCY": "2"}


def stage_commands() -> list:
    """The processes running the slow stage's command."""
    import psutil

    return [p for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and SLOW_STAGE in " ".join(p.info["cmdline"])]


def wait_for_stage(proc, out: list[str], timeout_s: float = 180) -> list:
    """The slow stage's processes once the scheduled run has started it;
    fails when ``proc`` (the schedule) exits or none starts in time."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and not stage_commands():
        time.sleep(1)
        assert proc.poll() is None, "".join(out)
    stage = stage_commands()
    assert stage, "".join(out)
    return stage


@pytest.mark.slow  # ~40 s: a real Prefect server, a scheduled run
def test_kill_9_of_schedule_ends_its_run_and_the_stage_it_runs(tmp_path):
    """The same through the real CLI, in a git and DVC project whose first
    stage runs for minutes: `kill -9` of `shrinkflow schedule` while the
    scheduled lifecycle runs that stage ends the stage's command (a task's
    thread reads it, which the interrupt does not reach: a helper's
    finding, the stage ran on 2 minutes holding the project), the run's
    process, and frees the project. Served again, the schedule marks the
    run Crashed: it could not report its end."""
    import httpx
    import psutil

    from shrinkflow.projectlock import project_lock

    root, env = slow_stage_project(tmp_path)

    def serve() -> tuple[subprocess.Popen, list[str]]:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "schedule", "--interval", "5",
                                 "--monitor-interval", "86400"], cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        out: list[str] = []
        threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")), daemon=True).start()
        return proc, out

    proc, out = serve()
    try:
        stage = wait_for_stage(proc, out)
        api = next(m.group(1) for m in (re.search(r"\(API (http://\S+/api)\)", x) for x in out) if m)
        running = [x["id"] for x in httpx.post(f"{api}/flow_runs/filter", json={"flows": {"name": {"any_": [
            "shrinkflow-lifecycle"]}}}, timeout=10).json() if x["state_type"] == "RUNNING"]
        assert len(running) == 1, running
        runs = [c for c in psutil.Process(proc.pid).children(recursive=True)
                if "prefect.engine" in cmdline_of(c)]
        assert runs, [cmdline_of(c) for c in psutil.Process(proc.pid).children(recursive=True)]
        proc.kill()
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs(stage + runs, timeout=45)
        assert not alive, [cmdline_of(p) for p in alive]
        with project_lock(root, "the test"):   # free: nothing of the run holds it
            pass
        assert not (root / "out.txt").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in stage_commands():
            p.kill()
    proc, out = serve()   # served again: the killed run is marked Crashed
    try:
        deadline, line = time.time() + 120, None
        while time.time() < deadline and not line:
            time.sleep(1)
            line = next((x for x in out if "with its process gone" in x), None)
            assert proc.poll() is None, "".join(out)
        assert line and "shrinkflow-lifecycle/scheduled: " in line and "was Running" in line, "".join(out)
        api = next(m.group(1) for m in (re.search(r"\(API (http://\S+/api)\)", x) for x in out) if m)
        assert httpx.get(f"{api}/flow_runs/{running[0]}", timeout=10).json()["state_type"] == "CRASHED"
    finally:
        # killed outright too: its tied catch-up run and that run's stage end with it. (A SIGTERM here took
        # over 90 s to end `schedule` in one suite run while the catch-up run's stage ran: see docs/operations.md.)
        proc.kill()
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(stage_commands(), timeout=45)
        for p in alive:
            p.kill()
        assert not alive, "the catch-up run's stage outlived its killed scheduler"


@pytest.mark.slow  # ~25 s: a real Prefect server, a scheduled run
def test_sigterm_of_schedule_mid_stage_ends_the_run_the_stage_and_the_server_quietly(tmp_path):
    """SIGTERM (systemd, docker stop) to `shrinkflow schedule` alone while its
    scheduled lifecycle runs a 5-minute DVC stage: `schedule` exits 0 within
    a minute (about 6 s here), the stage's command and the run's process end,
    the project is free, and the runner's last log records reach the server
    before it stops (a helper's finding: "--- Error logging to API --- All
    connection attempts failed" after "stopped the local Prefect server")."""
    import psutil

    from shrinkflow.projectlock import project_lock

    root, env = slow_stage_project(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "schedule", "--interval", "5",
                             "--monitor-interval", "86400"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()

    try:
        stage = wait_for_stage(proc, out)
        runs = [c for c in psutil.Process(proc.pid).children(recursive=True)
                if "prefect.engine" in cmdline_of(c)]
        assert runs
        time.sleep(2)
        started = time.time()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=90)
        took = time.time() - started
        _, alive = psutil.wait_procs(stage + runs, timeout=30)
        assert not alive, [cmdline_of(p) for p in alive]
        with project_lock(root, "the test"):
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in stage_commands():
            p.kill()
    reader.join(timeout=10)
    text = "".join(out)
    assert rc == 0 and took < 60, (rc, took, text[-3000:])
    assert "stopped the local Prefect server" in text and "Error logging to API" not in text, text[-3000:]
    assert not (root / "out.txt").exists()


# ------------------------------------------------- schedule and team up
HOLD_SCHEDULE = """
import sys, time
from shrinkflow.projectlock import hold_scheduler
hold_scheduler(sys.argv[1], *sys.argv[2:])
print("held", flush=True)
time.sleep(600)
"""


def test_schedule_and_team_up_refuse_to_serve_a_project_the_other_serves(tmp_path):
    """A helper's finding: `team up` and `shrinkflow schedule` did not know
    of each other, and both served one project's schedules (every run
    twice). Each now refuses, exit 2, naming the other, and starts nothing;
    once the other is gone, the check passes."""
    import json

    import psutil

    root = bare_project(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SCHEDULE, str(root)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        up = subprocess.run([sys.executable, "-m", "flows.cli", "team", "up"], cwd=root, env=cli_env(),
                            capture_output=True, text=True, timeout=120)
        assert up.returncode == 2, up.stdout + up.stderr
        assert f"`shrinkflow schedule` (pid {holder.pid}, since " in up.stderr
        assert "already serves this project's schedules" in up.stderr and "Nothing was started" in up.stderr
        assert not (root / ".shrinkflow" / "team" / "postgres").exists()
    finally:
        holder.kill()
        holder.wait()
    from shrinkflow.projectlock import scheduler_holder

    assert scheduler_holder(root) is None   # its lock went with it
    # a `team up` still starting (no worker yet) holds the same lock: a `schedule` started then is refused
    # (a helper's finding: it served the project beside the stack once the worker came up)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SCHEDULE, str(root), "shrinkflow team up"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        sched = subprocess.run([sys.executable, "-m", "flows.cli", "schedule", "--monitor-interval", "86400"],
                               cwd=root, env=cli_env(), capture_output=True, text=True, timeout=120)
        assert sched.returncode == 2, sched.stdout + sched.stderr
        assert f"`shrinkflow team up` (pid {holder.pid}, since " in sched.stderr
        assert not (root / ".prefect").exists()
    finally:
        holder.kill()
        holder.wait()

    # a team worker of this project runs (its pid file names a live process started when it says)
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        team = root / ".shrinkflow" / "team"
        team.mkdir(parents=True, exist_ok=True)
        (team / "worker.pid").write_text(json.dumps({"pid": worker.pid,
                                                     "create_time": psutil.Process(worker.pid).create_time()}))
        sched = subprocess.run([sys.executable, "-m", "flows.cli", "schedule", "--monitor-interval", "86400"],
                               cwd=root, env=cli_env(), capture_output=True, text=True, timeout=120)
        assert sched.returncode == 2, sched.stdout + sched.stderr
        assert f"`shrinkflow team up` serves this project's schedules ({root}): its worker runs (pid {worker.pid})" \
            in sched.stderr
        assert not (root / ".prefect").exists() and "Prefect UI" not in sched.stdout
    finally:
        worker.kill()
        worker.wait()


@pytest.mark.slow  # ~25 s: a real Prefect server, a scheduled run
def test_a_scheduled_run_refused_by_the_project_lock_fails_with_the_reason_not_its_traceback(tmp_path):
    """A helper's finding: a scheduled run refused after its wait (another
    writer held the project) logged the refusal's traceback twice. It ends
    Failed now, its message the reason, and the refusal's traceback is not
    printed (Prefect's engine still logs one for every Failed run, its own
    FailedRun, which carries the reason); the scheduler serves on."""
    import httpx

    from shrinkflow.projectlock import project_lock

    root = bare_project(tmp_path)
    text = (root / "params.yaml").read_text()
    assert "scheduled_wait_minutes: 30" in text
    (root / "params.yaml").write_text(text.replace("scheduled_wait_minutes: 30", "scheduled_wait_minutes: 0"))
    env = {**cli_env(), "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5", "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    with project_lock(root, "the test (another writer)"):
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "schedule", "--interval", "5",
                                 "--monitor-interval", "86400"], cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        out: list[str] = []
        threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")), daemon=True).start()
        try:
            deadline, api, failed = time.time() + 180, None, []
            while time.time() < deadline and not failed:
                time.sleep(1)
                assert proc.poll() is None, "".join(out)
                api = api or next((m.group(1) for m in (re.search(r"\(API (http://\S+/api)\)", x) for x in out)
                                   if m), None)
                if api:
                    r = httpx.post(f"{api}/flow_runs/filter", json={"flows": {"name": {"any_": [
                        "shrinkflow-lifecycle"]}}}, timeout=10)
                    failed = [x for x in r.json() if x["state_type"] == "FAILED"]
            assert failed, "".join(out)
            time.sleep(2)   # what the run printed on its way out
            message = failed[0]["state"]["message"]
            assert message.startswith("refused: the test (another writer) (pid ") and "is changing this project" \
                in message, message
            assert proc.poll() is None   # serving on
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=90)
    text = "".join(out)
    assert "refused: the test (another writer)" in text
    assert "Encountered exception during execution" not in text and "projectlock.py" not in text, text[-4000:]
    assert "ProjectBusy" not in text, text[-4000:]
    # One traceback at most per refused run: Prefect's engine's own FailedRun,
    # carrying the reason. (The 5 s schedule may start a second run before the
    # SIGTERM lands, seen in a fresh-clone suite: two refused runs, two such.)
    refused = text.count("Finished in state Failed('refused: the test (another writer)")
    tracebacks = text.split("Traceback (most recent call last):")[1:]
    assert 1 <= refused and len(tracebacks) <= refused, text[-4000:]
    for tb in tracebacks:
        raised = next(line for line in tb.splitlines() if line and not line.startswith((" ", "\t")))
        assert raised.startswith("prefect.exceptions.FailedRun: refused: the test (another writer)"), tb[-2000:]
