"""Dependencies the routers share (the FastAPI full-stack template's ``Annotated`` style)."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.service import Service


def get_service(request: Request) -> Service:
    """The app's one Service, made by the lifespan."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
