"""The project's DVC remote: which one a push goes to, switching a project
to a team remote over SSH, and what an unreachable remote reports (no
Prefect here).

Every push shrinkflow makes (the window and feedback archives,
``shrinkflow.dvcrun.dvc_add_and_push``) is ``dvc push`` to the project's
*default* remote, whatever its protocol: a local folder for one user (the
project's ``local`` remote, ``../.dvc-remote``), ``ssh://`` for a team
(docs/team.md). The remote's name and URL are project config
(``.dvc/config``, committed, so a clone knows them); credentials (the key
file, a user name that differs per person, a password) are written only to
``.dvc/config.local``, which DVC keeps out of git.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from shrinkflow.dvcrun import DVC_PUSH_TIMEOUT_S, dvc_add_and_push, dvc_command
from shrinkflow.errors import MissingInput

# The connect timeout written for an SSH remote (seconds). dvc-ssh's own
# default is 1800: a push to a host that drops packets would hang for half
# an hour before saying anything.
SSH_CONNECT_TIMEOUT_S = 30
# A remote name DVC accepts as a config section and a shell word.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RemoteError(RuntimeError):
    """The project's DVC remote could not be reached, or refused a push or a
    check (host down, key refused, no such directory). The message names
    the remote and its URL (never a password) and DVC's reason; after a
    failed push it also says that nothing is lost. Kept here, not in
    shrinkflow.errors: no stage raises it (errors.py is every stage's dep)."""

    def __init__(self, message: str, remote: str | None = None, url: str | None = None):
        self.remote, self.url = remote, url
        super().__init__(message)


def redact_url(url: str) -> str:
    """``url`` with any password removed (``ssh://u:secret@h/p`` ->
    ``ssh://u@h/p``): what a message may print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = (f"{parts.username}@" if parts.username else "") + host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def check_ssh_url(url: str) -> str:
    """Validate an SSH remote URL, ``ssh://[user@]host[:port]/absolute/path``;
    returns it unchanged. Raises ValueError for another scheme, no host, no
    path, a bad port, or a password in the URL (it would be committed in
    .dvc/config: a password goes in .dvc/config.local)."""
    parts = urlsplit(url)
    if parts.scheme != "ssh":
        raise ValueError(f"{redact_url(url)!r} is not an ssh:// URL (ssh://[user@]host[:port]/path)")
    if parts.password is not None:
        raise ValueError("the URL holds a password, which would be committed in .dvc/config: remove it and use a "
                         "key file (or `dvc remote modify --local NAME password ...`, which writes "
                         ".dvc/config.local)")
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host (ssh://[user@]host[:port]/path)")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"{url!r}: the port is not a number from 0 to 65535") from None
    if parts.path in ("", "/"):
        raise ValueError(f"{url!r} names no directory on the host (ssh://[user@]host[:port]/path)")
    return url


def check_key_file(key_file: Path | str) -> Path:
    """The private key file as an absolute path (``~`` expanded). Raises
    MissingInput when it is not a readable file, ValueError when it is a
    public key (``.pub``)."""
    path = Path(key_file).expanduser().resolve()
    if path.suffix == ".pub":
        raise ValueError(f"{path} is a public key: give the private key (the same name without .pub)")
    if not path.is_file():
        raise MissingInput(f"{path}: no such key file")
    try:
        path.open("rb").close()
    except OSError as exc:
        raise MissingInput(f"{path}: the key file cannot be read ({exc.strerror})") from None
    return path


@dataclass(frozen=True)
class SshRemote:
    """An SSH remote as ``shrinkflow remote-ssh`` writes it: ``name`` and
    ``url`` go in .dvc/config (committed), ``key_file`` (absolute) and
    ``user`` (optional: overrides the URL's user for this checkout only) in
    .dvc/config.local. ``timeout_s``: the connect timeout, seconds."""

    name: str
    url: str
    key_file: Path
    user: str | None = None
    default: bool = True
    timeout_s: int = SSH_CONNECT_TIMEOUT_S

    def commands(self, replace: bool = False) -> list[list[str]]:
        """The ``dvc`` commands (without ``dvc``) that configure it, in
        order; ``replace``: overwrite a remote of the same name. These are
        the commands docs/team.md lists for doing it by hand."""
        flags = (["--default"] if self.default else []) + (["--force"] if replace else [])
        cmds = [["remote", "add", *flags, self.name, self.url],
                ["remote", "modify", self.name, "timeout", str(self.timeout_s)],
                ["remote", "modify", "--local", self.name, "keyfile", str(self.key_file)]]
        if self.user:
            cmds.append(["remote", "modify", "--local", self.name, "user", self.user])
        return cmds


def ssh_remote(name: str, url: str, key_file: Path | str, user: str | None = None, default: bool = True,
               timeout_s: int = SSH_CONNECT_TIMEOUT_S) -> SshRemote:
    """A validated ``SshRemote``. Raises ValueError (a bad name, URL or
    timeout) or MissingInput (no key file), before anything is written."""
    if not _NAME.match(name):
        raise ValueError(f"{name!r}: a remote name is letters, digits, '.', '_' and '-'")
    if not timeout_s > 0:
        raise ValueError(f"timeout {timeout_s}: must be a positive number of seconds")
    return SshRemote(name, check_ssh_url(url), check_key_file(key_file), user, default, int(timeout_s))


def dvc_config(project_dir: Path | str) -> dict[str, str]:
    """The project's DVC config as DVC merges it (system, global, project,
    then config.local: a later level wins), from one ``dvc config --list``:
    ``{"core.remote": "team", "remote.team.url": "ssh://...", ...}``. Holds
    config.local's credentials too: never print it whole. Raises
    RuntimeError when DVC cannot read its config."""
    conf: dict[str, str] = {}
    for line in dvc_command(["config", "--list"], project_dir).splitlines():
        key, sep, value = line.partition("=")
        if sep:
            conf[key.strip()] = value.strip()
    return conf


def remote_exists(project_dir: Path | str, name: str) -> bool:
    """Whether the project's DVC config (any level) defines remote ``name``."""
    return f"remote.{name}.url" in dvc_config(project_dir)


def add_ssh_remote(project_dir: Path | str, remote: SshRemote, replace: bool = False) -> list[list[str]]:
    """Run ``remote.commands()`` in the project; returns them. Raises
    ValueError when a remote of that name exists and ``replace`` is false
    (nothing written), RuntimeError when DVC refuses a command (an unknown
    config option: dvc-ssh not installed)."""
    if not replace and remote_exists(project_dir, remote.name):
        raise ValueError(f"the project already has a remote named {remote.name!r} (--force replaces it)")
    cmds = remote.commands(replace)
    for cmd in cmds:
        dvc_command(cmd, project_dir)
    return cmds


def default_remote_url(project_dir: Path | str) -> tuple[str | None, str | None]:
    """The remote ``dvc push`` and ``dvc pull`` use in the project (core.remote,
    from any config level) and its URL without a password; (None, None)
    when none is set, or when DVC cannot read its config."""
    try:
        conf = dvc_config(project_dir)
    except RuntimeError:
        return None, None
    name = conf.get("core.remote") or None
    url = conf.get(f"remote.{name}.url") if name else None
    return name, redact_url(url) if url else None


def default_remote(project_dir: Path | str) -> str | None:
    """The name of the project's default remote (None: none is set)."""
    return default_remote_url(project_dir)[0]


def _dvc_reason(output: str) -> str:
    """DVC's own error lines from its output (the last lines when none is
    marked ERROR), for a one-paragraph message."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return " ".join(errors or lines[-3:])[-1500:]


def push(targets: list[str], project_dir: Path | str, timeout_s: float = DVC_PUSH_TIMEOUT_S,
         remote: tuple[str | None, str | None] | None = None) -> str:
    """``dvc push <targets>`` (none: everything) to the project's default
    remote, whatever its protocol; returns DVC's output. ``remote``: its
    (name, URL) when the caller has them (default: looked up on failure).
    Raises RemoteError when the push fails or outlives ``timeout_s``: it
    names the remote, its URL and DVC's reason, and says that nothing is
    lost (the local cache keeps every object; a later ``dvc push`` sends
    them)."""
    try:
        return dvc_command(["push", *targets], project_dir, timeout_s=timeout_s)
    except RuntimeError as exc:
        name, url = remote if remote is not None else default_remote_url(project_dir)
        what = " ".join(targets) or "the project's data"
        raise RemoteError(
            f"could not push {what} to the DVC remote {name!r} ({url}): {_dvc_reason(str(exc))}. "
            "Nothing is lost: the data is in the local cache (.dvc/cache) and recorded in its .dvc file; run "
            "`dvc push` once the remote answers (docs/team.md, \"An unreachable remote\")",
            remote=name, url=url) from None


def probe_remote(project_dir: Path | str, name: str | None = None) -> bool:
    """Connect to remote ``name`` (default: the project's default remote)
    through DVC's own filesystem for it, with the project's config and
    config.local, and look for its directory. Returns whether the directory
    exists (False: reachable, nothing pushed yet; ``dvc push`` creates it).
    Raises RemoteError when it cannot be reached or refuses the login."""
    from dvc.repo import Repo

    root = Path(project_dir).resolve()
    # dvc.repo.Repo resolves paths against the process's directory: enter
    # the project for the whole call.
    with contextlib.chdir(root), Repo(str(root)) as repo:
        try:
            remote = repo.cloud.get_remote(name)
        except Exception as exc:  # noqa: BLE001  (no such remote, no default, its plugin missing)
            raise RemoteError(f"the DVC remote {name or '(the default)'} cannot be used: {exc}",
                              remote=name) from None
        url = redact_url(repo.config["remote"][remote.name]["url"])
        try:
            return bool(remote.fs.exists(remote.path))
        except Exception as exc:  # noqa: BLE001  (asyncssh, OSError, a plugin's own errors)
            # dvc-ssh reports a refused key as PermissionError, a host that is
            # down as ConnectionRefusedError (or a timeout): say which.
            what = "refused the login" if isinstance(exc, PermissionError) else "cannot be reached"
            raise RemoteError(f"the DVC remote {remote.name!r} ({url}) {what}: {type(exc).__name__}: {exc}",
                              remote=remote.name, url=url) from None


def archive(path: Path | str, project_dir: Path | str) -> str | None:
    """``dvc add <path>`` and a push to the default remote, for what a
    flow archives on its way (the monitor's window, the feedback dataset):
    an unreachable remote must not stop the re-compression or retrain that
    needs the data, which is safe in the local cache either way. Returns
    None when pushed (or no default remote is set), else the RemoteError's
    message, for the flow to report. Raises RuntimeError when the add
    itself fails (nothing is archived then)."""
    try:
        dvc_add_and_push(path, project_dir)
    except RemoteError as exc:
        return str(exc)
    return None
