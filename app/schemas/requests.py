"""Request bodies of the routes (image and latent bodies are raw bytes, handled by app.codecs)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SampleRequest(BaseModel):
    """Body of POST /v1/models/{name}/sample; limits that depend on settings or the model's sampler are
    checked per request (422 naming the field and the limit)."""

    model_config = ConfigDict(extra="forbid")

    num_samples: int = Field(1, description="How many images (1..AESERVE_MAX_NUM_SAMPLES)")
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="Same seed -> same images; omitted: random"
    )
    steps: int | None = Field(
        None, description="DDIM steps (1..sampler.max_steps); default sampler.default_steps"
    )
    eta: float | None = Field(None, description="DDIM eta in [0, 1]; default sampler.default_eta")
    condition: list[float] | list[list[float]] | dict[str, float | str] | None = Field(
        None,
        description="M floats (shared by all samples), N x M floats, "
        "or {slot: value} over sampler.condition_keys",
    )
