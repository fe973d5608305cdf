"""FastAPI app factory: lifespan, middleware, and the routers of server/routes/ (HTTP <-> jobs).

Run it through `amskv serve` (server/cli.py), which adds drain-on-SIGTERM, or directly with
``uvicorn --factory server.app:create_app --workers 1``.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import os
import signal
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from amskv.calibration import CalibrationSettings
from amskv.classes import ClassCatalog
from amskv.engine import Engine
from server import metrics
from server.batcher import Batcher
from server.docs_ui import add_offline_docs
from server.errors import Unavailable, register_exception_handlers
from server.faults import FaultPlan
from server.middleware import DrainNotice, RequestGuard, RequestMetrics
from server.routes import catalog, faults, generate, health, openai_images
from server.routes.playground import add_playground
from server.schemas import GenerateRequest, ImagesGenerationRequest
from server.service import Service
from server.settings import Settings, get_settings
from server.worker import InferenceWorker

logger = logging.getLogger(__name__)

STARTUP_FAILED_EXIT = 3  # uvicorn's own status for a failed lifespan start-up, kept for scripts that test it
FATAL_EXIT = 70  # EX_SOFTWARE: the worker died, stalled, hit a CUDA error or failed K batches in a row
WATCH_INTERVAL_S = 0.5


def _engine_loader(settings: Settings, device: str, dtype: str) -> Callable[[], Engine]:
    def load() -> Engine:
        # runs on the inference thread, which owns the device
        return Engine.load(settings.var_checkpoint, settings.vae_checkpoint, model=settings.model,
                           policy=settings.policy, policy_args=settings.policy_args, dtype=dtype, device=device,
                           profile=settings.kv_profile, profile_cache_dir=settings.profile_cache_dir,
                           batch_invariant=settings.batch_invariant,
                           calibration=CalibrationSettings(images=settings.calibration_images,
                                                           time_limit_s=settings.calibration_max_s))
    return load


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    from amskv.device import cuda_available, device_reserved_bytes
    from amskv.sampling import SamplingParams
    device = settings.resolved_device(cuda_available())
    dtype = settings.resolved_dtype(device)

    def make_worker(batcher: Batcher, faults: FaultPlan | None) -> InferenceWorker:
        return InferenceWorker(settings, batcher, _engine_loader(settings, device, dtype), faults=faults,
                               warmup_params=SamplingParams())

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
        if service.exit_code != FATAL_EXIT:  # a fatal state has no worker left to finish the queue: no drain
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
                                openai_schemas={openai_images.IMAGES_PATH: ImagesGenerationRequest.model_json_schema()})
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, access_log=settings.access_log)
    app.add_middleware(DrainNotice)

    for router in (generate.router, openai_images.router, catalog.router, health.router):
        app.include_router(router)
    add_playground(app)
    if settings.fault_injection:
        logger.warning("AMSKV_FAULT_INJECTION is on: POST /_test/faults, without authentication, can fail, stall or "
                       "kill this replica's inference worker. Test use only; never in production (the balancer "
                       "config denies /_test/, a replica reached directly does not)")
        app.include_router(faults.router)

    return app


async def _start_then_watch(app: FastAPI, service: Service) -> None:
    """Wait (bounded) for load + warm-up, publish the model, then exit the process on a fatal state."""
    settings = service.settings
    try:
        await asyncio.to_thread(service.worker.wait_started, settings.load_timeout_s)
    except Exception as exc:
        if isinstance(exc, TimeoutError):
            exc = TimeoutError("load and warm-up did not finish within "
                               f"AMSKV_LOAD_TIMEOUT_S={settings.load_timeout_s:g} s")
        service.startup_error = f"start-up failed: {exc}"
        logger.error("start-up failed: %s", exc)
        _request_exit(app, service, STARTUP_FAILED_EXIT)
        return
    info = service.worker.info
    assert info is not None  # wait_started returned: the worker is warm
    service.catalog = ClassCatalog.for_model(info.num_classes)
    metrics.start_model_series(info.model_name)
    metrics.set_build_info(_version(), info.model_name, info.policy, info.dtype, info.device)
    metrics.READY.set(1)
    while (reason := service.fatal_reason()) is None:
        await asyncio.sleep(WATCH_INTERVAL_S)
    metrics.READY.set(0)
    # Nothing will finish the queued and running requests (the worker is dead or stuck in a device call):
    # answer them now, retryable elsewhere, rather than when the exit finally closes their connections.
    service.batcher.close(Unavailable("this replica is in a fatal state and restarts; retry on another replica",
                                      code="worker_dead", retry_after_s=30))
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


