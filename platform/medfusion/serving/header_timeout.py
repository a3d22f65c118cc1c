"""A timeout on incoming request headers for uvicorn, the HTTP server inside Ray Serve's proxy.

uvicorn closes a kept-alive connection that idles past ``timeout_keep_alive``, but a connection
that opens and then sends its request headers slowly, or never, it holds open for good (slowloris): a
few thousand of them exhaust the proxy's file descriptors. Neither uvicorn's config nor Serve's
``http_options`` has a setting for it, so `install` wraps the two uvicorn HTTP protocol classes: from
the moment a connection opens, or the first bytes of a next request arrive on a kept-alive one, the
headers (up to their blank line) must be complete within the timeout, or the connection is answered
408 and closed.

Serve's proxy runs it through its documented hook: ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` set
to ``medfusion.serve.app:proxy_callback`` in the environment Ray starts with (``medfusion serve`` sets
it when it starts Ray), with ``MEDFUSION_HEADER_TIMEOUT_S`` (default 10 s) the timeout.
"""

from __future__ import annotations

import os
from typing import Any

HEADER_TIMEOUT_ENV = "MEDFUSION_HEADER_TIMEOUT_S"
DEFAULT_HEADER_TIMEOUT_S = 10.0
_END_OF_HEADERS = b"\r\n\r\n"
_TIMED_OUT_BODY = b"the request headers did not arrive in time"
_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    + f"content-length: {len(_TIMED_OUT_BODY)}\r\n\r\n".encode()
    + _TIMED_OUT_BODY
)
_MARK = "_medfusion_header_timeout"

_timeout_s: float | None = None  # read at each connection: install(None) turns the timeout off


def timeout_from_env() -> float:
    """The header timeout in seconds from MEDFUSION_HEADER_TIMEOUT_S (default 10)."""
    value = os.environ.get(HEADER_TIMEOUT_ENV, "").strip()
    timeout = float(value) if value else DEFAULT_HEADER_TIMEOUT_S
    if not timeout > 0:
        raise ValueError(f"{HEADER_TIMEOUT_ENV} must be > 0 seconds, got {value!r}")
    return timeout


def install(timeout_s: float | None) -> None:
    """Time out request headers in every uvicorn server of this process after `timeout_s` (None: never).

    Idempotent: the protocol classes are wrapped once, and the timeout is read per connection.
    """
    global _timeout_s
    _timeout_s = timeout_s
    if timeout_s is None:
        return
    from uvicorn.protocols.http.h11_impl import H11Protocol

    _wrap(H11Protocol)
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is optional; uvicorn then serves with h11
        return
    _wrap(HttpToolsProtocol)


class _State:
    """Per connection: whether a request's headers are awaited, the timer, and the last bytes seen."""

    __slots__ = ("awaiting", "timer", "tail")

    def __init__(self) -> None:
        self.awaiting = True
        self.timer: Any = None
        self.tail = b""


def _wrap(cls: type) -> None:
    if getattr(cls, _MARK, False):
        return
    made, received, completed, lost = (
        cls.connection_made,
        cls.data_received,
        cls.on_response_complete,
        cls.connection_lost,
    )

    def connection_made(self: Any, transport: Any) -> None:
        made(self, transport)
        state = self._medfusion_headers = _State()
        if _timeout_s is not None:  # a silent connection times out too
            state.timer = self.loop.call_later(_timeout_s, _expire, self)

    def data_received(self: Any, data: bytes) -> None:
        state = getattr(self, "_medfusion_headers", None)
        if state is not None and state.awaiting:
            seen = state.tail + data
            if _END_OF_HEADERS in seen:
                state.awaiting, state.tail = False, b""
                _cancel(state)
            else:
                state.tail = seen[-(len(_END_OF_HEADERS) - 1) :]
                if state.timer is None and _timeout_s is not None:  # a next request's first bytes
                    state.timer = self.loop.call_later(_timeout_s, _expire, self)
        received(self, data)

    def on_response_complete(self: Any) -> None:
        completed(self)
        state = getattr(self, "_medfusion_headers", None)
        if state is not None:
            # Idle from here is keep-alive's business; the next request's first bytes start the timer.
            state.awaiting, state.tail = True, b""

    def connection_lost(self: Any, exc: Exception | None) -> None:
        state = getattr(self, "_medfusion_headers", None)
        if state is not None:
            _cancel(state)
        lost(self, exc)

    cls.connection_made = connection_made
    cls.data_received = data_received
    cls.on_response_complete = on_response_complete
    cls.connection_lost = connection_lost
    setattr(cls, _MARK, True)


def _cancel(state: _State) -> None:
    if state.timer is not None:
        state.timer.cancel()
        state.timer = None


def _expire(protocol: Any) -> None:
    state = protocol._medfusion_headers
    state.timer = None
    if state.awaiting and not protocol.transport.is_closing():
        protocol.transport.write(_TIMED_OUT)
        protocol.transport.close()
