"""``shrinkflow`` console script.

Exit codes: 0 deployed (or status printed); 1 a candidate failed a gate
(a normal outcome, not a crash); 2 bad params or usage; 3 a stage crashed.
Prefect is imported only by ``run``, after params are validated, so a bad
params file writes nothing (not even Prefect's database).
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
from shrinkflow.pipeline import OFFLINE_ENV

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
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    # Keep Prefect's state (ephemeral API database, logs) inside the project.
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@app.command()
def run(params: Optional[Path] = typer.Option(None, "--params", help="params file (default: params.yaml)")):
    """Run the lifecycle flow: DVC stages train -> compress -> validate -> deploy."""
    root = _project_root()
    path, parsed = _validated(root, params)
    target = root / "params.yaml"
    if path.resolve() != target.resolve():
        # DVC tracks params.yaml; a run on another file makes it the params.
        if target.is_file() and target.read_bytes() != path.read_bytes():
            backup = root / ".shrinkflow" / "params.previous.yaml"
            backup.parent.mkdir(exist_ok=True)
            shutil.copyfile(target, backup)
            typer.echo(f"params.yaml replaced by {path} (previous copy: {backup.relative_to(root)})")
        shutil.copyfile(path, target)
    _configure_env(root)
    from flows.lifecycle import lifecycle
    from shrinkflow.pipeline import StageFailed

    try:
        result = lifecycle(project_dir=str(root))
    except StageFailed as exc:
        typer.echo(f"\nerror: {exc}", err=True)
        raise typer.Exit(3)
    _print_summary(root, parsed, result)
    raise typer.Exit(0 if result["deployed_version"] else 1)


def _print_summary(root: Path, parsed, result: dict) -> None:
    from shrinkflow.gates import GateReport

    stages = ", ".join(f"{s}={r['status']}" for s, r in result["stages"].items())
    out = ["", "=" * 72, f"stages: {stages}"]
    if result["deployed_version"]:
        out.append(f"DEPLOYED {result['deployed_version']} (candidate {result['selected']!r}) "
                   f"-> {parsed.deploy.registry_dir}/versions/{result['deployed_version']}")
    else:
        out.append("NOT DEPLOYED: no candidate passed every gate.")
        for name, d in result["gates"]["candidates"].items():
            rep = GateReport.from_dict(d)
            for f in rep.failures:
                out.append(f"  {name}: {f.describe()}")
    out += [f"metrics and gates: reports/gates.md, metrics/validate.json (or `dvc metrics show`)",
            f"Prefect flow run: {result['flow_run_name']} ({result['flow_run_id']}), "
            f"artifact 'shrinkflow-lifecycle'",
            f"  browse it: PREFECT_HOME={os.environ.get('PREFECT_HOME')} prefect server start",
            "status: shrinkflow status --json", "=" * 72]
    typer.echo("\n".join(out))


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="print JSON"),
           params: Optional[Path] = typer.Option(None, "--params")):
    """Show the deployed (production) version, its metrics, gates and lineage."""
    from shrinkflow.registry import Registry

    root = _project_root()
    _, parsed = _validated(root, params)
    registry = Registry(root / parsed.deploy.registry_dir)
    prod = registry.production()
    if prod is None:
        doc = {"deployed": None, "message": "nothing is deployed yet: run `shrinkflow run`"}
    else:
        version, m = prod
        doc = {"deployed": {"version": version, "candidate": m["candidate"], "recipe": m["recipe"],
                            "created_at": m["created_at"], "path": str(registry.path(version)),
                            "metrics": m["metrics"], "gates": m["gates"], "lineage": m["lineage"]},
               "teacher": {"metrics": m["teacher_metrics"],
                           "description": "fp32 teacher, torch eager, as trained"},
               "versions": registry.versions()}
    if as_json:
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))
    elif prod is None:
        typer.echo(doc["message"])
    else:
        d, t = doc["deployed"], doc["teacher"]["metrics"]
        typer.echo(f"production: {d['version']} ({d['candidate']}), deployed {d['created_at']}")
        for k in ("accuracy", "latency_ms_p95_b1", "size_mb", "peak_rss_mb"):
            typer.echo(f"  {k:<20} {d['metrics'][k]:>10.4g}   teacher {t[k]:>10.4g}")
        typer.echo("  gates: " + ", ".join(f"{n}={'pass' if g['passed'] else 'FAIL'}" for n, g in d["gates"].items()))


@app.command()
def schedule(cron: Optional[str] = typer.Option(None, "--cron", help='cron expression, e.g. "0 3 * * *"'),
             interval: Optional[int] = typer.Option(None, "--interval", min=1, help="seconds between runs"),
             name: str = typer.Option("scheduled", "--name", help="deployment name")):
    """Serve the lifecycle as a Prefect deployment on a schedule (Ctrl-C stops).

    Each scheduled run is a full `shrinkflow run`: DVC skips what is unchanged,
    so a run with nothing new costs seconds. At most one run at a time.
    """
    root = _project_root()
    _validated(root, None)
    if (cron is None) == (interval is None):
        typer.echo("error: give exactly one of --cron or --interval", err=True)
        raise typer.Exit(2)
    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule

        try:  # Prefect's own validation, before anything is served
            CronSchedule(cron=cron)
        except ValueError as exc:
            typer.echo(f"error: --cron {cron!r} is not a valid cron expression: {exc}", err=True)
            raise typer.Exit(2)
    _configure_env(root)
    from flows.lifecycle import lifecycle

    when = f"cron {cron!r}" if cron else f"every {interval}s"
    typer.echo(f"serving deployment shrinkflow-lifecycle/{name} ({when}) for {root}; Ctrl-C stops")
    lifecycle.serve(name=name, cron=cron, interval=interval, limit=1,
                    parameters={"project_dir": str(root)})


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
