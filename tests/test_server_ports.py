"""A tied server's OS-picked port taken by another process before the
server binds it (CI once saw a Dask scheduler of a parallel test answer on
the local Prefect server's port: the schedule died on BadStatusLine).

The race is made certain here: the port free_port picks first is held by a
squatter in this process, a real one (a socket that answers in a protocol
other than HTTP, or an HTTP server answering 200 on every path). The server
is a real process, Python's own http.server, started tied like every
shrinkflow server."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading

import pytest

import flows.prefect_server as ps
from shrinkflow.ports import free_port


class HttpServer(ps.TiedServer):
    """``python -m http.server`` on the port, tied like Prefect's servers."""

    name = "the test's HTTP server"

    @property
    def health_url(self) -> str:
        return f"{self.url}/"

    def command(self) -> list[str]:
        return ps.tied_command("http.server", ["--bind", self.host, str(self.port)])


class NotHttp:
    """A listener that greets every connection with bytes that are not HTTP
    (a Dask comm handshake's first bytes, as CI printed them)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"\x82\xabcompression\xc0\xa6python\x93\x03\x0b\x07\xafpickle-protocol\x05\r\n\r\n")

    def close(self):
        self.sock.close()


class AlwaysHealthy:
    """An HTTP server in this process answering 200 on every path: another
    server's health check would pass on it."""

    def __init__(self):
        class Ok(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Ok)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def first_pick(monkeypatch, port: int, module=ps) -> None:
    """The OS's next pick in ``module`` (a tied server's by default) is
    ``port`` (held by a squatter), then real picks: the race, made certain."""
    picks = iter([port])
    monkeypatch.setattr(module, "free_port", lambda host="127.0.0.1": next(picks, None) or free_port(host))


@pytest.mark.parametrize("squatter", [NotHttp, AlwaysHealthy])
def test_a_server_whose_picked_port_is_taken_starts_on_another(tmp_path, monkeypatch, squatter):
    other = squatter()
    first_pick(monkeypatch, other.port)
    server = HttpServer(tmp_path / "server.log", startup_timeout_s=60)
    try:
        url = server.start()
        assert server.port != other.port and url == f"http://127.0.0.1:{server.port}"
        assert server.healthy() and server.listens_here()
        log = (tmp_path / "server.log").read_text()
        assert f"another process took port {other.port} before {server.name} bound it; " \
               f"starting it again on port {server.port}" in log
    finally:
        server.stop()
        other.close()


def test_the_squatters_are_what_the_server_meets(tmp_path):
    """The check above can fail: on the squatter's port, the health check
    is False for the one and True for the other, and neither is this
    server's own socket."""
    for squatter, answers in ((NotHttp, False), (AlwaysHealthy, True)):
        other = squatter()
        server = HttpServer(tmp_path / "server.log", port=other.port)
        server.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            assert server.healthy() is answers
            assert not server.listens_here()
        finally:
            server.proc.kill()
            server.proc.wait()
            other.close()


def test_a_given_port_that_is_taken_is_an_error_not_a_new_port(tmp_path):
    """A port the user named is not changed behind their back: the server's
    exit is the error, with its log."""
    other = AlwaysHealthy()
    server = HttpServer(tmp_path / "server.log", port=other.port, startup_timeout_s=60)
    try:
        with pytest.raises(RuntimeError, match=r"(?s)the test's HTTP server exited with 1 while starting; log .*"
                                               r"Address already in use"):
            server.start()
        assert server.port == other.port
    finally:
        server.stop()
        other.close()


def test_a_postgresql_cluster_whose_picked_port_is_taken_starts_on_another(monkeypatch):
    """The same race for the PostgreSQL cluster `team up` and the tests
    start: pg_ctl fails on the taken port, the cluster takes another; a
    port the caller named stays an error."""
    import shutil
    import tempfile
    from pathlib import Path

    import shrinkflow.pgcluster as pgc

    other = AlwaysHealthy()
    first_pick(monkeypatch, other.port, pgc)
    root = Path(tempfile.mkdtemp(prefix="shrinkflow-pg-"))   # the postgres user cannot enter pytest's tmp
    cluster = pgc.PgCluster(root, durable=False)
    try:
        cluster.init()
        cluster.start()
        assert cluster.running() and cluster.port != other.port and cluster.last_port() == cluster.port
        cluster.stop()
        named = pgc.PgCluster(root, port=other.port, durable=False)
        with pytest.raises(pgc.PgClusterError, match=r"cannot start the PostgreSQL cluster"):
            named.start()
        assert not named.running()
    finally:
        cluster.destroy()
        shutil.rmtree(root, ignore_errors=True)
        other.close()


class Trickle:
    """A listener that starts a 200 answer and then sends a byte every 0.3 s
    for 8 s: each read is within a 1 s timeout, the answer does not end."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn, for_s: float = 8.0):
        import time

        end = time.monotonic() + for_s   # then it hangs up: the old check returned after that
        with conn:
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                while not self.closed.wait(0.3) and time.monotonic() < end:
                    conn.sendall(b"X")
            except OSError:
                return

    def close(self):
        self.closed.set()
        self.sock.close()


def test_the_health_check_keeps_its_timeout_against_a_peer_that_trickles():
    """A helper's finding: urllib's timeout bounds each read, so a peer
    trickling a byte a second held the check (and a server's start-up
    deadline) for as long as it liked."""
    import time

    from shrinkflow.ports import answers_200

    other = Trickle()
    try:
        t0 = time.monotonic()
        assert answers_200(f"http://127.0.0.1:{other.port}/", timeout_s=1.0) is False
        assert time.monotonic() - t0 < 5.0   # the whole answer in 1 s; the old check took the 8 s
    finally:
        other.close()


@pytest.mark.slow  # 4-7 s in the quick suite, which must stay under 3 minutes (184 s with it)
def test_an_exit_that_is_not_a_taken_port_is_not_retried_and_leaves_no_child(tmp_path):
    """The server started a child that holds the port, then crashed for its
    own reasons: the port looks taken, by its own orphan. The group is ended
    first, so the crash is the error (not "another process took port"), and
    the child is gone."""
    import os
    import signal
    import time

    import psutil

    children = tmp_path / "children"

    class CrashingParent(HttpServer):
        def command(self):
            code = ("import subprocess, sys, time; "
                    f"c = subprocess.Popen([sys.executable, '-m', 'http.server', '--bind', '127.0.0.1', "
                    f"'{self.port}']); open({str(children)!r}, 'a').write(f'{{c.pid}}\\n'); "
                    "time.sleep(3); sys.exit(7)")
            return [sys.executable, "-c", code]

        def listens_here(self):   # never ready: the crash comes first
            return False

    server = CrashingParent(tmp_path / "server.log", startup_timeout_s=60)
    try:
        with pytest.raises(RuntimeError, match=r"exited with 7 while starting; log"):
            server.start()
        assert "another process took port" not in (tmp_path / "server.log").read_text()
        time.sleep(0.5)
        started = [int(x) for x in children.read_text().split()]
        assert len(started) == 1
        assert not [pid for pid in started if psutil.pid_exists(pid)
                    and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    finally:
        server.stop()
        for pid in (int(x) for x in (children.read_text().split() if children.exists() else [])):
            try:   # whatever a failed run left (the old code left them all)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_ipv6_loopback_ports_are_bound_as_ipv6():
    """A helper's finding: `monitor ui --host ::1` called a free port taken
    and crashed on the OS's pick (IPv4 sockets for an IPv6 address). Where
    the machine has no IPv6 loopback, the pick says so with an OSError."""
    from shrinkflow.ports import free_port as pick
    from shrinkflow.ports import port_is_free

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        has_v6 = True
    except OSError:
        has_v6 = False
    if not has_v6:
        with pytest.raises(OSError):
            pick("::1")
        return
    port = pick("::1")
    assert port_is_free("::1", port)
    with socket.socket(socket.AF_INET6) as held:
        held.bind(("::1", port))
        held.listen()
        assert not port_is_free("::1", port)


def test_listens_on_names_the_process_that_holds_the_port():
    """The own-socket check `team up` and every tied server use: this
    process holds the squatter's socket, a child of it does not."""
    import os

    from shrinkflow.ports import listens_on

    other = AlwaysHealthy()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert listens_on(os.getpid(), other.port)
        assert not listens_on(child.pid, other.port)
        assert not listens_on(-1, other.port)
    finally:
        child.kill()
        child.wait()
        other.close()
    assert not listens_on(child.pid, other.port)   # gone


class PrefectLike(HttpServer):
    """A server that, like `prefect server start`, checks its port first and
    says "Port N is already in use." (no errno) when it is taken."""

    def command(self) -> list[str]:
        code = ("import runpy, socket, sys\n"
                f"port = {self.port}\n"
                "s = socket.socket()\n"
                "try:\n"
                "    s.bind(('127.0.0.1', port))\n"
                "except OSError:\n"
                "    print(f'Port {port} is already in use. Please specify a different port.'); sys.exit(1)\n"
                "s.close()\n"
                "sys.argv = ['http.server', '--bind', '127.0.0.1', str(port)]\n"
                "runpy.run_module('http.server', run_name='__main__')\n")
        return [sys.executable, "-c", code]


@pytest.mark.parametrize("kind", [HttpServer, PrefectLike])
def test_a_squatter_gone_before_the_exit_is_seen_still_gets_a_new_port(tmp_path, monkeypatch, kind):
    """Helpers' findings: the retry looked only at whether the port was
    still taken when the exit was seen, so a squatter that held it for a
    moment made the start fail. The server's own log counts too: Python's
    and uvicorn's errno 98, and `prefect server start`'s own "Port N is
    already in use." (PrefectLike)."""
    other = AlwaysHealthy()
    first_pick(monkeypatch, other.port)
    server = kind(tmp_path / "server.log", startup_timeout_s=60)
    try:
        server.launch()
        assert server.port == other.port
        server.proc.wait(timeout=30)   # it could not bind
        other.close()                  # and the squatter has gone
        assert server.wait_ready() == f"http://127.0.0.1:{server.port}" and server.port != other.port
        assert f"another process took port {other.port}" in (tmp_path / "server.log").read_text()
    finally:
        server.stop()


def test_the_health_check_goes_direct_and_does_not_follow_redirects(monkeypatch):
    """A loopback health check never goes through http_proxy (a dead proxy
    made every server's start time out), and a 302 to a server that answers
    200 is not a 200 (helpers' findings)."""
    from shrinkflow.ports import answers_200

    ok = AlwaysHealthy()

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{ok.port}/")
            self.end_headers()

        def log_message(self, *args):
            pass

    moved = http.server.HTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=moved.serve_forever, daemon=True).start()
    try:
        dead = free_port()
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{dead}")
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead}")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        assert answers_200(f"http://127.0.0.1:{ok.port}/health")
        assert not answers_200(f"http://127.0.0.1:{moved.server_address[1]}/health")
    finally:
        moved.shutdown()
        moved.server_close()
        ok.close()
