"""Test-only: POST /_test/faults, included only when AMSKV_FAULT_INJECTION=1."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from server.errors import InvalidRequest
from server.routes.deps import ServiceDep

router = APIRouter(include_in_schema=False)


@router.post("/_test/faults")
async def set_faults(request: Request, service: ServiceDep) -> dict[str, Any]:
    """Set fault counters, e.g. {"fail_batches": 1} or {"kill_worker": true} (server/faults.py FaultPlan)."""
    changes = await request.json()
    faults = service.faults
    assert faults is not None  # the app includes this router only with fault injection on, which makes the plan
    unknown = set(changes) - set(faults.snapshot())
    if unknown:
        raise InvalidRequest(f"unknown fault(s): {sorted(unknown)}", param=sorted(unknown)[0])
    return faults.update(**changes)
