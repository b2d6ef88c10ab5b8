"""The capabilities the service offers, as data: the v1 routes (and any later protocol) come from here."""

from __future__ import annotations

from app.api.attention import attention_and_saliency, check_saliency
from app.api.sample import check_sample_request, run_sampler
from app.api.spec import CapabilitySpec

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
        check=check_saliency, run=attention_and_saliency,
    ),
    CapabilitySpec(
        "sample", op=None, input="sample-request", output="images", tag="sample",
        summary="Generate images: prior sampling, fixed render or DDIM",
        check=check_sample_request, run=run_sampler,
    ),
)
