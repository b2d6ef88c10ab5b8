"""attention-map: the head-averaged attention matrix (ONNX op attention_matrix) and an input-gradient
saliency heatmap (torch.export program of the op named in manifest.saliency).

Without torch (or without the torch_export artifact) the saliency part answers 501 with a JSON error
that says so; `?saliency=false` returns the attention matrix alone (JSON only).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from app import codecs
from app.api.deps import ModelDep, SettingsDep, deadline_from_now, require_capability, track
from app.api.io import json_bytes, read_images
from app.errors import FeatureUnavailable, InvalidInput
from app.lifespan import SALIENCY_OP
from app.runtime.torch_export import SALIENCY_METHOD, normalize_saliency
from app.schemas.responses import ERROR_RESPONSES

router = APIRouter(prefix="/v1/models", tags=["attention"], responses=ERROR_RESPONSES)

ATTENTION_METHOD = "head-averaged attention weights via ONNX op attention_matrix"


def _overlay_png(images: np.ndarray, saliency: np.ndarray) -> tuple[bytes, int, int]:
    return codecs.encode_png_grid(codecs.heat_overlay(images, saliency))


@router.post(
    "/{name}/attention-map", summary="Attention matrix + input-gradient saliency (JSON or PNG overlay)"
)
async def attention_map(
    request: Request,
    model: ModelDep,
    settings: SettingsDep,
    format: Annotated[str | None, Query(description="json | png (saliency overlaid on the input)")] = None,
    saliency: Annotated[bool, Query(description="compute the saliency heatmap (needs torch)")] = True,
) -> Response:
    async with track(model, "attention-map"):
        require_capability(model, "attention-map")
        fmt = codecs.negotiate(request.headers.get("accept"), format, ("json", "png"))
        if fmt == "png" and not saliency:
            raise InvalidInput("the PNG overlay shows the saliency map", field="saliency", limit=True)
        if saliency and model.saliency is None:
            raise FeatureUnavailable(
                f"saliency is unavailable for {model.name!r}: {model.saliency_reason}; "
                "install torch (pip install 'aeserve[torch]') or ask with ?saliency=false for the attention "
                "matrix alone",
                field="saliency",
                code="saliency_unavailable",
            )
        manifest = model.manifest
        op = model.op("attention_matrix")
        images = await read_images(request, settings, manifest.preprocessing, op)
        deadline = deadline_from_now(settings)
        jobs = [model.engine.submit("attention_matrix", {op.inputs[0].name: images}, deadline=deadline)]
        if saliency:
            sal_op = model.op(manifest.saliency.op)
            jobs.append(model.engine.submit(SALIENCY_OP, {sal_op.inputs[0].name: images}, deadline=deadline))
        results = await asyncio.gather(*jobs)
        attention = results[0][op.outputs[0].name]
        heat = normalize_saliency(results[1]["grad_abs"], manifest.saliency) if saliency else None
        methods = {"attention": ATTENTION_METHOD}
        if heat is not None:
            methods["saliency"] = (
                f"{SALIENCY_METHOD}: |d/dx sum((f(x) - x)^2)| of op {manifest.saliency.op!r}, "
                f"one global min-max over the request's frames, eps={manifest.saliency.eps:g}"
            )
        headers = {"X-Attention-Method": methods["attention"]}
        if heat is not None:
            headers["X-Saliency-Method"] = SALIENCY_METHOD
        if fmt == "png":
            png, rows, cols = await run_in_threadpool(_overlay_png, images, heat)
            headers.update(
                {"X-Image-Count": str(images.shape[0]), "X-Grid-Rows": str(rows), "X-Grid-Cols": str(cols)}
            )
            return Response(png, media_type=codecs.PNG_MEDIA_TYPE, headers=headers)
        body = {
            "attention": attention,
            "attention_shape": list(attention.shape),
            "saliency": heat,
            "saliency_shape": None if heat is None else list(heat.shape),
            "methods": methods,
        }
        data = await run_in_threadpool(json_bytes, body)
        return Response(data, media_type=codecs.JSON_MEDIA_TYPE, headers=headers)
