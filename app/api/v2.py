"""The Open Inference Protocol (KServe v2) beside v1: health, metadata and `infer` over the same engines.

Routes (each model route also under `/versions/{v}`: any served version, `app.versions.find_version`;
another is a 404): `GET /v2`, `/v2/health/live`, `/v2/health/ready`, `GET /v2/models/{m}`,
`GET /v2/models/{m}/ready`, `POST /v2/models/{m}/infer`. JSON tensors and the binary tensor data
extension (`app.api.v2_tensors`); datatypes FP32 (FP16, and UINT8 images scaled by 1/255, accepted
for FP32 inputs), INT64 (INT32 accepted); BYTES is refused (no op takes strings). Parameters: `op`
(plain names), `binary_data_output`, `timeout` (microseconds, as tritonclient sends it).

Op mapping: one v2 model per op, `<model>.<op>` (`v3-small-201.encode` takes `image` FP32
[-1, 1, -1, -1] and gives `latent` FP32 [-1, 512]; `.decode` `latent` -> `image`; `.reconstruct`
`image` -> `reconstruction`), because a v2 model has ONE list of inputs and outputs in its metadata:
only a name per op lets `GET /v2/models/{m}` describe exactly what `infer` takes, so generic v2
clients (tritonclient, KServe, Seldon) work unchanged. The plain `<model>` is kept for clients that
select the op themselves: it serves its default op (`app.api.v2_models.OP_ORDER`; its metadata says
which) and any other through the request parameter `"op"` (its metrics' `op` label is `infer`: the op
is known only once the body is read). Tensors are model tensors: v2 does no image decoding or
resizing (that is v1's job); an image input must have the op's (or, for a dynamic one, an accepted)
size.

One path with v1: every infer runs on a lease of its version (`app.versions.leased`, named in
`X-Model-Version`), `app.api.deps.track` (metrics), `admission_slot` (429 before the body is read),
`app.api.io.input_memory` and `read_held_body` (the body and the memory pool, within the body limits of
`app.api.edge`), the same request deadline, `Engine.submit` (the batcher: v1 and v2 requests of one
op and shape share its queues) and `until_disconnected`. Errors come from the same exceptions, the
same `app.errors.STATUS_TABLE` and the same handlers (so they are counted the same), reshaped to v2's
`{"error": "<code>: <message> (field: ...; limit: ...)"}`. Health answers have no body: 200 for true,
503 (as `/readyz`) for false.
"""# No `from __future__ import annotations`: FastAPI reads the route functions' annotations.

import json
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import preprocess
from app.api.deps import admission_slot, get_ready_record, get_registry, request_deadline_of, track
from app.api.edge import arrival_of, until_disconnected
from app.api.error_handlers import (
    http_error_handler,
    service_error_handler,
    unhandled_error_handler,
    v2_message,
    validation_error_handler,
)
from app.api.io import INLINE_LATENT_COST, hold_input, input_memory, read_held_body
from app.api.v2_docs import (
    HEALTH_RESPONSES,
    INFER_EXTRA,
    INFER_RESPONSES,
    METADATA_ERRORS,
    MODEL_HEALTH_RESPONSES,
    ModelMetadata,
    ServerMetadata,
)
from app.api.v2_models import Target, choose_op, model_metadata, resolve
from app.api.v2_tensors import (
    BINARY_MEDIA_TYPE,
    HEADER_LENGTH,
    Arrays,
    InferenceRequest,
    TensorLimits,
    decode_inputs,
    encode_response,
    output_values,
    parse_cost,
    parse_header,
    select_outputs,
    split_body,
)
from app.budget import ANSWER_BYTES_PER_VALUE, MemoryBudget, decode_limiter, hold_answer, mib
from app.errors import InvalidInput, NotAcceptable, PayloadTooLarge, ServiceError, UnsupportedMediaType
from app.metrics import observe_codec
from app.schemas.manifest import TensorSpec
from app.settings import Settings
from app.store import ModelRecord
from app.versions import VERSION_HEADER, leased

SERVER_NAME = "aeserve"
EXTENSIONS = ["binary_tensor_data"]
TIMEOUT_PARAMETER = "timeout"  # microseconds, as tritonclient sends it: shortens the request's deadline


# ------------------------------------------------------------------------------ errors in the v2 shape
async def v2_error(request: Request, exc: Exception) -> JSONResponse:
    """The service's own handler of `exc` (status from STATUS_TABLE, counting, headers), as `{"error": str}`."""
    handler: Callable[[Request, Exception], Awaitable[JSONResponse]] = unhandled_error_handler
    if isinstance(exc, ServiceError):
        handler = service_error_handler
    elif isinstance(exc, RequestValidationError):
        handler = validation_error_handler
    elif isinstance(exc, StarletteHTTPException):
        handler = http_error_handler
    answer = await handler(request, exc)
    detail = json.loads(bytes(answer.body))["error"]
    headers = {k: v for k, v in answer.headers.items() if k not in ("content-length", "content-type")}
    return JSONResponse({"error": v2_message(detail)}, status_code=answer.status_code, headers=headers)


class V2Route(APIRoute):
    """A route whose every error answer has the v2 shape."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def v2_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # every error, rendered by the service's handlers
                return await v2_error(request, exc)

        return v2_handler


# ------------------------------------------------------------------------------ infer
def hw_checker(record: ModelRecord, spec: TensorSpec, settings: Settings) -> Callable[[tuple[int, int], str], None]:
    """The check of a dynamic image input's (H, W): v1's limits, and no resizing (v2 takes model tensors)."""
    assert record.manifest is not None
    preprocessing = record.manifest.preprocessing
    side = settings.max_dynamic_side
    limits = {"max_hw": preprocessing.max_hw or (side, side),
              "max_pixels": preprocessing.max_pixels or settings.max_dynamic_pixels}

    def check(have: tuple[int, int], field: str) -> None:
        size = preprocess.model_input_size(have, preprocessing, spec.shape, field=field, **limits)
        if size != have:
            raise InvalidInput(f"image is {have[0]}x{have[1]}; v2 does not resize (v1 does)", field=field,
                               limit=f"{size[0]}x{size[1]}")

    return check


def decode_request(
    target: Target, header: bytes, binary: memoryview, settings: Settings, budget: MemoryBudget
) -> tuple[InferenceRequest, str, Arrays]:
    """(request, op, op inputs) from the header and binary data, each input charged to `budget` first; timed
    as the request's decoding (`json`, or `other` for binary tensors)."""
    started = time.perf_counter()
    infer_request = parse_header(header)
    op_name = choose_op(target, infer_request)
    op = target.record.op(op_name)
    image = next((s for s in op.inputs if len(s.shape) == 4), None)
    limits = TensorLimits(
        max_frames=settings.max_frames,
        check_hw=hw_checker(target.record, image, settings) if image is not None else lambda hw, field: None,
        charge=lambda nbytes, field, what: budget.charge(nbytes, field=field, what=what),
    )
    inputs = decode_inputs(infer_request, binary, op, limits)
    rows = next(iter(inputs.values())).shape[0] if inputs else 1
    observe_codec("decode", "binary" if len(binary) else "json", time.perf_counter() - started, rows)
    return infer_request, op_name, inputs


async def read_request(
    request: Request, target: Target, settings: Settings
) -> tuple[InferenceRequest, str, Arrays]:
    """Read and decode the body, held in the request's pool share from its size and parse cost up front."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):  # compressed bodies would escape the body limits: refused unread
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r}", field="Content-Encoding", limit=["identity"])
    body = await read_held_body(request, settings)
    header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
    budget = MemoryBudget(settings.max_request_memory_bytes)
    budget.charge(len(body) + parse_cost(header), field="body", what="the body and its parsed JSON")
    hold_input(request, budget.used, field="body", what=f"a v2 request of {len(body)} bytes")
    if len(header) * INLINE_LATENT_COST <= settings.inline_codec_bytes:  # cheaper here than a thread trip
        decoded = decode_request(target, header, binary, settings, budget)
    else:
        decoded = await anyio.to_thread.run_sync(
            decode_request, target, header, binary, settings, budget,
            limiter=decode_limiter(request.app.state, settings),
        )
    hold_input(request, budget.used, field="inputs", what="the v2 inputs and their body")
    return decoded


def reserve_answer(selected: list[tuple[TensorSpec, bool]], batch: int, settings: Settings) -> None:
    """Size the answer before the work runs (406/413 past the request's budget), then hold it in the pool."""
    values = {True: 0, False: 0}
    for spec, binary in selected:
        values[binary] += output_values(spec, batch) or 0
    kinds = {True: "npy", False: "json"}  # binary data costs what an NPY answer costs to encode
    needed = sum(count * ANSWER_BYTES_PER_VALUE[kinds[binary]] for binary, count in values.items())
    limit = settings.max_request_memory_bytes
    if needed > limit:
        total = values[True] + values[False]
        message = f"an answer of {total} values needs ~{mib(needed)} to encode, over {mib(limit)}"
        if values[False] and total * ANSWER_BYTES_PER_VALUE["npy"] <= limit:
            raise NotAcceptable(f"{message}; ask for binary_data outputs", field="outputs.parameters.binary_data",
                                limit=limit, code="answer_too_large")
        raise PayloadTooLarge(f"{message}; send a smaller batch", field="inputs", limit=limit,
                              code="answer_too_large")
    hold_answer(values[True] + values[False], "json" if values[False] else "npy")


def deadline_of(request: Request, infer_request: InferenceRequest, settings: Settings) -> float:
    """v1's deadline, shortened by a `timeout` parameter (microseconds, Triton's unit) when given."""
    deadline = request_deadline_of(request, settings)
    timeout = infer_request.parameters.get(TIMEOUT_PARAMETER)
    if timeout is None:
        return deadline
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise InvalidInput(f"timeout {timeout!r}", field=f"parameters.{TIMEOUT_PARAMETER}",
                           limit="microseconds > 0")
    return min(deadline, arrival_of(request).loop_time + timeout / 1e6)


def expecting(record: ModelRecord, op: str | None) -> AbstractContextManager[None]:
    """The engine's count of requests for `op` being read (nothing while a plain name's op is unknown)."""
    return record.engine.expecting(op) if op is not None and record.engine is not None else nullcontext()


def encode_timed(head: dict[str, Any], outputs: Arrays, selected: list[tuple[TensorSpec, bool]]
                 ) -> tuple[bytes, int | None]:
    """`encode_response`, timed as the request's encoding (`json`, or `other` with binary outputs)."""
    started = time.perf_counter()
    body, header_length = encode_response(head, outputs, selected)
    rows = max((a.shape[0] for a in outputs.values() if a.ndim), default=1)
    observe_codec("encode", "json" if header_length is None else "binary", time.perf_counter() - started, rows)
    return body, header_length


async def answer(target: Target, infer_request: InferenceRequest, outputs: Arrays,
                 selected: list[tuple[TensorSpec, bool]], settings: Settings) -> Response:
    head: dict[str, Any] = {"model_name": target.name, "model_version": target.record.version}
    if infer_request.id is not None:
        head["id"] = infer_request.id
    values = sum(a.size for a in outputs.values())
    if values * ANSWER_BYTES_PER_VALUE["json"] <= settings.inline_codec_bytes:
        body, header_length = encode_timed(head, outputs, selected)
    else:
        body, header_length = await run_in_threadpool(encode_timed, head, outputs, selected)
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type=BINARY_MEDIA_TYPE, headers={HEADER_LENGTH: str(header_length)})


async def infer(request: Request, model_name: str, model_version: str | None = None) -> Response:
    """`POST /v2/models/{m}[/versions/{v}]/infer`: admit, read, decode, submit, encode (see the module doc)."""
    settings: Settings = request.app.state.settings
    target = resolve(get_registry(request), model_name, model_version)
    record = get_ready_record(target.record, request)
    with leased(record):  # a version retired by a reload is freed only once this request is done
        try:
            response = await run_infer(request, target, record, settings)
        except ServiceError as exc:
            exc.headers[VERSION_HEADER] = record.label_version
            raise
    response.headers[VERSION_HEADER] = record.label_version
    return response


async def run_infer(request: Request, target: Target, record: ModelRecord, settings: Settings) -> Response:
    """Admit, read, decode, submit and encode one request on a leased, ready version."""
    async with (
        track(record, target.metric_op),
        admission_slot(request, record, target.metric_op),
        input_memory(request, settings, (record.name, record.label_version, target.metric_op)),
    ):
        with expecting(record, target.op):  # an idle engine lets this request join its next batch
            infer_request, op_name, inputs = await read_request(request, target, settings)
        selected = select_outputs(infer_request, record.op(op_name))
        batch = next(iter(inputs.values())).shape[0] if inputs else 1
        reserve_answer(selected, batch, settings)
        deadline = deadline_of(request, infer_request, settings)
        assert record.engine is not None  # a ready record has one
        outputs = await until_disconnected(request, record.engine.submit(op_name, inputs, deadline=deadline))
        return await answer(target, infer_request, outputs, selected, settings)


# ------------------------------------------------------------------------------ health and metadata
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=request.app.version, extensions=EXTENSIONS)


async def server_live() -> Response:
    return Response(status_code=200)


async def server_ready(request: Request) -> Response:
    return Response(status_code=200 if request.app.state.ready else 503)


def metadata_of(request: Request, model_name: str, model_version: str | None) -> dict[str, Any]:
    return model_metadata(resolve(get_registry(request), model_name, model_version))


def ready_answer(request: Request, model_name: str, model_version: str | None) -> Response:
    record = resolve(get_registry(request), model_name, model_version).record
    return Response(status_code=200 if record.state == "ready" and record.engine is not None else 503)


async def metadata(request: Request, model_name: str) -> dict[str, Any]:
    return metadata_of(request, model_name, None)


async def version_metadata(request: Request, model_name: str, model_version: str) -> dict[str, Any]:
    return metadata_of(request, model_name, model_version)


async def model_ready(request: Request, model_name: str) -> Response:
    return ready_answer(request, model_name, None)


async def version_ready(request: Request, model_name: str, model_version: str) -> Response:
    return ready_answer(request, model_name, model_version)


async def model_infer(request: Request, model_name: str) -> Response:
    return await infer(request, model_name, None)


async def version_infer(request: Request, model_name: str, model_version: str) -> Response:
    return await infer(request, model_name, model_version)


def router() -> APIRouter:
    """Every v2 route, its errors in the v2 shape (paths that match no route answer the app's own 404)."""
    v2 = APIRouter(prefix="/v2", route_class=V2Route, tags=["v2"])
    v2.add_api_route("", server_metadata, methods=["GET"], summary="v2 server metadata", response_model=ServerMetadata)
    health = {"methods": ["GET"], "response_class": Response}  # no body: nothing to document as JSON
    v2.add_api_route("/health/live", server_live, summary="v2 liveness (200, no body)", responses=HEALTH_RESPONSES,
                     **health)
    v2.add_api_route("/health/ready", server_ready, summary="v2 readiness (200 or 503, no body)",
                     responses=HEALTH_RESPONSES, **health)
    routes = {"": (metadata, model_ready, model_infer),
              "/versions/{model_version}": (version_metadata, version_ready, version_infer)}
    for suffix, (describe, ready, run) in routes.items():
        model = f"/models/{{model_name}}{suffix}"
        v2.add_api_route(model, describe, methods=["GET"], summary="v2 model metadata: inputs and outputs",
                         response_model=ModelMetadata, response_model_exclude_none=True, responses=METADATA_ERRORS)
        v2.add_api_route(f"{model}/ready", ready, summary="v2 model readiness (no body)",
                         responses=MODEL_HEALTH_RESPONSES, **health)
        v2.add_api_route(f"{model}/infer", run, methods=["POST"], summary="v2 inference: JSON or binary tensors",
                         responses=INFER_RESPONSES, openapi_extra=INFER_EXTRA)
    return v2
