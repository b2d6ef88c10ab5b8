"""Service settings: environment variables with the `AESERVE_` prefix (e.g. `AESERVE_MAX_BATCH_SIZE=16`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AESERVE_", extra="ignore", frozen=True)

    store: Path = Field(
        Path("model_store"), description="Model store root: <store>/<model>/<version>/manifest.json"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="auto: CUDA when a GPU really works, else CPU; cuda: fail a model that cannot use it",
    )
    prefer: Literal["onnx", "aoti"] = Field(
        "onnx", description="Artifact format to run when an op has several"
    )
    models: str = Field(
        "", description="Comma-separated model names to load (empty: every model in the store)"
    )
    strict: bool = Field(False, description="Fail startup when any model fails verification or loading")
    warmup: bool = Field(True, description="Run every shape bucket x batch size once before reporting ready")
    warmup_max_run_s: float = Field(
        1.0,
        ge=0,
        description="Stop warming larger batches of an op once one warm-up run took longer than this"
        " (its first-call overhead is then negligible); 0: warm every batch size",
    )

    max_batch_size: int = Field(32, ge=1, le=4096, description="Items (frames) per engine batch at most")
    max_delay_ms: float = Field(
        5.0,
        ge=0,
        le=10_000,
        description="Longest a partial batch waits for more items (counted from its first)",
    )
    idle_start: bool = Field(
        True,
        description="Start a batch at once when the engine is idle (the next batch collects while one runs);"
        " False: classic dynamic batching, wait for max_batch_size items or max_delay_ms",
    )
    max_queue_items: int = Field(1024, ge=1, description="Items a (model, op, shape) queue holds before 429")
    request_timeout_s: float = Field(
        30.0, gt=0, description="Per-request deadline; past it the answer is 504"
    )
    intra_op_threads: int = Field(1, ge=1, le=256, description="Threads per engine (ONNX Runtime / torch)")

    max_upload_bytes: int = Field(32 * 1024 * 1024, ge=1, description="Largest request body accepted (413)")
    max_frames: int = Field(256, ge=1, description="Most images (or latents) in one request")
    max_num_samples: int = Field(64, ge=1, description="Most samples one `sample` request may ask for")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Level of the service's own `app.*` loggers (model loading, providers, failures)"
    )

    def model_filter(self) -> set[str] | None:
        """The names `models` selects, or None for all."""
        names = {n.strip() for n in self.models.split(",") if n.strip()}
        return names or None
