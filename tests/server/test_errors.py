"""Validation errors become one envelope that names the field to fix (server/errors.py)."""
from __future__ import annotations

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from server.errors import validation_error
from server.schemas import GenerateRequest, ImagesGenerationRequest


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
