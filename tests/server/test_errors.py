"""Validation errors become one envelope that names the field to fix, and every refusal of a generate request is
counted once, by its error code (server/errors.py)."""
from __future__ import annotations

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from server import metrics
from server.errors import (ApiError, BodyTooLarge, InvalidRequest, JobFailed, Unavailable, UnsupportedMediaType,
                           as_bad_request, count_rejection, deadline_error, validation_error)
from server.jobs import JOB_SCOPE_KEY
from server.schemas import GenerateRequest, ImagesGenerationRequest
from tests.fakes import counter, make_job


def invalid(model, body: dict) -> RequestValidationError:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in caught.value.errors()])


def test_an_unknown_field_is_named_first_with_the_known_ones():
    error = validation_error(invalid(GenerateRequest, {"classes": [3]}), GenerateRequest.model_json_schema())
    assert error.status == 422 and error.param == "classes"
    assert error.message.startswith("classes: unknown field (the fields are: class_labels, ")
    assert error.message.endswith("(and 1 more error(s))")  # class_labels is still missing


def test_an_unknown_field_beside_a_bad_value_is_still_named_first():
    error = validation_error(invalid(GenerateRequest, {"class_labels": [1], "cfg_scale": 99, "colour": "red"}),
                             GenerateRequest.model_json_schema())
    assert error.param == "colour" and "unknown field" in error.message


def test_other_errors_keep_their_message_and_range():
    error = validation_error(invalid(GenerateRequest, {"class_labels": [1], "cfg_scale": 99}),
                             GenerateRequest.model_json_schema())
    assert error.param == "cfg_scale" and "cfg_scale <= " in error.message


def test_the_openai_route_names_an_unknown_field_too():
    error = validation_error(invalid(ImagesGenerationRequest, {"prompt": "3", "size_px": 32}),
                             ImagesGenerationRequest.model_json_schema())
    assert error.param == "size_px" and "unknown field" in error.message and "prompt" in error.message


def rejections() -> dict[str, float]:
    return {reason: counter(metrics.REJECTED, reason=reason) for reason in metrics.REJECT_REASONS}


@pytest.mark.parametrize(("error", "reason"), [
    (Unavailable("queue is full", code="queue_full"), "queue_full"),
    (Unavailable("draining", code="draining"), "draining"),
    (Unavailable("loading", code="not_ready"), "not_ready"),
    (Unavailable("the worker died", code="worker_dead"), "not_ready"),  # not ready to serve, for good
    (InvalidRequest("too many", code="too_many_images"), "too_many_images"),
    (InvalidRequest("no such class", code="unknown_class_label"), "invalid"),
    (InvalidRequest("cfg_scale: too large"), "invalid"),
    (as_bad_request(InvalidRequest("not served here", code="model_not_found")), "invalid"),  # the OpenAI route
    (BodyTooLarge("too large"), "body_too_large"),
    (UnsupportedMediaType("text/plain"), "unsupported_media_type"),
])
def test_a_refusal_is_counted_once_under_the_reason_of_its_code(error, reason):
    before = rejections()
    count_rejection({"path": "/v1/generate"}, error)
    assert rejections() == {**before, reason: before[reason] + 1}


def test_a_job_refused_by_the_queue_is_counted_and_an_admitted_jobs_error_is_not():
    refused, admitted = make_job(1), make_job(1)
    admitted.admitted = True  # as Batcher.submit sets it
    before = rejections()
    count_rejection({"path": "/v1/images/generations", JOB_SCOPE_KEY: refused}, Unavailable("full", code="queue_full"))
    assert rejections() == {**before, "queue_full": before["queue_full"] + 1}
    before = rejections()
    for outcome in (Unavailable("server shut down", code="draining"),  # the batcher closed while it was queued
                    deadline_error(True, None, retry_after_s=1), JobFailed("the batch failed")):
        count_rejection({"path": "/v1/generate", JOB_SCOPE_KEY: admitted}, outcome)
    count_rejection({"path": "/v1/classes"}, InvalidRequest("not a generate endpoint"))
    count_rejection({"path": "/generate"}, ApiError("internal server error"))  # a 500 is no refusal
    assert rejections() == before
