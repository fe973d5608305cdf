"""HTTP request and response models. pydantic lives only at this edge; inner layers use dataclasses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictInt, StrictStr, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError

from amskv.calibration import ProfileSource
from amskv.classes import ClassCatalog, ClassLabelError
from amskv.engine import EngineInfo
from server.settings import MAX_BATCH_CEILING

SEED_MAX = 2**32 - 1
CFG_MAX = 20.0
# The error type of a failed check against the loaded model; server/errors.py answers it with the message,
# param and code it carries.
MODEL_CHECK_ERROR = "model_check"


@dataclass(frozen=True)
class ModelLimits:
    """What a generate request is validated against once the model is loaded: pydantic's validation context.

    FastAPI parses a body without it (types and the ranges that hold for every model); the generate routes
    validate the body again with it before they build a job (server/routes/deps.py), so every check of a
    request lives in its model below.
    """

    catalog: ClassCatalog
    model_name: str
    resolution: int
    scales: tuple[int, ...]  # the side of each scale's token map
    vocab_size: int | None
    max_images_per_request: int

    @property
    def num_scales(self) -> int:
        return len(self.scales)


def _model_check(message: str, param: str, code: str = "invalid_value") -> PydanticCustomError:
    """A failed check against the model, carrying the envelope's message, param and code as they are."""
    return PydanticCustomError(MODEL_CHECK_ERROR, "{message}",
                               {"message": message, "param": param, "code": code})


def _limits(info: ValidationInfo) -> ModelLimits | None:
    return info.context if isinstance(info.context, ModelLimits) else None


def _resolve_labels(catalog: ClassCatalog, labels: list[int | str], field: str) -> list[int]:
    """Class indices for the labels; an unknown one is named by its position (class_labels[i]) or, for the
    OpenAI route's one label, by its field (prompt), with the same words."""
    try:
        return catalog.resolve_all(labels)
    except ClassLabelError as exc:
        message = f"{exc}; GET /v1/classes lists the classes"
        if field == "prompt":
            raise _model_check(message.replace("class_labels", "prompt"), "prompt", "unknown_class_label") from None
        raise _model_check(message, f"{field}[{exc.position}]", "unknown_class_label") from None


def _check_total_and_top_k(body: GenerateRequest | ImagesGenerationRequest, labels: int,
                           limits: ModelLimits) -> None:
    """The checks both generate routes share: images per request, and top_k against the vocabulary."""
    total = labels * body.n
    if total > limits.max_images_per_request:
        raise _model_check(f"{labels} labels x n={body.n} = {total} images; at most "
                           f"{limits.max_images_per_request} per request", "n", "too_many_images")
    if limits.vocab_size is not None and body.top_k > limits.vocab_size:
        if "top_k" in body.model_fields_set:
            raise _model_check(f"top_k: at most the vocabulary size (allowed: 0 <= top_k <= {limits.vocab_size})",
                               "top_k")
        body.top_k = limits.vocab_size  # the default (900) exceeds a small vocabulary: clamp it, no error


class _LabelledRequest(BaseModel):
    """A generate body whose class labels its model validator resolves against the loaded model."""

    _labels: list[int] = PrivateAttr(default_factory=list)

    @property
    def labels(self) -> list[int]:
        """The class index of each label; set by validation with the model's limits (``ModelLimits``)."""
        if not self._labels:
            raise RuntimeError("the request was not validated against the model (ModelLimits context)")
        return self._labels


class GenerateRequest(_LabelledRequest):
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

    @model_validator(mode="after")
    def _check_against_model(self, info: ValidationInfo) -> GenerateRequest:
        """With the model's limits as context: resolve the labels, then the totals and the format choices."""
        limits = _limits(info)
        if limits is None:
            return self
        self._labels = _resolve_labels(limits.catalog, self.class_labels, "class_labels")
        _check_total_and_top_k(self, len(self._labels), limits)
        if self.stream and self.response_format != "b64_json":
            raise _model_check(f"stream: images are streamed as b64_json, not {self.response_format!r}",
                               "response_format")
        if self.response_format == "png" and self.num_images != 1:
            raise _model_check(f"response_format 'png' returns one image, but {self.num_images} were requested; "
                               "use b64_json or zip", "response_format")
        return self

    @property
    def num_images(self) -> int:
        return len(self.class_labels) * self.n


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
    profile_source: ProfileSource = Field(
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
    batch_invariance: str = Field("", description="how an image is kept bit-identical whatever its batch mates "
                                  "(AMSKV_BATCH_INVARIANT and what auto chose on this device)")

    @classmethod
    def from_info(cls, info: EngineInfo, max_batch: int) -> ModelCard:
        """The card of a loaded engine: every field comes from ``Engine.info()``, the one definition."""
        kv = info.kv_cache
        return cls(id=info.model_name, num_classes=info.num_classes, resolution=info.resolution,
                   channels=info.channels, policy=info.policy, dtype=info.dtype, device=info.device,
                   kv_bytes_per_image=info.kv_bytes_per_image,
                   vanilla_kv_bytes_per_image=info.vanilla_kv_bytes_per_image, max_batch=max_batch,
                   kv_cache=KVCacheCard(policy=kv.policy, profile_source=kv.profile_source,
                                        demanding_layers=list(kv.demanding_layers), theta=kv.theta,
                                        bytes_per_image=kv.bytes_per_image,
                                        vanilla_bytes_per_image=kv.vanilla_bytes_per_image),
                   batch_invariance=info.batch_invariance)


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


class ImagesGenerationRequest(_LabelledRequest):
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

    @model_validator(mode="after")
    def _check_against_model(self, info: ValidationInfo) -> ImagesGenerationRequest:
        """With the model's limits as context: the OpenAI fields this model has one answer to, then the prompt."""
        limits = _limits(info)
        if limits is None:
            return self
        side = f"{limits.resolution}x{limits.resolution}"
        if self.model is not None and self.model != limits.model_name:
            raise _model_check(f"model {self.model!r} is not served here (allowed: {limits.model_name})", "model",
                               "model_not_found")
        if self.response_format != "b64_json":
            raise _model_check(f"response_format {self.response_format!r} is not supported: this server keeps no "
                               "files to link to (allowed: b64_json)", "response_format")
        if self.size not in ("auto", side):
            raise _model_check(f"size {self.size!r} is not this model's (allowed: {side} or auto)", "size")
        most = limits.num_scales - 1
        if self.partial_images > most:
            raise _model_check(f"partial_images: this model has {limits.num_scales} scales, so at most {most} "
                               f"partial images (allowed: 0 <= partial_images <= {most})", "partial_images")
        if self.partial_images and not self.stream:
            raise _model_check("partial_images needs stream: true", "partial_images")
        self._labels = _resolve_labels(limits.catalog, [self.prompt], "prompt")
        _check_total_and_top_k(self, 1, limits)
        return self


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
