"""POST /v1/generate (and /generate): class labels in, images out; ``"stream": true`` answers with SSE."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response

from server import metrics
from server.encoding import b64_png
from server.generation import CLIENT_CLOSED_REQUEST, await_job, new_job, render, usage
from server.jobs import Job
from server.routes.deps import AcceptedGenerate, ServiceDep
from server.schemas import ERROR_RESPONSES, GenerateResponse, ModelLimits, with_event_stream
from server.service import Service
from server.streaming import Preview, attach_channel, b64_pngs, error_event, event_stream, job_events, sse

router = APIRouter(tags=["generate"])
PATHS = ("/v1/generate", "/generate")  # the second is the original path, kept out of the schema


async def generate(accepted: AcceptedGenerate, request: Request, service: ServiceDep) -> Response:
    body, model = accepted.body, accepted.model
    job = new_job(service, request, body, preview_scales=range(model.num_scales) if body.stream else ())
    if body.stream:
        return await _stream(service, model, job, request)
    service.batcher.submit(job)
    result = await await_job(service.batcher, job, request)
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    response = await asyncio.to_thread(render, job, result, model.model_name, body.response_format)
    metrics.IMAGES_GENERATED.labels(model=model.model_name).inc(job.num_images)
    return response


for _path in PATHS:
    router.add_api_route(_path, generate, methods=["POST"], response_model=GenerateResponse,
                         responses=with_event_stream(ERROR_RESPONSES, "preview, image, done and error events"),
                         summary="Generate images for class labels",
                         include_in_schema=_path == "/v1/generate")


async def _stream(service: Service, model: ModelLimits, job: Job, request: Request) -> Response:
    """Submit the job and answer text/event-stream: preview events per scale, image events, then done.

    Refusals before the job is queued (queue full, draining) are ordinary HTTP errors; once streaming,
    an error is an ``error`` event with the same envelope.
    """
    channel = attach_channel(job)
    service.batcher.submit(job)

    async def events() -> AsyncIterator[bytes]:
        try:
            async for event in job_events(service.batcher, job, channel):
                if isinstance(event, Preview):
                    b64 = await asyncio.to_thread(b64_png, event.image)
                    yield sse("preview", {"index": event.index, "scale": event.scale, "of": model.num_scales,
                                          "b64_json": b64})
                    continue
                encoded = await b64_pngs(event.images)
                for index, b64 in enumerate(encoded):
                    yield sse("image", {"index": index, "class_label": job.labels[index], "seed": job.seeds[index],
                                        "b64_json": b64})
                metrics.IMAGES_GENERATED.labels(model=model.model_name).inc(job.num_images)
                yield sse("done", {"id": job.id, "created": int(time.time()), "model": model.model_name,
                                   "usage": usage(job, event)})
        except Exception as exc:  # the stream has started: an error travels as an event (ApiError's envelope)
            yield error_event(exc, request.scope)

    return event_stream(events(), request.scope)
