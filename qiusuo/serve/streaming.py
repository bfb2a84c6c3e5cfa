"""A streaming response (SSE, or Ollama's NDJSON) that always runs its `on_close` when the response ends, however it ends.

Starlette cancels the body iterator when the client disconnects, but an async generator that is
suspended at a `yield` at that moment is only finalized when it is garbage-collected; tying the
abort to the response's own exit makes "the client left, the engine stops" deterministic
(vLLM #54947 is the bug this avoids).
"""

from __future__ import annotations

from typing import AsyncIterator, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class AbortingStreamingResponse(StreamingResponse):
    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], media_type: str = "text/event-stream"):
        super().__init__(content, media_type=media_type, headers=SSE_HEADERS)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except RuntimeError:  # cancelled while running: it has already unwound
                    pass
