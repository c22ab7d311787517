"""Loopback ports for the servers shrinkflow starts (Prefect, Evidently's UI,
a PostgreSQL cluster). Nothing happens at import."""

from __future__ import annotations

import socket


def _family(host: str) -> int:
    """The address family ``host`` binds with: IPv6 for "::1" (or a name
    that resolves to IPv6 first), else IPv4."""
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    except (socket.gaierror, IndexError):
        return socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS's choice). Raises OSError
    when ``host`` cannot be bound (not an address of this machine)."""
    with socket.socket(_family(host)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Whether a server can listen on ``port`` on ``host`` now. With
    SO_REUSEADDR, as uvicorn and PostgreSQL bind: connections of a server
    just stopped (TIME_WAIT) do not make its port look taken, so a restart
    gets the same port back; a listening socket still does. IPv6 hosts
    ("::1") are bound as IPv6."""
    with socket.socket(_family(host)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
    for as long as it likes (a helper's finding)."""
    import threading
    import urllib.request
    from http.client import HTTPException

    answered: list[bool] = []

    def get() -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
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
