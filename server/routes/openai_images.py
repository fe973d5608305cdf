"""POST /v1/images/generations: OpenAI's Images API over the same jobs, so unchanged OpenAI clients work.

The prompt is one class (an index, WordNet id or name, resolved like class_labels). Invalid requests
get 400 in OpenAI's error envelope. ``stream: true`` answers OpenAI's image_generation.* events: with
``partial_images: k``, k of the scales (spread over all but the last) become partial images, then each
image's ``image_generation.completed``.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response

from server import metrics
from server.encoding import b64_png
from server.generation import CLIENT_CLOSED_REQUEST, await_job, new_job, usage
from server.jobs import Job
from server.routes.deps import AcceptedImages, ServiceDep
from server.schemas import (
    OPENAI_ERROR_RESPONSES,
    ImagesGenerationRequest,
    ImagesResponse,
    ModelLimits,
    OpenAIImage,
    Usage,
    with_event_stream,
)
from server.service import Service
from server.streaming import Preview, attach_channel, b64_pngs, error_event, event_stream, job_events, sse

IMAGES_PATH = "/v1/images/generations"

router = APIRouter(tags=["openai"])


def partial_scales(num_scales: int, partial_images: int) -> list[int]:
    """``partial_images`` scales spread evenly over all but the last (the last is the completed image)."""
    step = (num_scales - 1) / (partial_images + 1)
    return [int((j + 1) * step) for j in range(partial_images)]


@router.post(IMAGES_PATH, response_model=ImagesResponse,
             responses=with_event_stream(OPENAI_ERROR_RESPONSES, "image_generation.* events"),
             summary="OpenAI-compatible image generation (prompt = one class)")
async def images_generations(accepted: AcceptedImages, request: Request,
                             service: ServiceDep) -> Response | ImagesResponse:
    body, model = accepted.body, accepted.model
    job = new_job(service, request, body, preview_scales=partial_scales(model.num_scales, body.partial_images))
    if body.stream:
        return _stream(service, model, job, body, request)
    service.batcher.submit(job)
    result = await await_job(service.batcher, job, request)
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    encoded = await b64_pngs(result.images)
    name = model.catalog.name_of(job.labels[0])
    metrics.IMAGES_GENERATED.labels(model=model.model_name).inc(job.num_images)
    return ImagesResponse(created=int(time.time()), usage=Usage(**usage(job, result)), data=[
        OpenAIImage(b64_json=b64, revised_prompt=name, class_label=job.labels[i], seed=job.seeds[i])
        for i, b64 in enumerate(encoded)])


def _stream(service: Service, model: ModelLimits, job: Job, body: ImagesGenerationRequest,
            request: Request) -> Response:
    channel = attach_channel(job)
    service.batcher.submit(job)
    shape = {"size": f"{model.resolution}x{model.resolution}", "quality": "auto", "background": "opaque",
             "output_format": "png"}
    scales = partial_scales(model.num_scales, body.partial_images)
    tokens = sum(side * side for side in model.scales)

    async def events() -> AsyncIterator[bytes]:
        try:
            async for event in job_events(service.batcher, job, channel):
                if isinstance(event, Preview):
                    b64 = await asyncio.to_thread(b64_png, event.image)
                    yield sse("image_generation.partial_image", {
                        "type": "image_generation.partial_image", "b64_json": b64, "created_at": int(time.time()),
                        "partial_image_index": scales.index(event.scale), "index": event.index,
                        "scale": event.scale, **shape})
                    continue
                encoded = await b64_pngs(event.images)
                used: dict[str, Any] = {"input_tokens": 0,
                                        "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                                        "output_tokens": tokens, "total_tokens": tokens, **usage(job, event)}
                metrics.IMAGES_GENERATED.labels(model=model.model_name).inc(job.num_images)
                for index, b64 in enumerate(encoded):
                    yield sse("image_generation.completed", {
                        "type": "image_generation.completed", "b64_json": b64, "created_at": int(time.time()),
                        "index": index, "revised_prompt": model.catalog.name_of(job.labels[index]),
                        "seed": job.seeds[index], "usage": used, **shape})
        except Exception as exc:  # the stream has started: an error travels as an event (the same envelope)
            yield error_event(exc, request.scope)

    return event_stream(events(), request.scope)
