"""The team setup, measured (issue 18, "Measure"): the team stack
(`shrinkflow team up`) from nothing and from its existing data, a lifecycle
run through the work pool's worker against the same run through
`shrinkflow run`, and the whole model set through a DVC remote over real SSH.

The team stack runs in clone A below (stages up to date, the registry of
this checkout copied in, so production exists): ``team up`` from nothing
(initdb, the Prefect server's migrations on PostgreSQL, pool, deployments,
worker), ``team down``, ``team up`` again on the same data (timed); then the
lifecycle deployment run through the server and its worker
(``prefect.deployments.run_deployment``: the path a scheduled run takes,
minus the scheduler's wait), timed from its creation to its end, with the
run's own start and end as Prefect records them; then ``shrinkflow run`` on
the same project, same params, through Prefect's ephemeral API. Every stage
is up to date in both, so the difference is the server path's own cost.

The project's own DVC-tracked files (the pinned source archive, the splits,
the kept teacher, every candidate and student, the archives: whatever this
checkout's ``dvc.lock`` and ``.dvc`` files name) are pushed to an SSH remote
and pulled into a second clone, as two teammates would:

  1. clone A: ``git clone`` of this checkout, its DVC cache filled from
     this checkout's cache (hard links: nothing is rebuilt), switched to the
     SSH remote by ``shrinkflow remote-ssh``; ``dvc push`` to an empty
     remote (timed), then ``dvc push`` again with nothing new (timed);
  2. clone B: ``git clone`` of A, given only its key in config.local;
     ``dvc pull`` (timed), then ``dvc status`` must be clean for every stage
     that makes data or models, and every file under data/ and models/ must
     hash as in A;
  3. A publishes its registry to a shared registry on the same sshd
     (``shrinkflow publish``, timed) and B runs ``shrinkflow pull`` (timed):
     then B's ``dvc status`` must be clean (the deploy record restored) and
     its ``shrinkflow status`` must show A's production.

The server is Debian's sshd on 127.0.0.1 (the same setup as
tests/test_remote_ssh.py: public-key login, SFTP only), so the figures are
SSH and DVC's own costs without a network: a real link adds its bandwidth
and round trips. Writes bench/results/team.{md,json}.

    .venv/bin/python bench/team.py      # after `shrinkflow run` (needs the outputs in .dvc/cache)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, ROOT, stamp

sys.path.insert(0, str(ROOT))

from shrinkflow.dvcrun import dvc_command  # noqa: E402
from tests.test_remote_ssh import Sshd  # noqa: E402  (the tests' real sshd, reused)

WORK = ROOT / "bench" / "work" / "team"
GIT = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under data/ and models/ of ``root``."""
    out = {}
    for top in ("data", "models"):
        for p in sorted((root / top).rglob("*")):
            if p.is_file():
                out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def dir_size(path: Path) -> tuple[int, int]:
    """(files, bytes) under ``path``."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def timed(args: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    dvc_command(args, cwd, timeout_s=3600)
    return time.perf_counter() - t0


def clone_a() -> Path:
    """Clone A: this checkout's commit, its DVC cache hard-linked and checked
    out (every stage up to date), its registry copied (production exists)."""
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    a = WORK / "a"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(a)], check=True)
    subprocess.run(["cp", "-al", str(ROOT / ".dvc" / "cache"), str(a / ".dvc" / "cache")], check=True)
    dvc_command(["checkout", "-q"], a, timeout_s=3600)
    if (ROOT / "registry").is_dir():
        shutil.copytree(ROOT / "registry", a / "registry")
    if (ROOT / "deploy" / "deployment.json").is_file():
        (a / "deploy").mkdir(exist_ok=True)
        shutil.copy2(ROOT / "deploy" / "deployment.json", a / "deploy" / "deployment.json")
    return a


def cli(root: Path, *args: str, timeout_s: float = 1800) -> tuple[float, str]:
    """``shrinkflow ARGS`` in ``root`` as a user runs it; (seconds, output).
    Raises AssertionError with the output when it fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    t0 = time.perf_counter()
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "shrinkflow"), *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, f"shrinkflow {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return seconds, proc.stdout + proc.stderr


def team_stack(a: Path) -> dict:
    from flows.team import TeamStack
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    up_cold_s, _ = cli(a, "team", "up")
    down_s, _ = cli(a, "team", "down")
    up_warm_s, out = cli(a, "team", "up")
    api_url = TeamStack(a).api_url()
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            t0 = time.perf_counter()
            run = run_deployment("shrinkflow-lifecycle/team", timeout=1800, poll_interval=1)
            via_worker_s = time.perf_counter() - t0
        assert run.state.is_completed(), run.state
        ran_s = (run.end_time - run.start_time).total_seconds()
        pickup_s = (run.start_time - run.created).total_seconds()
    finally:
        cli(a, "team", "down")
    direct_s, out = cli(a, "run")
    stages = next(line for line in out.splitlines() if line.startswith("stages: "))
    assert set(v.split("=")[1] for v in stages[len("stages: "):].split(", ")) == {"skipped"}, stages
    return {"team_up_from_nothing_s": round(up_cold_s, 1), "team_down_s": round(down_s, 1),
            "team_up_existing_data_s": round(up_warm_s, 1),
            "lifecycle_via_worker_s": round(via_worker_s, 1), "lifecycle_via_worker_run_s": round(ran_s, 1),
            "lifecycle_via_worker_pickup_s": round(pickup_s, 1), "lifecycle_shrinkflow_run_s": round(direct_s, 1),
            "stages": stages}


def dvc_over_ssh(a: Path) -> dict:
    sshd = Sshd(WORK)
    sshd.start()
    try:
        b, storage = WORK / "b", WORK / "storage" / "shrinkflow"
        url = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}{storage}"
        cli = subprocess.run([str(ROOT / ".venv" / "bin" / "shrinkflow"), "remote-ssh", "team", url,
                              "--key-file", str(sshd.client_key)], cwd=a, capture_output=True, text=True)
        assert cli.returncode == 0, cli.stdout + cli.stderr + sshd.log()
        subprocess.run(GIT + ["commit", "-qam", "DVC remote over SSH"], cwd=a, check=True)
        push_s = timed(["push", "-q"], a)
        files, size = dir_size(storage)
        push_again_s = timed(["push", "-q"], a)

        subprocess.run(["git", "clone", "-q", str(a), str(b)], check=True)
        dvc_command(["remote", "modify", "--local", "team", "keyfile", str(sshd.client_key)], b)
        pull_s = timed(["pull", "-q"], b)
        status = json.loads(dvc_command(["status", "--json"], b) or "{}")
        same = tree_hashes(a) == tree_hashes(b)
        # deploy/deployment.json is the local registry's record (cache: false,
        # git-ignored: docs/registry.md), so after `dvc pull` alone the clone
        # has none: the only entry allowed. Every stage that makes data or
        # models must be clean.
        others = {k: v for k, v in status.items() if k != "deploy"}
        assert not others and same, (status, same)
        registry = shared_registry_over_ssh(a, b, sshd)
        return {"objects": files, "mb": round(size / 1e6, 1), "push_s": round(push_s, 1),
                "push_nothing_new_s": round(push_again_s, 1), "pull_s": round(pull_s, 1),
                "push_mb_per_s": round(size / 1e6 / push_s, 1), "pull_mb_per_s": round(size / 1e6 / pull_s, 1),
                "clone_b_dvc_status": status, "clone_b_build_stages_clean": not others, "clone_b_files_identical": same,
                "files_compared": len(tree_hashes(b)), "shared_registry": registry}
    finally:
        sshd.stop()


def shared_registry_over_ssh(a: Path, b: Path, sshd) -> dict:
    """Clone A publishes its registry to a shared registry on the same sshd
    (``shrinkflow publish``, timed); clone B, after its ``dvc pull``, runs
    ``shrinkflow pull`` (timed): then its ``dvc status`` must be clean, and
    ``shrinkflow status`` must show A's production version."""
    import yaml

    from shrinkflow.registry import Registry
    from shrinkflow.shared_registry import KEY_ENV, KNOWN_HOSTS_ENV

    host_key = (sshd.root / "host_key.pub").read_text().split()
    known = sshd.root / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {host_key[0]} {host_key[1]}\n")
    env = {KEY_ENV: str(sshd.client_key), KNOWN_HOSTS_ENV: str(known)}
    url = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}{WORK / 'storage' / 'registry'}"
    for clone in (a, b):
        params = yaml.safe_load((clone / "params.yaml").read_text())
        params["shared_registry"]["url"] = url
        (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shrinkflow = str(ROOT / ".venv" / "bin" / "shrinkflow")

    def run(clone: Path, *args: str) -> tuple[float, str]:
        t0 = time.perf_counter()
        proc = subprocess.run([shrinkflow, *args], cwd=clone, capture_output=True, text=True,
                              env={**os.environ, **env})
        assert proc.returncode == 0, (args, proc.stdout + proc.stderr)
        return time.perf_counter() - t0, proc.stdout

    publish_s, published = run(a, "publish")
    pull_s, pulled = run(b, "pull")
    status = json.loads(dvc_command(["status", "--json"], b) or "{}")
    _, shown = run(b, "status")
    prod_a = Registry(a / "registry").alias()
    versions = Registry(b / "registry").versions()
    assert status == {} and prod_a in shown, (status, shown)
    return {"url_kind": "ssh:// (SFTP, the same sshd)", "versions": len(versions),
            "mb": round(sum(p.stat().st_size for p in (b / "registry").rglob("*") if p.is_file()) / 1e6, 1),
            "publish_s": round(publish_s, 1), "pull_s": round(pull_s, 1), "published": published.strip(),
            "pulled": pulled.strip(), "clone_b_dvc_status_after": status, "production": prod_a}


def registry_lines(r: dict | None) -> list[str]:
    """The shared registry's section of team.md (none for a record measured
    before it existed)."""
    if not r:
        return []
    return ["## The registry to a second clone: `shrinkflow publish`, `shrinkflow pull`", "",
            f"Clone A publishes its registry ({r['versions']} versions, {r['mb']} MB) to a shared registry "
            f"over the same sshd ({r['url_kind']}); clone B, after its `dvc pull`, runs `shrinkflow pull`, "
            "which copies every version (each file's sha256 checked against its manifest) and restores the "
            "deploy record its dvc.lock pins.", "",
            "| `shrinkflow publish` (A, empty shared registry) | `shrinkflow pull` (B) |", "|---|---|",
            f"| {r['publish_s']} s | {r['pull_s']} s |", "",
            f"Then in clone B: `dvc status` is **{json.dumps(r['clone_b_dvc_status_after'])}** (clean), and "
            f"`shrinkflow status` shows production {r['production']}, verified. The commands said:", "",
            "```text", r["published"], r["pulled"], "```", ""]


def write(doc: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "team.json").write_text(json.dumps(doc, indent=2) + "\n")
    d, t = doc["dvc_over_ssh"], doc["team_stack"]
    lines = [
        "# The team setup, measured (issue 18)", "",
        f"Measured {doc['measured_at']} on {doc['machine']} ({os.cpu_count()} cores), by `bench/team.py`.", "",
        "## The team stack: `shrinkflow team up`", "",
        "In a clone of this checkout with every stage up to date and production in its registry: PostgreSQL "
        "(a cluster in `.shrinkflow/team/`), the Prefect server on it, the process work pool, the deployments "
        "of `prefect.yaml` and a worker, all on 127.0.0.1.", "",
        "| `team up` from nothing | `team down` | `team up` again (existing data) |", "|---|---|---|",
        f"| {t['team_up_from_nothing_s']} s | {t['team_down_s']} s | {t['team_up_existing_data_s']} s |", "",
        "## A lifecycle run through the server and its worker, against `shrinkflow run`", "",
        "The same project and params, every stage up to date (`" + t["stages"] + "`), so what differs is the "
        "path: a run of the lifecycle deployment created on the team server (what the scheduler does when a "
        "schedule fires) and executed by the pool's worker in a process of its own, against `shrinkflow run` "
        "(Prefect's ephemeral API, in the CLI's process).", "",
        "| path | wall | of which |", "|---|---|---|",
        f"| through the worker | {t['lifecycle_via_worker_s']} s from creation to its end | "
        f"{t['lifecycle_via_worker_pickup_s']} s until the worker started it (it polls the pool), "
        f"{t['lifecycle_via_worker_run_s']} s running |",
        f"| `shrinkflow run` | {t['lifecycle_shrinkflow_run_s']} s (the whole command) | |", "",
        f"The server path against `shrinkflow run`: **{t['lifecycle_via_worker_s'] - t['lifecycle_shrinkflow_run_s']:+.1f} s** "
        f"per run. It waits {t['lifecycle_via_worker_pickup_s']} s for the worker's poll of the pool (Prefect's "
        "default query interval), but the run itself starts no ephemeral API (the server is already up), "
        "which `shrinkflow run` does in every command. Either way it is seconds, against the minutes a run "
        "that trains or compresses takes.", "",
        "## The whole model set through a DVC remote over SSH", "",
        "This checkout's DVC-tracked files (source archive, splits, kept teacher, every candidate and "
        "student, archives) pushed by clone A to an empty SSH remote (Debian's sshd on 127.0.0.1, SFTP "
        "only) and pulled by a second clone B given only its key. Loopback: no network bandwidth or "
        "round-trip time is in these figures.", "",
        "| objects | MB | `dvc push` (empty remote) | `dvc push` (nothing new) | `dvc pull` (clone B) |",
        "|---|---|---|---|---|",
        f"| {d['objects']} | {d['mb']} | {d['push_s']} s ({d['push_mb_per_s']} MB/s) | {d['push_nothing_new_s']} s "
        f"| {d['pull_s']} s ({d['pull_mb_per_s']} MB/s) |", "",
        f"In clone B after the pull: `dvc status` clean for every stage that makes data or models "
        f"(fetch to validate): **{d['clone_b_build_stages_clean']}**; it lists only "
        f"`{json.dumps(d['clone_b_dvc_status'])}`: the deploy stage's record is the local registry's "
        "(`cache: false`, not in git: docs/registry.md), which `dvc pull` does not bring (`shrinkflow pull` does: next section). All "
        f"{d['files_compared']} files under data/ and models/ identical to clone A's (sha256): "
        f"**{d['clone_b_files_identical']}**.", "",
        *registry_lines(d.get("shared_registry")),
        "## Serving replicas on one PostgreSQL log", "",
        "Two `shrinkflow serve` replicas on one PostgreSQL prediction log against one replica on SQLite "
        "(req/s, latency, zero 5xx, logged rows equal to answered ones): "
        "[serving_replicas.md](serving_replicas.md) (`bench/serving_replicas.py`).", ""]
    (RESULTS / "team.md").write_text("\n".join(lines))


def main() -> None:
    if sys.argv[1:] == ["--render"]:      # the .md again from the .json, nothing measured
        write(json.loads((RESULTS / "team.json").read_text()))
        return
    a = clone_a()
    doc = {**stamp(), "team_stack": team_stack(a), "dvc_over_ssh": dvc_over_ssh(a)}
    write(doc)
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
