"""What the server serves and is doing: GET /v1/models, /v1/classes and /v1/status."""
from __future__ import annotations

from fastapi import APIRouter

from server.routes.deps import ServiceDep, loaded_model
from server.schemas import ClassInfo, ClassList, ModelCard, ModelList, QueueStatus

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList)
async def models(service: ServiceDep) -> ModelList:
    info, _ = loaded_model(service)
    return ModelList(data=[ModelCard.from_info(info, max_batch=service.worker.max_images)])


@router.get("/classes", response_model=ClassList)
async def classes(service: ServiceDep) -> ClassList:
    info, catalog = loaded_model(service)
    data = [ClassInfo(index=e.index, wnid=e.wnid, names=list(e.names)) for e in catalog.entries]
    return ClassList(model=info.model_name, data=data)


@router.get("/status", response_model=QueueStatus)
async def status(service: ServiceDep) -> QueueStatus:
    """The queue and the running batch now; answers during start-up too (max_batch 0 until loaded)."""
    batcher = service.batcher
    return QueueStatus(status=service.health()[0], queued_requests=batcher.queued_requests,
                       queued_images=batcher.queued_images, oldest_queued_s=round(batcher.oldest_queued_age_s(), 3),
                       running_requests=batcher.running_requests, running_images=batcher.running_images,
                       max_batch=service.worker.max_images, free_images=service.worker.free_images)
