"""The v1 HTTP protocol: one generic route per capability spec, `POST /v1/models/{name}/{capability}` (the
model's default version) and `POST /v1/models/{name}/versions/{version}/{capability}` (a served version).
Every answer names the version that served it in `X-Model-Version`.

decode (request -> the op's inputs, by input kind) -> validate (the spec's check; codecs validate
what they decode) -> submit (the spec's run) -> encode (by output kind, in the negotiated format).
"""
# No `from __future__ import annotations` here: FastAPI reads the endpoint's annotations, and the
# options dependency of each spec is a local of `endpoint_for`, which a string annotation cannot name.

from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute

from app import codecs
from app.api.capabilities import CAPABILITIES
from app.api.deps import (
    admission_slot,
    get_ready_record,
    get_record,
    get_registry,
    request_deadline_of,
    require_capability,
    track,
)
from app.api.documentation import route_documentation
from app.api.edge import until_disconnected
from app.api.io import (
    image_response,
    input_memory,
    json_answer,
    latents_response,
    read_body,
    read_images,
    read_latents,
)
from app.api.negotiation import negotiate
from app.api.spec import Arrays, CapabilitySpec, InputKind, Job, Outcome, OutputKind, RequestOptions
from app.budget import use_answer_limit
from app.errors import InvalidInput, ServiceError
from app.schemas.manifest import OpSpec
from app.schemas.requests import SampleRequest
from app.settings import Settings
from app.store import ModelRecord
from app.versions import VERSION_HEADER, find_version, leased

# response formats each output kind offers; the first is the default
FORMATS: dict[OutputKind, tuple[str, ...]] = {
    "latents": ("json", "npy"),
    "images": ("png", "npy", "json"),
    "attention": ("json", "png"),
}

# ------------------------------------------------------------------------------ options (query, body)
FormatQuery = Annotated[str | None, Query(description="png | npy | json; overrides the Accept header")]
LatentFormatQuery = Annotated[str | None, Query(description="json | npy; overrides the Accept header")]
BitDepthQuery = Annotated[
    int, Query(description="PNG bit depth: 8 or 16 (16 for grayscale only)", json_schema_extra={"enum": [8, 16]})
]
AttentionFormatQuery = Annotated[str | None, Query(description="json | png (saliency overlaid on the input)")]
SaliencyQuery = Annotated[bool, Query(description="compute the saliency heatmap (needs torch)")]


async def latent_options(format: LatentFormatQuery = None) -> RequestOptions:
    return RequestOptions(format=format)


async def image_options(format: FormatQuery = None, bit_depth: BitDepthQuery = 8) -> RequestOptions:
    return RequestOptions(format=format, bit_depth=bit_depth)


async def attention_options(format: AttentionFormatQuery = None, saliency: SaliencyQuery = True) -> RequestOptions:
    return RequestOptions(format=format, saliency=saliency)


async def sample_options(
    body: SampleRequest | None = None, format: FormatQuery = None, bit_depth: BitDepthQuery = 8
) -> RequestOptions:
    return RequestOptions(format=format, bit_depth=bit_depth, sample=body or SampleRequest())


def options_for(spec: CapabilitySpec) -> Callable[..., Awaitable[RequestOptions]]:
    """The dependency that reads a spec's query parameters (and, for samples, the JSON body); `async`, as are
    the route's other dependencies: FastAPI runs a plain `def` dependency in a thread pool, a thread trip
    per dependency per request."""
    if spec.input == "sample-request":
        return sample_options
    return {"latents": latent_options, "images": image_options, "attention": attention_options}[spec.output]


# ------------------------------------------------------------------------------ decode: request -> inputs
async def read_image_input(request: Request, record: ModelRecord, op: OpSpec, settings: Settings) -> Arrays:
    return {op.inputs[0].name: await read_images(request, settings, record.manifest.preprocessing, op)}


async def read_latent_input(request: Request, record: ModelRecord, op: OpSpec, settings: Settings) -> Arrays:
    return {op.inputs[0].name: await read_latents(request, settings, int(op.inputs[0].shape[1]))}


async def read_no_input(request: Request, record: ModelRecord, op: OpSpec, settings: Settings) -> Arrays:
    """A fixed render (e.g. ProgressiveDecoder) takes nothing: the body must be empty (or `{}`)."""
    body = await read_body(request, settings.max_upload_bytes)
    if body.strip() not in (b"", b"{}"):
        raise InvalidInput("this decoder renders a fixed image and takes no latents", field="latents", limit=0)
    return {}


async def read_sample_input(request: Request, record: ModelRecord, op: OpSpec | None, settings: Settings) -> Arrays:
    return {}  # the JSON body arrived parsed and validated by FastAPI, in RequestOptions.sample


Reader = Callable[[Request, ModelRecord, OpSpec, Settings], Awaitable[Arrays]]
READERS: dict[InputKind, Reader] = {
    "images": read_image_input,
    "latents": read_latent_input,
    "none": read_no_input,
    "sample-request": read_sample_input,
}


# ------------------------------------------------------------------------------ encode: outcome -> response
async def latent_answer(
    outcome: Outcome, record: ModelRecord, fmt: str, options: RequestOptions, settings: Settings
) -> Response:
    latents = outcome.array
    return await latents_response(latents.reshape(latents.shape[0], -1), fmt)


async def image_answer(
    outcome: Outcome, record: ModelRecord, fmt: str, options: RequestOptions, settings: Settings
) -> Response:
    output_range = record.manifest.preprocessing.output_range
    return await image_response(
        outcome.array, output_range, fmt, bit_depth=options.bit_depth, headers=outcome.headers,
        inline_bytes=settings.inline_codec_bytes,
    )


def overlay_png(images: np.ndarray, saliency: np.ndarray) -> tuple[bytes, int, int]:
    return codecs.encode_png_grid(codecs.heat_overlay(images, saliency))


async def attention_answer(
    outcome: Outcome, record: ModelRecord, fmt: str, options: RequestOptions, settings: Settings
) -> Response:
    """JSON (attention matrix, saliency, methods) or the saliency overlaid on the input as a PNG grid."""
    headers = dict(outcome.headers)
    if fmt == "png":
        images = outcome.inputs
        png, rows, cols = await run_in_threadpool(overlay_png, images, outcome.saliency)
        headers.update({"X-Image-Count": str(images.shape[0]), "X-Grid-Rows": str(rows), "X-Grid-Cols": str(cols)})
        return Response(png, media_type=codecs.PNG_MEDIA_TYPE, headers=headers)
    attention, heat = outcome.array, outcome.saliency
    body = {
        "attention": attention,
        "attention_shape": list(attention.shape),
        "saliency": heat,
        "saliency_shape": None if heat is None else list(heat.shape),
        "methods": outcome.methods,
    }
    data = await json_answer(body)  # held in the pool first
    return Response(data, media_type=codecs.JSON_MEDIA_TYPE, headers=headers)


Writer = Callable[[Outcome, ModelRecord, str, RequestOptions, Settings], Awaitable[Response]]
WRITERS: dict[OutputKind, Writer] = {"latents": latent_answer, "images": image_answer, "attention": attention_answer}


# ------------------------------------------------------------------------------ the one handler and its routes
def output_channels(spec: CapabilitySpec, record: ModelRecord) -> int | None:
    """Channels of the images a capability answers with, from the manifest (None: not known up front)."""
    assert record.manifest is not None
    sampler = record.manifest.sampler
    if spec.op is None and sampler is not None and sampler.image_shape:
        return int(sampler.image_shape[0])
    shape = record.op(spec.op or "decode").outputs[0].shape
    return int(shape[1]) if len(shape) == 4 and shape[1] > 0 else None


def check_bit_depth(spec: CapabilitySpec, record: ModelRecord, options: RequestOptions, fmt: str) -> None:
    """422 before anything runs: 8 or 16 bits, and a 16-bit PNG only of grayscale images."""
    if spec.output != "images":
        return
    channels = output_channels(spec, record)
    allowed = [8] if fmt == "png" and channels not in (None, 1) else [8, 16]
    if options.bit_depth not in allowed:
        images = f" for {channels}-channel images" if channels else ""
        raise InvalidInput(f"bit_depth={options.bit_depth}{images}", field="bit_depth", limit=allowed)


def expecting(record: ModelRecord, op: str | None) -> AbstractContextManager[None]:
    """The engine's count of requests for `op` being read and decoded (nothing for the sampler)."""
    if op is None or record.engine is None:
        return nullcontext()
    return record.engine.expecting(op)


async def serve(
    spec: CapabilitySpec, request: Request, record: ModelRecord, settings: Settings, options: RequestOptions
) -> Response:
    """admit -> check -> decode -> submit -> encode, counted and timed under the capability's name.

    Everything the query, headers and manifest can refuse is refused before the body is read; the
    deadline runs from the request's arrival; a client that leaves while its work waits cancels it.
    """
    async with (
        track(record, spec.name) as request_metrics,
        admission_slot(request, record, spec.name),
        input_memory(request, settings),
    ):
        use_answer_limit(settings)  # answers are sized against the memory budget before encoding
        require_capability(record, spec.name)
        fmt = negotiate(request.headers.get("accept"), options.format, FORMATS[spec.output])
        check_bit_depth(spec, record, options, fmt)
        if spec.check is not None:
            spec.check(record, settings, options, fmt)
        deadline = request_deadline_of(request, settings)
        op = record.op(spec.op) if spec.op is not None else None
        with expecting(record, spec.op):  # an idle engine lets this request join its next batch
            inputs = await READERS[spec.input_kind(op)](request, record, op, settings)
        outcome = await until_disconnected(request, spec.run(Job(record, spec.op, inputs, options, deadline)))
        response = await WRITERS[spec.output](outcome, record, fmt, options, settings)
        if not request_metrics.items_out:  # an answer no codec counted (images as JSON): its rows
            request_metrics.items_out = int(outcome.array.shape[0])
        return response


async def serve_version(
    spec: CapabilitySpec, request: Request, record: ModelRecord, options: RequestOptions
) -> Response:
    """`serve` on a lease of the version (it is not freed while this runs), naming it in `X-Model-Version`
    (errors too). A version retired since the route resolved it (a reload swapped it out while the options
    were read) is resolved again: the new default, or a 404 for a version no longer served."""
    if record.retired:
        version = request.path_params.get("version")
        record = await (ready_record(record.name, request) if version is None else
                        version_record(record.name, version, request))
    version = record.label_version
    with leased(record):
        try:
            response = await serve(spec, request, record, request.app.state.settings, options)
        except ServiceError as exc:
            exc.headers[VERSION_HEADER] = version
            raise
    response.headers[VERSION_HEADER] = version
    response.headers["Vary"] = "Accept"  # every capability answer is negotiated (Accept or ?format=)
    return response


async def ready_record(name: str, request: Request) -> ModelRecord:
    """`app.api.deps.get_ready_record` of the path's model (its default version), on the event loop (see
    `options_for`); resolved before the options, so an unknown or unready model is refused before its query
    is validated."""
    return get_ready_record(get_record(name, get_registry(request)), request)


async def version_record(name: str, version: str, request: Request) -> ModelRecord:
    """`ready_record` of one served version of the model; 404 naming the served versions for another."""
    registry = get_registry(request)
    return get_ready_record(find_version(registry, get_record(name, registry), version), request)


class CapabilityRoute(APIRoute):
    """A capability's route. A request without a query string has every option at its default, so it skips
    FastAPI's dependency resolution (a sixth of a light request's time on the event loop, measured with
    py-spy): the same record resolver and options function the dependencies would call run directly. A query
    (or the sampler's JSON body) goes through FastAPI, which validates it and documents the route."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        resolved = super().get_route_handler()
        spec: CapabilitySpec = self.endpoint.spec  # type: ignore[attr-defined]  # set by `endpoint_for`
        versioned: bool = self.endpoint.versioned  # type: ignore[attr-defined]
        if spec.input == "sample-request":
            return resolved
        default_options = options_for(spec)

        async def handler(request: Request) -> Response:
            if request.scope.get("query_string"):
                return await resolved(request)
            params = request.path_params
            record = await (version_record(params["name"], params["version"], request) if versioned
                            else ready_record(params["name"], request))
            return await serve_version(spec, request, record, await default_options())

        return handler


def endpoint_for(spec: CapabilitySpec, *, versioned: bool = False) -> Callable[..., Awaitable[Response]]:
    """The route function of one spec (its default-version or its `/versions/{version}` form): its own options
    dependency, the shared handler (the settings come from the app's state: every dependency costs FastAPI a
    resolution per request)."""
    options_dependency = options_for(spec)
    resolve = version_record if versioned else ready_record

    async def endpoint(
        request: Request,
        record: Annotated[ModelRecord, Depends(resolve)],
        options: Annotated[RequestOptions, Depends(options_dependency)],
    ) -> Response:
        return await serve_version(spec, request, record, options)

    endpoint.spec, endpoint.versioned = spec, versioned  # type: ignore[attr-defined]  # for `CapabilityRoute`
    return endpoint


def router(capabilities: Sequence[CapabilitySpec] = CAPABILITIES) -> APIRouter:
    """`POST /v1/models/{name}/{capability}` for every spec, in order, then the same under
    `/v1/models/{name}/versions/{version}/`."""
    v1 = APIRouter(prefix="/v1/models")  # each route documents its own errors (`route_documentation`)
    for versioned in (False, True):
        for spec in capabilities:
            v1.add_api_route(
                f"/{{name}}/versions/{{version}}/{spec.name}" if versioned else f"/{{name}}/{spec.name}",
                endpoint_for(spec, versioned=versioned),
                methods=["POST"],
                summary=f"{spec.summary} (one served version)" if versioned else spec.summary,
                tags=[spec.tag],
                name=spec.name.replace("-", "_") + ("_version" if versioned else ""),
                route_class_override=CapabilityRoute,
                **route_documentation(spec, FORMATS[spec.output]),
            )
    return v1
