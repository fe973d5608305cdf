"""What the server serves: GET /v1/models and GET /v1/classes."""
from __future__ import annotations

from fastapi import APIRouter

from server.routes.deps import ServiceDep
from server.schemas import ClassInfo, ClassList, KVCacheCard, ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList)
async def models(service: ServiceDep) -> ModelList:
    service.require_loaded()
    info = service.worker.info
    return ModelList(data=[ModelCard(
        id=info.model_name, num_classes=info.num_classes, resolution=info.resolution,
        channels=info.channels, policy=info.policy, dtype=info.dtype, device=info.device,
        kv_bytes_per_image=info.kv_bytes_per_image,
        vanilla_kv_bytes_per_image=info.vanilla_kv_bytes_per_image, max_batch=service.worker.max_images,
        kv_cache=KVCacheCard(**info.kv_cache) if info.kv_cache else None)])


@router.get("/classes", response_model=ClassList)
async def classes(service: ServiceDep) -> ClassList:
    service.require_loaded()
    data = [ClassInfo(index=e.index, wnid=e.wnid, names=list(e.names)) for e in service.catalog.entries]
    return ClassList(model=service.worker.info.model_name, data=data)
