"""Server-Sent Events for a job: per-scale previews while it runs, then its images.

The inference thread hands each preview to the job's `PreviewChannel`, which moves it onto the event
loop (``call_soon_threadsafe``) into an asyncio queue the handler owns. `job_events` merges that queue
with the job's future; the routes turn what it yields into their own event shapes (POST /v1/generate:
``preview``/``image``/``done``; the OpenAI route: ``image_generation.*``).
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi.responses import StreamingResponse

from server.batcher import Batcher
from server.encoding import b64_png
from server.errors import ApiError, envelope
from server.generation import CLIENT_CLOSED_REQUEST, expire, seconds_left
from server.jobs import Job, JobResult

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies must not buffer the stream


@dataclass(frozen=True)
class Preview:
    index: int  # image index in the job
    scale: int
    image: Any  # uint8 (H, W, C)


class PreviewChannel:
    """The job's preview sink: called on the inference thread, read on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.queue: asyncio.Queue[Preview] = asyncio.Queue()

    def __call__(self, index: int, scale: int, image: Any) -> None:
        self._loop.call_soon_threadsafe(self.queue.put_nowait, Preview(index, scale, image))


def attach_channel(job: Job) -> PreviewChannel:
    channel = PreviewChannel(asyncio.get_running_loop())
    job.on_preview = channel
    return channel


async def job_events(batcher: Batcher, job: Job, channel: PreviewChannel) -> AsyncIterator[Preview | JobResult]:
    """Yield the job's previews in scale order per image, then its JobResult; raise its ApiError.

    A preview arrives before the result that follows it (both travel through call_soon_threadsafe, in
    order). A batch retried after an OOM repeats its early scales: those repeats are dropped, so each
    image's previews stay strictly increasing. Cancelled (the client left) or abandoned: the job is cancelled.
    """
    waiter = asyncio.wrap_future(job.future)
    last_scale: dict[int, int] = {}
    getter: asyncio.Future | None = None
    try:
        while True:
            getter = asyncio.ensure_future(channel.queue.get())
            done, _ = await asyncio.wait({waiter, getter}, timeout=max(seconds_left(job), 0),
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                preview = getter.result()
                if preview.scale > last_scale.get(preview.index, -1):
                    last_scale[preview.index] = preview.scale
                    yield preview
                continue
            getter.cancel()
            if waiter not in done:
                raise expire(batcher, job)
            while not channel.queue.empty():  # previews queued before the result
                preview = channel.queue.get_nowait()
                if preview.scale > last_scale.get(preview.index, -1):
                    last_scale[preview.index] = preview.scale
                    yield preview
            yield waiter.result()  # raises the job's ApiError
            return
    finally:
        if getter is not None:
            getter.cancel()
        if not waiter.done():
            waiter.cancel()
        batcher.cancel(job)  # a no-op once the job finished; otherwise the client left mid-stream


async def b64_pngs(images: Sequence[np.ndarray]) -> list[str]:
    """The images as base64 PNGs, encoded off the event loop."""
    return await asyncio.to_thread(lambda: [b64_png(image) for image in images])


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# The status a streamed request ended with, for the request metrics (server/middleware.py): the response
# started as 200, but a stream that then fails or whose client leaves is not a success.
OUTCOME_KEY = "amskv.outcome_status"


def error_event(exc: BaseException, scope: MutableMapping[str, Any]) -> bytes:
    """The same envelope a non-streamed request gets, as an ``error`` event; its status is the request's outcome."""
    if not isinstance(exc, ApiError):
        logger.error("stream failed", exc_info=exc)
        exc = ApiError("internal server error")
    scope[OUTCOME_KEY] = exc.status
    return sse("error", envelope(exc.message, exc.type, exc.code, exc.param))


def event_stream(events: AsyncIterator[bytes], scope: MutableMapping[str, Any]) -> StreamingResponse:
    """The SSE response; a stream its client leaves before the end is counted as 499, not 200."""
    async def tracked() -> AsyncIterator[bytes]:
        ended = False
        try:
            async for chunk in events:
                yield chunk
            ended = True
        finally:
            if not ended:
                scope.setdefault(OUTCOME_KEY, CLIENT_CLOSED_REQUEST)
    return StreamingResponse(tracked(), media_type="text/event-stream", headers=SSE_HEADERS)
