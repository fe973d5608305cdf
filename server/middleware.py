"""Pure ASGI middleware of the service: request ids and generate-endpoint metrics; media type and body limits;
the drain notice on /readyz."""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.responses import JSONResponse

from server import metrics
from server.errors import ApiError, BodyTooLarge, UnsupportedMediaType, count_rejection, error_response

GENERATE_PATHS = metrics.GENERATE_ENDPOINTS


access_logger = logging.getLogger("amskv.access")


def access_line(request_id: str, route: str, status: int, seconds: float, job: Any) -> str:
    """One generate request as key=value pairs: id, route, status, images, queue and inference seconds."""
    fields = {"id": request_id, "route": route, "status": status, "images": job.num_images if job else 0,
              "queue_s": round(((job.started_at or job.arrival) - job.arrival) if job else 0.0, 4),
              "inference_s": round(job.inference_time_s if job else 0.0, 4), "total_s": round(seconds, 4)}
    return " ".join(f"{key}={value}" for key, value in fields.items())


class RequestMetrics:
    """Pure ASGI middleware: X-Request-ID on every response; count and time the generate endpoints, and
    log one access line per generate request unless ``access_log`` is off."""

    def __init__(self, app: Any, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = f"gen_{uuid.uuid4().hex}"
        scope["amskv.request_id"] = request_id
        status = {"code": 500}

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        began = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = scope.get("path", "")
            if path in GENERATE_PATHS and scope.get("method") == "POST":
                code = scope.get("amskv.outcome_status", status["code"])  # a stream's end (server/streaming.py)
                seconds = time.perf_counter() - began
                metrics.REQUESTS.labels(endpoint=path, status=str(code)).inc()
                if 200 <= code < 300:  # answered with images; fast rejections would hide the latency
                    metrics.REQUEST_DURATION.labels(endpoint=path).observe(seconds)
                if self.access_log:
                    access_logger.info("%s", access_line(request_id, path, code, seconds, scope.get("amskv.job")))


class RequestGuard:
    """Pure ASGI middleware for POSTs: JSON only (415) and a body size limit (413), before any parsing."""

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if content_type and content_type != b"application/json":
            return await _reject(scope, send, UnsupportedMediaType(
                f"Content-Type must be application/json, got {content_type.decode(errors='replace')!r}",
                param="Content-Type"))
        too_large = BodyTooLarge(f"request body exceeds the limit of {self.max_body_bytes} bytes",
                                 param="body")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _reject(scope, send, too_large)
        body = b""
        while True:  # read it all (it is small) so chunked bodies are limited too
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return await _reject(scope, send, too_large)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class DrainNotice:
    """Pure ASGI middleware: once `amskv serve` announced its exit (``app.state.leaving``, set on SIGTERM for
    AMSKV_DRAIN_NOTICE_S), /readyz answers 503 DRAINING while requests are still admitted, so a balancer's
    health checks take the replica out of rotation before its drain refuses anything (server/cli.py)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if (scope["type"] == "http" and scope.get("path") == "/readyz"
                and getattr(scope["app"].state, "leaving", False)):
            response = JSONResponse({"status": "DRAINING", "detail": "shutting down: leaving the rotation before "
                                     "the drain"}, status_code=503)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


async def _no_body() -> dict:
    """The receive of a request answered before its body is read: the response never calls it."""
    return {"type": "http.request", "body": b"", "more_body": False}


async def _reject(scope: dict, send: Callable, error: ApiError) -> None:
    count_rejection(scope, error)  # answered before routing, so the error handlers never see it
    response = error_response(error)
    await response(scope, _no_body, send)
