"""Loopback ports for the servers shrinkflow starts (Prefect, Evidently's UI,
a PostgreSQL cluster). Nothing happens at import."""

from __future__ import annotations

import socket


def _families(host: str) -> list[int]:
    """The address families ``host`` resolves to, in the resolver's order
    (IPv6 for "::1"; both for a "localhost" listed under ::1 and
    127.0.0.1, which uvicorn binds both of); IPv4 when it does not resolve."""
    try:
        found = [info[0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]
    except socket.gaierror:
        found = []
    return list(dict.fromkeys(f for f in found if f in (socket.AF_INET, socket.AF_INET6))) or [socket.AF_INET]


def _server_socket(family: int) -> socket.socket:
    """A TCP socket of ``family`` set as uvicorn and PostgreSQL set theirs:
    SO_REUSEADDR, and IPv6 only for an IPv6 one."""
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return s


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS's choice, in the first family
    ``host`` resolves to, and free in the others too). Raises OSError when
    ``host`` cannot be bound (not an address of this machine)."""
    for _ in range(20):
        with socket.socket(_families(host)[0]) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port_is_free(host, port):
            return port
    return port


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket listening on a free port of ``host`` (the OS's pick, in
    the first family ``host`` resolves to), with SO_REUSEADDR and
    inheritable, as uvicorn binds its own: for a server handed the socket
    (``uvicorn.Server.run(sockets=...)``), there is no moment between the
    pick and the bind for another process to take the port, as there is
    with ``free_port``. Raises OSError when ``host`` cannot be bound."""
    s = _server_socket(_families(host)[0])
    try:
        s.bind((host, 0))
        s.listen(2048)   # uvicorn's default backlog; it listens again with its own
        s.set_inheritable(True)   # uvicorn's worker processes share it
    except OSError:
        s.close()
        raise
    return s


def port_is_free(host: str, port: int) -> bool:
    """Whether a server can listen on ``port`` on ``host`` now, in every
    address family ``host`` resolves to (a helper's finding: "localhost"
    listed under ::1 first hid a listener on 127.0.0.1, which uvicorn then
    failed to bind). With SO_REUSEADDR, as uvicorn and PostgreSQL bind:
    connections of a server just stopped (TIME_WAIT) do not make its port
    look taken, so a restart gets the same port back; a listening socket
    still does."""
    for family in _families(host):
        with _server_socket(family) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def answers_200(url: str, timeout_s: float = 2.0) -> bool:
    """Whether ``GET url`` answers with status 200 within ``timeout_s``
    seconds, all of it (connect, status line, headers). Anything else is
    False, never an exception: nothing listening, a timeout, an error
    status, a malformed URL, or a server on the port that does not speak
    HTTP (CI once met a Dask scheduler on a port picked for a Prefect
    server: http.client raised BadStatusLine). The request runs on a daemon
    thread: urllib's timeout bounds each read, not the whole answer, and a
    peer that trickles a byte a second would hold a caller's deadline off
    for as long as it likes (a helper's finding); such a thread lives on
    until the peer hangs up or its next read times out. The request goes
    direct, never through ``http_proxy`` (a health check of a loopback
    server sent to a proxy fails), and a redirect is not followed: only the
    URL's own 200 counts."""
    import threading
    import urllib.request
    from http.client import HTTPException

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None   # urllib raises HTTPError for the 3xx: False below

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect())
    answered: list[bool] = []

    def get() -> None:
        try:
            with opener.open(url, timeout=timeout_s) as r:
                answered.append(r.status == 200)
        except (OSError, HTTPException, ValueError):
            answered.append(False)

    thread = threading.Thread(target=get, name="answers-200", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(answered) and answered[0]


def listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` or one of its descendants holds a listening
    TCP socket on ``port`` (any address, IPv4 or IPv6): a server that
    answers there is that process's own and not another's. False when
    ``pid`` no longer runs; True when the OS will not say (AccessDenied).
    Needs psutil >= 6 (``Process.net_connections``)."""
    import psutil

    if pid <= 0:
        return False
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                       for c in proc.net_connections(kind="inet")):
                    return True
            except psutil.NoSuchProcess:
                continue
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    return False
