"""A capability as data: what its request decodes to, which op it submits, what its answer encodes.

Every capability runs the same steps (`app.api.v1.serve`): decode the request into the op's inputs,
validate, submit to the model's engine, encode the answer. A `CapabilitySpec` names the kinds of
input and output (the protocol decodes and encodes them) and points at its special parts: a `check`
before the body is read and a `run` for anything beyond one engine call of `op`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from app.schemas.manifest import Capability, OpName, OpSpec
from app.schemas.requests import SampleRequest
from app.settings import Settings
from app.store import ModelRecord

Arrays = dict[str, np.ndarray]
# images: an image upload for `op`'s first input; latents: JSON/NPY latents for it ("none" when `op`
# takes no input: a fixed render answers an empty body); sample-request: a JSON `SampleRequest`
InputKind = Literal["images", "latents", "none", "sample-request"]
OutputKind = Literal["latents", "images", "attention"]


@dataclass(frozen=True)
class RequestOptions:
    """What the client asked for beyond its input (v1: query parameters and the sample body)."""

    format: str | None = None  # response format; None: from the Accept header
    bit_depth: int = 8  # PNG bit depth of image answers
    saliency: bool = True  # attention-map: also compute the saliency heatmap
    sample: SampleRequest = field(default_factory=SampleRequest)


@dataclass(frozen=True)
class Job:
    """One decoded, validated request, ready to submit."""

    record: ModelRecord
    op: OpName | None
    inputs: Arrays  # keyed by the op's input names; empty for inputless ops and samplers
    options: RequestOptions
    deadline: float  # on the event loop's clock, as app.batcher and app.diffusion expect


@dataclass
class Outcome:
    """The submit step's result: the main array, headers for the answer, and what an overlay needs."""

    array: np.ndarray  # latents (N, ...), images (N, C, H, W) or attention (N, T, T)
    headers: dict[str, str] = field(default_factory=dict)
    saliency: np.ndarray | None = None  # attention-map: normalised |d/dx| of the input (N, C, H, W)
    inputs: np.ndarray | None = None  # attention-map: the model input the overlay is drawn on
    methods: dict[str, str] = field(default_factory=dict)  # attention-map: how each array was made


Check = Callable[[ModelRecord, Settings, RequestOptions, str], None]
Run = Callable[[Job], Awaitable[Outcome]]


async def submit_op(job: Job) -> Outcome:
    """The plain submit step: one engine call of `job.op`; the answer is its first output."""
    assert job.op is not None
    op = job.record.op(job.op)
    outputs = await job.record.engine.submit(job.op, job.inputs, deadline=job.deadline)
    return Outcome(outputs[op.outputs[0].name])


@dataclass(frozen=True)
class ResponseHeader:
    """Documentation of a header a capability's answers carry (behaviour lives in its writer or `run`)."""

    name: str
    description: str
    media_types: tuple[str, ...] = ()  # sent with every answer of these types; (): with every answer
    always: bool = True  # False: only in the case its description names (e.g. DDIM samplers only)


@dataclass(frozen=True)
class CapabilitySpec:
    """One capability of the service; the protocols register their routes from these."""

    name: Capability  # route segment, manifest capability and the `op` label of the metrics
    op: OpName | None  # the op the input is decoded for and submitted to; None: the sampler decides
    input: InputKind
    output: OutputKind
    summary: str  # OpenAPI summary
    tag: str  # OpenAPI tag
    run: Run = submit_op
    check: Check | None = None  # validation that needs no body (runs after content negotiation)
    # OpenAPI only (app.api.documentation): headers `run` adds to its answers, error statuses beyond the
    # ones every route of its input kind can answer (e.g. 501 from `check`)
    headers: tuple[ResponseHeader, ...] = ()
    errors: tuple[int, ...] = ()

    def input_kind(self, op: OpSpec | None) -> InputKind:
        """The input the model's `op` really takes: "none" for an op without inputs (a fixed render)."""
        return "none" if op is not None and not op.inputs else self.input
