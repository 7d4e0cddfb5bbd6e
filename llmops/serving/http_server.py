"""Running an ASGI app (the server, the router) under uvicorn, with a deadline on each request's arrival.

uvicorn bounds neither how long a request's head takes to arrive nor its body: a client that opens a connection
and sends nothing, or a byte now and then (slowloris), holds it for ever, and enough of them take every connection
the process can hold. Here a request's head and body must have arrived within `read_timeout_s` of the connection
opening (or of the request's first byte, on a kept-alive connection); a connection that has not is closed, and a body
cut off that way reaches the app as a client that left. nginx does the same with client_header_timeout and client_body_timeout. uvicorn has
no setting for it and no hook but its protocol class, so this is a small subclass of it (h11, the implementation it
picks where httptools is not installed, as here).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

CLIENT_CLOSED = 499  # nginx's status for a request whose client left before its answer: logs and metrics see it
logger = logging.getLogger("llmops.serving.http_server")


def run(app: Any, host: str, port: int, read_timeout_s: float) -> None:
    """Serve `app` on host:port until SIGINT or SIGTERM (requests in flight get 30 s to finish)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30,
                http=_with_deadline(read_timeout_s))


def _with_deadline(seconds: float) -> type:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    arriving = (h11.IDLE, h11.SEND_BODY)  # the client's side of h11's state machine while a request is still coming

    class Deadline(H11Protocol):
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            # the deadline of a request after the first on a connection runs from its first byte: between requests,
            # uvicorn's keep-alive timeout closes an idle connection (a shorter deadline there would close pooled
            # connections under clients that are about to send on them)
            first = self._timer is None and self.conn.their_state is h11.IDLE
            super().data_received(data)
            if self.conn.their_state not in arriving:
                self._disarm()  # the whole request is in
            elif first:
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            if self.conn.their_state in arriving and not self.transport.is_closing():
                self._timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            if self.conn.their_state in arriving and not self.transport.is_closing():
                client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
                logger.warning("closed the connection of %s: its request did not arrive within %g s", client, seconds)
                self.transport.close()  # connection_lost tells a request being read that its client left

    return Deadline
