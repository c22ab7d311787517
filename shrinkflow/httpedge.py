"""The HTTP edge of ``shrinkflow serve``: limits on what a client may send
before the app sees a request.

uvicorn's httptools protocol sets no limit on the size or number of request
headers (a single 30 MB header was accepted and raised the server's peak
memory by 58 MB: httptools accumulates a header's value until it ends) and no
deadline for receiving a request (a client that announced 31 body bytes and
sent 10 held its connection, unanswered, for 70 s and more). ``EdgeProtocol``
is that protocol with three limits:

- ``max_header_bytes``: the request line and headers of one request, counted
  as bytes arrive, *before* httptools buffers them: past the limit the server
  answers **431** and closes the connection;
- ``max_headers``: more header fields than this get **431** and a close;
- ``request_timeout_s``: from a request's first byte, its headers and whole
  body must arrive within this. Otherwise **408** and a close. When the app is
  already reading the body, it sees a client disconnect and the scope key
  ``TIMEOUT_SCOPE_KEY``, so it can count a 408 rather than an error. A fresh
  connection that sends nothing within the same time is closed silently.

The limits travel with the app rather than with uvicorn's config: the app's
lifespan puts an ``EdgeLimits`` into the lifespan state under ``STATE_KEY``
(uvicorn hands that state to every connection's protocol), so each worker of
``--workers N`` enforces the limits its own app was built with, and a refusal
is reported to the app's metrics through ``EdgeLimits.on_reject``. Select the
protocol with ``uvicorn.run(..., http=PROTOCOL)`` (an import string, so that
it also reaches spawned workers).

Bounds, by construction: while a request's head is being read, data is fed to
the parser in slices no larger than the room left under ``max_header_bytes``,
so the parser never holds more than that of one head. The head of a pipelined
request that arrives in the same read as the end of the previous body is fed
with that read (at most one read, 256 KiB with asyncio) before it is counted.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

PROTOCOL = "shrinkflow.httpedge:EdgeProtocol"
STATE_KEY = "shrinkflow.edge"
TIMEOUT_SCOPE_KEY = "shrinkflow.edge_timeout"

logger = logging.getLogger("shrinkflow.serve")


@dataclass(frozen=True)
class EdgeLimits:
    """What ``EdgeProtocol`` enforces (defaults: ``ServeParams``'s).

    ``on_reject(status, kind, path)`` is called once for each request answered
    at the edge, before the app saw it (431, or 408 while headers were still
    arriving, or 400 for a request httptools cannot parse); ``path`` is the
    request's path when it had arrived, else None. It must not raise (an
    exception is logged and ignored)."""

    max_header_bytes: int = 16_384
    max_headers: int = 100
    request_timeout_s: float = 10.0
    on_reject: Callable[[int, str, str | None], None] | None = None


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's ``HttpToolsProtocol`` with header limits and a request
    deadline (see the module docstring). One instance per connection."""

    def __init__(self, config, server_state, app_state: dict[str, Any], _loop=None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = app_state.get(STATE_KEY)
        self.limits: EdgeLimits = limits if isinstance(limits, EdgeLimits) else EdgeLimits()
        self._in_head = True         # reading a request line and headers (or waiting for one)
        self._head_bytes = 0         # bytes fed since the current head began
        self._header_count = 0
        self._refused = False        # answered at the edge: the connection is closing
        self._timer = None           # the current request's deadline

    # ------------------------------------------------------------ the deadline
    def _arm(self) -> None:
        if self._timer is None:
            self._timer = self.loop.call_later(self.limits.request_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._refused or self.transport.is_closing():
            return
        if self._in_head:
            if self._head_bytes == 0:
                # A connection that never sent a byte: nothing to answer.
                self.transport.close()
                return
            self._refuse(408, "request_timeout",
                         f"the request's headers did not arrive within {self.limits.request_timeout_s:g} s")
            return
        cycle = self.cycle
        if cycle is None or cycle.response_started:
            # Already answered (the app did not need the rest of the body), or
            # half answered: a status line can no longer be sent.
            self.transport.close()
            return
        # The app is waiting for the body: tell it why the client "left", so
        # that it counts a 408 (and logs no error), then answer and close.
        cycle.scope[TIMEOUT_SCOPE_KEY] = True  # type: ignore[literal-required]
        self._refused = True
        self._write_error(408, "request_timeout",
                          f"the request's body did not arrive within {self.limits.request_timeout_s:g} s")
        cycle.disconnected = True
        cycle.message_event.set()

    # ------------------------------------------------------------ refusals
    def _path(self) -> str | None:
        url = getattr(self, "url", b"") or b""
        if not url:
            return None
        return url.split(b"?", 1)[0].decode("latin-1")

    def _refuse(self, status: int, kind: str, detail: str) -> None:
        """Answer ``status`` at the edge, close the connection, report it."""
        if self._refused:
            return
        self._refused = True
        self._disarm()
        path = self._path()
        logger.warning("%s %s from %s: %s", status, kind, "%s:%d" % self.client if self.client else "?", detail)
        if self.limits.on_reject is not None:
            try:
                self.limits.on_reject(status, kind, path)
            except Exception:  # noqa: BLE001 - metrics must never break the connection handling
                logger.exception("on_reject failed")
        self._write_error(status, kind, detail)

    def _write_error(self, status: int, kind: str, detail: str) -> None:
        body = json.dumps({"error": kind, "detail": detail}).encode("ascii")
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                 b"connection: close\r\n\r\n"]
        if not self.transport.is_closing():
            self.transport.write(b"".join(head) + body)
            self.transport.close()

    # ------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()   # the first request must arrive within the deadline too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self._refused:
            return
        view, pos, n = memoryview(data), 0, len(data)
        while pos < n:
            if self._in_head:
                room = self.limits.max_header_bytes - self._head_bytes
                if room <= 0:
                    self._refuse(431, "headers_too_large",
                                 f"the request line and headers exceed {self.limits.max_header_bytes} bytes")
                    return
                end = min(n, pos + room)
                self._head_bytes += end - pos
            else:
                end = n
            try:
                self.parser.feed_data(view[pos:end])
            except httptools.HttpParserUpgrade:
                # As uvicorn: a WebSocket upgrade when one is configured
                # (`shrinkflow serve` configures none), else a warning.
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
                return
            except httptools.HttpParserError:
                self._refuse(400, "bad_http", "Invalid HTTP request received.")
                return
            if self._refused:
                return
            pos = end

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._in_head and not self._refused and not self.transport.is_closing():
            # A pipelined request whose body was still arriving waited for the
            # previous response (reading was paused): give it a fresh deadline.
            self._arm()

    # ------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        self._header_count = 0
        self._arm()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            return
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._refuse(431, "too_many_headers", f"more than {self.limits.max_headers} request headers")
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        super().on_headers_complete()
        if self.pipeline and self.pipeline[0][0] is self.cycle:
            # Queued behind a running request, with reading paused: the wait is
            # ours, not the client's (re-armed in on_response_complete).
            self._disarm()

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        self._disarm()
        self._in_head, self._head_bytes = True, 0
