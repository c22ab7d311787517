"""The team setup, measured (issue 18, "Measure"): moving the whole model
set through a DVC remote over real SSH.

The project's own DVC-tracked files (the pinned source archive, the splits,
the kept teacher, every candidate and student, the archives: whatever this
checkout's ``dvc.lock`` and ``.dvc`` files name) are pushed to an SSH remote
and pulled into a second clone, as two teammates would:

  1. clone A: ``git clone`` of this checkout, its DVC cache filled from
     this checkout's cache (hard links: nothing is rebuilt), switched to the
     SSH remote by ``shrinkflow remote-ssh``; ``dvc push`` to an empty
     remote (timed), then ``dvc push`` again with nothing new (timed);
  2. clone B: ``git clone`` of A, given only its key in config.local;
     ``dvc pull`` (timed), then ``dvc status`` must be clean and every file
     under data/ and models/ must hash as in A.

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


def dvc_over_ssh() -> dict:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    sshd = Sshd(WORK)
    sshd.start()
    try:
        a, b, storage = WORK / "a", WORK / "b", WORK / "storage" / "shrinkflow"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(a)], check=True)
        # This checkout's cache, hard-linked: clone A holds what a full run made.
        subprocess.run(["cp", "-al", str(ROOT / ".dvc" / "cache"), str(a / ".dvc" / "cache")], check=True)
        dvc_command(["checkout", "-q"], a, timeout_s=3600)
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
        # git-ignored: docs/registry.md), so a clone has none: the only entry
        # allowed. Every stage that makes data or models must be clean.
        others = {k: v for k, v in status.items() if k != "deploy"}
        assert not others and same, (status, same)
        return {"objects": files, "mb": round(size / 1e6, 1), "push_s": round(push_s, 1),
                "push_nothing_new_s": round(push_again_s, 1), "pull_s": round(pull_s, 1),
                "push_mb_per_s": round(size / 1e6 / push_s, 1), "pull_mb_per_s": round(size / 1e6 / pull_s, 1),
                "clone_b_dvc_status": status, "clone_b_build_stages_clean": not others, "clone_b_files_identical": same,
                "files_compared": len(tree_hashes(b))}
    finally:
        sshd.stop()


def write(doc: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "team.json").write_text(json.dumps(doc, indent=2) + "\n")
    d = doc["dvc_over_ssh"]
    lines = [
        "# The team setup, measured (issue 18)", "",
        f"Measured {doc['measured_at']} on {doc['machine']} ({os.cpu_count()} cores), by `bench/team.py`.", "",
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
        "(`cache: false`, not in git: docs/registry.md), which a clone does not have until it deploys. All "
        f"{d['files_compared']} files under data/ and models/ identical to clone A's (sha256): "
        f"**{d['clone_b_files_identical']}**.", ""]
    (RESULTS / "team.md").write_text("\n".join(lines))


def main() -> None:
    doc = {**stamp(), "dvc_over_ssh": dvc_over_ssh()}
    write(doc)
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
