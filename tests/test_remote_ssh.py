"""Models and data shared through a DVC remote over real SSH.

One real sshd per module (Debian's openssh-server, installed by
scripts/setup.sh): ``sshd -D -f CONFIG -p PORT`` on 127.0.0.1, with a host
key and a user key made here by ssh-keygen, a dedicated authorized_keys and
no password login. A tiny git+DVC project (data tracked with ``dvc add``; a
teacher and a candidate directory made by two DVC stages: small stand-in
files derived from the data, since what is tested is how they travel) is
switched to the remote by ``shrinkflow remote-ssh`` and pushed by the
product's own push (``shrinkflow.remote``). A second clone, given only its
key in config.local, pulls exactly the same files. With sshd down, the
archive step a flow runs fails to push with a clear warning and loses
nothing; once sshd is back, the same step pushes.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from shrinkflow.dvcrun import dvc_command
from shrinkflow.errors import ExitCode, MissingInput
from shrinkflow.paths import FEEDBACK_ARCHIVE, WINDOWS_ARCHIVE
from shrinkflow.remote import (SSH_CONNECT_TIMEOUT_S, RemoteError, SshRemote, archive, check_ssh_url,
                               default_remote, probe_remote, push, redact_url, ssh_remote)
from tests.conftest import PROJECT_ROOT
from tests.netports import free_port

# A real server per module: in the full suite (CI), not in the quick `-m "not slow"` run.
pytestmark = pytest.mark.slow

GIT = ["git", "-c", "user.name=ssh-test", "-c", "user.email=ssh-test@localhost"]
NAME = "team"


# ------------------------------------------------------------ no server needed
def test_an_ssh_url_with_a_password_another_scheme_or_no_path_is_refused():
    assert check_ssh_url("ssh://dvc@storage:2222/srv/dvc/shrinkflow") == "ssh://dvc@storage:2222/srv/dvc/shrinkflow"
    with pytest.raises(ValueError, match="password.*config.local"):
        check_ssh_url("ssh://dvc:hunter2@storage/srv/dvc")
    with pytest.raises(ValueError, match="not an ssh:// URL"):
        check_ssh_url("s3://bucket/shrinkflow")
    with pytest.raises(ValueError, match="names no directory"):
        check_ssh_url("ssh://dvc@storage:2222/")
    with pytest.raises(ValueError, match="names no host"):
        check_ssh_url("ssh:///srv/dvc")
    assert redact_url("ssh://dvc:hunter2@storage:2222/srv") == "ssh://dvc@storage:2222/srv"


def test_the_key_goes_only_to_config_local_and_the_remote_becomes_the_default(tmp_path):
    key = tmp_path / "id_ed25519"
    key.write_text("not read here")
    remote = ssh_remote(NAME, "ssh://dvc@storage/srv/dvc", key, user="bob")
    assert remote.commands() == [
        ["remote", "add", "--default", NAME, "ssh://dvc@storage/srv/dvc"],
        ["remote", "modify", NAME, "timeout", str(SSH_CONNECT_TIMEOUT_S)],
        ["remote", "modify", "--local", NAME, "keyfile", str(key.resolve())],
        ["remote", "modify", "--local", NAME, "user", "bob"]]
    assert SshRemote(NAME, "ssh://h/p", key, default=False).commands(replace=True)[0] == [
        "remote", "add", "--force", NAME, "ssh://h/p"]
    with pytest.raises(ValueError, match="public key"):
        ssh_remote(NAME, "ssh://h/p", tmp_path / "id_ed25519.pub")
    with pytest.raises(MissingInput, match="no such key file"):
        ssh_remote(NAME, "ssh://h/p", tmp_path / "absent")


# ------------------------------------------------------------ a real sshd
def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True,
                   capture_output=True, timeout=30)
    return path


class Sshd:
    """Debian's sshd in the foreground on 127.0.0.1:``port``: public-key
    login only, as the user running the tests, with keys made here."""

    def __init__(self, root: Path):
        self.root, self.port, self.user = root, free_port(), getpass.getuser()
        self.client_key = _keygen(root / "client_key")
        host_key = _keygen(root / "host_key")
        authorized = root / "authorized_keys"
        authorized.write_text((root / "client_key.pub").read_text())
        authorized.chmod(0o600)
        self.config = root / "sshd_config"
        self.config.write_text("\n".join([
            "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"PidFile {root / 'sshd.pid'}",
            f"AuthorizedKeysFile {authorized}", "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", f"AllowUsers {self.user}",
            # pytest's temporary directories sit under a world-writable /tmp
            "StrictModes no", "UsePAM no", "LogLevel VERBOSE",
            # SFTP only, as docs/team.md sets up the server: DVC needs nothing else
            "Subsystem sftp internal-sftp", "ForceCommand internal-sftp", "AllowTcpForwarding no", ""]))
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        assert Path(sshd).is_file(), "sshd is not installed (scripts/setup.sh installs Debian's openssh-server)"
        if os.geteuid() == 0:  # sshd's privilege-separation directory (systemd makes it on a real host)
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        log = open(self.root / "sshd.log", "ab")
        self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(self.config), "-p", str(self.port)],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"sshd exited:\n{self.log()}"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"sshd did not answer on 127.0.0.1:{self.port} in 15 s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)

    def log(self) -> str:
        return (self.root / "sshd.log").read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------ the project
# Two DVC stages in the shape of the project's train and compress: a teacher
# directory from the data, a candidate directory from the teacher.
MAKE_MODELS = '''\
import hashlib, json, sys
from pathlib import Path

if sys.argv[1] == "teacher":
    seed = hashlib.sha256(Path("data/raw/texts.tsv").read_bytes()).digest()
    out = Path("models/teacher")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"hidden_size": 8, "num_layers": 1}))
    (out / "weights.bin").write_bytes(seed * 2048)
else:
    weights = Path("models/teacher/weights.bin").read_bytes()
    out = Path("models/candidates/int8")
    out.mkdir(parents=True, exist_ok=True)
    (out / "weights.bin").write_bytes(bytes(b // 2 for b in weights))
    (out / "measurements.json").write_text(json.dumps({"size_bytes": len(weights) // 4}))
'''
DVC_YAML = '''\
stages:
  train:
    cmd: python make_models.py teacher
    deps: [make_models.py, data/raw]
    outs: [models/teacher]
  compress:
    cmd: python make_models.py candidate
    deps: [make_models.py, models/teacher]
    outs: [models/candidates]
'''


@dataclass(frozen=True)
class Origin:
    root: Path
    storage: Path             # the remote's directory, on the sshd host (here: this machine)
    url: str
    cli_output: str
    files: dict[str, str]     # sha256 of every file under data/ and models/, as committed


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for top in ("data", "models") for p in sorted((root / top).rglob("*")) if p.is_file()}


def git(root: Path, *args: str) -> str:
    return subprocess.run(GIT + list(args), cwd=root, check=True, capture_output=True, text=True,
                          timeout=60).stdout


def object_path(base: Path, md5: str) -> Path:
    """Where DVC 3 stores an object of md5 ``md5`` in a cache or remote."""
    return base / "files" / "md5" / md5[:2] / md5[2:]


@pytest.fixture(scope="module")
def origin(sshd, tmp_path_factory) -> Origin:
    """The first user's project: data added (the raw data and a window
    archive), two stages run, switched to the SSH remote by ``shrinkflow
    remote-ssh`` (the one-user ``local`` remote is the default until then),
    then everything pushed by the product's own push."""
    base = tmp_path_factory.mktemp("origin")
    root, storage = base / "project", base / "storage" / "shrinkflow"
    root.mkdir()
    git(root, "init", "-q")
    dvc_command(["init", "-q"], root)
    shutil.copy(PROJECT_ROOT / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copy(PROJECT_ROOT / "params.yaml", root / "params.yaml")
    (root / "make_models.py").write_text(MAKE_MODELS)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "texts.tsv").write_text("id\ttext\tlabel\n1\tA gem of a film.\t1\n2\tDull.\t0\n")
    (root / WINDOWS_ARCHIVE).mkdir(parents=True)
    (root / WINDOWS_ARCHIVE / "window-0001.txt").write_text("a window of production text\n")
    dvc_command(["add", "-q", "data/raw", str(WINDOWS_ARCHIVE)], root)
    dvc_command(["repro", "-q"], root)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "a tiny project")

    url = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}{storage}"
    # The real command, in this process (a subprocess would add seconds of imports)
    with contextlib.chdir(root):
        out = CliRunner().invoke(app, ["remote-ssh", NAME, url, "--key-file", str(sshd.client_key)])
    assert out.exit_code == ExitCode.OK, out.output + sshd.log()
    git(root, "commit", "-qam", "DVC remote over SSH")
    push([], root)  # everything, as `dvc push` does
    return Origin(root, storage, url, out.output, tree_hashes(root))


def test_remote_ssh_commits_the_remote_and_keeps_the_key_in_config_local(origin, sshd):
    assert "answered" in origin.cli_output, origin.cli_output
    config = (origin.root / ".dvc" / "config").read_text()
    local = (origin.root / ".dvc" / "config.local").read_text()
    assert f"url = {origin.url}" in config and f"remote = {NAME}" in config, config
    assert "url = ../.dvc-remote" in config  # the one-user remote stays defined
    assert "keyfile" in local and str(sshd.client_key) in local, local
    tracked = git(origin.root, "ls-files").split()
    assert ".dvc/config" in tracked and ".dvc/config.local" not in tracked
    for rel in tracked:
        assert str(sshd.client_key) not in (origin.root / rel).read_text(errors="replace"), rel
    assert default_remote(origin.root) == NAME


def test_the_same_name_again_or_a_password_in_the_url_is_refused_and_nothing_is_written(origin, monkeypatch, sshd):
    monkeypatch.chdir(origin.root)
    before = (origin.root / ".dvc" / "config").read_bytes()
    out = CliRunner().invoke(app, ["remote-ssh", NAME, origin.url + "-other", "--key-file", str(sshd.client_key)])
    assert out.exit_code == ExitCode.USAGE and "already has a remote named 'team'" in out.output, out.output
    out = CliRunner().invoke(app, ["remote-ssh", NAME, "ssh://u:pw@h/p", "--key-file", str(sshd.client_key)])
    assert out.exit_code == ExitCode.USAGE and "password" in out.output, out.output
    assert (origin.root / ".dvc" / "config").read_bytes() == before


def test_a_second_clone_pulls_exactly_the_same_data_and_models(origin, sshd, tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(origin.root), str(clone)], check=True, timeout=60)
    assert not (clone / "models" / "teacher").exists() and not (clone / ".dvc" / "config.local").exists()
    dvc_command(["remote", "modify", "--local", NAME, "keyfile", str(sshd.client_key)], clone)  # only the key
    dvc_command(["pull", "-q"], clone)
    assert json.loads(dvc_command(["status", "--json"], clone) or "{}") == {}
    pulled = tree_hashes(clone)
    assert {"models/teacher/weights.bin", "models/candidates/int8/weights.bin", "data/raw/texts.tsv",
            "data/windows/window-0001.txt"} <= set(pulled)
    assert pulled == origin.files


def test_a_push_while_sshd_is_down_fails_clearly_loses_nothing_and_succeeds_after_a_restart(origin, sshd):
    """What the retrain flow archives (the feedback dataset) while the
    remote is down: archived locally, a clear warning instead of a push (the
    flow goes on), then a plain push once sshd is back."""
    archive_dir = origin.root / FEEDBACK_ARCHIVE
    archive_dir.mkdir(parents=True, exist_ok=True)
    body = b'{"text": "A gem of a film.", "label": "positive"}\n'
    (archive_dir / "labels-0001.jsonl").write_bytes(body)
    md5 = hashlib.md5(body).hexdigest()
    sshd.stop()
    try:
        t0 = time.monotonic()
        warning = archive(FEEDBACK_ARCHIVE, origin.root)
        assert time.monotonic() - t0 < 60
        assert warning is not None and f"to the DVC remote '{NAME}' ({origin.url})" in warning, warning
        assert "Nothing is lost" in warning and "`dvc push`" in warning, warning
        assert "ERROR" in warning, warning  # DVC's own reason
        assert object_path(origin.root / ".dvc" / "cache", md5).read_bytes() == body  # in the local cache
        assert (origin.root / f"{FEEDBACK_ARCHIVE}.dvc").is_file()
        assert not object_path(origin.storage, md5).exists()
        with pytest.raises(RemoteError, match=f"'{NAME}' .* cannot be reached"):
            probe_remote(origin.root)
    finally:
        sshd.start()
    assert archive(FEEDBACK_ARCHIVE, origin.root) is None  # the same archive step, now pushed
    assert object_path(origin.storage, md5).read_bytes() == body
