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


@pytest.mark.parametrize("squatter", [NotHttp, AlwaysHealthy])
def test_a_server_whose_picked_port_is_taken_starts_on_another(tmp_path, monkeypatch, squatter):
    other = squatter()
    picks = iter([other.port])
    monkeypatch.setattr(ps, "free_port", lambda host="127.0.0.1": next(picks, None) or free_port(host))
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
    picks = iter([other.port])
    monkeypatch.setattr(pgc, "free_port", lambda host="127.0.0.1": next(picks, None) or free_port(host))
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
