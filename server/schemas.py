"""HTTP request and response models. pydantic lives only at this edge; inner layers use dataclasses."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from server.settings import MAX_BATCH_CEILING

SEED_MAX = 2**32 - 1
CFG_MAX = 20.0


class GenerateRequest(BaseModel):
    """Body of POST /v1/generate. Total images = len(class_labels) * n."""

    model_config = ConfigDict(extra="forbid", strict=True)

    class_labels: list[StrictInt | StrictStr] = Field(
        ..., min_length=1, max_length=MAX_BATCH_CEILING,
        description="class indices, WordNet ids (n01440764) or class names",
        examples=[[207, "n01440764", "volcano"]])
    n: int = Field(1, ge=1, le=MAX_BATCH_CEILING, description="images per class label")
    seed: int | None = Field(None, ge=0, le=SEED_MAX,
                             description="image i uses (seed + i) mod 2**32; omitted = server picks one")
    cfg_scale: float = Field(4.0, ge=0.0, le=CFG_MAX, allow_inf_nan=False, description="classifier-free guidance")
    top_k: int = Field(900, ge=0, description="0 = off; at most the vocabulary size")
    top_p: float = Field(0.95, ge=0.0, le=1.0, allow_inf_nan=False, description="0 = off")
    more_smooth: bool = Field(False, description="Gumbel-softmax smoothing of the sampled tokens")
    response_format: Literal["b64_json", "zip", "png"] = Field(
        "b64_json", description="png only when exactly one image is requested")
    priority: int = Field(1, ge=0, le=2, description="0 = most urgent")
    timeout_ms: int | None = Field(None, ge=1, description="may only shorten the server's request timeout")
    stream: bool = Field(False, description="answer text/event-stream: a preview event per image and scale, "
                         "then image events (b64_json only), then done (docs/api.md)")


class ImageData(BaseModel):
    index: int
    class_label: int
    seed: int
    b64_json: str


class Usage(BaseModel):
    images: int
    queue_time_s: float = Field(description="arrival until the first image of the request started")
    inference_time_s: float = Field(description="wall time of the batches that ran this request")
    batch_images: int = Field(description="largest batch (in images) this request ran in")
    batches: int = Field(description="batches the request was split across")


class GenerateResponse(BaseModel):
    id: str
    created: int
    model: str
    data: list[ImageData]
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class KVCacheCard(BaseModel):
    """The KV cache the model runs with (docs/kv-cache.md §6)."""

    policy: str
    profile_source: Literal["calibrated", "cached", "file", "none"] = Field(
        description="calibrated at this start, cached from an earlier one, a given/shipped file, or none")
    demanding_layers: list[int] = Field(description="layers whose cache is planned at c_max")
    theta: float | None = Field(description="the profile's similarity threshold; null without a profile")
    bytes_per_image: int
    vanilla_bytes_per_image: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "amskv"
    num_classes: int
    resolution: int
    channels: int
    policy: str
    dtype: str
    device: str
    kv_bytes_per_image: int
    vanilla_kv_bytes_per_image: int
    max_batch: int
    kv_cache: KVCacheCard | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ClassInfo(BaseModel):
    index: int
    wnid: str | None
    names: list[str]


class ClassList(BaseModel):
    model: str
    data: list[ClassInfo]


class HealthStatus(BaseModel):
    status: Literal["STARTING", "READY", "DRAINING", "UNHEALTHY"]
    detail: str | None = None


# Shared by every route that can fail, so the OpenAPI document shows the envelope.
ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in [
        (413, "body too large"), (415, "not JSON"), (422, "invalid field (param names it)"),
        (500, "generation failed"), (503, "queue full, draining or not ready; see Retry-After"),
        (504, "generation did not finish before the request deadline"),
    ]
}


class ImagesGenerationRequest(BaseModel):
    """Body of POST /v1/images/generations, OpenAI's Images API; our sampling fields are extras."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr | StrictInt = Field(..., description="one class: an index, a WordNet id or a class name",
                                          examples=["seven"])
    model: str | None = Field(None, description="the served model's id (GET /v1/models); omitted = that one")
    n: int = Field(1, ge=1, le=MAX_BATCH_CEILING)
    response_format: str = Field("b64_json", description="b64_json only; the server keeps no files to link to")
    size: str = Field("auto", description="auto or the model's own resolution, e.g. 32x32")
    stream: bool = Field(False, description="answer with image_generation.* Server-Sent Events")
    partial_images: int = Field(0, ge=0, description="with stream: partial images per image, at most the "
                                "number of scales - 1")
    # OpenAI fields that this model has no choice in; accepted so unchanged clients work.
    quality: Literal["auto", "standard", "low", "medium", "high"] | None = None
    background: Literal["auto", "opaque"] | None = None
    output_format: Literal["png"] | None = None
    moderation: Literal["auto", "low"] | None = None
    style: str | None = None
    user: str | None = None
    # Extras: the sampling fields of POST /v1/generate.
    seed: int | None = Field(None, ge=0, le=SEED_MAX,
                             description="image i uses (seed + i) mod 2**32; omitted = server picks one")
    cfg_scale: float = Field(4.0, ge=0.0, le=CFG_MAX, allow_inf_nan=False)
    top_k: int = Field(900, ge=0, description="0 = off; at most the vocabulary size")
    top_p: float = Field(0.95, ge=0.0, le=1.0, allow_inf_nan=False)
    more_smooth: bool = False
    priority: int = Field(1, ge=0, le=2)
    timeout_ms: int | None = Field(None, ge=1)


class OpenAIImage(BaseModel):
    b64_json: str
    revised_prompt: str = Field(description="the class the prompt resolved to")
    class_label: int
    seed: int


class ImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    usage: Usage


class QueueStatus(BaseModel):
    """GET /v1/status: what the server is doing now (the playground shows it)."""

    status: Literal["STARTING", "READY", "DRAINING", "UNHEALTHY"]
    queued_requests: int
    queued_images: int
    oldest_queued_s: float
    running_requests: int
    running_images: int
    max_batch: int = Field(description="the most images one step may run (the KV pool after OOM back-off)")
    free_images: int = Field(0, description="KV slots free now: images that could start at the next scale boundary")


# The OpenAI-compatible route answers invalid requests with 400 (OpenAI's status), not 422.
OPENAI_ERROR_RESPONSES = {
    **{status: spec for status, spec in ERROR_RESPONSES.items() if status != 422},
    400: {"model": ErrorResponse, "description": "invalid request (param names the field), OpenAI's envelope"},
}


def with_event_stream(responses: dict, what: str) -> dict:
    """Document the text/event-stream answer of ``stream: true`` beside the JSON one."""
    return {**responses, 200: {"description": f"JSON, or with stream: true text/event-stream ({what})",
                               "content": {"text/event-stream": {"schema": {"type": "string"}}}}}
