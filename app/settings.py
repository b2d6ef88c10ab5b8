"""Service settings: environment variables with the `AESERVE_` prefix (e.g. `AESERVE_MAX_BATCH_SIZE=16`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.versions import PolicyTable


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AESERVE_", extra="ignore", frozen=True)

    store: Path = Field(
        Path("model_store"), description="Model store root: <store>/<model>/<version>/manifest.json"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="auto: CUDA when a GPU really works, else CPU; cuda: fail a model that cannot use it",
    )
    prefer: Literal["manifest", "onnx", "aoti", "torch_export"] = Field(
        "manifest",
        description="Artifact format to run when an op has several; manifest: the one the export measured"
        " fastest (the op's preferred_format), else onnx",
    )
    models: str = Field(
        "", description="Comma-separated model names to load (empty: every model in the store)"
    )
    version_policy: str = Field(
        "latest:1",
        description="Which versions of each model are served: latest:N (the N newest that load), all, or pinned:V;"
        " comma-separated, an entry without = is the default, model=policy overrides it for one model (e.g."
        " latest:1,stem-ae=latest:2,v3-small-201=pinned:1); <store>/<model>/policy.json ({\"policy\": ...})"
        " applies when the setting names no policy for that model. Plain routes serve the newest ready one",
    )
    store_poll_s: float = Field(
        0.0,
        ge=0,
        description="Check the store every this many seconds and reload when versions, manifests or policy.json"
        " files changed (as POST /v1/admin/reload does); 0: no watcher",
    )
    strict: bool = Field(False, description="Fail startup when any model fails verification or loading")
    warmup: bool = Field(
        True,
        description="Run every shape bucket once (batch 1, then larger batches while they are quick) before"
        " reporting ready; models load and warm concurrently",
    )
    warmup_max_run_s: float = Field(
        0.01,
        ge=0,
        description="Stop warming larger batches of an op once one warm-up run took longer than this: a first"
        " call costs a few ms more than the next on CPU, so only quick batch sizes are worth a run (on CUDA"
        " these are the fast ones, warmed at every size); 0: warm every batch size",
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
        description="Start a batch at once when the engine is idle and no more requests for the op are being"
        " read or decoded (those join it, waiting up to max_delay_ms; the next batch collects while one runs);"
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
    engine_instances: int = Field(
        0,
        ge=0,
        le=256,
        description="Batches of one model in flight at once, each on a worker thread calling the same runtime"
        " (instances, as Triton calls them); 0: the cores this process may use on CPU (each batch on one core:"
        " measured 1.05-1.6x the items/s of one batch on every core), 1 on CUDA. The DDIM sampler always runs"
        " one step batch at a time",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="Intra-op threads of each ONNX Runtime session (one per op) and of torch (process-wide);"
        " 0: the cores (CPU affinity and cgroup quota) divided among the engine's instances. Set alone, the"
        " instances become as many as fill the cores",
    )
    lone_batch_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="Intra-op threads of a second ONNX Runtime session per op on the CPU, which runs a batch that"
        " is its model's only work (nothing else running, queued or being read), so a lone request uses every"
        " core instead of one instance's share (stem-ae encode at batch 1: 45 -> 26 ms on 2 cores); 0: all the"
        " cores of the model's instances; no second session when that is no more than `intra_op_threads`"
        " (1: off)",
    )
    lone_batch_min_ms: float = Field(
        2.0,
        ge=0,
        description="An op keeps its lone-batch session only when one item on an instance's session takes at"
        " least this long at warm-up (lighter ops lose to the extra threads' wake-ups); a lighter op runs a lone"
        " batch that fits in this time on the event loop instead, with no worker-thread round trip; 0: always"
        " keep the session, never run on the loop",
    )
    malloc_arenas: int = Field(
        2,
        ge=0,
        le=1024,
        description="glibc malloc arenas the process's threads may use (M_ARENA_MAX), set when the app is"
        " created: fewer arenas keep fewer per-thread copies of freed run buffers (peak RSS over the benchmark"
        " 1128-1156 MB at 2 against 1282-1299 MB at glibc's default); 0: glibc's default; MALLOC_ARENA_MAX in"
        " the environment wins",
    )
    cpu_mem_arena: bool = Field(
        False,
        description="ONNX Runtime's CPU memory arena: it keeps every session's largest run allocated for good"
        " (~1 GB for a STEM decode at batch 4); off, each run's buffers go back to the allocator (measured: the"
        " same speed, but for ~8% more CPU on a batch-4 STEM encode)",
    )

    max_upload_bytes: int = Field(32 * 1024 * 1024, ge=1, description="Largest request body accepted (413)")
    max_frames: int = Field(256, ge=1, description="Most images (or latents) in one request")
    max_num_samples: int = Field(64, ge=1, description="Most samples one `sample` request may ask for")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Level of the service's own `app.*` loggers (model loading, providers, failures)"
    )
    access_log: bool = Field(
        False,
        description="uvicorn's access log, a line per request (off: the app silences it however uvicorn was"
        " started; formatting and writing it took ~2% of the service's CPU on light requests; /metrics counts"
        " every request)",
    )
    inline_codec_bytes: int = Field(
        65_536,
        ge=0,
        description="Uploads whose input (upload + decoded model input; latents: 16 x their body) and answers"
        " whose encoding (PNG: 24 per value, NPY: 1) come to at most this many bytes are decoded and encoded on"
        " the event loop, where they cost less than a trip through a thread pool (~60 us of CPU, ~0.1 ms of"
        " latency); larger ones go to the threads (max_concurrent_decodes); 0: always threads",
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
    body_read_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest wait for the next chunk of a request body; a client that stalls longer gets 408"
        " and its connection is closed (so it holds no worker and cannot delay shutdown by more than this)",
    )
    load_in_background: bool = Field(
        True,
        description="Open the port at once and verify, load and warm the models in a background task (/healthz"
        " 200 at once, /readyz 503 with per-model states until every model is warm); false: load them before"
        " the port opens. strict always loads them first",
    )
    shutdown_grace_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM /readyz and new requests answer 503 at once; requests in flight get this long to"
        " finish, then the process exits 0",
    )
    api_token: str | None = Field(
        None,
        min_length=16,
        repr=False,
        description="Bearer token every route but /healthz and /readyz requires (Authorization: Bearer <token>;"
        " 401 otherwise); also makes its holders admins. Unset: no auth, and admin routes are refused",
    )
    auth_metrics: bool = Field(False, description="With api_token: /metrics requires the token too")
    auth_docs: bool = Field(
        False, description="With api_token: /docs, /redoc and /openapi.json require the token too"
    )
    cors_origins: str = Field(
        "", description="Comma-separated origins allowed to call the API from a browser (CORS); empty: CORS off"
    )
    max_request_memory_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024 * 1024,
        description="Working memory one request may take to decode its body, and again to encode its answer;"
        " estimated from the image headers (declared frames x pixels x bands x bytes per value) before anything"
        " is decoded: the uploaded bytes + the float32 model input + the largest part's decoder buffers and"
        " per-frame conversion/resize. Past it: 413 (406 naming the formats that fit, for an answer). 256 MiB"
        " admits max_frames=256 frames of 201x201, ~220 frames of 152x1280 (8-bit TIFF) or one ~2600x2600 RGB"
        " PNG, and refuses a 4096x4096 PNG of 16 KB (~420 MiB to decode). Worst admitted request: 256 MiB"
        " decoding + 256 MiB answering (input and output arrays included) + the model's batch, well under 1 GB",
    )
    max_concurrent_decodes: int = Field(
        2,
        ge=1,
        description="Requests decoding (or parsing JSON) at once; others wait their turn. 2 x"
        " max_request_memory_bytes = 512 MiB of decoding at most, however many requests arrive together",
    )
    max_dynamic_side: int = Field(
        4096,
        ge=1,
        description="Largest H and W a dynamic-size model (V3 encode) accepts when its manifest sets no max_hw"
        " (422 past it)",
    )
    max_dynamic_pixels: int = Field(
        262_144,
        ge=1,
        description="Largest H x W a dynamic-size model accepts when its manifest sets no max_pixels (422 past"
        " it). Measured for V3-small encode (ONNX Runtime, CPU): ~52 bytes of activations per pixel plus ~27"
        " per attention-token pair (tokens = H x W / 1024): 13 MiB per 512x512 frame, 431 MiB for a batch of"
        " 32; 1024x1024: 58 MiB per frame (1.8 GiB per batch), 2048x2048: 475 MiB, 4096x4096: ~8 GiB."
        " 512 x 512 keeps a full batch of max_batch_size=32 under 0.5 GB and admits the trained 201x201 and"
        " 152x1280",
    )
    max_inflight_memory_bytes: int = Field(
        512 * 1024 * 1024,
        ge=1024 * 1024,
        description="Bytes all requests in flight may hold together, inputs and answers: a request holds its body (its"
        " Content-Length before reading), then the held part of its max_request_memory_bytes estimate (uploaded"
        " bytes + declared data + float32 model input) from before decoding until its answer is sent, while its"
        " arrays wait in the batcher's queues. No room now: 429 with Retry-After at once (no waiting, like"
        " max_inflight_requests); more than the whole pool: 413. Without it 64 admitted requests could hold"
        " 64 x 256 MiB = 16 GiB. Worst admitted set: 512 MiB held + max_concurrent_decodes x"
        " max_request_memory_bytes (2 x 256 MiB) decoding on top = 1 GiB, + a batch (< 0.5 GB, see"
        " max_dynamic_pixels) + the process: inside a 2 GB container. 512 MiB holds 2 maximal requests at once,"
        " or ~14 of 32 frames of 152x1280 (~36 MiB each, ~450 frames queued: the cores stay busy); keep it >="
        " max_request_memory_bytes",
    )

    @field_validator("version_policy")
    @classmethod
    def _policy_parses(cls, value: str) -> str:
        PolicyTable.parse(value)  # ValueError names the bad entry and the grammar
        return value

    def model_filter(self) -> set[str] | None:
        """The names `models` selects, or None for all."""
        names = {n.strip() for n in self.models.split(",") if n.strip()}
        return names or None
