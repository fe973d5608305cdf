"""POST /v1/generate (and /generate): class labels in, images out; ``"stream": true`` answers with SSE."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from server import metrics
from server.classes import resolve_labels
from server.errors import InvalidRequest
from server.generation import CLIENT_CLOSED_REQUEST, await_job, new_job, render
from server.metrics import GENERATE_ENDPOINTS
from server.routes.deps import ServiceDep
from server.schemas import ERROR_RESPONSES, GenerateRequest, GenerateResponse

router = APIRouter(tags=["generate"])


async def generate(body: GenerateRequest, request: Request, service: ServiceDep) -> Response:
    service.check_accepting()
    info = service.worker.info
    try:
        labels = resolve_labels(service.catalog, body.class_labels)
    except InvalidRequest:
        metrics.REJECTED.labels(reason="invalid").inc()
        raise
    job = new_job(service, request, labels, body)
    if body.response_format == "png" and job.num_images != 1:
        metrics.REJECTED.labels(reason="invalid").inc()
        raise InvalidRequest(f"response_format 'png' returns one image, but {job.num_images} were requested; "
                             "use b64_json or zip", param="response_format")
    service.batcher.submit(job)
    result = await await_job(service.batcher, job, request)
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    response = await asyncio.to_thread(render, job, result, info.model_name, body.response_format)
    metrics.IMAGES_GENERATED.labels(model=info.model_name).inc(job.num_images)
    return response


for _path in GENERATE_ENDPOINTS:
    router.add_api_route(_path, generate, methods=["POST"], response_model=GenerateResponse,
                         responses=ERROR_RESPONSES, summary="Generate images for class labels",
                         include_in_schema=_path == "/v1/generate")
