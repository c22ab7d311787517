"""``shrinkflow`` console script.

Exit codes of ``run``: 0 deployed; 1 no candidate passed its gates (a
normal outcome, not a crash); 2 bad params or usage; 3 anything that crashed
(a stage, a missing file, Prefect failing to start, a deploy that leaves
nothing in production). Prefect is imported only after params are validated,
so a bad params file writes nothing (not even Prefect's database).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from shrinkflow.config import ParamsError, load_params
from shrinkflow.entry import configure_env
from shrinkflow.paths import PREFECT_HOME, STATE

EXIT_DEPLOYED, EXIT_NOT_DEPLOYED, EXIT_USAGE, EXIT_CRASH = 0, 1, 2, 3

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="shrinkflow: train large, then compress. Runs the lifecycle through DVC and Prefect.")


def _project_root() -> Path:
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").is_file():
            return d
    typer.echo(f"error: {here} is not inside a shrinkflow project (no dvc.yaml found)", err=True)
    raise typer.Exit(2)


def _validated(root: Path, params: Optional[Path]):
    path = params if params is not None else root / "params.yaml"
    try:
        return path, load_params(path)
    except ParamsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)


def _configure_env(root: Path) -> None:
    # Telemetry off; Prefect's state (database, logs) inside the project.
    configure_env(root)


@app.command()
def run(params: Optional[Path] = typer.Option(None, "--params", help="params file (default: params.yaml)")):
    """Run the lifecycle flow: DVC stages train -> compress -> validate -> deploy."""
    root = _project_root()
    path, parsed = _validated(root, params)
    target = root / "params.yaml"
    if path.resolve() != target.resolve():
        # DVC tracks params.yaml; a run on another file makes it the params.
        if target.is_file() and target.read_bytes() != path.read_bytes():
            backup = root / STATE / "params.previous.yaml"
            backup.parent.mkdir(exist_ok=True)
            shutil.copyfile(target, backup)
            typer.echo(f"params.yaml replaced by {path} (previous copy: {backup.relative_to(root)})")
        shutil.copyfile(path, target)
    _configure_env(root)
    try:
        from flows.lifecycle import lifecycle

        result = lifecycle(project_dir=str(root))
    except Exception as exc:  # noqa: BLE001 - every crash is exit 3, with its reason
        typer.echo(f"\nerror: {_crash_message(exc)}", err=True)
        raise typer.Exit(EXIT_CRASH)
    _print_summary(root, parsed, result)
    raise typer.Exit(EXIT_DEPLOYED if result["deployed_version"] else EXIT_NOT_DEPLOYED)


def _crash_message(exc: BaseException, what: str = "the lifecycle") -> str:
    """The one message a crash prints: what failed (``what``: "the
    lifecycle", "the monitor", ...) and why, so that a monitor failure never
    reads as the lifecycle's."""
    from shrinkflow.errors import DeploymentMissing, ParamsChanged
    from shrinkflow.pipeline import StageFailed
    from shrinkflow.predlog import PredictionLogError

    if isinstance(exc, PredictionLogError):
        # Already names the log, its path and the cause (and, from the
        # monitor, the monitor).
        return str(exc) if str(exc).startswith(what) else f"{what} could not run: {exc}"
    if isinstance(exc, (StageFailed, DeploymentMissing, ParamsChanged)):
        return f"{what} failed: {exc}"
    if isinstance(exc, FileNotFoundError):
        return f"{what} could not run: missing file: {exc}"
    # Anything else happened outside a stage: most often Prefect itself (an
    # API that cannot start or be reached). Name it with its type.
    return f"{what} could not run: {type(exc).__name__}: {exc}"


def _print_summary(root: Path, parsed, result: dict) -> None:
    from shrinkflow.gates import GateReport

    stages = ", ".join(f"{s}={r['status']}" for s, r in result["stages"].items())
    out = ["", "=" * 72, f"stages: {stages}"]
    if result["deployed_version"]:
        out.append(f"DEPLOYED {result['deployed_version']} (candidate {result['selected']!r}) "
                   f"-> {parsed.deploy.registry_dir}/versions/{result['deployed_version']}")
    else:
        out.append("NOT DEPLOYED: no candidate passed every gate; production is unchanged.")
        for name, d in result["gates"]["candidates"].items():
            rep = GateReport.from_dict(d)
            for f in rep.failures:
                out.append(f"  {name} (val): {f.describe()}")
        conf = result["gates"].get("confirmation")
        if conf and not conf["passed"]:
            for f in GateReport.from_dict(conf["gates"]).failures:
                out.append(f"  {conf['candidate']} (test confirmation): {f.describe()}")
    out += [f"metrics and gates: reports/gates.md, metrics/validate.json (or `dvc metrics show`)",
            f"Prefect flow run: {result['flow_run_name']} ({result['flow_run_id']}), "
            f"artifact 'shrinkflow-lifecycle'",
            f"  browse it: PREFECT_HOME={os.environ.get('PREFECT_HOME')} prefect server start",
            "status: shrinkflow status --json", "=" * 72]
    typer.echo("\n".join(out))


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="print JSON"),
           params: Optional[Path] = typer.Option(None, "--params")):
    """Show the deployed (production) version: test figures, gates, lineage."""
    from shrinkflow.errors import RegistryError
    from shrinkflow.registry import Registry
    from shrinkflow.status import status_document

    root = _project_root()
    _, parsed = _validated(root, params)
    try:
        doc = status_document(Registry(root / parsed.deploy.registry_dir))
    except RegistryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CRASH)
    if as_json:
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))
    elif doc["deployed"] is None:
        typer.echo(doc["message"])
    else:
        d, t = doc["deployed"], doc["teacher"]["metrics"]
        typer.echo(f"production: {d['version']} ({d['candidate']}), deployed {d['created_at']}; "
                   f"files {d['integrity']}")
        labels = d.get("labels")
        typer.echo(f"  labels ({len(labels)}): {', '.join(labels)}" if labels else "  labels: not recorded")
        typer.echo(f"  figures on the {d['metrics']['split']} split ({d['metrics']['n']} sentences; the "
                   f"candidate was selected on {d['selection_metrics']['split']}):")
        # macro-F1 and f1 are absent from versions deployed before they were
        # recorded; f1 (of class 1) exists for two classes only
        for k in ("accuracy", "macro_f1", "f1", "latency_ms_p95_b1", "size_mb", "peak_rss_mb"):
            if d["metrics"].get(k) is not None:
                typer.echo(f"  {k:<20} {d['metrics'][k]:>10.4g}   teacher {t[k]:>10.4g}")
        mm = d["metrics"]
        typer.echo(f"  accuracy drop        {mm['accuracy_drop']:>+10.4f}   {mm['confidence']:.0%} interval "
                   f"[{mm['accuracy_drop_ci_low']:+.4f}, {mm['accuracy_drop_ci_high']:+.4f}], "
                   f"McNemar p={mm['mcnemar_p']:.3g}")
        if "macro_f1_drop" in mm:
            typer.echo(f"  macro-F1 drop        {mm['macro_f1_drop']:>+10.4f}   {mm['confidence']:.0%} bootstrap "
                       f"interval [{mm['macro_f1_drop_ci_low']:+.4f}, {mm['macro_f1_drop_ci_high']:+.4f}]")
        if mm.get("per_class_recall"):
            tr = t.get("per_class_recall") or {}
            typer.echo("  recall by class (test): " + "; ".join(
                f"{c} {r:.3f}" + (f" (teacher {tr[c]:.3f})" if tr.get(c) is not None else "")
                for c, r in mm["per_class_recall"].items() if r is not None))
        typer.echo(f"  teacher agreement    {mm['agreement']['test']:>10.4f}")
        typer.echo("  gates: " + ", ".join(
            f"{n}={'pass' if g['passed'] else ('FAIL' if g.get('enforced', True) else 'not met')}"
            for n, g in d["gates"].items()))
        for n, g in d["gates"].items():
            if not g["passed"] and not g.get("enforced", True):
                typer.echo(f"    {n}: {g['value']:.4g} (threshold {g['threshold']:.4g}): {g.get('note', '')}")
        if d.get("roi"):
            from shrinkflow.cost import roi_lines

            typer.echo("  cost and return of compressing:")
            for line in roi_lines(d["roi"]):
                typer.echo(f"    {line}")
        window = (d.get("lineage") or {}).get("window")
        if window:  # a re-compression: which production window, asked for by which monitor run
            typer.echo(f"  re-compressed on a production window: {window.get('rows_distill')} texts distilled, "
                       f"{window.get('rows_heldout')} held out (md5 {window.get('texts_md5')}); monitor run "
                       f"{window.get('monitor_flow_run')}, triggers {', '.join(window.get('triggers') or [])}")
        if not d["integrity"] == "verified":
            raise typer.Exit(EXIT_CRASH)


@app.command()
def serve(host: Optional[str] = typer.Option(None, "--host", help="default: serve.host (127.0.0.1)"),
          port: Optional[int] = typer.Option(None, "--port", help="default: serve.port"),
          workers: int = typer.Option(1, "--workers", min=1, help="uvicorn worker processes")):
    """Serve the registry's production version over HTTP (FastAPI + uvicorn)."""
    import uvicorn

    from shrinkflow.errors import IntegrityError, RegistryError
    from shrinkflow.httpedge import PROTOCOL
    from shrinkflow.predlog import PredictionLog, PredictionLogError
    from shrinkflow.registry import Registry
    from shrinkflow.serving import TOKEN_ENV, make_app

    root = _project_root()
    _, parsed = _validated(root, None)
    _configure_env(root)
    sp = parsed.serve
    registry = Registry(root / parsed.deploy.registry_dir)
    try:  # refuse to start rather than fail on the first request
        from shrinkflow.serving import model_labels

        model_labels(registry.load().path, registry.alias() or "")   # no label names: nothing to answer with
        # The log too: locked or unwritable, say so here, not in a traceback
        # from inside uvicorn's startup.
        PredictionLog(root / sp.log_path).open()
    except (RegistryError, IntegrityError, PredictionLogError) as exc:
        typer.echo(f"error: cannot serve: {exc}", err=True)
        raise typer.Exit(EXIT_CRASH)
    host, port = host or sp.host, port or sp.port
    typer.echo(f"serving {registry.alias()} from {registry.root} on http://{host}:{port} "
               f"(docs at /docs, monitoring reports at /reports/; prediction log {root / sp.log_path})")
    # The HTTP edge (shrinkflow/httpedge.py): header size and count limits and
    # a request deadline, which uvicorn's default protocol does not have; no
    # WebSockets (the API has none, and an upgraded connection would escape
    # those limits). The limits come from the app (serve: in params.yaml).
    edge = {"http": PROTOCOL, "ws": "none", "log_level": "warning"}
    if workers > 1:
        os.environ["SHRINKFLOW_PROJECT"] = str(root)
        uvicorn.run("shrinkflow.serving:app_from_env", factory=True, host=host, port=port, workers=workers, **edge)
        return
    app_ = make_app(registry, PredictionLog(root / sp.log_path), sp, reports_dir=root / parsed.monitor.reports_dir,
                    token=os.environ.get(TOKEN_ENV) or None)
    uvicorn.run(app_, host=host, port=port, **edge)


@app.command()
def rollback(to: Optional[str] = typer.Option(None, "--to", help="version to make production (default: the "
                                                                   "previous production version)")):
    """Move production back atomically (recorded in the registry's history)."""
    from shrinkflow.errors import IntegrityError, RegistryError
    from shrinkflow.registry import Registry

    root = _project_root()
    _, parsed = _validated(root, None)
    registry = Registry(root / parsed.deploy.registry_dir)
    try:
        done = registry.rollback(to)
    except RegistryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE)
    except IntegrityError as exc:
        typer.echo(f"error: refusing to roll back to a corrupted version: {exc}", err=True)
        raise typer.Exit(EXIT_CRASH)
    typer.echo(f"production: {done.previous} -> {done.version}")


@app.command()
def versions(as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """List every version: key figures, when it was live, and which is live now."""
    from shrinkflow.registry import Registry

    root = _project_root()
    _, parsed = _validated(root, None)
    rows = Registry(root / parsed.deploy.registry_dir).describe_versions()
    if as_json:
        typer.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    if not rows:
        typer.echo("no versions yet: run `shrinkflow run`")
        return
    typer.echo(f"{'':2}{'version':<8} {'candidate':<22} {'test acc':>8} {'p95 b1 ms':>9} {'MB':>6}  live")
    for r in rows:
        m = r["metrics"]

        def num(x, fmt):
            return format(x, fmt) if isinstance(x, (int, float)) else "-"

        live = "; ".join(f"{p['from']} .. {p['to'] or 'now'}" for p in r["live"]) or "never"
        typer.echo(f"{'*' if r['production'] else ' ':2}{r['version']:<8} {str(r['candidate']):<22} "
                   f"{num(m['accuracy'], '8.4f')} {num(m['latency_ms_p95_b1'], '9.2f')} {num(m['size_mb'], '6.1f')}  "
                   f"{live}" + (f"  (same files as {r['same_model_as']})" if r["same_model_as"] else ""))


def _schedule_of(cron: Optional[str], interval: Optional[int], p_cron: Optional[str],
                 p_minutes: Optional[int], flag: str) -> tuple[Optional[str], Optional[int]]:
    """Flags override params; exactly one of cron and interval (seconds).

    A cron that Prefect would refuse, or that has no next run at all (31
    February: Prefect accepts it, then its scheduler logs an error every
    minute and never starts a run), exits 2 naming it, before Prefect is
    imported or anything is started. Params crons were checked the same way
    when params.yaml was loaded (``MonitorParams``)."""
    from shrinkflow.config import cron_next_run

    if cron is not None and interval is not None:
        typer.echo(f"error: give exactly one of --{flag}cron or --{flag}interval", err=True)
        raise typer.Exit(EXIT_USAGE)
    if cron is None and interval is None:
        cron, interval = p_cron, (p_minutes * 60 if p_minutes else None)
    if cron is not None:
        try:  # the scheduler's own cron library, before anything is started
            cron_next_run(cron)
        except ValueError as exc:
            typer.echo(f"error: --{flag}cron {exc}", err=True)  # exc starts with the expression
            raise typer.Exit(EXIT_USAGE)
    return cron, interval


@app.command()
def schedule(cron: Optional[str] = typer.Option(None, "--cron", help='lifecycle cron, e.g. "0 3 * * 0" '
                                                "(default: monitor.lifecycle_cron / lifecycle_interval_minutes)"),
             interval: Optional[int] = typer.Option(None, "--interval", min=1, help="lifecycle: seconds between runs"),
             monitor_cron: Optional[str] = typer.Option(None, "--monitor-cron", help="monitor cron (default: "
                                                        "monitor.cron / interval_minutes)"),
             monitor_interval: Optional[int] = typer.Option(None, "--monitor-interval", min=1,
                                                            help="monitor: seconds between runs"),
             name: str = typer.Option("scheduled", "--name", help="deployment name (both flows)")):
    """Serve the lifecycle and the monitor as Prefect deployments, each on its
    own schedule, in one process (Ctrl-C stops).

    With no PREFECT_API_URL set, a local Prefect server (with the scheduler
    that turns schedules into runs) is started first, its state in .prefect/,
    and stopped on the way out. A lifecycle run is a full `shrinkflow run`
    (DVC skips what is unchanged); a monitor run reports on the prediction
    log and re-compresses when the policy says so. One run at a time.

    A cron with no next run (31 February) exits 2 before anything starts.
    The scheduler's errors happen inside the server: the local server's log
    is followed and its errors echoed to stderr (each kind once); for any
    server, external ones included, each deployment is checked 90 s after it
    is served to have a scheduled run, and a warning names the one without.
    """
    root = _project_root()
    _, parsed = _validated(root, None)
    m = parsed.monitor
    # Checked before the environment is set up or Prefect imported: a schedule
    # that cannot run starts nothing and writes nothing (no .prefect/).
    cron, interval = _schedule_of(cron, interval, m.lifecycle_cron, m.lifecycle_interval_minutes, "")
    monitor_cron, monitor_interval = _schedule_of(monitor_cron, monitor_interval, m.cron, m.interval_minutes,
                                                  "monitor-")
    _configure_env(root)
    import signal

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.server import LocalPrefectServer, ScheduleWatch, ServerLogFollower
    from shrinkflow.config import cron_next_run

    def _stop(signum, frame):  # SIGTERM stops like Ctrl-C: runner first, then the server
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    server = follower = watch = None
    api_url = os.environ.get("PREFECT_API_URL")

    def warn(line: str) -> None:
        typer.echo(line, err=True)

    try:
        if not api_url:
            server = LocalPrefectServer(root / PREFECT_HOME)
            typer.echo(f"starting a local Prefect server (state in {PREFECT_HOME}/, log {server.log_path}) ...")
            server.home.mkdir(parents=True, exist_ok=True)
            follower = ServerLogFollower(server.log_path, emit=warn)  # from the log's end before this start
            api_url = server.start()
            follower.start()
            os.environ["PREFECT_API_URL"] = api_url  # inherited by every run's subprocesses
            typer.echo(f"Prefect UI: {server.url}  (API {api_url}); its errors are echoed here")
        else:
            typer.echo(f"using the Prefect server at {api_url}: its scheduler's errors are in that server's log; "
                       "each deployment is checked for a scheduled run 90 s after it is served")
        from prefect import serve as prefect_serve

        from flows.lifecycle import lifecycle
        from flows.monitor import monitor

        def when(c, i):
            if c:
                return f"cron {c!r}, next run {cron_next_run(c):%Y-%m-%d %H:%M} UTC"
            return f"every {i}s"

        typer.echo(f"serving deployments shrinkflow-lifecycle/{name} ({when(cron, interval)}) and "
                   f"shrinkflow-monitor/{name} ({when(monitor_cron, monitor_interval)}) for {root} "
                   f"against {api_url}; Ctrl-C stops")
        watch = ScheduleWatch(api_url, [f"{lifecycle.name}/{name}", f"{monitor.name}/{name}"], emit=warn).start()
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            prefect_serve(
                lifecycle.to_deployment(name=name, cron=cron, interval=interval,
                                        parameters={"project_dir": str(root)}),
                monitor.to_deployment(name=name, cron=monitor_cron, interval=monitor_interval,
                                      parameters={"project_dir": str(root)}),
                # One run at a time across both: each may run DVC in this
                # workspace (a re-compression is a `dvc repro`), and DVC
                # allows one repro per workspace.
                limit=1, print_starting_message=False)
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # noqa: BLE001
        typer.echo(f"error: {_crash_message(exc, 'the schedule')}", err=True)
        raise typer.Exit(EXIT_CRASH)
    finally:
        if watch is not None:
            watch.stop()
        if server is not None:
            server.stop()
            typer.echo("stopped the local Prefect server")
        if follower is not None:
            follower.stop()  # what the server logged while stopping
            if follower.repeats:
                warn(f"(the Prefect server logged {follower.repeats} more errors like those above; "
                     f"see {follower.path})")


class TrafficDomain(str, Enum):
    in_ = "in"
    shifted = "shifted"


@app.command("simulate-traffic")
def simulate_traffic(
        domain: TrafficDomain = typer.Option(..., "--domain", help="in: the test split; shifted: the traffic "
                                             "pool of the shifted split (the user's, or the built-in tweets), "
                                             "never its recovery set"),
        n: int = typer.Option(..., "--n", min=1, help="predictions to request (the pool is cycled if smaller)"),
        feedback_rate: float = typer.Option(0.0, "--feedback-rate", min=0.0, max=1.0,
                                            help="share of answered predictions whose true label is posted"),
        url: Optional[str] = typer.Option(None, "--url", help="default: http://serve.host:serve.port"),
        seed: int = typer.Option(0, "--seed", help="order of the texts and choice of the feedback"),
        concurrency: int = typer.Option(4, "--concurrency", min=1, max=256, help="requests in flight")):
    """Send real texts to a running `shrinkflow serve`, one POST /predict
    each, and post the true label (by name) of a seeded share of the answers
    to /feedback (bearer token from SHRINKFLOW_API_TOKEN when set).
    Exit 0 when every request got 200; 1 when some failed; 2 on bad usage;
    3 when the server cannot be reached or a data file is missing."""
    from shrinkflow.errors import DataError
    from shrinkflow.serving import TOKEN_ENV
    from shrinkflow.traffic import ServerUnreachable, simulate, traffic_order, traffic_pool

    root = _project_root()
    _, parsed = _validated(root, None)
    if url is None:
        # A server bound to every interface is reached on loopback.
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(parsed.serve.host, parsed.serve.host)
        url = f"http://{f'[{host}]' if ':' in host else host}:{parsed.serve.port}"
    from shrinkflow.labels import BUILTIN_LABELS, read_labels
    from shrinkflow.paths import LABELS_JSON

    # The user's task (data.source.kind: files) or the built-in archive.
    kind = getattr(getattr(getattr(parsed, "data", None), "source", None), "kind", None)
    try:
        pool = traffic_pool(domain.value, root, kind)
        # Feedback is posted by name: the names the data stage wrote (the
        # built-in task before labels.json existed: its two).
        names = read_labels(root / LABELS_JSON) if kind == "files" or (root / LABELS_JSON).is_file() \
            else BUILTIN_LABELS
    except (FileNotFoundError, DataError) as exc:
        typer.echo(f"error: cannot read the {domain.value!r} traffic: {exc}", err=True)
        raise typer.Exit(EXIT_CRASH)
    if len(pool) == 0:
        hint = (": this task has no shifted data; set data.source.shifted_path to labelled text of another "
                "domain and run `shrinkflow run`" if domain.value == "shifted" and kind == "files" else "")
        typer.echo(f"error: the {domain.value!r} traffic pool is empty: nothing to send{hint}", err=True)
        raise typer.Exit(EXIT_USAGE if hint else EXIT_CRASH)
    bad = sorted({int(y) for y in pool["label"] if not 0 <= int(y) < len(names)})
    if bad:
        typer.echo(f"error: the {domain.value!r} traffic has class ids {bad} that {LABELS_JSON} "
                   f"({list(names)}) does not name: run `shrinkflow run` to prepare the data again", err=True)
        raise typer.Exit(EXIT_CRASH)
    rows, passes = traffic_order(pool, n, seed)
    what = "test split" if domain.value == "in" else (
        "shifted traffic pool (the recovery set is never sent)" if kind == "files"
        else "shifted traffic pool (tweets; the recovery set is never sent)")
    typer.echo(f"sending {n} texts from the {what}, {len(pool)} texts, to {url}"
               + (f"; n is larger than the pool, so it is cycled ({passes} passes)" if passes > 1 else ""))
    try:
        res = simulate(url, rows["text"].tolist(), [names[int(y)] for y in rows["label"]],
                       feedback_rate=feedback_rate, seed=seed,
                       concurrency=concurrency, token=os.environ.get(TOKEN_ENV) or None)
    except ServerUnreachable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CRASH)

    def counts(c) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(c.items())) or "none"

    sent = rows["label"].astype(int).value_counts(normalize=True)
    typer.echo(f"predict: {res.sent} requests; by status {counts(res.predict_status)}")
    typer.echo("texts sent, by their true label: " + ", ".join(f"{name} {sent.get(k, 0.0):.1%}"
                                                               for k, name in enumerate(names)))
    share = res.feedback_posted / res.answered if res.answered else 0.0
    typer.echo(f"feedback: {res.feedback_posted} labels posted ({share:.1%} of {res.answered} answered predictions; "
               f"asked {feedback_rate:.1%})" + (f"; by status {counts(res.feedback_status)}"
                                                 if res.feedback_status else ""))
    if res.unreachable:
        typer.echo(f"error: the server at {url} stopped answering: {counts(res.predict_status)}", err=True)
        raise typer.Exit(EXIT_CRASH)
    if not res.ok:
        bad = {k: v for k, v in (res.predict_status + res.feedback_status).items() if k != "200"}
        hint = " (401: set SHRINKFLOW_API_TOKEN to the server's token)" if "401" in bad else ""
        typer.echo(f"error: some requests failed: {counts(bad)}{hint}", err=True)
        raise typer.Exit(1)


@app.command()
def window(version: str = typer.Argument(..., help="a registry version, e.g. v0006"),
           out: Path = typer.Option(..., "--out", help="where to write the window's distillation text"),
           heldout: bool = typer.Option(False, "--heldout", help="restore the held-out part instead")):
    """Restore the production window a version was re-compressed on, from the
    DVC-tracked archive (data/windows/), by the md5 in its lineage."""
    from shrinkflow.registry import Registry
    from shrinkflow.window import restore_window

    root = _project_root()
    _, parsed = _validated(root, None)
    try:
        lineage = Registry(root / parsed.deploy.registry_dir).manifest(version).get("lineage") or {}
    except (KeyError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE)
    meta = lineage.get("window")
    if not meta:
        typer.echo(f"error: {version} was not re-compressed on a production window (no window in its lineage)",
                   err=True)
        raise typer.Exit(EXIT_NOT_DEPLOYED)
    md5 = meta["heldout_md5"] if heldout else meta["texts_md5"]
    try:
        path = restore_window(root, md5, out)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CRASH)
    typer.echo(f"{version}: window {md5} ({meta['rows_heldout' if heldout else 'rows_distill']} texts; monitor run "
               f"{meta.get('monitor_flow_run')}) -> {path}")


@app.command("monitor")
def monitor_cmd(act: bool = typer.Option(True, "--act/--report-only",
                                         help="on a recompress verdict, run the re-compression flow"),
                as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Run the monitor once: Evidently reports on the newest prediction-log
    window, the policy's verdict, and (on recompress) re-compression.
    Exit 0 when it ran (any verdict) and any re-compression deployed; 1 when
    a re-compression deployed nothing (gates); 3 on a crash."""
    root = _project_root()
    _validated(root, None)
    _configure_env(root)
    try:
        from flows.monitor import monitor

        result = monitor(project_dir=str(root), act=act)
    except Exception as exc:  # noqa: BLE001
        typer.echo(f"error: {_crash_message(exc, 'the monitor')}", err=True)
        raise typer.Exit(EXIT_CRASH)
    rec = result.get("recompress")
    if as_json:
        typer.echo(json.dumps({k: v for k, v in result.items() if k != "summary"} | {
            "summary": result.get("summary")}, indent=2, default=str))
    else:
        typer.echo(f"verdict: {result['action']}"
                   + (" (not acted on: --report-only; no re-compression, no cooldown started)"
                      if result["action"] == "recompress" and not result.get("acted") else ""))
        for r in result["reasons"]:
            typer.echo(f"  - {r}")
        for n in (result.get("summary") or {}).get("not_computed", []):
            typer.echo(f"  not computed on this window: {n['metric']}: {n['reason']}")
        tr = (result.get("summary") or {}).get("truncation")
        if tr:
            share = "not computed" if tr["share"] is None else f"{tr['share']:.3f} of {tr['known_rows']} rows"
            drift = tr.get("drift")
            typer.echo(f"truncated texts ({tr['strategy']}): window {share}; reference "
                       f"{tr['reference_share']:.3f}" + (f"; drift p={drift['value']:.3g}"
                                                         f"{' (drifted)' if drift['drifted'] else ''}"
                                                         if drift else ""))
        s = result.get("summary") or {}
        if s.get("class_share_reference"):
            cur = s.get("class_share_current") or {}
            typer.echo("class shares (window / reference): " + ", ".join(
                f"{k} {cur[k]:.2f}" if k in cur else f"{k} n/a" for k in s["class_share_reference"])
                + " / " + ", ".join(f"{v:.2f}" for v in s["class_share_reference"].values()))
        if result.get("report_dir"):
            typer.echo(f"reports: {result['report_dir']} (index: {Path(result['report_dir']).parent / 'index.html'})")
        if rec is not None:
            typer.echo(f"re-compression: {'DEPLOYED ' + rec['deployed_version'] if rec['deployed_version'] else 'NOT DEPLOYED'}"
                       f": {rec['reason']}")
    if rec is not None and not rec["deployed_version"]:
        raise typer.Exit(EXIT_NOT_DEPLOYED)


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
