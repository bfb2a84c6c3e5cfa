"""A streaming response (SSE, or Ollama's NDJSON) that always runs its `on_close` when the response ends, however it ends.

Starlette cancels the body iterator when the client disconnects, but an async generator that is
suspended at a `yield` at that moment is only finalized when it is garbage-collected; tying the
abort to the response's own exit makes "the client left, the engine stops" deterministic
(vLLM #54947 is the bug this avoids).

A client that stops reading: each send waits for the socket to drain, so the stream's generator
waits too, but the engine goes on generating into the request's (bounded, merged) delta until
max_tokens: an engine slot and its compute for a reader that takes nothing, and only the
attacker's open socket to pay for it. So a send that cannot complete within the server's
`stream_send_timeout_s` (nginx's `send_timeout`, 60 s by default there and here) ends the
response: the connection is closed and the request aborted in the engine.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
log = logging.getLogger("qiusuo.serve")


class StalledClient(Exception):
    """The client accepted no bytes for `stream_send_timeout_s`."""


class AbortingStreamingResponse(StreamingResponse):
    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], media_type: str = "text/event-stream"):
        super().__init__(content, media_type=media_type, headers=SSE_HEADERS)
        self.on_close = on_close
        self.send_timeout_s: float | None = None  # from the app's ServerConfig, read in __call__

    async def stream_response(self, send: Send) -> None:
        timeout = self.send_timeout_s
        if timeout is None:
            return await super().stream_response(send)

        async def send_or_give_up(message) -> None:
            try:
                async with asyncio.timeout(timeout):  # a timer per send, not a task (as wait_for makes)
                    await send(message)
            except TimeoutError:
                raise StalledClient(f"the client read nothing for {timeout:g} s") from None

        await super().stream_response(send_or_give_up)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = getattr(getattr(scope.get("app"), "state", None), "qiusuo", None)
        if state is not None:  # the routes build this response; the server's config says how long to wait
            self.send_timeout_s = state.config.stream_send_timeout_s
        try:
            await super().__call__(scope, receive, send)
        except* StalledClient as group:  # (inside Starlette's task group: an exception group)
            log.warning("stream closed and its request aborted: %s", group.exceptions[0])
            # returning with the response unfinished makes the HTTP server close the connection
        finally:
            self.on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except RuntimeError:  # cancelled while running: it has already unwound
                    pass
