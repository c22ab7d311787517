"""Loopback ports for the servers shrinkflow starts (Prefect, Evidently's UI,
a PostgreSQL cluster). Nothing happens at import."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS's choice)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Whether a server can listen on ``port`` on ``host`` now. With
    SO_REUSEADDR, as uvicorn and PostgreSQL bind: connections of a server
    just stopped (TIME_WAIT) do not make its port look taken, so a restart
    gets the same port back; a listening socket still does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def answers_200(url: str, timeout_s: float = 2.0) -> bool:
    """Whether ``GET url`` answers with status 200 within ``timeout_s``
    seconds. Anything else is False, never an exception: nothing listening,
    a timeout, an error status, a malformed URL, or a server on the port that
    does not speak HTTP (CI once met a Dask scheduler on a port picked for a
    Prefect server: http.client raised BadStatusLine)."""
    import urllib.request
    from http.client import HTTPException

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200
    except (OSError, HTTPException, ValueError):
        return False
