"""Dependencies the routers share (the FastAPI full-stack template's ``Annotated`` style)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from amskv.classes import ClassCatalog
from amskv.engine import EngineInfo
from server.schemas import GenerateRequest, ImagesGenerationRequest, ModelLimits
from server.service import Service

RequestT = TypeVar("RequestT", GenerateRequest, ImagesGenerationRequest)


def get_service(request: Request) -> Service:
    """The app's one Service, made by the lifespan."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


@dataclass(frozen=True)
class Accepted(Generic[RequestT]):
    """A request the server takes now: its body, valid for the loaded model, and that model."""

    body: RequestT
    model: ModelLimits


def loaded_model(service: Service) -> tuple[EngineInfo, ClassCatalog]:
    """The loaded engine's description and its class names; 503 not_ready until load and warm-up are done."""
    service.require_loaded()
    info, catalog = service.worker.info, service.catalog
    assert info is not None and catalog is not None  # require_loaded raised otherwise
    return info, catalog


def model_limits(service: Service) -> ModelLimits:
    """The loaded model's limits, the validation context of a generate request."""
    info, catalog = loaded_model(service)
    return ModelLimits(catalog=catalog, model_name=info.model_name, resolution=info.resolution,
                       scales=tuple(info.scales), vocab_size=info.vocab_size,
                       max_images_per_request=service.settings.max_images_per_request)


def accept(body: RequestT, service: Service) -> Accepted[RequestT]:
    """Refuse a request the server cannot take now (503), then validate the body again with the model's
    limits as pydantic's context; a failed check is a RequestValidationError like any other invalid body.

    FastAPI has already checked the fields without the model (their errors come first, before the server's
    state is looked at); the second validation is of the few fields of a small body.
    """
    service.check_accepting()
    model = model_limits(service)
    try:
        checked = type(body).model_validate(body.model_dump(exclude_unset=True), context=model)
    except ValidationError as exc:
        # Located in the body, as FastAPI locates the errors of its own parse (server/errors.py names the field).
        raise RequestValidationError([_in_body(error) for error in exc.errors(include_url=False)]) from None
    return Accepted(checked, model)


def _in_body(error: ErrorDetails) -> dict[str, Any]:
    return {**error, "loc": ("body", *error["loc"])}


async def accept_generate(body: GenerateRequest, service: ServiceDep) -> Accepted[GenerateRequest]:
    return accept(body, service)


async def accept_images(body: ImagesGenerationRequest, service: ServiceDep) -> Accepted[ImagesGenerationRequest]:
    return accept(body, service)


# What each generate route receives: FastAPI parses the body (so the OpenAPI document shows it), then accept().
AcceptedGenerate = Annotated[Accepted[GenerateRequest], Depends(accept_generate)]
AcceptedImages = Annotated[Accepted[ImagesGenerationRequest], Depends(accept_images)]
