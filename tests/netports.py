"""Loopback ports for the servers the tests start.

Not the OS's pick (``bind(("127.0.0.1", 0))``): a port so picked is in the
ephemeral range, released at once, and any process can take it before the
test's server binds it, by its own ``bind(0)`` or as the local end of an
outgoing connection. CI once saw a Dask scheduler of a parallel test answer
on a port picked for a Prefect server. Here each pytest-xdist worker gets a
block of its own below the ephemeral range, walked in turn, so no OS pick
takes it first; and each port handed out is reserved for this process's
life by an ``flock`` on a file named after it in the temporary directory,
so two test sessions on one host (the same blocks) never hand out the same
port either (a helper's finding: they did)."""

from __future__ import annotations

import fcntl
import itertools
import os
import re
import tempfile
from pathlib import Path

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
    """This process's block: the controller's (or a run without xdist) first,
    then one per worker, as wide as the room below the ephemeral range
    allows for PYTEST_XDIST_WORKER_COUNT workers (BLOCK at most, 20 at
    least; empty, so the OS picks, when even that does not fit)."""
    match = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    worker = int(match.group(1)) + 1 if match else 0
    try:
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    except ValueError:
        workers = 0
    room = _ephemeral_low() - 10000
    width = min(BLOCK, room // (max(workers, worker) + 1)) if room > 0 else 0
    if width < 20:
        return range(0)
    low = 10000 + worker * width
    return range(low, low + width)


_CURSOR = itertools.cycle(_block() or [0])
_RESERVED: dict[int, int] = {}   # port -> the descriptor whose flock reserves it for this process
_LOCKS = Path(tempfile.gettempdir()) / "shrinkflow-test-ports"


def _reserve(port: int) -> bool:
    """Reserve ``port`` for this process (False: another process has)."""
    if port in _RESERVED:
        return True
    try:
        if not _LOCKS.is_dir():
            _LOCKS.mkdir(exist_ok=True)
            os.chmod(_LOCKS, 0o1777)   # every user's tests reserve here (the umask cut mkdir's mode)
        # Read-only: flock needs no write access, so another user's lock file serves too.
        fd = os.open(_LOCKS / f"{port}.lock", os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _RESERVED[port] = fd
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, from this worker's block below the
    ephemeral range (the next one after the last handed out that no other
    process has reserved), or the OS's pick when the host's ephemeral
    range leaves no room or the block is spent."""
    for _ in range(BLOCK):
        port = next(_CURSOR)
        if port == 0:
            break
        if _reserve(port) and port_is_free(host, port):
            return port
    return os_pick(host)
