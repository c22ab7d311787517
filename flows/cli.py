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


def _crash_message(exc: BaseException) -> str:
    from shrinkflow.errors import DeploymentMissing, ParamsChanged
    from shrinkflow.pipeline import StageFailed

    if isinstance(exc, (StageFailed, DeploymentMissing, ParamsChanged)):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"missing file: {exc}"
    # Anything else happened outside a stage: most often Prefect itself (an
    # API that cannot start or be reached). Name it with its type.
    return f"the lifecycle could not run: {type(exc).__name__}: {exc}"


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
        typer.echo(f"  figures on the {d['metrics']['split']} split ({d['metrics']['n']} sentences; the "
                   f"candidate was selected on {d['selection_metrics']['split']}):")
        for k in ("accuracy", "f1", "latency_ms_p95_b1", "size_mb", "peak_rss_mb"):
            typer.echo(f"  {k:<20} {d['metrics'][k]:>10.4g}   teacher {t[k]:>10.4g}")
        mm = d["metrics"]
        typer.echo(f"  accuracy drop        {mm['accuracy_drop']:>+10.4f}   {mm['confidence']:.0%} interval "
                   f"[{mm['accuracy_drop_ci_low']:+.4f}, {mm['accuracy_drop_ci_high']:+.4f}]")
        typer.echo(f"  teacher agreement    {mm['agreement']['test']:>10.4f}")
        typer.echo("  gates: " + ", ".join(f"{n}={'pass' if g['passed'] else 'FAIL'}" for n, g in d["gates"].items()))
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
    from shrinkflow.predlog import PredictionLog
    from shrinkflow.registry import Registry
    from shrinkflow.serving import TOKEN_ENV, make_app

    root = _project_root()
    _, parsed = _validated(root, None)
    _configure_env(root)
    sp = parsed.serve
    registry = Registry(root / parsed.deploy.registry_dir)
    try:  # refuse to start rather than fail on the first request
        registry.load()
    except (RegistryError, IntegrityError) as exc:
        typer.echo(f"error: cannot serve: {exc}", err=True)
        raise typer.Exit(EXIT_CRASH)
    host, port = host or sp.host, port or sp.port
    typer.echo(f"serving {registry.alias()} from {registry.root} on http://{host}:{port} "
               f"(docs at /docs, monitoring reports at /reports/; prediction log {root / sp.log_path})")
    if workers > 1:
        os.environ["SHRINKFLOW_PROJECT"] = str(root)
        uvicorn.run("shrinkflow.serving:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level="warning")
        return
    app_ = make_app(registry, PredictionLog(root / sp.log_path), sp, reports_dir=root / parsed.monitor.reports_dir,
                    token=os.environ.get(TOKEN_ENV) or None)
    uvicorn.run(app_, host=host, port=port, log_level="warning")


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
    """Flags override params; exactly one of cron and interval (seconds)."""
    if cron is not None and interval is not None:
        typer.echo(f"error: give exactly one of --{flag}cron or --{flag}interval", err=True)
        raise typer.Exit(EXIT_USAGE)
    if cron is None and interval is None:
        cron, interval = p_cron, (p_minutes * 60 if p_minutes else None)
    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule

        try:  # Prefect's own validation, before anything is started
            CronSchedule(cron=cron)
        except ValueError as exc:
            typer.echo(f"error: --{flag}cron {cron!r} is not a valid cron expression: {exc}", err=True)
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
    """
    root = _project_root()
    _, parsed = _validated(root, None)
    _configure_env(root)
    m = parsed.monitor
    cron, interval = _schedule_of(cron, interval, m.lifecycle_cron, m.lifecycle_interval_minutes, "")
    monitor_cron, monitor_interval = _schedule_of(monitor_cron, monitor_interval, m.cron, m.interval_minutes,
                                                  "monitor-")
    import signal

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.server import LocalPrefectServer

    def _stop(signum, frame):  # SIGTERM stops like Ctrl-C: runner first, then the server
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    server = None
    api_url = os.environ.get("PREFECT_API_URL")
    try:
        if not api_url:
            server = LocalPrefectServer(root / PREFECT_HOME)
            typer.echo(f"starting a local Prefect server (state in {PREFECT_HOME}/, log {server.log_path}) ...")
            api_url = server.start()
            os.environ["PREFECT_API_URL"] = api_url  # inherited by every run's subprocesses
            typer.echo(f"Prefect UI: {server.url}  (API {api_url})")
        from prefect import serve as prefect_serve

        from flows.lifecycle import lifecycle
        from flows.monitor import monitor

        def when(c, i):
            return f"cron {c!r}" if c else f"every {i}s"

        typer.echo(f"serving deployments shrinkflow-lifecycle/{name} ({when(cron, interval)}) and "
                   f"shrinkflow-monitor/{name} ({when(monitor_cron, monitor_interval)}) for {root} "
                   f"against {api_url}; Ctrl-C stops")
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
        typer.echo(f"error: {_crash_message(exc)}", err=True)
        raise typer.Exit(EXIT_CRASH)
    finally:
        if server is not None:
            server.stop()
            typer.echo("stopped the local Prefect server")


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
        typer.echo(f"error: {_crash_message(exc)}", err=True)
        raise typer.Exit(EXIT_CRASH)
    rec = result.get("recompress")
    if as_json:
        typer.echo(json.dumps({k: v for k, v in result.items() if k != "summary"} | {
            "summary": result.get("summary")}, indent=2, default=str))
    else:
        typer.echo(f"verdict: {result['action']}")
        for r in result["reasons"]:
            typer.echo(f"  - {r}")
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
