"""The production model reaches every serving host: the registry published
to shared storage, and a second "host" (a project directory with only
dvc.yaml, params.yaml and the shared URL: no registry of its own) that serves
it with the real `shrinkflow serve`, follows a promotion and a rollback
without a restart, refuses a tampered version while it keeps serving the one
it has, and never sees an upload killed midway (nor a copy of its own
killed midway).

The shared storage is a directory (``file://``; fast) for most checks, and a
real sshd on loopback (Debian's openssh-server, SFTP only, keys made here;
``tests.test_remote_ssh.Sshd``) for one host that follows over SSH, also
while the server is down. The model is one tiny real ONNX candidate: every
version holds the same files (``same_model_as``), which is what a
re-validation deploys, and is enough to tell versions apart, since every
answer names the version that gave it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from flows.cli import app
from shrinkflow.config import Candidate, Gates, ParamsError, load_params
from shrinkflow.errors import ExitCode, IntegrityError
from shrinkflow.files import file_hashes
from shrinkflow.gates import evaluate_gates
from tests.netports import free_port
from shrinkflow.registry import Registry
from shrinkflow.shared_registry import (KEY_ENV, KNOWN_HOSTS_ENV, Follower, SharedRegistry, SharedRegistryDiverged,
                                        SharedRegistryError, STALE_UPLOAD_S, VersionRefused, publish_project)
from tests.conftest import PROJECT_ROOT, cmdline_of, terminate_group
from tests.registry_outputs import deploy_record
from tests.test_remote_ssh import Sshd
from tests.test_serving import Server

PASS = evaluate_gates("c", {"accuracy": 0.85, "latency_ms_p95_b1": 1.0, "size_mb": 1.0},
                      {"accuracy": 0.85, "latency_ms_p95_b1": 10.0, "size_mb": 90.0}, Gates())
POLL_S = 0.2


def make_project(root: Path, serve: dict | None = None, shared: dict | None = None) -> Path:
    """A project directory: this checkout's dvc.yaml and params.yaml, with
    ``serve`` and ``shared_registry`` settings changed."""
    root.mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["serve"].update({"reload_poll_s": POLL_S, "threads": 1, **(serve or {})})
    params["shared_registry"].update(shared or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def cli(root: Path, *args: str):
    with contextlib.chdir(root):
        return CliRunner().invoke(app, list(args))


class Host(Server):
    """`shrinkflow serve` in ``root`` (a serving host), as a user starts
    it; ``env``: extra environment (the SSH key and known_hosts)."""

    def __init__(self, root: Path, env: dict | None = None, args: tuple[str, ...] = ()):
        super().__init__(root, free_port(), token=None, output=root / "serve.log",
                         env={"PYTHONUNBUFFERED": "1", **(env or {})}, new_session=True, start_timeout_s=90,
                         args=args)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def answer(self) -> str:
        """The version that answers a prediction now."""
        r = httpx.post(f"{self.url}/predict", json={"texts": ["a wonderful film"]}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["model_version"]

    def wait_for(self, check, what: str, timeout_s: float = 20.0) -> dict:
        """/health once ``check(health)`` holds; fails naming ``what``."""
        deadline = time.time() + timeout_s
        while True:
            health = self.health()
            if check(health):
                return health
            assert time.time() < deadline, f"{what}: /health {health}\n{self.output_text()[-3000:]}"
            time.sleep(0.05)

    def serves(self, version: str) -> None:
        self.wait_for(lambda h: h["model_version"] == version, f"the host never served {version}")
        assert self.answer() == version

    def stop(self) -> None:
        terminate_group(self.proc)


# ------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def candidate(tmp_path_factory, tiny_teacher_dir) -> Path:
    from shrinkflow.compress import apply_recipe

    return apply_recipe(tiny_teacher_dir, Candidate(name="fp32"), tmp_path_factory.mktemp("shared-cand") / "fp32",
                        progress=False)


@pytest.fixture(scope="module")
def site(tmp_path_factory, candidate):
    """The deploying host (``origin``: its registry was built, v0001, before
    the shared URL was set; then `shrinkflow publish` sent it), the shared
    directory, and a serving host with only the shared URL."""
    base = tmp_path_factory.mktemp("shared-site")
    shared = base / "shared"
    url = f"file://{shared}"
    origin = make_project(base / "origin")
    Registry(origin / "registry").promote(candidate, PASS, deploy_record("fp32"))
    params = yaml.safe_load((origin / "params.yaml").read_text())
    params["shared_registry"]["url"] = url          # the team sets the URL later
    (origin / "params.yaml").write_text(yaml.safe_dump(params))
    out = cli(origin, "publish")
    assert out.exit_code == 0, out.output
    assert f"published to {url}: v0001 uploaded; production none -> v0001" in out.output
    host_root = make_project(base / "host", serve={"registry": "shared"}, shared={"url": url})
    host = Host(host_root)
    try:
        yield {"origin": origin, "shared": shared, "url": url, "host": host, "candidate": candidate}
    finally:
        host.stop()


def padded(model_dir: Path, dest: Path) -> Path:
    """A copy of ``model_dir`` with 12 MB more in 12 files: copying it takes
    a while after its first padding file appears."""
    shutil.copytree(model_dir, dest)
    for i in range(12):
        (dest / f"padding-{i:02d}.bin").write_bytes(os.urandom(1 << 20))
    return dest


def origin_registry(site) -> Registry:
    return Registry(site["origin"] / "registry")


def promote_and_publish(site, model_dir: Path | None = None) -> str:
    """What `shrinkflow run` does on the deploying host: deploy (a new
    version), then the lifecycle's publish step."""
    version = origin_registry(site).promote(model_dir or site["candidate"], PASS, deploy_record("fp32")).version
    published, warning = publish_project(site["origin"], load_params(site["origin"] / "params.yaml"))
    assert warning is None and published.production == version, warning
    return version


FOLLOWER = r"""
import sys
from shrinkflow.registry import Registry
from shrinkflow.shared_registry import Follower, SharedRegistry
print("ready", flush=True)
sys.stdin.readline()
Follower(SharedRegistry(sys.argv[1]), Registry(sys.argv[2])).sync()
print("done", flush=True)
"""


def test_a_host_killed_mid_copy_shows_nothing_of_it_and_the_next_sync_completes(tmp_path, candidate):
    """SIGKILL a serving host's follower while it copies a version: the
    cache never lists it nor names it, and the next sync (a restarted
    replica) removes the leftovers and completes."""
    origin, cache = Registry(tmp_path / "origin"), Registry(tmp_path / "cache")
    first = origin.promote(candidate, PASS, deploy_record("fp32")).version
    url = f"file://{tmp_path / 'shared'}"
    SharedRegistry(url).publish(origin)
    assert Follower(SharedRegistry(url), cache).sync() == first
    big = padded(candidate, tmp_path / "big")
    new = origin.promote(big, PASS, deploy_record("fp32")).version
    SharedRegistry(url).publish(origin)
    proc = subprocess.Popen([sys.executable, "-c", FOLLOWER, url, str(cache.root)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        deadline = time.time() + 60
        while not any((cache.root / ".incoming").glob("*/versions/*/model/*.bin")):
            assert time.time() < deadline and proc.poll() is None, "the follower ended before it was caught"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (cache.root / ".incoming").exists(), "the kill landed after the copy: the test proved little"
    assert cache.versions() == [first] and cache.alias() == first
    assert Follower(SharedRegistry(url), cache).sync() == new
    assert cache.versions() == [first, new] and not (cache.root / ".incoming").exists()
    cache.verify(new)
    # The share unmounted (the URL's directory gone, or empty): said, and the cache keeps production.
    (tmp_path / "shared").rename(tmp_path / "unmounted")
    with pytest.raises(SharedRegistryError, match="has nothing in production .*is the storage mounted"):
        Follower(SharedRegistry(url), cache).sync()
    assert cache.alias() == new


# ------------------------------------------------------------ publishing: refusals (no server)
def test_a_corrupted_local_version_is_not_published_and_another_registry_is_refused(tmp_path, candidate):
    url = f"file://{tmp_path / 'shared'}"
    mine = Registry(tmp_path / "mine")
    mine.promote(candidate, PASS, deploy_record("fp32"))
    v2 = mine.promote(candidate, PASS, deploy_record("fp32")).version
    (mine.path(v2) / "model" / "model.onnx").write_bytes(b"rot")
    shared = SharedRegistry(url)
    with pytest.raises(IntegrityError, match="model.onnx"):
        shared.publish(mine)
    assert shared.versions() == ["v0001"] and shared.aliases() == {}     # nothing of v0002, no alias
    assert not list((tmp_path / "shared" / "versions").glob(".tmp-*"))
    # a registry of its own, numbering its versions from v0001 too
    other = Registry(tmp_path / "other")
    other.promote(candidate, PASS, {**deploy_record("fp32"), "candidate": "other"})
    with pytest.raises(SharedRegistryError, match="another registry publishes to this URL"):
        shared.publish(other)
    assert shared.aliases() == {}


def test_urls_credentials_and_settings_are_checked_before_anything_runs(tmp_path, monkeypatch):
    for bad, why in [("s3://bucket/reg", "renames by copying"), ("file://relative/reg", "three slashes"),
                     ("ssh://u:pw@host/srv/reg", "password"), ("ssh://host", "names no directory")]:
        with pytest.raises(ValueError, match=why):
            SharedRegistry(bad)
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["serve"]["registry"] = "shared"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="serve.registry: shared needs shared_registry.url"):
        load_params(tmp_path / "params.yaml")
    # the server's host key must be checkable: no known_hosts, a clear error (nothing is contacted)
    monkeypatch.setenv(KNOWN_HOSTS_ENV, str(tmp_path / "absent_known_hosts"))
    with pytest.raises(SharedRegistryError, match="no known_hosts file.*ssh-keyscan -p 2222 storage"):
        SharedRegistry("ssh://dvc@storage:2222/srv/reg").aliases()
    root = make_project(tmp_path / "p")
    out = cli(root, "publish")
    assert out.exit_code == ExitCode.USAGE and "shared_registry.url is not set" in out.output


def test_a_failed_publish_leaves_the_move_here_and_says_how_to_send_it(tmp_path, candidate, monkeypatch):
    known = tmp_path / "known_hosts"
    known.write_text("")
    monkeypatch.setenv(KNOWN_HOSTS_ENV, str(known))
    down = f"ssh://nobody@127.0.0.1:{free_port()}/srv/reg"      # nothing listens there
    root = make_project(tmp_path / "p", shared={"url": down})
    reg = Registry(root / "registry")
    for _ in range(2):
        reg.promote(candidate, PASS, deploy_record("fp32"))
    # what the lifecycle's publish step returns: a warning, the promotion stands
    published, warning = publish_project(root, load_params(root / "params.yaml"))
    assert published is None and "could not publish the registry to " + down in warning
    assert "Production here is v0002" in warning and "`shrinkflow publish`" in warning
    out = cli(root, "rollback")
    assert out.exit_code == ExitCode.CRASH and "production: v0002 -> v0001" in out.output
    assert "the rollback is done in registry/, but could not publish" in out.output and "Connect call" in out.output
    assert reg.alias() == "v0001"
    out = cli(root, "publish")
    assert out.exit_code == ExitCode.CRASH and "Connect call failed" in out.output


def test_a_corrupted_shared_production_is_repaired_by_the_next_publish_and_followed_after_the_retry_interval(
        tmp_path, candidate):
    """The storage's copy of production rots after it was published: a
    host refuses it and keeps what it served; the next publish reads the
    copy back, finds it broken and uploads it again (saying so); the host
    copies it again only after its retry interval."""
    origin = Registry(tmp_path / "origin")
    first, second = (origin.promote(candidate, PASS, deploy_record("fp32")).version for _ in range(2))
    shared = SharedRegistry(f"file://{tmp_path / 'shared'}")
    origin.rollback(to=first)
    shared.publish(origin)
    cache = Registry(tmp_path / "cache")
    cache_aliases = {"production": first}
    follower = Follower(shared, cache, retry_refused_s=0.5)
    assert follower.sync() == first and cache.aliases() == cache_aliases
    origin.rollback(to=second)
    assert shared.publish(origin).repaired == ()
    good = tmp_path / "shared" / "versions" / second / "model" / "model.onnx"
    good.write_bytes(b"rot")                      # rots after it was published
    assert shared.broken_files(origin.manifest(second), second) == ["model/model.onnx"]
    with pytest.raises(VersionRefused, match=f"refused {second}.*model.onnx"):
        follower.sync()
    done = shared.publish(origin)                 # e.g. the next `shrinkflow publish` or lifecycle run
    assert done.repaired == (second,) and done.uploaded == ()
    assert f"the shared copy of {second} failed its hashes and was uploaded again" in done.describe()
    assert shared.broken_files(origin.manifest(second), second) == []
    assert not list((tmp_path / "shared" / "versions").glob(".tmp-*"))
    with pytest.raises(VersionRefused):           # not copied again yet
        follower.sync()
    assert cache.aliases() == cache_aliases and cache.versions() == [first]
    time.sleep(0.5)
    assert follower.sync() == second and cache.alias() == second
    assert file_hashes(cache.path(second)) == file_hashes(origin.path(second))


def test_publishing_where_the_share_is_gone_is_refused_until_it_is_back_or_fresh_is_asked(tmp_path, candidate):
    """A registry that published to a URL and now finds nothing there (the
    share unmounted: the directory missing, or an empty mount point) does
    not re-create the registry where no serving host looks: rollback and
    publish fail (exit 3) saying so; the mounted share takes the publish;
    --fresh publishes to a new, empty one on purpose."""
    shared_dir = tmp_path / "shared"
    root = make_project(tmp_path / "p", shared={"url": f"file://{shared_dir}"})
    reg = Registry(root / "registry")
    for _ in range(2):
        reg.promote(candidate, PASS, deploy_record("fp32"))
    assert cli(root, "publish").exit_code == ExitCode.OK
    shared_dir.rename(tmp_path / "mounted-elsewhere")            # unmounted: the directory is gone
    out = cli(root, "rollback")
    assert out.exit_code == ExitCode.CRASH and "production: v0002 -> v0001" in out.output, out.output
    assert "holds nothing, but" in out.output and "published there before (production v0002" in out.output
    assert "not mounted" in out.output and "--fresh" in out.output
    assert not shared_dir.exists() and reg.alias() == "v0001"
    shared_dir.mkdir()                                             # an empty mount point
    out = cli(root, "publish")
    assert out.exit_code == ExitCode.CRASH and "holds nothing, but" in out.output, out.output
    assert list(shared_dir.iterdir()) == []
    shared_dir.rmdir()
    (tmp_path / "mounted-elsewhere").rename(shared_dir)            # mounted again: the rollback goes out
    out = cli(root, "publish")
    assert out.exit_code == ExitCode.OK and "production v0002 -> v0001" in out.output, out.output
    other = tmp_path / "new-share"
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["shared_registry"]["url"] = f"file://{other}"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    out = cli(root, "publish")                                     # never published there: nothing to refuse
    assert out.exit_code == ExitCode.OK and "v0001, v0002 uploaded" in out.output, out.output
    shutil.rmtree(other)
    assert cli(root, "publish").exit_code == ExitCode.CRASH
    out = cli(root, "publish", "--fresh")
    assert out.exit_code == ExitCode.OK and "v0001, v0002 uploaded" in out.output, out.output


def test_a_host_behind_the_shared_registry_cannot_undo_its_moves_and_diverged_registries_are_refused_both_ways(
        tmp_path, candidate):
    """Moves of production are never undone by a publish nor dropped by a
    pull: a host that has not seen a teammate's rollback is refused until it
    pulls; two registries that each moved are refused both ways, until
    `pull --discard-local` takes the shared one's (the local-only version set
    aside, not deleted)."""
    shared = SharedRegistry(f"file://{tmp_path / 'shared'}")
    a, b = Registry(tmp_path / "a"), Registry(tmp_path / "b")
    for _ in range(2):
        a.promote(candidate, PASS, deploy_record("fp32"))
    shared.publish(a)
    shared.pull(b)                                   # a teammate's clone
    b.rollback(to="v0001")
    shared.publish(b)
    with pytest.raises(SharedRegistryDiverged, match=r"has not seen \(rollback to v0001 .*`shrinkflow pull` brings"):
        shared.publish(a)                            # would put v0002 back
    assert shared.aliases()["production"] == "v0001"
    assert shared.history_bytes() == (b.root / "history.jsonl").read_bytes()
    shared.pull(a)
    assert a.alias() == "v0001" and shared.publish(a).uploaded == ()
    # a pull cut short (versions copied, no alias yet) must not take production away
    half = Registry(tmp_path / "half")
    half.versions_dir.mkdir(parents=True)
    shutil.copytree(a.path("v0001"), half.path("v0001"))
    with pytest.raises(SharedRegistryDiverged):
        shared.publish(half)
    assert shared.aliases()["production"] == "v0001"
    # both move: b deploys v0003 and publishes, a rolls back and deploys its own v0003
    b.promote(candidate, PASS, deploy_record("fp32"))
    shared.publish(b)
    a.rollback(to="v0002")
    a.promote(candidate, PASS, {**deploy_record("fp32"), "candidate": "a-own"})
    with pytest.raises(SharedRegistryDiverged, match="the two diverged.*--discard-local"):
        shared.publish(a)
    with pytest.raises(SharedRegistryDiverged, match="the two diverged.*--discard-local"):
        shared.pull(a)
    done = shared.pull(a, discard_local=True)
    assert a.alias() == "v0003" and a.manifest("v0003") == b.manifest("v0003")
    assert (a.root / "history.jsonl").read_bytes() == shared.history_bytes()
    kept = list((a.root / "set-aside").glob("*/v0003"))
    assert len(kept) == 1 and "set aside v0003" in done.describe()
    assert json.loads((kept[0] / "manifest.json").read_text())["candidate"] == "a-own"


def test_a_damaged_shared_manifest_and_a_broken_older_version_are_uploaded_again(tmp_path, candidate):
    """Production's manifest on the storage truncated, then a figure in it
    edited: each publish uploads the version again (not "another
    registry"). An older version's file rotted: a new clone's pull refuses
    it and says how to repair it; `publish --check-all` does, then the pull
    completes. What publish writes on a shared mount is readable by other
    users (not the temporary file's 0600)."""
    import stat

    from shrinkflow.files import _umask

    shared_dir = tmp_path / "shared"
    shared = SharedRegistry(f"file://{shared_dir}")
    origin = Registry(tmp_path / "origin")
    for _ in range(2):
        origin.promote(candidate, PASS, deploy_record("fp32"))
    shared.publish(origin)
    for name in ("aliases.json", "history.jsonl"):
        assert stat.S_IMODE((shared_dir / name).stat().st_mode) == 0o666 & ~_umask(), name
    manifest = shared_dir / "versions" / "v0002" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:100])
    assert shared.publish(origin).repaired == ("v0002",)
    edited = json.loads(manifest.read_text())
    edited["metrics"] = {**edited.get("metrics", {}), "accuracy": 0.99}
    manifest.write_text(json.dumps(edited))
    assert shared.publish(origin).repaired == ("v0002",)
    assert json.loads(manifest.read_text()) == origin.manifest("v0002")

    (shared_dir / "versions" / "v0001" / "model" / "model.onnx").write_bytes(b"rot")
    assert shared.publish(origin).repaired == ()      # production only, by default
    clone = Registry(tmp_path / "clone")
    with pytest.raises(VersionRefused, match="refused v0001.*nothing of it was copied.*--check-all"):
        shared.pull(clone)
    assert shared.publish(origin, check_all=True).repaired == ("v0001",)
    assert shared.pull(clone).copied == ("v0001", "v0002") and clone.alias() == "v0002"


def test_the_unmounted_share_guard_knows_the_place_however_the_url_spells_it(tmp_path, candidate):
    base = tmp_path / "shared"
    reg = Registry(tmp_path / "reg")
    reg.promote(candidate, PASS, deploy_record("fp32"))
    SharedRegistry(f"file://{base}/").publish(reg)
    base.rename(tmp_path / "away")
    for spelling in (f"file://{base}", f"file://{base}//", f"file://localhost{base}", f"file://{base}/x/.."):
        with pytest.raises(SharedRegistryError, match="holds nothing, but .* published there before"):
            SharedRegistry(spelling).publish(reg)
        assert not base.exists()
    for bad in (f"file://{base}?x=1", f"file://{tmp_path}/my%20reg", f"file://{base}#top"):
        with pytest.raises(ValueError, match="no query, fragment or %-escape"):
            SharedRegistry(bad)


def test_a_host_rolled_back_to_a_version_whose_cached_copy_is_damaged_copies_it_again(tmp_path, candidate):
    origin, cache = Registry(tmp_path / "origin"), Registry(tmp_path / "cache")
    for _ in range(2):
        origin.promote(candidate, PASS, deploy_record("fp32"))
    shared = SharedRegistry(f"file://{tmp_path / 'shared'}")
    origin.rollback(to="v0001")
    shared.publish(origin)
    follower = Follower(shared, cache)
    assert follower.sync() == "v0001"
    origin.rollback(to="v0002")
    shared.publish(origin)
    assert follower.sync() == "v0002"
    (cache.path("v0001") / "model" / "model.onnx").write_bytes(b"rot")    # the host's own disk
    origin.rollback(to="v0001")
    shared.publish(origin)
    assert follower.sync() == "v0001"
    cache.verify("v0001")
    assert not (cache.root / ".incoming").exists()


WRITE_RECORD = """\
import json, os, sys
from pathlib import Path
sys.path.insert(0, os.environ["SHRINKFLOW_SRC"])
from shrinkflow.registry import Registry
out = Path("deploy/deployment.json")
out.parent.mkdir(parents=True, exist_ok=True)
# like the real record: the version, and figures measured in the run (never the same twice)
out.write_text(json.dumps({"version": Registry("registry").alias(), "measured": os.urandom(8).hex()}))
"""
DEPLOY_STAGE = """\
stages:
  deploy:
    cmd: python write_record.py
    deps: [write_record.py]
    outs:
      - deploy/deployment.json:
          cache: false
"""
GIT = ["git", "-c", "user.name=pull-test", "-c", "user.email=pull-test@localhost"]


@pytest.mark.slow  # ~8 s: in the full suite, not the quick run (kept under 3 minutes)
def test_a_second_clone_pulls_the_registry_and_the_deploy_record_so_dvc_status_is_clean(tmp_path, candidate):
    """A deploy stage (its record git-ignored and not cached, as the real
    one) ran on the deploying host, which published. A second clone: `dvc
    status` shows the deploy stage changed until `shrinkflow pull` copies
    the registry (verified) and restores the record dvc.lock pins; then it is
    clean and `shrinkflow status` verifies the same production. A version
    the clone deploys itself is refused by pull until it is published, and
    then reaches the first host's pull."""
    from shrinkflow.dvcrun import dvc_command

    url = f"file://{tmp_path / 'shared'}"
    origin = make_project(tmp_path / "origin", shared={"url": url})
    subprocess.run([*GIT, "init", "-q"], cwd=origin, check=True)
    dvc_command(["init", "-q"], origin)
    (origin / "dvc.yaml").write_text(DEPLOY_STAGE)
    (origin / "write_record.py").write_text(WRITE_RECORD)
    (origin / ".gitignore").write_text("registry/\ndeploy/deployment.json\n")
    Registry(origin / "registry").promote(candidate, PASS, deploy_record("fp32"))
    env = {**os.environ, "SHRINKFLOW_SRC": str(PROJECT_ROOT)}
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=origin, env=env, check=True, timeout=120)
    subprocess.run([*GIT, "add", "-A"], cwd=origin, check=True)
    subprocess.run([*GIT, "commit", "-qm", "deployed v0001"], cwd=origin, check=True)
    out = cli(origin, "publish")
    assert out.exit_code == ExitCode.OK, out.output

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True, timeout=60)
    assert json.loads(dvc_command(["status", "--json"], clone) or "{}") != {}   # the record is missing
    out = cli(clone, "pull")
    assert out.exit_code == ExitCode.OK, out.output
    assert f"pulled from {url}: v0001 copied and verified; production is v0001" in out.output
    assert "deploy/deployment.json, the record dvc.lock pins: restored" in out.output
    assert json.loads(dvc_command(["status", "--json"], clone) or "{}") == {}
    assert (clone / "deploy" / "deployment.json").read_bytes() == (origin / "deploy" / "deployment.json").read_bytes()
    mine = Registry(clone / "registry")
    assert mine.aliases() == {"production": "v0001"} and mine.verify("v0001")
    assert file_hashes(mine.path("v0001")) == file_hashes(Registry(origin / "registry").path("v0001"))
    out = cli(clone, "status")
    assert out.exit_code == ExitCode.OK and "v0001" in out.output, out.output
    assert "no new version copied" in cli(clone, "pull").output                  # idempotent

    # the clone deploys a version of its own: pull would hide it, publish sends it
    mine.promote(candidate, PASS, deploy_record("fp32"))
    out = cli(clone, "pull")
    assert out.exit_code == ExitCode.CRASH and "holds moves of production the shared registry has not seen " \
        "(promote to v0002" in out.output and "`shrinkflow publish` sends them there" in out.output, out.output
    assert cli(clone, "publish").exit_code == ExitCode.OK
    out = cli(origin, "pull")
    assert out.exit_code == ExitCode.OK and "v0002 copied and verified; production is v0002" in out.output
    # the origin's dvc.lock pins its own record, which it still has
    assert "deploy/deployment.json, the record dvc.lock pins: already here" in out.output, out.output


# ------------------------------------------------------------ a serving host over a shared directory
def test_a_host_with_only_the_shared_url_serves_production_and_follows_promotion_and_rollback(site):
    host, origin = site["host"], origin_registry(site)
    start = origin.alias()
    host.serves(start)
    assert "from the shared registry file://" in host.output_text()
    assert not (host.root / "registry").exists()          # it has no registry of its own
    cache = Registry(host.root / ".shrinkflow" / "registry-cache")
    # the exact files of the version production names
    assert file_hashes(cache.path(start)) == file_hashes(origin.path(start))
    assert httpx.get(f"{host.url}/metadata").json()["deployed"]["version"] == start

    new = promote_and_publish(site)
    host.serves(new)                                       # no restart
    assert host.proc.poll() is None
    out = cli(site["origin"], "rollback")                  # `shrinkflow rollback` publishes too
    assert out.exit_code == 0, out.output
    assert f"production: {new} -> {start}" in out.output and f"production {new} -> {start}" in out.output
    host.serves(start)
    assert host.health()["refused"] is None
    assert SharedRegistry(site["url"]).aliases() == origin.aliases()


@pytest.mark.slow  # ~10 s: in the full suite, not the quick run (kept under 3 minutes)
def test_a_host_with_several_workers_follows_with_every_worker_and_one_cache(site, tmp_path):
    """`shrinkflow serve --workers 2` on a serving host: each uvicorn worker
    follows the shared registry (they share one cache, under its lock); after
    a promotion every answer, whichever worker gives it, names the new
    version, and the cache holds one copy of it."""
    root = make_project(tmp_path / "host2", serve={"registry": "shared"}, shared={"url": site["url"]})
    host = Host(root, args=("--workers", "2"))
    try:
        start = origin_registry(site).alias()
        host.serves(start)
        new = promote_and_publish(site)
        deadline = time.time() + 30
        while True:    # a new connection per request: the kernel spreads them over both workers
            answers = [host.answer() for _ in range(40)]
            if set(answers) == {new}:
                break
            assert time.time() < deadline, f"answers still {sorted(set(answers))} after 30 s:\n{host.output_text()}"
            time.sleep(0.2)
        cache = Registry(root / ".shrinkflow" / "registry-cache")
        assert cache.alias() == new and new in cache.versions() and not (cache.root / ".incoming").exists()
        cache.verify(new)
        import psutil

        workers = [c for c in psutil.Process(host.proc.pid).children(recursive=True)
                   if "spawn_main" in cmdline_of(c)]
        assert len(workers) == 2, [cmdline_of(c) for c in psutil.Process(host.proc.pid).children(recursive=True)]
    finally:
        host.stop()


def test_a_tampered_shared_version_is_refused_and_the_host_keeps_serving(site):
    host, shared = site["host"], site["shared"]
    serving = origin_registry(site).alias()
    host.serves(serving)
    aliases = shared / "aliases.json"
    saved = aliases.read_text()
    bad = shared / "versions" / "v0999"
    try:
        # storage that changed a byte of a version, which production then names
        shutil.copytree(shared / "versions" / serving, bad)
        (bad / "model" / "model.onnx").write_bytes(b"rot")
        aliases.write_text(json.dumps({"production": "v0999"}))
        health = host.wait_for(lambda h: (h["refused"] or {}).get("version") == "v0999",
                               "the tampered version was not refused")
        assert "model.onnx" in health["refused"]["reason"] and "refused v0999" in health["refused"]["reason"]
        assert health["model_version"] == serving and host.answer() == serving
        cache = host.root / ".shrinkflow" / "registry-cache"
        assert not (cache / "versions" / "v0999").exists() and not (cache / ".incoming").exists()
    finally:
        shutil.rmtree(bad, ignore_errors=True)
        aliases.write_text(saved)
    host.wait_for(lambda h: h["refused"] is None, "the refusal did not clear once the alias moved back")
    assert host.answer() == serving


PUBLISHER = r"""
import sys
from shrinkflow.registry import Registry
from shrinkflow.shared_registry import SharedRegistry
print("ready", flush=True)
sys.stdin.readline()
SharedRegistry(sys.argv[2]).publish(Registry(sys.argv[1]))
print("done", flush=True)
"""


def test_an_upload_killed_midway_is_never_visible_and_the_next_publish_completes(site, tmp_path):
    host, shared, origin = site["host"], site["shared"], origin_registry(site)
    serving = origin.alias()
    host.serves(serving)
    new = origin.promote(padded(site["candidate"], tmp_path / "big"), PASS, deploy_record("fp32")).version
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(origin.root), site["url"]], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        deadline = time.time() + 60
        partial: list[Path] = []
        while not partial:
            assert time.time() < deadline and proc.poll() is None, "the publisher ended before it was caught"
            partial = [d for d in (shared / "versions").glob(".tmp-*") if any(d.rglob("*.bin"))]
        proc.send_signal(signal.SIGSTOP)            # frozen mid-upload
        assert not (shared / "versions" / new).exists(), "the kill landed after the upload: the test proved little"
        assert new not in SharedRegistry(site["url"]).versions()
        time.sleep(2 * POLL_S)                      # the host polls meanwhile
        health = host.health()
        assert (health["model_version"], health["refused"]) == (serving, None)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert SharedRegistry(site["url"]).aliases()["production"] == serving
        assert not (host.root / ".shrinkflow" / "registry-cache" / "versions" / new).exists()
        # the next publish completes; it leaves the young leftover (it could be
        # another host's upload in progress), and removes it once it is stale
        published, warning = publish_project(site["origin"], load_params(site["origin"] / "params.yaml"))
        assert warning is None and published.uploaded == (new,)
        leftover = list((shared / "versions").glob(".tmp-*"))
        assert len(leftover) == 1 and leftover[0].name not in SharedRegistry(site["url"]).versions()
        old = time.time() - STALE_UPLOAD_S - 60
        os.utime(leftover[0], (old, old))
        publish_project(site["origin"], load_params(site["origin"] / "params.yaml"))
        assert not list((shared / "versions").glob(".tmp-*"))
        host.serves(new)
    finally:
        if proc.poll() is None:
            proc.kill()
        # back to what the module's other tests expect
        if origin.alias() == new:
            assert cli(site["origin"], "rollback", "--to", serving).exit_code == 0
    host.serves(serving)


# ------------------------------------------------------------ a serving host over real SSH
@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = Sshd(tmp_path_factory.mktemp("shared-sshd"))
    server.start()
    host_key = (server.root / "host_key.pub").read_text().split()
    known = server.root / "known_hosts"
    known.write_text(f"[127.0.0.1]:{server.port} {host_key[0]} {host_key[1]}\n")
    server.env = {KEY_ENV: str(server.client_key), KNOWN_HOSTS_ENV: str(known)}
    try:
        yield server
    finally:
        server.stop()


def stop_sshd(server: Sshd) -> None:
    """Stop sshd and the connections it serves (each runs in its own
    session, so they outlive the listener unless killed too)."""
    import psutil

    connections = psutil.Process(server.proc.pid).children(recursive=True)
    server.proc.terminate()
    server.proc.wait(timeout=15)
    for child in connections:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def restart_replica(root: Path) -> tuple[dict, str]:
    """A replica of the host in ``root`` (re)started now, as `shrinkflow
    serve` starts one (its first sync, then the app: in this process, on a
    free port): its /health and the version that answers."""
    from flows.cli import _follow_at_start
    from shrinkflow.predlog import PredictionLog
    from shrinkflow.serving import create_app, served_registry
    from tests.test_serving_app import running

    params = load_params(root / "params.yaml")
    registry, follower = served_registry(root, params)
    _follow_at_start(follower)
    app = create_app(registry, PredictionLog(root / "restarted.db"), params.serve, follower=follower)
    with running(app) as srv:
        answer = httpx.post(f"{srv.url}/predict", json={"texts": ["a gem"]}, timeout=30).json()
        return httpx.get(f"{srv.url}/health").json(), answer["model_version"]


@pytest.mark.slow
def test_over_ssh_a_host_serves_production_and_follows_it_while_the_server_comes_and_goes(candidate, sshd,
                                                                                           tmp_path, capsys):
    url = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}{tmp_path / 'storage'}"
    origin = Registry(tmp_path / "origin-registry")
    first, second = (origin.promote(candidate, PASS, deploy_record("fp32")).version for _ in range(2))
    origin.rollback(to=first)
    with pytest.MonkeyPatch.context() as env:      # the key and known_hosts, as a user exports them
        for key, value in sshd.env.items():
            env.setenv(key, value)
        # the server's host key is checked: another key in known_hosts, and nothing is read
        wrong = tmp_path / "wrong_known_hosts"
        wrong.write_text(f"[127.0.0.1]:{sshd.port} " + " ".join(sshd.client_key.with_suffix(".pub").read_text()
                                                              .split()[:2]) + "\n")
        env.setenv(KNOWN_HOSTS_ENV, str(wrong))
        with pytest.raises(SharedRegistryError, match="Host key is not trusted"):
            SharedRegistry(url).aliases()
        env.setenv(KNOWN_HOSTS_ENV, sshd.env[KNOWN_HOSTS_ENV])
        shared = SharedRegistry(url)
        published = shared.publish(origin)          # every version, then the alias, over SFTP
        assert published.uploaded == (first, second) and shared.aliases() == origin.aliases()
        host = Host(make_project(tmp_path / "host", serve={"registry": "shared"}, shared={"url": url}), sshd.env)
        try:
            host.serves(first)
            cache = Registry(host.root / ".shrinkflow" / "registry-cache")
            assert file_hashes(cache.path(first)) == file_hashes(origin.path(first))
            origin.rollback(to=second)
            assert shared.publish(origin).production == second
            host.serves(second)
            # the storage goes down: the host keeps serving, and says why it cannot follow
            stop_sshd(sshd)
            health = host.wait_for(lambda h: bool(h["refused"]) and h["refused"]["version"] is None,
                                   "an unreachable shared registry was not reported")
            assert f"127.0.0.1:{sshd.port}" in health["refused"]["reason"] and host.answer() == second
            # a replica (re)started meanwhile serves what its cache holds, and says why
            capsys.readouterr()
            health, answered = restart_replica(host.root)
            assert f"serving {second} from the local copy" in capsys.readouterr().err
            assert (health["model_version"], answered, health["refused"]["version"]) == (second, second, None)
            assert "Connect call failed" in health["refused"]["reason"]
            sshd.start()                            # back: the host follows again, without a restart
            origin.rollback(to=first)
            assert SharedRegistry(url).publish(origin).production == first
            host.serves(first)
            assert host.health()["refused"] is None
        finally:
            host.stop()


# ------------------------------------------------------------ `shrinkflow status` on a serving host
def host_status(root: Path, json_exit: int | None = None) -> tuple[int, str, dict]:
    """`shrinkflow status` and `status --json` in the checkout ``root``: the
    exit code and text of the first, the document of the second (the same
    code, unless ``json_exit`` says another)."""
    text, doc = cli(root, "status"), cli(root, "status", "--json")
    assert doc.exit_code == (text.exit_code if json_exit is None else json_exit), doc.output
    return text.exit_code, text.output, json.loads(doc.stdout)


def test_status_on_a_serving_host_compares_the_shared_production_with_its_verified_cache(site, tmp_path,
                                                                                        monkeypatch):
    """A serving host has no registry of its own: `status` names the shared
    production and what this host's cache holds (its files verified), before
    any sync, once synced, when the cache lags, and when the shared registry
    cannot be reached (the cache is shown, with the warning)."""
    from shrinkflow.status import NOTHING_DEPLOYED

    origin, url = origin_registry(site), site["url"]
    start = origin.alias()
    # the module's host, synced by its real `shrinkflow serve`
    site["host"].serves(start)
    code, text, doc = host_status(site["host"].root)
    assert code == 0, text
    assert f"shared production: {start}\n" in text and f"): {start} (the shared production)\n" in text
    assert f"production: {start} (fp32)" in text and "files verified" in text and "warning" not in text
    assert doc["shared"] == {"url": url, "production": start, "cached": start, "state": "in_sync", "warning": None,
                             "cache_dir": str(site["host"].root / ".shrinkflow" / "registry-cache")}
    assert doc["deployed"]["version"] == start and doc["deployed"]["integrity"] == "verified"

    # a fresh serving checkout, before any sync: not "nothing is deployed yet"; status copies nothing
    fresh = make_project(tmp_path / "fresh", serve={"registry": "shared"}, shared={"url": url})
    code, text, doc = host_status(fresh)
    assert code == 0 and NOTHING_DEPLOYED not in text, text
    # rollback and versions there say where they belong instead of the deploying host's advice
    out = cli(fresh, "rollback")
    assert out.exit_code == ExitCode.NOTHING and "this checkout is a serving host" in out.output, out.output
    assert "roll back on the host that deploys" in out.output and "nothing to roll back" not in out.output
    out = cli(fresh, "versions")
    assert out.exit_code == 0 and "this checkout is a serving host" in out.output, out.output
    assert "run `shrinkflow run`" not in out.output
    assert f"this host has not copied production yet: the shared registry's production is {start}" in text
    assert "): empty\n" in text
    assert (doc["deployed"], doc["shared"]["state"], doc["shared"]["production"]) == (None, "not_synced", start)
    assert not (fresh / ".shrinkflow" / "registry-cache").exists()

    # synced (what `serve` does first), then production moves on and the cache lags
    params = load_params(fresh / "params.yaml")
    cache = Registry(fresh / params.shared_registry.cache_dir)
    assert Follower(SharedRegistry(url), cache).sync() == start
    new = promote_and_publish(site)
    try:
        code, text, doc = host_status(fresh)
        assert code == 0, text
        assert f"warning: this host's cache lags the shared registry: it holds {start}, the shared production is " \
               f"{new}" in text
        assert f"production: {start} (fp32)" in text and "files verified" in text
        assert (doc["shared"]["state"], doc["shared"]["cached"], doc["shared"]["production"]) == ("lags", start, new)
    finally:
        assert cli(site["origin"], "rollback", "--to", start).exit_code == 0   # as the module's other tests expect

    # the shared registry unreachable: the cache is shown, verified, with the reason
    known = tmp_path / "known_hosts"
    known.write_text("")
    monkeypatch.setenv(KNOWN_HOSTS_ENV, str(known))
    down = f"ssh://nobody@127.0.0.1:{free_port()}/srv/reg"      # nothing listens there
    cut = make_project(tmp_path / "cut", serve={"registry": "shared"}, shared={"url": down})
    shutil.copytree(cache.root, cut / ".shrinkflow" / "registry-cache")
    code, text, doc = host_status(cut)
    assert code == 0, text
    assert "shared production: unknown" in text and f"warning: the shared registry {down} cannot be reached" in text
    assert "showing this host's cache, which may lag" in text and "Connect call failed" in text
    assert f"production: {start} (fp32)" in text and "files verified" in text
    assert (doc["shared"]["state"], doc["shared"]["production"], doc["shared"]["cached"]) == ("unusable", None, start)
    assert doc["deployed"]["integrity"] == "verified"
    # a share that is not mounted (the URL's directory is missing or empty): said, the cache is shown
    lost = make_project(tmp_path / "lost", serve={"registry": "shared"}, shared={"url": f"file://{tmp_path}/unmounted"})
    shutil.copytree(cache.root, lost / ".shrinkflow" / "registry-cache")
    code, text, doc = host_status(lost)
    assert code == 0 and "has nothing in production (no aliases.json there: is the storage mounted" in text, text
    assert (doc["shared"]["state"], doc["deployed"]["version"]) == ("lost_production", start)
    # ... whose copy fails its hashes: exit 3, as for a local registry (whose --json says it and exits 0)
    model = next((cut / ".shrinkflow" / "registry-cache" / "versions" / start / "model").glob("*.onnx"))
    model.write_bytes(b"rot")
    code, text, doc = host_status(cut, json_exit=0)
    assert code == ExitCode.CRASH and "files FAILED" in text and model.name in text
    assert doc["deployed"]["integrity"].startswith("FAILED") and doc["shared"]["state"] == "unusable"
    # ... and with nothing cached there is nothing to show: exit 3, as `serve` would
    empty = make_project(tmp_path / "empty", serve={"registry": "shared"}, shared={"url": down})
    code, text, doc = host_status(empty)
    assert code == ExitCode.CRASH and "holds nothing: nothing to show" in text
    assert (doc["deployed"], doc["shared"]["state"]) == (None, "unusable")


# ------------------------------------------------------------ URLs: the whole kind
_SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=8).filter(
    lambda s: s not in (".", ".."))


@given(segments=st.lists(_SEGMENT, min_size=1, max_size=4), slashes=st.integers(1, 3),
       trailing=st.booleans(), detour=st.booleans(), host=st.sampled_from(["", "localhost"]))
@settings(max_examples=60, deadline=None)
def test_every_spelling_of_one_shared_directory_is_one_place(segments, slashes, trailing, detour, host):
    """However a file:// URL spells a directory (doubled slashes, a trailing
    slash, a detour through x/.., localhost), it is the same place to the
    unmounted-share guard."""
    plain = SharedRegistry("file:///" + "/".join(segments))
    path = ("/" * slashes).join(segments) + ("/x/.." if detour else "") + ("/" if trailing else "")
    assert SharedRegistry(f"file://{host}/{path}").key == plain.key == f"file:///{'/'.join(segments)}"


@given(segments=st.lists(_SEGMENT, min_size=1, max_size=3), bad=st.sampled_from(["?", "#", "%"]),
       tail=st.text(alphabet="abc=12", max_size=4), scheme=st.sampled_from(["file://", "ssh://u@h:22"]))
@settings(max_examples=60, deadline=None)
def test_every_url_with_a_query_fragment_or_escape_is_refused(segments, bad, tail, scheme):
    with pytest.raises(ValueError, match="no query, fragment or %-escape"):
        SharedRegistry(f"{scheme}/{'/'.join(segments)}{bad}{tail}")
