"""Probes and metrics: GET /livez, /readyz and /metrics."""
from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from server import metrics
from server.routes.deps import ServiceDep
from server.schemas import HealthStatus

router = APIRouter(tags=["health"])


@router.get("/livez", response_model=HealthStatus, responses={503: {"model": HealthStatus}})
async def livez(service: ServiceDep) -> JSONResponse:
    """200 while the process can still serve (loading included); 503 once only a restart helps."""
    fatal = service.fatal_reason()
    body = HealthStatus(status="UNHEALTHY" if fatal else "READY", detail=fatal).model_dump()
    return JSONResponse(body, status_code=503 if fatal else 200)


@router.get("/readyz", response_model=HealthStatus, responses={503: {"model": HealthStatus}})
async def readyz(service: ServiceDep) -> JSONResponse:
    status, detail = service.health()
    metrics.READY.set(1 if status == "READY" else 0)
    body = HealthStatus(status=status, detail=detail).model_dump()
    return JSONResponse(body, status_code=200 if status == "READY" else 503)


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
