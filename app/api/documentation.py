"""OpenAPI documentation of the v1 routes' raw bodies: what each input kind takes and each output kind
answers (the generic handler reads and writes bytes, so FastAPI cannot infer them).

The media types and JSON shapes here are the ones `app.api.io` and `app.api.v1` really read and write;
tests/app/test_schemathesis.py fuzzes the service from this document and checks every answer against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.api.spec import InputKind, OutputKind
from app.codecs import JSON_MEDIA_TYPE, NPY_MEDIA_TYPE, PNG_MEDIA_TYPE
from app.schemas.responses import ErrorBody

Schema = dict[str, Any]

BINARY: Schema = {"schema": {"type": "string", "format": "binary"}}
NUMBERS: Schema = {"type": "array", "items": {"type": "number"}}
INTEGERS: Schema = {"type": "array", "items": {"type": "integer"}}
NESTED_NUMBERS: Schema = {"type": "array"}  # (N, C, H, W) or (N, T, T) nested lists of numbers

REQUEST_BODIES: dict[InputKind, Schema] = {
    "images": {
        "required": True,
        "description": "One image (PNG, TIFF: every page a frame) or an NPY stack (H, W) / (N, H, W) / (N, C, H, W),"
        " as the raw body, or several as multipart parts named `files`",
        "content": {
            "image/png": BINARY,
            "image/tiff": BINARY,
            NPY_MEDIA_TYPE: BINARY,
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["files"],
                }
            },
        },
    },
    "latents": {
        "required": False,
        "description": "Latents (N, D) as JSON or NPY; a fixed-render decoder takes an empty body",
        "content": {
            JSON_MEDIA_TYPE: {
                "schema": {
                    "type": "object",
                    "properties": {"latents": {"type": "array", "items": NUMBERS}},
                    "required": ["latents"],
                }
            },
            NPY_MEDIA_TYPE: BINARY,
        },
    },
}

JSON_ANSWERS: dict[OutputKind, Schema] = {
    "latents": {
        "type": "object",
        "properties": {"latents": {"type": "array", "items": NUMBERS}, "shape": INTEGERS},
        "required": ["latents", "shape"],
    },
    "images": {
        "type": "object",
        "properties": {"images": NESTED_NUMBERS, "shape": INTEGERS, "output_range": NUMBERS},
        "required": ["images", "shape", "output_range"],
    },
    "attention": {
        "type": "object",
        "properties": {
            "attention": NESTED_NUMBERS,
            "attention_shape": INTEGERS,
            "saliency": {"type": ["array", "null"]},
            "saliency_shape": {"type": ["array", "null"], "items": {"type": "integer"}},
            "methods": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "required": ["attention", "attention_shape", "saliency", "saliency_shape", "methods"],
    },
}

MEDIA_TYPES = {"png": PNG_MEDIA_TYPE, "npy": NPY_MEDIA_TYPE, "json": JSON_MEDIA_TYPE}

# Errors of the HTTP edge, beside app.schemas.responses.ERROR_RESPONSES
EDGE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "a body that cannot be parsed at all"},
    408: {"model": ErrorBody, "description": "the client stalled sending its body (the read timeout)"},
}


def request_body(kind: InputKind) -> Schema | None:
    """`openapi_extra` of a route taking `kind` (None: FastAPI documents it, e.g. the sample request)."""
    body = REQUEST_BODIES.get(kind)
    return None if body is None else {"requestBody": body}


def answers(output: OutputKind, formats: Sequence[str]) -> dict[int | str, dict[str, Any]]:
    """The 200 answer in each offered format, plus the edge errors."""
    content = {
        MEDIA_TYPES[fmt]: {"schema": JSON_ANSWERS[output]} if fmt == "json" else BINARY for fmt in formats
    }
    return {**EDGE_ERRORS, 200: {"description": f"{output} as {' | '.join(formats)}", "content": content}}
