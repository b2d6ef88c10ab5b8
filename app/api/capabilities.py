"""The capabilities the service offers, as data: the v1 routes (and any later protocol) come from here.

`headers` and `errors` only document the answers (app.api.documentation); behaviour is `run` and `check`.
"""

from __future__ import annotations

from app.api.attention import attention_and_saliency, check_saliency
from app.api.sample import check_sample_request, run_sampler
from app.api.spec import CapabilitySpec, ResponseHeader

SAMPLE_HEADERS = (
    ResponseHeader("X-Seed", "the seed the images were drawn with (drawn at random when the body gave none)"),
    ResponseHeader("X-Sampler", "the model's sampler: prior_gaussian | fixed_render | ddim"),
    ResponseHeader("X-Steps", "DDIM steps run (ddim samplers only)", always=False),
    ResponseHeader("X-Eta", "DDIM eta used (ddim samplers only)", always=False),
)
ATTENTION_HEADERS = (
    ResponseHeader("X-Attention-Method", "how the attention matrix was made"),
    ResponseHeader("X-Saliency-Method", "how the saliency map was made (unless ?saliency=false)", always=False),
)

CAPABILITIES: tuple[CapabilitySpec, ...] = (
    CapabilitySpec(
        "encode", op="encode", input="images", output="latents", tag="codec",
        summary="Images -> latents (a stack of T frames gives T x D latents)",
    ),
    CapabilitySpec(
        "decode", op="decode", input="latents", output="images", tag="codec",
        summary="Latents -> images (a fixed-render decoder takes an empty body)",
    ),
    CapabilitySpec(
        "reconstruct", op="reconstruct", input="images", output="images", tag="codec",
        summary="Images -> reconstructed images",
    ),
    CapabilitySpec(
        "attention-map", op="attention_matrix", input="images", output="attention", tag="attention",
        summary="Attention matrix + input-gradient saliency (JSON or PNG overlay)",
        check=check_saliency, run=attention_and_saliency, headers=ATTENTION_HEADERS, errors=(501,),
    ),
    CapabilitySpec(
        "sample", op=None, input="sample-request", output="images", tag="sample",
        summary="Generate images: prior sampling, fixed render or DDIM",
        check=check_sample_request, run=run_sampler, headers=SAMPLE_HEADERS,
    ),
)
