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

    max_batch_size: int = Field(
        32, ge=1, le=4096, description="Items (frames) per engine batch at most (an op's own limit may be lower)"
    )
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
    max_queue_items: int = Field(
        1024,
        ge=1,
        description="Frames a (model, op, input shape) queue holds; a request that would overfill a non-empty"
        " queue is a 429",
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="Per-request deadline; past it the answer is 504"
    )
    intra_op_threads: int = Field(
        1, ge=1, le=256, description="Intra-op threads of each ONNX Runtime session (one per op) and of torch"
        " (process-wide)"
    )

    max_upload_bytes: int = Field(32 * 1024 * 1024, ge=1, description="Largest request body accepted (413)")
    max_frames: int = Field(256, ge=1, description="Most images (or latents) in one request")
    max_num_samples: int = Field(64, ge=1, description="Most samples one `sample` request may ask for")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Level of the service's own `app.*` loggers (model loading, providers, failures)"
    )
    max_inflight_requests: int = Field(
        64,
        ge=1,
        description="Model requests admitted at once (reading, decoding, queued or running); more get 429 with"
        " Retry-After before their body is read. 64 = two full batches of max_batch_size (one running, one"
        " collecting): enough to keep 2 cores busy; more would only wait in queues, adding latency and memory",
    )
    max_queued_items_total: int = Field(
        2048,
        ge=1,
        description="Items (frames) queued in all engines together before 429 (max_queue_items still bounds"
        " each queue); 2 x max_queue_items, so one busy input shape cannot take more than half",
    )
    max_queues_per_model: int = Field(
        64, ge=1, description="Distinct (op, input shape) queues of one model before 429; empty ones are pruned"
    )
    max_sampler_rows: int = Field(
        128,
        ge=1,
        description="Diffusion sample rows waiting or running per model before 429 (2 x max_num_samples);"
        " an idle sampler takes any request",
    )

    def model_filter(self) -> set[str] | None:
        """The names `models` selects, or None for all."""
        names = {n.strip() for n in self.models.split(",") if n.strip()}
        return names or None
