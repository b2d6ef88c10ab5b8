"""OpenAPI documentation of the v2 routes: their bodies, answers and the v2 error shape."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.api.v2_tensors import BINARY_MEDIA_TYPE, HEADER_LENGTH, KNOWN_DATATYPES


class V2Error(BaseModel):
    """Every v2 error: `{"error": "<code>: <message> (field: <field>; limit: <limit>)"}`."""

    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a dynamic axis")
    parameters: dict[str, Any] | None = None


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, Any] | None = Field(None, description="plain model names: the op served by default")
    ops: dict[str, str] | None = Field(None, description="plain model names: each op's own v2 model name")


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": V2Error, "description": text}
    for status, text in {
        401: "AESERVE_API_TOKEN is set and the bearer token is missing or wrong (WWW-Authenticate)",
        404: "unknown model, op or version",
        406: "the answer fits the request's memory budget only as binary data",
        413: "body, input or answer too large",
        415: "a compressed body (Content-Encoding other than identity)",
        422: "invalid request: names the field and the limit",
        429: "service full (see Retry-After)",
        503: "model unavailable / not ready / shutting down",
        500: "internal error (a bug: never a client's mistake)",
        504: "request deadline exceeded",
    }.items()
}

PARAMETERS = {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}}
REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": PARAMETERS,
        "inputs": {"type": "array", "items": {
            "type": "object",
            "required": ["name", "shape", "datatype"],
            "properties": {
                "name": {"type": "string"},
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "datatype": {"type": "string", "enum": list(KNOWN_DATATYPES)},
                "parameters": PARAMETERS,
                "data": {"type": "array", "description": "row-major values, flat or nested"},
            },
        }},
        "outputs": {"type": "array", "items": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"}, "parameters": PARAMETERS},
        }},
    },
}
BINARY_BODY = {"schema": {"type": "string", "format": "binary"}}
HEADER_PARAMETER = {
    "name": HEADER_LENGTH, "in": "header", "required": False, "schema": {"type": "integer", "minimum": 1},
    "description": "binary tensor data extension: bytes of the JSON header at the start of the body; the raw"
    " data of each input with `parameters.binary_data_size` follows, in the order of `inputs`",
}
INFER_EXTRA: dict[str, Any] = {
    "parameters": [HEADER_PARAMETER],
    "requestBody": {
        "required": True,
        "description": "An inference request: JSON tensors, or (binary tensor data extension) the JSON header"
        f" followed by raw little-endian tensor data, its length in {HEADER_LENGTH}. Parameters: `op` (plain model"
        " names), `binary_data_output`, `timeout` (microseconds)",
        "content": {
            "application/json": {"schema": REQUEST_SCHEMA},
            BINARY_MEDIA_TYPE: BINARY_BODY,
        },
    },
}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {
        "description": f"The outputs: JSON, or with binary outputs the JSON header ({HEADER_LENGTH} bytes, given"
        " in that header) followed by their raw data",
        "content": {"application/json": {"schema": {"type": "object"}}, BINARY_MEDIA_TYPE: BINARY_BODY},
        "headers": {HEADER_LENGTH: {"schema": {"type": "integer"}, "description": "with binary outputs"}},
    },
}
HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "true (no body)", "content": {}},
    503: {"description": "false (no body)", "content": {}},
}
METADATA_ERRORS: dict[int | str, dict[str, Any]] = {status: ERRORS[status] for status in (401, 404, 500, 503)}
MODEL_HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {404: ERRORS[404], **HEALTH_RESPONSES}
