"""uvicorn's h11 protocol with the two guards uvicorn lacks: a request-receipt deadline and probes that
bypass the connection limit.

- **Receipt deadline.** uvicorn closes an idle keep-alive connection, but a connection that sends half a
  header (or nothing, or half a body) is held forever: 300 such connections were held for 60 s and never
  closed. Here every request must arrive whole (headers and body) within ``receive_timeout_s`` of the
  connection opening or of the previous response ending; otherwise the client gets 408 and the connection
  is closed. In Kubernetes the Service reaches the replica directly, so the process itself must do this,
  not only the balancer (HAProxy's ``timeout http-request``).
- **Probes beyond the limit.** Past ``AMSKV_LIMIT_CONCURRENCY`` open connections uvicorn answers a bare 503
  to every request: 2,100 idle connections made ``/livez``, ``/readyz`` and ``/metrics`` fail too, and the
  kubelet would restart a healthy pod. Those three paths are exempt; everything else still gets the 503.
"""
from __future__ import annotations

import asyncio
from typing import Any, cast

import h11
from uvicorn._types import HTTPScope
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.h11_impl import H11Protocol

EXEMPT_PATHS = frozenset({"/livez", "/readyz", "/metrics"})
REQUEST_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                            b"content-length: 29\r\nconnection: close\r\n\r\nrequest not received in time\n")


class GuardedH11Protocol(H11Protocol):
    """H11Protocol + a deadline for receiving each whole request + probes exempt from limit_concurrency."""

    receive_timeout_s: float = 10.0  # set per server by make_protocol_class

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._receive_deadline: asyncio.TimerHandle | None = None
        # uvicorn checks the limit before it knows the route; check it in front of the app instead.
        limit, self.limit_concurrency = self.limit_concurrency, None
        if limit is not None:
            self.app = _limited(self.app, limit, self.connections, self.tasks)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_receive_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_receive_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._cancel_receive_deadline()  # the whole request is in (DONE), or the connection is ending

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_receive_deadline()  # the next request on this connection gets its own deadline

    def _arm_receive_deadline(self) -> None:
        self._cancel_receive_deadline()
        self._receive_deadline = self.loop.call_later(self.receive_timeout_s, self._receive_deadline_passed)

    def _cancel_receive_deadline(self) -> None:
        if self._receive_deadline is not None:
            self._receive_deadline.cancel()
            self._receive_deadline = None

    def _receive_deadline_passed(self) -> None:
        self._receive_deadline = None
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return
        if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0] == b"":
                self.transport.close()  # nothing of a request arrived: an idle connection, no answer owed
                return
            self.transport.write(REQUEST_TIMEOUT_RESPONSE)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app sees http.disconnect
            self.cycle.message_event.set()
        self.transport.close()


def _limited(app: Any, limit: int, connections: set, tasks: set) -> Any:
    async def limited(scope: dict, receive: Any, send: Any) -> None:
        # This request's own task is already in `tasks` here (uvicorn checked before adding it).
        if scope["type"] == "http" and scope["path"] not in EXEMPT_PATHS and (
                len(connections) >= limit or len(tasks) > limit):
            return await service_unavailable(cast(HTTPScope, scope), receive, send)
        return await app(scope, receive, send)
    return limited


def make_protocol_class(receive_timeout_s: float) -> type[GuardedH11Protocol]:
    """The protocol class to give uvicorn.Config(http=...), with this server's receipt deadline."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"receive_timeout_s": receive_timeout_s})
