"""Loopback ports for the servers the tests start.

Not the OS's pick (``bind(("127.0.0.1", 0))``): a port so picked is in the
ephemeral range, released at once, and any process can take it before the
test's server binds it, by its own ``bind(0)`` or as the local end of an
outgoing connection. CI once saw a Dask scheduler of a parallel test answer
on a port picked for a Prefect server. Here each pytest-xdist worker gets a
block of its own below the ephemeral range, walked in turn, so no other
worker, and no OS pick, hands out the same port."""

from __future__ import annotations

import itertools
import os
import re

from shrinkflow.ports import free_port as os_pick
from shrinkflow.ports import port_is_free

BLOCK = 500


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _block() -> range:
    match = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    worker = int(match.group(1)) + 1 if match else 0
    low = 10000 + worker * BLOCK
    if low + BLOCK > _ephemeral_low():   # a host whose ephemeral range leaves no room
        return range(0)
    return range(low, low + BLOCK)


_CURSOR = itertools.cycle(_block() or [0])


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, from this worker's block below the
    ephemeral range (the next free one after the last handed out), or the
    OS's pick when the host's ephemeral range leaves no room."""
    for _ in range(BLOCK):
        port = next(_CURSOR)
        if port == 0:
            break
        if port_is_free(host, port):
            return port
    return os_pick(host)
