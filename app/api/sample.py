"""sample: prior_gaussian (seeded normal latents -> decode), fixed_render (the decoder's one image), ddim."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request, Response

from app import codecs
from app.api.deps import ModelDep, SettingsDep, deadline_from_now, require_capability, track
from app.api.io import image_response
from app.errors import InvalidInput, ServiceError, ShuttingDown
from app.schemas.manifest import SamplerSpec
from app.schemas.requests import SampleRequest
from app.schemas.responses import ERROR_RESPONSES
from app.store import ModelRecord

router = APIRouter(prefix="/v1/models", tags=["sample"], responses=ERROR_RESPONSES)


def parse_condition(
    condition: list[float] | list[list[float]] | dict[str, float | str] | None, spec: SamplerSpec, num_samples: int
) -> np.ndarray:
    """The request's condition as float32 (num_samples, M), M = sampler.condition_dim."""
    dim = spec.condition_dim
    if condition is None:
        if dim:
            raise InvalidInput(
                f"this sampler needs a condition of {dim} values",
                field="condition",
                limit=spec.condition_keys or dim,
            )
        return np.zeros((num_samples, 0), dtype=np.float32)
    if isinstance(condition, dict):
        keys = spec.condition_keys
        unknown = sorted(set(condition) - set(keys))
        if unknown:
            raise InvalidInput(
                f"unknown condition keys {unknown}",
                field="condition",
                limit=keys,
                code="unknown_condition_keys",
            )
        missing = [k for k in keys if k not in condition]
        if missing:
            raise InvalidInput(f"missing condition keys {missing}", field="condition", limit=keys)
        vector = np.asarray([condition_value(k, condition[k], spec) for k in keys], dtype=np.float32)
        array = np.broadcast_to(vector, (num_samples, len(keys)))
    else:
        array = np.asarray(condition, dtype=np.float32)
        if array.ndim == 1:
            array = np.broadcast_to(array, (num_samples, array.shape[0]))
    if array.shape != (num_samples, dim):
        raise InvalidInput(
            f"condition has shape {list(array.shape)}",
            field="condition",
            limit=f"{dim} values or ({num_samples}, {dim})",
            code="wrong_condition_shape",
        )
    if not np.isfinite(array).all():
        raise InvalidInput(
            "condition contains NaN or Inf", field="condition", limit="finite values", code="non_finite"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def condition_value(key: str, value: object, spec: SamplerSpec) -> float:
    """One slot of the condition: a number as it is, or a name the manifest's vocabulary knows."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidInput(f"condition {key!r} must be a number or a name", field=f"condition.{key}",
                           limit=_allowed(key, spec))
    if not isinstance(value, str):
        return float(value)
    vocabulary = spec.condition_values.get(key)
    if isinstance(vocabulary, list) and value in vocabulary:
        return float(vocabulary.index(value))
    if isinstance(vocabulary, dict) and value in vocabulary:
        return float(vocabulary[value])
    raise InvalidInput(f"condition {key!r} = {value!r} is not allowed", field=f"condition.{key}",
                       limit=_allowed(key, spec), code="unknown_condition_value")


def _allowed(key: str, spec: SamplerSpec) -> object:
    vocabulary = spec.condition_values.get(key)
    names = list(vocabulary) if vocabulary else []
    return [*names, "a number"] if names else "a number"


def check_num_samples(num_samples: int, limit: int) -> None:
    if not 1 <= num_samples <= limit:
        raise InvalidInput(
            f"num_samples={num_samples}", field="num_samples", limit=limit, code="num_samples_out_of_range"
        )


async def _prior_gaussian(
    model: ModelRecord, spec: SamplerSpec, body: SampleRequest, seed: int, deadline: float
) -> np.ndarray:
    op = model.op("decode")
    dim = spec.latent_dim or int(op.inputs[0].shape[1])
    latents = np.random.default_rng(seed).standard_normal((body.num_samples, dim), dtype=np.float32)
    outputs = await model.engine.submit("decode", {op.inputs[0].name: latents}, deadline=deadline)
    return outputs[op.outputs[0].name]


async def _fixed_render(model: ModelRecord, body: SampleRequest, deadline: float) -> np.ndarray:
    op = model.op("decode")
    outputs = await model.engine.submit("decode", {}, deadline=deadline)
    image = outputs[op.outputs[0].name][:1]
    return np.repeat(image, body.num_samples, axis=0)


async def _ddim(
    model: ModelRecord, spec: SamplerSpec, body: SampleRequest, seed: int, deadline: float
) -> tuple[np.ndarray, dict[str, str]]:
    sampler = model.sampler
    if sampler is None:
        raise ShuttingDown("the diffusion sampler is not running")
    max_steps = int(getattr(sampler, "max_steps", spec.max_steps))
    steps = spec.default_steps if body.steps is None else body.steps
    if not 1 <= steps <= max_steps:
        raise InvalidInput(f"steps={steps}", field="steps", limit=max_steps, code="steps_out_of_range")
    eta = spec.default_eta if body.eta is None else body.eta
    if not 0.0 <= eta <= 1.0:
        raise InvalidInput(f"eta={eta}", field="eta", limit="[0, 1]", code="eta_out_of_range")
    condition = parse_condition(body.condition, spec, body.num_samples)
    try:
        images = await sampler.sample(  # the sampler's deadline is on time.monotonic()
            num_samples=body.num_samples,
            steps=steps,
            eta=eta,
            condition=condition,
            seed=seed,
            deadline=time.monotonic() + (deadline - asyncio.get_running_loop().time()),
        )
    except ServiceError:
        raise  # the sampler speaks app.errors: 422 / 503 / 504 / 500 as they are
    except ValueError as exc:
        raise InvalidInput(str(exc), field="body") from exc
    return images, {"X-Steps": str(steps), "X-Eta": f"{eta:g}"}


@router.post("/{name}/sample", summary="Generate images: prior sampling, fixed render or DDIM")
async def sample(
    request: Request,
    model: ModelDep,
    settings: SettingsDep,
    body: SampleRequest | None = None,
    format: Annotated[str | None, Query(description="png | npy | json; overrides Accept")] = None,
    bit_depth: Annotated[int, Query(description="PNG bit depth: 8 or 16")] = 8,
) -> Response:
    async with track(model, "sample"):
        require_capability(model, "sample")
        fmt = codecs.negotiate(request.headers.get("accept"), format, ("png", "npy", "json"))
        body = body or SampleRequest()
        spec = model.manifest.sampler
        check_num_samples(body.num_samples, settings.max_num_samples)
        if spec.kind != "ddim" and (body.steps is not None or body.eta is not None):
            field = "steps" if body.steps is not None else "eta"
            raise InvalidInput(
                f"{field} only applies to ddim samplers (this one is {spec.kind})", field=field, limit=None
            )
        if spec.kind != "ddim" and body.condition is not None:
            parse_condition(body.condition, spec, body.num_samples)  # validates against condition_dim
        seed = secrets.randbelow(2**31) if body.seed is None else body.seed
        deadline = deadline_from_now(settings)
        headers = {"X-Seed": str(seed), "X-Sampler": spec.kind}
        if spec.kind == "prior_gaussian":
            images = await _prior_gaussian(model, spec, body, seed, deadline)
        elif spec.kind == "fixed_render":
            images = await _fixed_render(model, body, deadline)
        else:
            images, extra = await _ddim(model, spec, body, seed, deadline)
            headers.update(extra)
        return await image_response(
            images, model.manifest.preprocessing.output_range, fmt, bit_depth=bit_depth, headers=headers
        )
