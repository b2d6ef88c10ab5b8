"""encode · decode · reconstruct: validate, decode bytes, submit to the engine, encode the answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app import codecs
from app.api.deps import ModelDep, SettingsDep, deadline_from_now, require_capability, track
from app.api.io import image_response, latents_response, read_body, read_images, read_latents
from app.errors import InvalidInput
from app.schemas.responses import ERROR_RESPONSES

router = APIRouter(prefix="/v1/models", tags=["codec"], responses=ERROR_RESPONSES)

FormatQuery = Annotated[str | None, Query(description="png | npy | json; overrides the Accept header")]
BitDepthQuery = Annotated[int, Query(description="PNG bit depth: 8 or 16 (16 for grayscale only)")]


@router.post("/{name}/encode", summary="Images -> latents (a stack of T frames gives T x D latents)")
async def encode(
    request: Request, model: ModelDep, settings: SettingsDep, format: FormatQuery = None
) -> Response:
    async with track(model, "encode"):
        require_capability(model, "encode")
        fmt = codecs.negotiate(request.headers.get("accept"), format, ("json", "npy"))
        op = model.op("encode")
        images = await read_images(request, settings, model.manifest.preprocessing, op)
        outputs = await model.engine.submit(
            "encode", {op.inputs[0].name: images}, deadline=deadline_from_now(settings)
        )
        latents = outputs[op.outputs[0].name].reshape(images.shape[0], -1)
        return await latents_response(latents, fmt)


@router.post("/{name}/decode", summary="Latents -> images (a fixed-render decoder takes an empty body)")
async def decode(
    request: Request,
    model: ModelDep,
    settings: SettingsDep,
    format: FormatQuery = None,
    bit_depth: BitDepthQuery = 8,
) -> Response:
    async with track(model, "decode"):
        require_capability(model, "decode")
        fmt = codecs.negotiate(request.headers.get("accept"), format, ("png", "npy", "json"))
        op = model.op("decode")
        deadline = deadline_from_now(settings)
        if not op.inputs:  # fixed render (e.g. ProgressiveDecoder): nothing to send
            body = await read_body(request, settings.max_upload_bytes)
            if body.strip() not in (b"", b"{}"):
                raise InvalidInput(
                    "this decoder renders a fixed image and takes no latents", field="latents", limit=0
                )
            outputs = await model.engine.submit("decode", {}, deadline=deadline)
        else:
            latents = await read_latents(request, settings, int(op.inputs[0].shape[1]))
            outputs = await model.engine.submit("decode", {op.inputs[0].name: latents}, deadline=deadline)
        images = outputs[op.outputs[0].name]
        return await image_response(
            images, model.manifest.preprocessing.output_range, fmt, bit_depth=bit_depth
        )


@router.post("/{name}/reconstruct", summary="Images -> reconstructed images")
async def reconstruct(
    request: Request,
    model: ModelDep,
    settings: SettingsDep,
    format: FormatQuery = None,
    bit_depth: BitDepthQuery = 8,
) -> Response:
    async with track(model, "reconstruct"):
        require_capability(model, "reconstruct")
        fmt = codecs.negotiate(request.headers.get("accept"), format, ("png", "npy", "json"))
        op = model.op("reconstruct")
        images = await read_images(request, settings, model.manifest.preprocessing, op)
        outputs = await model.engine.submit(
            "reconstruct", {op.inputs[0].name: images}, deadline=deadline_from_now(settings)
        )
        return await image_response(
            outputs[op.outputs[0].name], model.manifest.preprocessing.output_range, fmt, bit_depth=bit_depth
        )
