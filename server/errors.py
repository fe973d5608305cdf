"""Every error a client can see, and the one place that maps them to HTTP.

The body is always the OpenAI-style envelope
``{"error": {"message", "type", "code", "param"}}``; 503s carry ``Retry-After``.
"""
from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import metrics
from server.jobs import JOB_SCOPE_KEY, Job
from server.schemas import MODEL_CHECK_ERROR

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with its HTTP status and envelope fields."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}


class InvalidRequest(ApiError):
    status, type, code = 422, "invalid_request_error", "invalid_value"


class BodyTooLarge(ApiError):
    status, type, code = 413, "invalid_request_error", "body_too_large"


class UnsupportedMediaType(ApiError):
    status, type, code = 415, "invalid_request_error", "unsupported_media_type"


class NotFound(ApiError):
    status, type, code = 404, "invalid_request_error", "not_found"


class Unavailable(ApiError):
    """Capacity or lifecycle refusals (queue_full, draining, not_ready, worker_dead, queue_timeout)."""

    status, type, code = 503, "overloaded_error", "unavailable"

    def __init__(self, message: str, *, code: str, retry_after_s: int = 1, param: str | None = None) -> None:
        super().__init__(message, code=code, retry_after_s=retry_after_s, param=param)


class GenerationTimeout(ApiError):
    status, type, code = 504, "timeout_error", "generation_timeout"


class DeadlineExceeded(ApiError):
    """The client's own ``timeout_ms`` passed (queued or running): its budget, not the server's overload."""

    status, type, code = 504, "timeout_error", "deadline_exceeded"


class JobFailed(ApiError):
    """The batch holding this request failed; details stay in the server log."""

    status, type, code = 500, "server_error", "generation_failed"


class OutOfMemory(JobFailed):
    code = "gpu_oom"


def deadline_error(queued: bool, client_timeout_ms: int | None, retry_after_s: int) -> ApiError:
    """What a request past its deadline answers. The client's own ``timeout_ms`` is 504 deadline_exceeded
    wherever it passed (its budget, not overload); the server's deadline is 503 queue_timeout while queued
    (overload: retry later) and 504 generation_timeout once its images run."""
    if client_timeout_ms is not None:
        where = "in the queue" if queued else "while its images were generated"
        return DeadlineExceeded(f"timeout_ms ({client_timeout_ms} ms) passed {where}", param="timeout_ms")
    if queued:
        return Unavailable("request deadline passed while it waited in the queue", code="queue_timeout",
                           retry_after_s=retry_after_s)
    return GenerationTimeout("request deadline passed before its images were generated")


def envelope(message: str, type_: str, code: str, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


def error_response(exc: ApiError) -> JSONResponse:
    body = envelope(exc.message, exc.type, exc.code, exc.param)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers())


def _param_name(loc: tuple[Any, ...]) -> str:
    """("body", "class_labels", 2) -> "class_labels[2]"; the bare "body" location means the whole body."""
    parts = [p for p in loc if p != "body"]
    if not parts:
        return "body"
    name = str(parts[0])
    for part in parts[1:]:
        name += f"[{part}]" if isinstance(part, int) else f".{part}"
    return name


def _allowed_range(schema: dict[str, Any], field: str) -> str:
    """Bounds of a top-level body field from its JSON schema, e.g. "allowed: 0 <= cfg_scale <= 20"."""
    prop = schema.get("properties", {}).get(field, {})
    candidates = [prop, *prop.get("anyOf", [])]
    for spec in candidates:
        low = spec.get("minimum", spec.get("exclusiveMinimum"))
        high = spec.get("maximum", spec.get("exclusiveMaximum"))
        if low is not None or high is not None:
            lo = f"{low} <= " if low is not None else ""
            hi = f" <= {high}" if high is not None else ""
            return f" (allowed: {lo}{field}{hi})"
        if "enum" in spec:
            return f" (allowed: {', '.join(map(str, spec['enum']))})"
    return ""


# pydantic reports a value that fits no member of `int | str` once per member, with the member's
# name appended to the location (class_labels.0.int, class_labels.0.str).
UNION_MEMBER_TAGS = {"int": "an integer", "str": "a string"}


def _merge_union_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One error per value for int | str unions, located at the value itself."""
    merged: list[dict[str, Any]] = []
    by_loc: dict[tuple[Any, ...], dict[str, Any]] = {}
    for err in errors:
        loc = tuple(err.get("loc", ()))
        if len(loc) < 2 or loc[-1] not in UNION_MEMBER_TAGS:
            merged.append(err)
            continue
        owner = loc[:-1]
        if owner in by_loc:
            by_loc[owner]["members"].append(UNION_MEMBER_TAGS[loc[-1]])
            continue
        entry = {**err, "loc": owner, "members": [UNION_MEMBER_TAGS[loc[-1]]]}
        by_loc[owner] = entry
        merged.append(entry)
    for entry in by_loc.values():
        entry["msg"] = f"Input should be {' or '.join(entry.pop('members'))}"
    return merged


def validation_error(exc: RequestValidationError, body_schema: dict[str, Any] | None) -> InvalidRequest:
    """Turn FastAPI's list of errors into one envelope naming the first bad field and its range.

    An unknown field comes first: `{"classes": [3]}` is a misspelt `class_labels`, and "class_labels: Field
    required" alone would not say which key was wrong.
    """
    errors = _merge_union_errors(list(exc.errors()))
    checked = next((err for err in errors if err.get("type") == MODEL_CHECK_ERROR), None)
    if checked is not None:
        # A check against the loaded model (server/schemas.py) runs only on a body whose fields are all valid,
        # so it is the one error; its context holds the envelope's message, param and code as they are.
        ctx = checked["ctx"]
        return InvalidRequest(ctx["message"], param=ctx["param"], code=ctx["code"])
    errors.sort(key=lambda err: err.get("type") != "extra_forbidden")  # stable: the order within each kind stays
    first: dict[str, Any] = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    param = "body" if first.get("type") == "json_invalid" else _param_name(tuple(first["loc"]))
    field = param.split("[")[0].split(".")[0]
    message = f"{param}: {first['msg']}"
    if first.get("type") == "extra_forbidden":
        known = ", ".join((body_schema or {}).get("properties", {}))
        message = f"{param}: unknown field" + (f" (the fields are: {known})" if known else "")
    elif body_schema is not None:
        message += _allowed_range(body_schema, field)
    if first.get("type") == "missing" and param == "body":
        message = "request body is required (a JSON object)"
    elif first.get("type") == "json_invalid":
        message = f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return InvalidRequest(message, param=param, code="invalid_value")


def body_not_json(cause: BaseException) -> InvalidRequest:
    reason = "nesting too deep" if isinstance(cause, RecursionError) else str(cause)
    return InvalidRequest(f"request body is not valid JSON: {reason[:200]}", param="body")


def as_bad_request(exc: InvalidRequest) -> InvalidRequest:
    """OpenAI-compatible routes answer invalid requests with 400, as OpenAI's API does (not 422)."""
    exc.status = 400
    return exc


def count_rejection(scope: MutableMapping[str, Any], error: ApiError) -> None:
    """Count a generate request refused with ``error`` in amskv_requests_rejected_total, by its error code.

    The one place refusals are counted: the handlers below call it for every error they answer, and the
    request guard (server/middleware.py), which answers before routing, may call it too. An error of a job
    the batcher already admitted (failed, timed out, closed) is the job's outcome, not a refusal.
    """
    if scope.get("path") not in metrics.GENERATE_ENDPOINTS:
        return
    job = scope.get(JOB_SCOPE_KEY)
    if isinstance(job, Job) and job.admitted:
        return
    reason = metrics.reject_reason(error.code, error.status)
    if reason is not None:
        metrics.REJECTED.labels(reason=reason).inc()


def register_exception_handlers(app: FastAPI, body_schema: dict[str, Any] | None = None,
                                openai_schemas: dict[str, dict[str, Any]] | None = None) -> None:
    """Install the handlers that produce the envelope and count refusals (`count_rejection`).

    `openai_schemas`: path -> body schema of the OpenAI-compatible routes, whose invalid bodies get 400.
    """

    def answer(request: Request, error: ApiError) -> JSONResponse:
        count_rejection(request.scope, error)
        return error_response(error)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        openai_schema = (openai_schemas or {}).get(request.url.path)
        if openai_schema is not None:
            return answer(request, as_bad_request(validation_error(exc, openai_schema)))
        return answer(request, validation_error(exc, body_schema))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and isinstance(exc.__cause__, (ValueError, RecursionError)):
            # FastAPI answers a bare 400 "error parsing the body" when decoding fails outside
            # JSONDecodeError: invalid UTF-8, nesting too deep, an integer over 4300 digits.
            error = body_not_json(exc.__cause__)
            return answer(request, as_bad_request(error) if request.url.path in (openai_schemas or {}) else error)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        body = envelope(str(exc.detail), "invalid_request_error", code, None)
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(ApiError("internal server error"))
