"""From a validated request to a job and back: build and submit the job, await it, render the answer.

Shared by POST /v1/generate and POST /v1/images/generations. Streaming (server/streaming.py) uses the
same job; only the way the answer travels differs.
"""
from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import Collection
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from amskv.naming import image_file_name
from amskv.sampling import SamplingParams
from server.batcher import Batcher
from server.encoding import b64_png, png_bytes, zip_archive
from server.errors import ApiError, deadline_error
from server.jobs import JOB_SCOPE_KEY, Job, JobResult, JobStatus
from server.schemas import SEED_MAX, GenerateRequest, ImagesGenerationRequest
from server.service import Service

CLIENT_CLOSED_REQUEST = 499  # nginx's code; the client never sees it, the metrics do


def new_job(service: Service, request: Request, body: GenerateRequest | ImagesGenerationRequest, *,
            preview_scales: Collection[int] = ()) -> Job:
    """The job of a request validated against the model (server/routes/deps.py); not submitted.

    Every check has run before the job exists; ``preview_scales``: the scales whose running image the
    client wants to see.
    """
    settings = service.settings
    labels = body.labels
    total = len(labels) * body.n
    seed = body.seed if body.seed is not None else secrets.randbelow(SEED_MAX + 1)
    now = time.monotonic()
    timeout_s = settings.request_timeout_s if body.timeout_ms is None else min(
        settings.request_timeout_s, body.timeout_ms / 1000)
    client_timeout_ms = body.timeout_ms if timeout_s < settings.request_timeout_s else None
    job = Job(id=request.scope.get("amskv.request_id", f"gen_{uuid.uuid4().hex}"),
              labels=[label for label in labels for _ in range(body.n)],
              seeds=[(seed + i) % (SEED_MAX + 1) for i in range(total)],
              params=SamplingParams(cfg=body.cfg_scale, top_k=body.top_k, top_p=body.top_p,
                                    more_smooth=body.more_smooth),
              priority=body.priority, arrival=now, deadline=now + timeout_s, client_timeout_ms=client_timeout_ms,
              preview_scales=frozenset(preview_scales))
    request.scope[JOB_SCOPE_KEY] = job
    return job


async def await_job(batcher: Batcher, job: Job, request: Request) -> JobResult | None:
    """The job's result; None if the client left. Raises the job's ApiError or a timeout."""
    waiter = asyncio.wrap_future(job.future)
    disconnect = asyncio.ensure_future(client_disconnected(request))
    try:
        # A small grace lets the batcher report queue expiry itself when it gets there first.
        done, _ = await asyncio.wait({waiter, disconnect}, timeout=max(seconds_left(job), 0),
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            return waiter.result()
        if disconnect in done:
            batcher.cancel(job)
            return None
        raise expire(batcher, job)
    except asyncio.CancelledError:
        batcher.cancel(job)
        raise
    finally:
        disconnect.cancel()
        if not waiter.done():
            waiter.cancel()


def seconds_left(job: Job) -> float:
    """Until the job's deadline, plus a small grace so the batcher can report queue expiry itself first."""
    return job.deadline - time.monotonic() + 0.05


def expire(batcher: Batcher, job: Job) -> ApiError:
    """Cancel a job past its deadline and return the error to answer with."""
    error = deadline_error(job.status == JobStatus.QUEUED, job.client_timeout_ms, retry_after_s=1)
    batcher.cancel(job, error)
    return error


async def client_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # an extra empty body message; never spin


def usage(job: Job, result: JobResult) -> dict[str, Any]:
    return {"images": job.num_images, "queue_time_s": round(result.queue_time_s, 6),
            "inference_time_s": round(result.inference_time_s, 6), "batch_images": result.batch_images,
            "batches": result.batches}


def render(job: Job, result: JobResult, model: str, response_format: str) -> Response:
    used = usage(job, result)
    headers = {"X-Queue-Time-S": str(used["queue_time_s"]), "X-Batch-Images": str(result.batch_images)}
    if response_format == "png":
        headers.update({"X-Seed": str(job.seeds[0]), "X-Class-Label": str(job.labels[0])})
        return Response(png_bytes(result.images[0]), media_type="image/png", headers=headers)
    base = {"id": job.id, "created": int(time.time()), "model": model}
    items = [{"index": i, "class_label": job.labels[i], "seed": job.seeds[i]} for i in range(job.num_images)]
    if response_format == "zip":
        manifest = {**base, "data": [{**item, "file": image_file_name(item["index"], item["class_label"], item["seed"])}
                                     for item in items], "usage": used}
        headers["Content-Disposition"] = f'attachment; filename="{job.id}.zip"'
        return Response(zip_archive(result.images, manifest), media_type="application/zip", headers=headers)
    data = [{**item, "b64_json": b64_png(image)} for item, image in zip(items, result.images, strict=True)]
    return JSONResponse({**base, "data": data, "usage": used}, headers=headers)
