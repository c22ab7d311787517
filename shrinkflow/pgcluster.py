"""A PostgreSQL cluster of our own on a loopback port, run with the
machine's PostgreSQL server binaries (``initdb``, ``pg_ctl``, ``postgres``).

The tests run the shared prediction log against one (a throwaway cluster in
a temporary directory), and ``team up`` hosts Prefect's database in one kept
inside the project. Constructing a ``PgCluster`` touches nothing;
``init()`` creates the cluster (or finds the one already there), ``start()``
and ``stop()`` run it, ``url()`` names a database in it.

Layout of ``root``::

    root/data/       the cluster (PGDATA), created by initdb
    root/server.log  the server's output (pg_ctl -l)
    root/pgpass      the password, in libpq's passfile format, mode 0600
    root/port        the port of the last start

The database superuser (``user``) gets a random password at ``init()``;
it is written only to ``root/pgpass``, which clients read through libpq's
``PGPASSFILE`` (``env()``) or ``passfile=``: never into params.yaml or a URL.
The server listens on ``host`` only (loopback by default) and opens no Unix
socket (a project path can be longer than a socket path may be).

PostgreSQL refuses to run as root. When this process is root, initdb and
pg_ctl run as ``system_user`` (``postgres`` by default) through ``runuser``,
and ``root`` is handed to that user: every directory above it must be
traversable by that user (a directory under a 0700 ``/root`` is not;
``init()`` says so rather than let initdb fail obscurely).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from shrinkflow.ports import free_port, port_is_free


class PgClusterError(RuntimeError):
    """A cluster command failed: the message names the command, the cluster
    and the tail of the server's log when there is one."""


def server_binary(name: str) -> str:
    """The path of a PostgreSQL server program (initdb, pg_ctl): on PATH,
    else in Debian's /usr/lib/postgresql/<major>/bin (newest major). Raises
    PgClusterError when it is not installed."""
    found = shutil.which(name)
    if found:
        return found
    debian = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                    key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if debian:
        return str(debian[-1])
    raise PgClusterError(f"{name} not found: install PostgreSQL's server (Debian: apt-get install postgresql)")


@dataclass
class PgCluster:
    """A PostgreSQL cluster in ``root`` (see the module's docstring).

    ``port``: the TCP port (None: the last start's, else a free one);
    ``host``: the address it listens on; ``user``: the database superuser
    initdb creates; ``system_user``: who runs the server when this process
    is root; ``durable`` False skips fsync (initdb --no-sync, fsync=off):
    for throwaway test clusters only, where it saves seconds per test module.
    """

    root: Path
    port: int | None = None
    host: str = "127.0.0.1"
    user: str = "shrinkflow"
    system_user: str = "postgres"
    durable: bool = True

    def __post_init__(self):
        self.root = Path(self.root)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    @property
    def passfile(self) -> Path:
        return self.root / "pgpass"

    @property
    def _port_file(self) -> Path:
        return self.root / "port"

    # ------------------------------------------------------------ helpers
    def _as_server_user(self) -> list[str]:
        """The command prefix that runs a server program as a user
        PostgreSQL accepts: ``runuser -u system_user --`` when we are root."""
        if os.geteuid() != 0:
            return []
        return [shutil.which("runuser") or "runuser", "-u", self.system_user, "--"]

    def _run(self, args: list[str], what: str, timeout_s: float) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run(self._as_server_user() + args, capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise PgClusterError(f"cannot {what} the PostgreSQL cluster in {self.root}: no answer within "
                                 f"{timeout_s:g} s{self._log_tail()}") from exc
        except OSError as exc:
            raise PgClusterError(f"cannot {what} the PostgreSQL cluster in {self.root}: {exc}") from exc
        return proc

    def _check(self, proc: subprocess.CompletedProcess, what: str) -> None:
        if proc.returncode != 0:
            out = (proc.stderr or proc.stdout or "").strip()
            raise PgClusterError(f"cannot {what} the PostgreSQL cluster in {self.root} (exit {proc.returncode}): "
                                 f"{out[-2000:]}{self._log_tail()}")

    def _log_tail(self, chars: int = 2000) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return f"\nserver log {self.log_file}:\n{text[-chars:]}" if text.strip() else ""

    def _give_to_server_user(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, user=self.system_user, group=None)

    # ---------------------------------------------------------- lifecycle
    def initialized(self) -> bool:
        """Whether ``root`` already holds a cluster (initdb ran)."""
        return (self.data_dir / "PG_VERSION").is_file() and self.passfile.is_file()

    def init(self, timeout_s: float = 120.0) -> bool:
        """Create the cluster, unless ``root`` holds one already (then reuse
        it, data and password included). Returns True when it created one.
        Raises PgClusterError (initdb missing or failing, ``root`` out of
        the server user's reach)."""
        if self.initialized():
            return False
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise PgClusterError(f"{self.data_dir} is not empty but holds no cluster of ours (no PG_VERSION or "
                                 f"no {self.passfile.name}): remove it or choose another directory")
        initdb = server_binary("initdb")
        self.root.mkdir(parents=True, exist_ok=True)
        self._give_to_server_user(self.root)
        if self._run(["test", "-w", str(self.root), "-a", "-x", str(self.root)], "reach",
                     timeout_s=30).returncode != 0:
            raise PgClusterError(f"the {self.system_user!r} user cannot write {self.root}: a directory above it is "
                                 f"not traversable by that user (for example a 0700 home directory); put the "
                                 f"cluster under a directory it can reach")
        password = secrets.token_urlsafe(24)
        pwfile = self.root / f".initdb-pw-{secrets.token_hex(4)}"
        pwfile.write_text(password + "\n")
        try:
            os.chmod(pwfile, 0o600)
            self._give_to_server_user(pwfile)
            args = [initdb, "-D", str(self.data_dir), "-U", self.user, f"--pwfile={pwfile}",
                    "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C"]
            if not self.durable:
                args.append("--no-sync")
            self._check(self._run(args, "initialise", timeout_s), "initialise")
        finally:
            pwfile.unlink(missing_ok=True)
        # Loopback only, no Unix socket; the port is given at each start.
        settings = [f"listen_addresses = '{self.host}'", "unix_socket_directories = ''"]
        if not self.durable:
            settings.append("fsync = off")
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as fh:
            fh.write("\n# shrinkflow.pgcluster\n" + "\n".join(settings) + "\n")
        # libpq ignores a passfile others can read; '*' matches any port and database.
        tmp = self.passfile.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{self.host}:*:*:{self.user}:{password}\n")
        os.replace(tmp, self.passfile)
        return True

    def running(self) -> bool:
        """Whether the cluster's server is running (``pg_ctl status``)."""
        if not (self.data_dir / "PG_VERSION").is_file():
            return False
        return self._run([server_binary("pg_ctl"), "-D", str(self.data_dir), "status"], "query",
                         timeout_s=30).returncode == 0

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the server on ``port`` (None: the last start's when it is
        free, else a free one) and wait until it accepts connections. A
        no-op when it is running. A port it picked that another process
        takes before the server binds it is replaced by another (3 times).
        Raises PgClusterError (not initialised, the port given taken, the
        server failing to start: with its log's tail)."""
        if not self.initialized():
            raise PgClusterError(f"no PostgreSQL cluster in {self.root}: call init() first")
        if self.running():
            return
        retries = 0
        if self.port is None:
            last = self._last_port()
            self.port = last if last is not None and port_is_free(self.host, last) else free_port(self.host)
            retries = 3
        while True:
            self._port_file.write_text(f"{self.port}\n")
            proc = self._run([server_binary("pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
                              "-t", str(int(timeout_s)), "-o", f"-p {int(self.port)}", "start"], "start",
                             timeout_s + 30)
            # A port this call picked, taken by another process before the
            # server bound it (a race with every other program on the host):
            # pick another. A port the caller named stays an error.
            if proc.returncode != 0 and retries and not self.running() and not port_is_free(self.host, self.port):
                retries -= 1
                self.port = free_port(self.host)
                continue
            self._check(proc, "start")
            return

    def stop(self, mode: str = "fast", timeout_s: float = 60.0) -> None:
        """Stop the server: ``mode`` fast (the default: roll back open
        transactions, disconnect clients, shut down cleanly), smart (wait
        for clients to leave) or immediate (as a crash would: recovery at
        the next start). A no-op when it is not running."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"mode must be smart, fast or immediate, not {mode!r}")
        if not self.running():
            return
        self._check(self._run([server_binary("pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w",
                               "-t", str(int(timeout_s)), "stop"], "stop", timeout_s + 30), "stop")

    def destroy(self) -> None:
        """Stop the server (fast) and delete ``root`` with everything in it."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------ clients
    def last_port(self) -> int | None:
        """The port of the last start (kept in ``root``), or None before the
        first start."""
        return self._last_port()

    def _last_port(self) -> int | None:
        try:
            return int(self._port_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def url(self, database: str = "postgres") -> str:
        """``postgresql://user@host:port/database``: no password (libpq
        reads it from ``env()``'s PGPASSFILE). Raises PgClusterError when the
        cluster has never been started (no port yet)."""
        port = self.port if self.port is not None else self._last_port()
        if port is None:
            raise PgClusterError(f"the PostgreSQL cluster in {self.root} has no port yet: start() it first")
        return f"postgresql://{self.user}@{self.host}:{port}/{database}"

    def env(self) -> dict[str, str]:
        """The environment a libpq client needs for the password:
        ``{"PGPASSFILE": root/pgpass}``."""
        return {"PGPASSFILE": str(self.passfile)}

    def create_database(self, name: str) -> bool:
        """Create database ``name`` owned by ``user`` unless it exists.
        Returns True when it created it. Needs psycopg; raises its errors
        (the server down, say)."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url("postgres"), passfile=str(self.passfile), autocommit=True,
                             connect_timeout=10) as con:
            if con.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                return False
            con.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            return True

    def create_schema(self, database: str, schema: str) -> str:
        """Create schema ``schema`` in ``database`` (which must exist) unless
        it exists, and return a URL whose connections use it first
        (libpq's ``options=-csearch_path=schema``): tables of their own
        without a database of their own. Needs psycopg."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url(database), passfile=str(self.passfile), autocommit=True,
                             connect_timeout=10) as con:
            con.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        return f"{self.url(database)}?options=-csearch_path%3D{schema}"
