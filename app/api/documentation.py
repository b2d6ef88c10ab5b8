"""OpenAPI documentation of the capability routes, built from their `CapabilitySpec`s in one place.

The generic handler (`app.api.v1.serve`) reads and writes raw bytes, so FastAPI cannot infer what a route
takes and gives. `route_documentation(spec, formats)` is the `responses` and `openapi_extra` of the route of
`spec` answering in `formats`: its request body per media type (as `app.api.io` reads them), the query
parameters read outside FastAPI (raw 4D-STEM frames, latent dtype), the deadline headers, the 200 answer
per media type with the headers the writers and the spec's `run` set, and the `ErrorBody` of every 4xx/5xx
the route can answer, with Retry-After / WWW-Authenticate where they are sent. Every route registered from
a spec passes it to `add_api_route`, so a new route gets its documentation with it.

tests/app/test_openapi_media.py sends a real request with every documented body media type, obtains every
documented answer type and checks the documented headers and errors against real answers;
tests/app/test_schemathesis.py fuzzes the service from this document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.admission import DEADLINE_HEADER, TIMEOUT_HEADER
from app.api.spec import CapabilitySpec, InputKind, OutputKind, ResponseHeader
from app.codecs import JSON_MEDIA_TYPE, NPY_MEDIA_TYPE, PNG_MEDIA_TYPE
from app.schemas.responses import ErrorBody
from app.versions import VERSION_HEADER

Schema = dict[str, Any]

TIFF_MEDIA_TYPE = "image/tiff"
OCTET_MEDIA_TYPE = "application/octet-stream"
MULTIPART_MEDIA_TYPE = "multipart/form-data"
MEDIA_TYPES = {"png": PNG_MEDIA_TYPE, "npy": NPY_MEDIA_TYPE, "json": JSON_MEDIA_TYPE}

BINARY: Schema = {"schema": {"type": "string", "format": "binary"}}
NUMBERS: Schema = {"type": "array", "items": {"type": "number"}}
INTEGERS: Schema = {"type": "array", "items": {"type": "integer"}}
NESTED_NUMBERS: Schema = {"type": "array"}  # (N, C, H, W) or (N, T, T) nested lists of numbers
LATENTS: Schema = {"anyOf": [{"type": "array", "items": NUMBERS}, NUMBERS], "description": "(N, D) or one (D,)"}

# ------------------------------------------------------------------------------ request bodies, by input kind
REQUEST_BODIES: dict[InputKind, Schema] = {
    "images": {
        "required": True,
        "description": "One image as the raw body: PNG (8/16-bit, APNG frames), TIFF (every page a frame) or an NPY"
        " array (H, W) / (N, H, W) / (N, C, H, W) (application/octet-stream is sniffed as one of these); or several"
        " as multipart/form-data parts named `files`. Integer images are scaled to [0, 1]; raw detector frames"
        " (models with `preprocessing.intensity`) keep their counts: see `intensity`",
        "content": {
            PNG_MEDIA_TYPE: BINARY,
            TIFF_MEDIA_TYPE: BINARY,
            NPY_MEDIA_TYPE: BINARY,
            OCTET_MEDIA_TYPE: BINARY,
            MULTIPART_MEDIA_TYPE: {
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
        "description": "Latents (N, D) or one (D,) as JSON or NPY (application/octet-stream: NPY); a fixed-render"
        " decoder (an op without inputs) takes an empty body or `{}`",
        "content": {
            JSON_MEDIA_TYPE: {
                "schema": {"type": "object", "properties": {"latents": LATENTS}, "required": ["latents"]}
            },
            NPY_MEDIA_TYPE: BINARY,
            OCTET_MEDIA_TYPE: BINARY,
        },
    },
}


def query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


NUMBER_LIST = r"^ *[0-9.eE+-]+ *(, *[0-9.eE+-]+ *)?$"
# read by app.preprocess.raw_detector, for models whose preprocessing has `intensity` (ignored by the others)
RAW_FRAME_PARAMETERS: list[Schema] = [
    query("intensity", {"type": "string", "enum": ["raw", "scaled"], "default": "raw"},
          "4D-STEM models: `raw` detector frames (normalised, rebinned and log-scaled by the service) or"
          " `scaled` values already in the model's [0, 1] range; ignored by other models"),
    query("angular_sampling_mrad", {"type": "string", "pattern": NUMBER_LIST, "example": "1.606"},
          "raw frames: mrad per detector pixel, one value or `ky,kx`; needed unless the frames are the model's"
          " pattern size (at most 4x the model's sampling, covering its field; else 422)"),
    query("counts_per_probe", {"type": "number", "exclusiveMinimum": 0, "example": 1e6},
          "raw frames: electrons per probe position x detector gain; without it floats are fractions of the"
          " probe and integer frames are divided by their own total"),
]
LATENT_PARAMETERS: list[Schema] = [  # read by app.api.io for latent answers
    query("dtype", {"type": "string", "enum": ["float32", "float16"], "default": "float32"},
          "precision of the latents answered (JSON and NPY)"),
]
# read by app.admission.request_deadline; described, not declared: a past deadline is a 504 by design, and
# tests/app/test_schemathesis.py would send past ones (it counts any 5xx as a failure)
DEADLINE_NOTE = (
    f"Request headers `{TIMEOUT_HEADER}: <seconds>` and `{DEADLINE_HEADER}: <Unix epoch seconds>` may shorten the"
    " request's deadline (AESERVE_REQUEST_TIMEOUT_S at most); past it the answer is a 504."
)
INPUT_PARAMETERS: dict[InputKind, list[Schema]] = {"images": RAW_FRAME_PARAMETERS}
OUTPUT_PARAMETERS: dict[OutputKind, list[Schema]] = {"latents": LATENT_PARAMETERS}

# ------------------------------------------------------------------------------ answers, by output kind
JSON_ANSWERS: dict[OutputKind, Schema] = {
    "latents": {
        "type": "object",
        "properties": {
            "latents": {"type": "array", "items": NUMBERS},
            "shape": INTEGERS,
            "dtype": {"type": "string", "enum": ["float32", "float16"]},
        },
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

PNG_ONLY = (PNG_MEDIA_TYPE,)
GRID_HEADERS = (  # app.api.io._png_response and app.api.v1.attention_answer
    ResponseHeader("X-Image-Count", "images in the PNG (several are tiled into one grid)", PNG_ONLY),
    ResponseHeader("X-Grid-Rows", "rows of the grid", PNG_ONLY),
    ResponseHeader("X-Grid-Cols", "columns of the grid", PNG_ONLY),
)
OUTPUT_HEADERS: dict[OutputKind, tuple[ResponseHeader, ...]] = {
    "latents": (),
    "images": (
        ResponseHeader("X-Output-Range", "`low,high`: the model's output range, mapped onto the PNG's 0..max"),
        *GRID_HEADERS,
        ResponseHeader("X-Image-Shape", "`C,H,W` of each image in the grid", PNG_ONLY),
    ),
    "attention": GRID_HEADERS,
}
# on every 200 of a capability route: app.api.negotiation.vary_on_accept, app.api.v1.serve_version
COMMON_HEADERS = (
    ResponseHeader("Vary", "`Accept`: the answer's media type depends on it"),
    ResponseHeader(VERSION_HEADER, "the model version that served the request"),
)

# ------------------------------------------------------------------------------ errors (app.errors.STATUS_TABLE)
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "a body that cannot be read at all",
    401: "a token is configured and the request lacks `Authorization: Bearer <token>`",
    404: "unknown model, or capability not offered by it",
    406: "no acceptable answer format (Accept / ?format=), or the answer cannot be encoded in it",
    408: "the client stalled sending its body, or sent it too slowly",
    413: "body or decoded input past its limit (bytes, frames, pixels, request memory)",
    415: "Content-Type is not one of the request body's media types",
    422: "invalid input: names the field and the limit",
    429: "overloaded (queue, in-flight requests or memory full): retry after Retry-After seconds",
    500: "the model's runtime failed on valid input",
    501: "an optional part is not installed here (saliency without torch; ?saliency=false still works)",
    503: "model unavailable (failed verification or loading, not ready, restarted) or the service shutting down",
    504: "the request's deadline passed",
}
ERROR_HEADERS: dict[int, tuple[ResponseHeader, ...]] = {
    401: (ResponseHeader("WWW-Authenticate", "`Bearer`"),),
    429: (ResponseHeader("Retry-After", "whole seconds to wait before retrying"),),
    503: (ResponseHeader("Retry-After", "seconds to wait (after a model's engine restarted)", always=False),),
}
VERSION_OF_ERROR = ResponseHeader(
    VERSION_HEADER, "the model version the request reached, once one was resolved", always=False
)
# every route: 401 (auth), 404 (model, capability), 406 (negotiation), 408/413 (the body edge), 422, 429
# (admission, memory), 500, 503, 504 (the deadline); the input kinds add their own
COMMON_ERRORS = (401, 404, 406, 408, 413, 422, 429, 500, 503, 504)
INPUT_ERRORS: dict[InputKind, tuple[int, ...]] = {
    "images": (415,),
    "latents": (415,),
    "sample-request": (400,),  # FastAPI reads this body itself
}


def header_objects(headers: Sequence[ResponseHeader]) -> dict[str, Schema]:
    """OpenAPI header objects; `required` = on every answer, `x-media-types` = on every answer of those types."""
    documented: dict[str, Schema] = {}
    for header in headers:
        item: Schema = {
            "description": header.description,
            "required": header.always and not header.media_types,
            "schema": {"type": "string"},
        }
        if header.media_types and header.always:
            item["x-media-types"] = list(header.media_types)
        documented[header.name] = item
    return documented


def error_statuses(spec: CapabilitySpec) -> list[int]:
    """Every 4xx/5xx the route of `spec` can answer (499 is never read by anyone: not documented)."""
    return sorted({*COMMON_ERRORS, *INPUT_ERRORS.get(spec.input, ()), *spec.errors})


def error_responses(statuses: Sequence[int]) -> dict[int | str, Schema]:
    """The `ErrorBody` answer of each status, with the headers sent with it."""
    documented: dict[int | str, Schema] = {}
    for status in statuses:
        headers = (*ERROR_HEADERS.get(status, ()), VERSION_OF_ERROR)
        documented[status] = {
            "model": ErrorBody, "description": ERROR_DESCRIPTIONS[status], "headers": header_objects(headers)
        }
    return documented


def success_response(spec: CapabilitySpec, formats: Sequence[str]) -> Schema:
    """The 200 answer of `spec` in each of `formats` (the first is the default), with its headers."""
    content = {
        MEDIA_TYPES[fmt]: {"schema": JSON_ANSWERS[spec.output]} if fmt == "json" else BINARY for fmt in formats
    }
    headers = (*COMMON_HEADERS, *OUTPUT_HEADERS[spec.output], *spec.headers)
    default = MEDIA_TYPES[formats[0]]
    return {
        "description": f"{spec.output} as {' | '.join(MEDIA_TYPES[f] for f in formats)} (Accept or ?format=;"
        f" default {default})",
        "content": content,
        "headers": header_objects(headers),
    }


def route_documentation(spec: CapabilitySpec, formats: Sequence[str]) -> dict[str, Any]:
    """`responses` and `openapi_extra` of the route of `spec`: `add_api_route(..., **route_documentation(...))`."""
    parameters = [*INPUT_PARAMETERS.get(spec.input, []), *OUTPUT_PARAMETERS.get(spec.output, [])]
    extra: Schema = {"description": f"{spec.summary}. {DEADLINE_NOTE}", "parameters": parameters}
    if spec.input in REQUEST_BODIES:  # the sample request is a pydantic body: FastAPI documents it
        extra["requestBody"] = REQUEST_BODIES[spec.input]
    return {
        "responses": {200: success_response(spec, formats), **error_responses(error_statuses(spec))},
        "openapi_extra": extra,
    }

