"""sample: prior_gaussian (seeded normal latents -> decode), fixed_render (the decoder's one image), ddim.

`check_sample_request` validates the body against the model's sampler before anything runs;
`run_sampler` is the capability's submit step.
"""

from __future__ import annotations

import secrets

import numpy as np

from app.api.spec import Job, Outcome, RequestOptions
from app.errors import InvalidInput, ServiceError, ShuttingDown
from app.schemas.manifest import SamplerSpec
from app.settings import Settings
from app.store import ModelRecord


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
        try:
            array = np.asarray(condition, dtype=np.float32)
        except ValueError as exc:  # ragged rows
            raise InvalidInput("condition rows differ in length", field="condition",
                               limit=f"{dim} values or ({num_samples}, {dim})", code="wrong_condition_shape") from exc
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


def check_sample_request(record: ModelRecord, settings: Settings, options: RequestOptions, fmt: str) -> None:
    """422 for a request the sampler cannot honour: sample count, ddim-only fields, the condition."""
    body, spec = options.sample, record.manifest.sampler
    check_num_samples(body.num_samples, settings.max_num_samples)
    if spec.kind != "ddim" and (body.steps is not None or body.eta is not None):
        field = "steps" if body.steps is not None else "eta"
        raise InvalidInput(
            f"{field} only applies to ddim samplers (this one is {spec.kind})", field=field, limit=None
        )
    if spec.kind != "ddim" and body.condition is not None:
        parse_condition(body.condition, spec, body.num_samples)  # validates against condition_dim


async def run_sampler(job: Job) -> Outcome:
    """Generate the images with the model's sampler; the seed (drawn when omitted) goes in X-Seed."""
    body, spec = job.options.sample, job.record.manifest.sampler
    seed = secrets.randbelow(2**31) if body.seed is None else body.seed
    headers = {"X-Seed": str(seed), "X-Sampler": spec.kind}
    if spec.kind == "prior_gaussian":
        images = await _prior_gaussian(job, spec, seed)
    elif spec.kind == "fixed_render":
        images = await _fixed_render(job)
    else:
        images, extra = await _ddim(job, spec, seed)
        headers.update(extra)
    return Outcome(images, headers=headers)


async def _prior_gaussian(job: Job, spec: SamplerSpec, seed: int) -> np.ndarray:
    op = job.record.op("decode")
    dim = spec.latent_dim or int(op.inputs[0].shape[1])
    latents = np.random.default_rng(seed).standard_normal((job.options.sample.num_samples, dim), dtype=np.float32)
    outputs = await job.record.engine.submit("decode", {op.inputs[0].name: latents}, deadline=job.deadline)
    return outputs[op.outputs[0].name]


async def _fixed_render(job: Job) -> np.ndarray:
    op = job.record.op("decode")
    outputs = await job.record.engine.submit("decode", {}, deadline=job.deadline)
    image = outputs[op.outputs[0].name][:1]
    return np.repeat(image, job.options.sample.num_samples, axis=0)


async def _ddim(job: Job, spec: SamplerSpec, seed: int) -> tuple[np.ndarray, dict[str, str]]:
    sampler, body = job.record.sampler, job.options.sample
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
        images = await sampler.sample(
            num_samples=body.num_samples,
            steps=steps,
            eta=eta,
            condition=condition,
            seed=seed,
            deadline=job.deadline,  # the event loop's clock, as the engine's
        )
    except ServiceError:
        raise  # the sampler speaks app.errors: 422 / 503 / 504 / 500 as they are
    except ValueError as exc:
        raise InvalidInput(str(exc), field="body") from exc
    return images, {"X-Steps": str(steps), "X-Eta": f"{eta:g}"}
