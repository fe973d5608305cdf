"""FastAPI app factory: lifespan, middleware and routes. Routes only translate HTTP <-> jobs.

Run it through `amskv serve` (server/cli.py), which adds drain-on-SIGTERM, or directly with
``uvicorn --factory server.app:create_app --workers 1``.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import os
import secrets
import signal
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from amskv.naming import image_file_name
from server import metrics
from server.batcher import Batcher
from server.classes import ClassCatalog, resolve_labels
from server.docs_ui import add_offline_docs
from server.encoding import b64_png, png_bytes, zip_archive
from server.errors import (ApiError, GenerationTimeout, InvalidRequest, Unavailable,
                           register_exception_handlers)
from server.jobs import Job, JobResult, JobStatus
from server.middleware import GENERATE_PATHS, RequestGuard, RequestMetrics
from server.schemas import (ERROR_RESPONSES, SEED_MAX, ClassInfo, ClassList, GenerateRequest,
                            GenerateResponse, HealthStatus, KVCacheCard, ModelCard, ModelList)
from server.settings import Settings, get_settings
from server.worker import FaultPlan, InferenceWorker

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's code; the client never sees it, the metrics do
STARTUP_FAILED_EXIT = 3  # uvicorn's own status for a failed lifespan start-up, kept for scripts that test it
FATAL_EXIT = 70  # EX_SOFTWARE: the worker died, stalled, hit a CUDA error or failed K batches in a row
WATCH_INTERVAL_S = 0.5


class Service:
    """Everything the routes need: settings, batcher, worker, class names and lifecycle state."""

    def __init__(self, settings: Settings, worker_factory: Callable[[Batcher, FaultPlan | None], InferenceWorker]):
        self.settings = settings
        self.batcher = Batcher(max_queue_images=settings.max_queue_images,
                               max_queue_delay_s=settings.max_queue_delay_ms / 1000)
        self.faults = FaultPlan() if settings.fault_injection else None
        self.worker = worker_factory(self.batcher, self.faults)
        self.catalog: ClassCatalog | None = None
        self.startup_error: str | None = None
        self.exit_code = 0  # set when the service asks the server to exit (cli.run returns it)

    def fatal_reason(self) -> str | None:
        """Why this process must be replaced (/livez 503, then exit), or None while it can still serve."""
        if self.startup_error is not None:
            return self.startup_error
        if self.worker.died:
            return self.worker.death_reason or "the inference worker died"
        stalled_s = self.worker.stalled_s()
        if stalled_s > self.settings.worker_stall_timeout_s:
            return (f"one batch has run for {stalled_s:.0f} s, over AMSKV_WORKER_STALL_TIMEOUT_S="
                    f"{self.settings.worker_stall_timeout_s:.0f}")
        return None

    def health(self) -> tuple[str, str | None]:
        fatal = self.fatal_reason()
        if fatal is not None:
            return "UNHEALTHY", fatal
        if self.batcher.draining:
            return "DRAINING", None
        if not self.worker.ready or self.catalog is None:
            return "STARTING", None
        return "READY", None

    def require_loaded(self) -> None:
        """Model-describing routes answer 503 not_ready until load and warm-up are done."""
        if self.worker.info is None or self.catalog is None:
            raise Unavailable("the model is still loading; retry shortly", code="not_ready", retry_after_s=5)

    def check_accepting(self) -> None:
        status, detail = self.health()
        if status == "READY":
            return
        if status == "DRAINING":
            metrics.REJECTED.labels(reason="draining").inc()
            raise Unavailable("server is draining; retry on another replica", code="draining", retry_after_s=5)
        metrics.REJECTED.labels(reason="not_ready").inc()
        code = "worker_dead" if status == "UNHEALTHY" else "not_ready"
        raise Unavailable(detail or "server is not ready yet", code=code, retry_after_s=30 if code == "worker_dead" else 5)

    async def drain(self) -> None:
        """Refuse new work and wait (at most drain_timeout_s) for queued and running work to finish.

        Whatever is left at the deadline is answered with 503 draining, so no accepted request is
        still waiting when uvicorn starts closing connections.
        """
        self.batcher.start_draining()
        metrics.DRAINING.set(1)
        metrics.READY.set(0)
        give_up = time.monotonic() + self.settings.drain_timeout_s
        while not self.batcher.is_idle() and not self.worker.died and time.monotonic() < give_up:
            await asyncio.sleep(0.05)
        if not self.batcher.is_idle():
            self.batcher.close(Unavailable("server shut down before this request was served",
                                           code="draining", retry_after_s=5))
            await asyncio.sleep(0.05)  # let the handlers send their 503s before connections close


def _engine_loader(settings: Settings, device: str, dtype: str) -> Callable[[], Any]:
    def load() -> Any:
        from amskv.engine import Engine  # imported on the inference thread, which owns the device
        from amskv.kvcache.calibration import CalibrationSettings
        return Engine.load(settings.var_checkpoint, settings.vae_checkpoint, policy=settings.policy,
                           policy_args=settings.policy_args, dtype=dtype, device=device,
                           profile=settings.kv_profile, profile_cache_dir=settings.profile_cache_dir,
                           calibration=CalibrationSettings(images=settings.calibration_images,
                                                           time_limit_s=settings.calibration_max_s))
    return load


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    from amskv.kvcache.manager import cuda_available, device_reserved_bytes
    from amskv.sampling import SamplingParams
    device = settings.resolved_device(cuda_available())
    dtype = settings.resolved_dtype(device)

    def make_worker(batcher: Batcher, faults: FaultPlan | None) -> InferenceWorker:
        return InferenceWorker(settings, batcher, _engine_loader(settings, device, dtype), dtype=dtype,
                               faults=faults, warmup_params=SamplingParams())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service = Service(settings, make_worker)
        app.state.service = service
        metrics.watch_service(settings.max_batch, service.batcher.oldest_queued_age_s,
                              lambda: service.batcher.running_requests,
                              device_reserved_bytes if device == "cuda" else None)
        service.worker.start()
        # The port opens now: while the engine loads and warms up, /livez is 200, /readyz 503 STARTING
        # and /metrics answers; the watchdog finishes start-up and later exits on a fatal state.
        watchdog = asyncio.create_task(_start_then_watch(app, service))
        yield
        watchdog.cancel()
        await service.drain()
        service.batcher.close(Unavailable("server shut down", code="draining", retry_after_s=5))
        await asyncio.to_thread(service.worker.stop)
        metrics.READY.set(0)
        # Runs after uvicorn closed every connection: the final account of what the app answered.
        logger.info("shutdown complete: generate requests answered by status %s", json.dumps(_answered()))

    app = FastAPI(title="amskv", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Class-conditional VAR image generation with the AMS-KV cache manager")
    add_offline_docs(app)
    register_exception_handlers(app, GenerateRequest.model_json_schema(),
                                on_invalid=lambda request: _count_invalid(request))
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics)

    async def generate(body: GenerateRequest, request: Request) -> Response:
        return await _generate(request.app.state.service, body, request, SamplingParams)

    for path in GENERATE_PATHS:
        app.add_api_route(path, generate, methods=["POST"], response_model=GenerateResponse,
                          responses=ERROR_RESPONSES, summary="Generate images for class labels",
                          include_in_schema=path == "/v1/generate")

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request) -> ModelList:
        service: Service = request.app.state.service
        service.require_loaded()
        info = service.worker.info
        return ModelList(data=[ModelCard(
            id=info.model_name, num_classes=info.num_classes, resolution=info.resolution,
            channels=info.channels, policy=info.policy, dtype=info.dtype, device=info.device,
            kv_bytes_per_image=info.kv_bytes_per_image,
            vanilla_kv_bytes_per_image=info.vanilla_kv_bytes_per_image, max_batch=service.worker.max_images,
            kv_cache=KVCacheCard(**info.kv_cache) if info.kv_cache else None)])

    @app.get("/v1/classes", response_model=ClassList)
    async def classes(request: Request) -> ClassList:
        service: Service = request.app.state.service
        service.require_loaded()
        data = [ClassInfo(index=e.index, wnid=e.wnid, names=list(e.names)) for e in service.catalog.entries]
        return ClassList(model=service.worker.info.model_name, data=data)

    @app.get("/livez", response_model=HealthStatus, responses={503: {"model": HealthStatus}})
    async def livez(request: Request) -> JSONResponse:
        """200 while the process can still serve (loading included); 503 once only a restart helps."""
        fatal = request.app.state.service.fatal_reason()
        body = HealthStatus(status="UNHEALTHY" if fatal else "READY", detail=fatal).model_dump()
        return JSONResponse(body, status_code=503 if fatal else 200)

    @app.get("/readyz", response_model=HealthStatus, responses={503: {"model": HealthStatus}})
    async def readyz(request: Request) -> JSONResponse:
        status, detail = request.app.state.service.health()
        metrics.READY.set(1 if status == "READY" else 0)
        body = HealthStatus(status=status, detail=detail).model_dump()
        return JSONResponse(body, status_code=200 if status == "READY" else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    if settings.fault_injection:
        @app.post("/_test/faults", include_in_schema=False)
        async def set_faults(request: Request) -> dict[str, Any]:
            """Test-only: set fault counters, e.g. {"fail_batches": 1} or {"kill_worker": true}."""
            changes = await request.json()
            faults: FaultPlan = request.app.state.service.faults
            unknown = set(changes) - set(faults.snapshot())
            if unknown:
                raise InvalidRequest(f"unknown fault(s): {sorted(unknown)}", param=sorted(unknown)[0])
            return faults.update(**changes)

    return app


async def _start_then_watch(app: FastAPI, service: Service) -> None:
    """Wait (bounded) for load + warm-up, publish the model, then exit the process on a fatal state."""
    settings = service.settings
    try:
        await asyncio.to_thread(service.worker.wait_started, settings.load_timeout_s)
    except Exception as exc:
        if isinstance(exc, TimeoutError):
            exc = TimeoutError(f"load and warm-up did not finish within AMSKV_LOAD_TIMEOUT_S={settings.load_timeout_s:g} s")
        service.startup_error = f"start-up failed: {exc}"
        logger.error("start-up failed: %s", exc)
        _request_exit(app, service, STARTUP_FAILED_EXIT)
        return
    info = service.worker.info
    service.catalog = ClassCatalog.for_model(info.num_classes)
    metrics.start_model_series(info.model_name)
    metrics.set_build_info(_version(), info.model_name, info.policy, info.dtype, info.device)
    metrics.READY.set(1)
    while (reason := service.fatal_reason()) is None:
        await asyncio.sleep(WATCH_INTERVAL_S)
    metrics.READY.set(0)
    logger.critical("fatal: %s; exiting with status %d in %.0f s so that a restart replaces this process",
                    reason, FATAL_EXIT, settings.fatal_exit_delay_s)
    await asyncio.sleep(settings.fatal_exit_delay_s)  # /livez answers 503 meanwhile
    _request_exit(app, service, FATAL_EXIT)


def _request_exit(app: FastAPI, service: Service, code: int) -> None:
    """Ask the server to shut down; `amskv serve` (server/cli.py) then exits with ``code``."""
    service.exit_code = code
    request_exit = getattr(app.state, "request_exit", None)
    if request_exit is not None:
        request_exit()
    else:  # plain `uvicorn --factory`: its SIGTERM handling shuts down (with status 0; prefer amskv serve)
        os.kill(os.getpid(), signal.SIGTERM)


def _version() -> str:
    try:
        return importlib.metadata.version("amskv")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def _answered() -> dict[str, int]:
    """Generate requests answered so far, by HTTP status, over both paths."""
    out: dict[str, int] = {}
    for family in metrics.REQUESTS.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                status = sample.labels["status"]
                out[status] = out.get(status, 0) + int(sample.value)
    return dict(sorted(out.items()))


def _count_invalid(request: Request) -> None:
    if request.url.path in GENERATE_PATHS:
        metrics.REJECTED.labels(reason="invalid").inc()


async def _generate(service: Service, body: GenerateRequest, request: Request, sampling_params: type) -> Response:
    settings = service.settings
    service.check_accepting()
    info = service.worker.info
    try:
        labels = resolve_labels(service.catalog, body.class_labels)
        total = len(labels) * body.n
        if total > settings.max_images_per_request:
            metrics.REJECTED.labels(reason="too_many_images").inc()
            raise InvalidRequest(f"{len(labels)} labels x n={body.n} = {total} images; at most "
                                 f"{settings.max_images_per_request} per request", param="n",
                                 code="too_many_images")
        top_k = body.top_k
        if info.vocab_size is not None and top_k > info.vocab_size:
            if "top_k" not in body.model_fields_set:  # the default (900) exceeds a small vocabulary
                top_k = info.vocab_size
            else:
                raise InvalidRequest(
                    f"top_k: at most the vocabulary size (allowed: 0 <= top_k <= {info.vocab_size})", param="top_k")
        if body.response_format == "png" and total != 1:
            raise InvalidRequest(f"response_format 'png' returns one image, but {total} were requested; "
                                 "use b64_json or zip", param="response_format")
    except InvalidRequest as exc:
        if exc.code != "too_many_images":
            metrics.REJECTED.labels(reason="invalid").inc()
        raise
    seed = body.seed if body.seed is not None else secrets.randbelow(SEED_MAX + 1)
    now = time.monotonic()
    timeout_s = settings.request_timeout_s if body.timeout_ms is None else min(
        settings.request_timeout_s, body.timeout_ms / 1000)
    job = Job(id=request.scope.get("amskv.request_id", f"gen_{uuid.uuid4().hex}"),
              labels=[label for label in labels for _ in range(body.n)],
              seeds=[(seed + i) % (SEED_MAX + 1) for i in range(total)],
              params=sampling_params(cfg=body.cfg_scale, top_k=top_k, top_p=body.top_p,
                                     more_smooth=body.more_smooth),
              priority=body.priority, arrival=now, deadline=now + timeout_s)
    service.batcher.submit(job)
    result = await _await_job(service.batcher, job, request)
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    response = await asyncio.to_thread(_render, job, result, info.model_name, body.response_format)
    metrics.IMAGES_GENERATED.labels(model=info.model_name).inc(total)
    return response


async def _await_job(batcher: Batcher, job: Job, request: Request) -> JobResult | None:
    """The job's result; None if the client left. Raises the job's ApiError or a timeout."""
    waiter = asyncio.wrap_future(job.future)
    disconnect = asyncio.ensure_future(_client_disconnected(request))
    try:
        # A small grace lets the batcher report queue expiry itself when it gets there first.
        remaining = job.deadline - time.monotonic() + 0.05
        done, _ = await asyncio.wait({waiter, disconnect}, timeout=max(remaining, 0),
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            return waiter.result()
        if disconnect in done:
            batcher.cancel(job)
            return None
        error: ApiError = (Unavailable("request deadline passed while it waited in the queue",
                                       code="queue_timeout", retry_after_s=1)
                           if job.status == JobStatus.QUEUED
                           else GenerationTimeout("request deadline passed before its images were generated"))
        batcher.cancel(job, error)
        raise error
    except asyncio.CancelledError:
        batcher.cancel(job)
        raise
    finally:
        disconnect.cancel()
        if not waiter.done():
            waiter.cancel()


async def _client_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # an extra empty body message; never spin


def _render(job: Job, result: JobResult, model: str, response_format: str) -> Response:
    usage = {"images": job.num_images, "queue_time_s": round(result.queue_time_s, 6),
             "inference_time_s": round(result.inference_time_s, 6), "batch_images": result.batch_images,
             "batches": result.batches}
    headers = {"X-Queue-Time-S": str(usage["queue_time_s"]), "X-Batch-Images": str(result.batch_images)}
    if response_format == "png":
        headers.update({"X-Seed": str(job.seeds[0]), "X-Class-Label": str(job.labels[0])})
        return Response(png_bytes(result.images[0]), media_type="image/png", headers=headers)
    base = {"id": job.id, "created": int(time.time()), "model": model}
    items = [{"index": i, "class_label": job.labels[i], "seed": job.seeds[i]} for i in range(job.num_images)]
    if response_format == "zip":
        manifest = {**base, "data": [{**item, "file": image_file_name(item["index"], item["class_label"], item["seed"])}
                                     for item in items], "usage": usage}
        headers["Content-Disposition"] = f'attachment; filename="{job.id}.zip"'
        return Response(zip_archive(result.images, manifest), media_type="application/zip", headers=headers)
    data = [{**item, "b64_json": b64_png(image)} for item, image in zip(items, result.images)]
    return JSONResponse({**base, "data": data, "usage": usage}, headers=headers)
