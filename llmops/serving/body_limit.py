"""A bound on request bodies, however they are sent: an ASGI middleware for the server and the router.

A Content-Length over the bound is refused before a byte of the body is read; a body without one (chunked
transfer encoding) is counted as it arrives and refused once it passes the bound. Checking the header alone let a
chunked 5 MB body through while /health went unanswered. Neither Starlette nor uvicorn bounds a body (uvicorn's
h11 limits apply to headers), so this is ours.
"""

from __future__ import annotations

from typing import Any, Callable

from starlette.responses import JSONResponse

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt that fits a context


class BodyLimit:
    """`app` with every request body of over `max_bytes` answered 413 (OpenAI's error shape).

    A body passing the bound is answered at once, from here; the app is then told the client left (as when one
    does), and whatever it still sends is dropped. Raising instead would not do: FastAPI turns any error while it
    reads a body into a 400.
    """

    def __init__(self, app: Callable, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _refusal(self) -> JSONResponse:
        return JSONResponse({"error": {"message": f"request body over {self.max_bytes} bytes",
                                       "type": "invalid_request_error", "param": None, "code": "request_too_large"}},
                            status_code=413)

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refusal()(scope, receive, send)
        state = {"seen": 0, "started": False, "refused": False}

        async def counted() -> dict[str, Any]:
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > self.max_bytes and not state["started"]:
                    state["refused"] = True
                    await self._refusal()(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def watched(message: dict[str, Any]) -> None:
            if state["refused"]:
                return  # the 413 went out; what the app answers to the "disconnect" goes nowhere
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, watched)
