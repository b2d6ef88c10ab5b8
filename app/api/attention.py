"""attention-map: the head-averaged attention matrix (ONNX op attention_matrix) and an input-gradient
saliency heatmap (torch.export program of the op named in manifest.saliency).

Without torch (or without the torch_export artifact) the saliency part answers 501 with a JSON error
that says so; `?saliency=false` returns the attention matrix alone (JSON only).
"""

from __future__ import annotations

import asyncio

from app.api.spec import Job, Outcome, RequestOptions
from app.errors import FeatureUnavailable, InvalidInput
from app.lifespan import SALIENCY_OP
from app.runtime.torch_export import SALIENCY_METHOD, normalize_saliency
from app.settings import Settings
from app.store import ModelRecord

ATTENTION_METHOD = "head-averaged attention weights via ONNX op attention_matrix"


def check_saliency(record: ModelRecord, settings: Settings, options: RequestOptions, fmt: str) -> None:
    """422 for a PNG overlay without saliency; 501 when saliency is asked for but cannot run here."""
    if fmt == "png" and not options.saliency:
        raise InvalidInput("the PNG overlay shows the saliency map", field="saliency", limit=True)
    if options.saliency and record.saliency is None:
        raise FeatureUnavailable(
            f"saliency is unavailable for {record.name!r}: {record.saliency_reason}; "
            "install torch (pip install 'aeserve[torch]') or ask with ?saliency=false for the attention "
            "matrix alone",
            field="saliency",
            code="saliency_unavailable",
        )


async def attention_and_saliency(job: Job) -> Outcome:
    """Submit the attention op and, when asked, the saliency pass on the same images, concurrently."""
    record, spec = job.record, job.record.manifest.saliency
    op = record.op("attention_matrix")
    images = job.inputs[op.inputs[0].name]
    calls = [record.engine.submit("attention_matrix", job.inputs, deadline=job.deadline)]
    if job.options.saliency:
        saliency_input = record.op(spec.op).inputs[0].name
        calls.append(record.engine.submit(SALIENCY_OP, {saliency_input: images}, deadline=job.deadline))
    results = await asyncio.gather(*calls)
    outcome = Outcome(
        results[0][op.outputs[0].name],
        headers={"X-Attention-Method": ATTENTION_METHOD},
        inputs=images,
        methods={"attention": ATTENTION_METHOD},
    )
    if job.options.saliency:
        outcome.saliency = normalize_saliency(results[1]["grad_abs"], spec)
        outcome.headers["X-Saliency-Method"] = SALIENCY_METHOD
        outcome.methods["saliency"] = (
            f"{SALIENCY_METHOD}: |d/dx sum((f(x) - x)^2)| of op {spec.op!r}, "
            f"one global min-max over the request's frames, eps={spec.eps:g}"
        )
    return outcome
