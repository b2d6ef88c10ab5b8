"""The lifespan owns every resource: load store -> runtimes -> warm up -> engines/samplers -> ready -> drain.

With `load_in_background` (and not `strict`) the lifespan returns at once, so the port answers while a
background task loads the models (/readyz: 503 with each model's state until all are done). Models load
and warm concurrently, as many at once as the machine has cores, largest first.
An engine or sampler whose scheduler stays down (`app.scheduling` supervision) makes its model
unavailable, with a log line and a 503 from /readyz (`report_failure`); `app.shutdown` drains on
SIGTERM. Everything lives on `app.state` (`settings`, `models`, `ready` = loading done, `drain`) and is
reached through the `Annotated` dependencies of `app.api.deps`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI

from app.admission import Admission, ItemBudget
from app.batcher import Engine
from app.diffusion import ContinuousDdimSampler
from app.errors import FeatureUnavailable
from app.metrics import MODEL_LOAD_SECONDS, MODEL_READY
from app.runtime.base import RuntimeLoadError
from app.runtime.threads import machine_cores
from app.scheduling import WorkerLoop
from app.schemas.manifest import OpSpec, TensorSpec
from app.settings import Settings
from app.shutdown import Drain, install_sigterm_hook
from app.store import ModelRecord, ModelRegistry, load_model
from app.versions import PolicyTable, scan_versions

log = logging.getLogger(__name__)

SALIENCY_OP = "saliency"  # engine queue of the input-gradient (torch.export) computation


class StartupError(RuntimeError):
    """strict=True and a model failed verification or loading."""


def warmup_batch_sizes(max_batch: int) -> list[int]:
    """1 and every power of two up to `max_batch`, plus `max_batch` itself."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    sizes.append(max_batch)
    return sizes


def shape_buckets(record: ModelRecord, op: OpSpec) -> list[tuple[int, int] | None]:
    """The (H, W) sizes an op with an image input is warmed at (None: it has no image input).

    Its fixed size, else the preprocessing `input_size` plus the op's `shape_buckets`, else `min_hw`.
    """
    assert record.manifest is not None
    images = [s for s in op.inputs if len(s.shape) == 4]
    if not images:
        return [None]
    _, _, height, width = images[0].shape
    if height > 0 and width > 0:
        return [(height, width)]
    buckets: list[tuple[int, int] | None] = []
    if record.manifest.preprocessing.input_size is not None:
        buckets.append(tuple(record.manifest.preprocessing.input_size))
    buckets += [tuple(b) for b in op.shape_buckets if len(b) == 2]
    return list(dict.fromkeys(buckets)) or [tuple(record.manifest.preprocessing.min_hw)]


def dummy_inputs(specs: list[TensorSpec], batch: int, hw: tuple[int, int] | None) -> dict[str, np.ndarray]:
    """Warm-up inputs of `batch` items: floats filled with 0.5, integers with 0.

    Dynamic H and W of (C, H, W) inputs come from `hw`; any other dynamic axis is 1.
    """
    arrays = {}
    for spec in specs:
        shape = list(spec.shape[1:])
        if len(shape) == 3 and hw is not None:
            shape[1] = hw[0] if shape[1] <= 0 else shape[1]
            shape[2] = hw[1] if shape[2] <= 0 else shape[2]
        shape = [batch, *(s if s >= 0 else 1 for s in shape)]
        fill = 0.5 if spec.dtype.startswith("float") else 0
        arrays[spec.name] = np.full(shape, fill, dtype=spec.dtype)
    return arrays


def warm_up(record: ModelRecord, settings: Settings) -> int:
    """Run every op at every shape bucket x batch size once (its lone-batch session at batch 1), and the
    saliency gradient once per bucket when its program is loaded (blocking); returns the number of runs.

    Batch sizes grow until one run takes longer than `warmup_max_run_s`: past that, the first-call
    overhead a warm-up removes is small beside the run itself (on CPU a first call costs a few ms more
    than the next at any batch size; a 4D-STEM reconstruction costs ~44 GMAC per image)."""
    assert record.manifest is not None
    runs = 0
    for op_name, runtime in record.runtimes.items():
        op = record.op(op_name)
        if not op.inputs:
            runtime.run({})
            runs += 1
            continue
        max_batch = min(settings.max_batch_size, op.max_batch_size)
        buckets = shape_buckets(record, op)
        runs += time_one_item(record, op_name, dummy_inputs(op.inputs, 1, buckets[0]), settings)
        for hw in buckets:
            if getattr(runtime, "run_alone", None) is not None:  # a lone request is mostly one item
                runtime.run_alone(dummy_inputs(op.inputs, 1, hw))
                runs += 1
            for batch in warmup_batch_sizes(max_batch):
                started = time.perf_counter()
                runtime.run(dummy_inputs(op.inputs, batch, hw))
                runs += 1
                if settings.warmup_max_run_s and time.perf_counter() - started > settings.warmup_max_run_s:
                    break
    if saliency_loaded(record) and record.manifest.saliency is not None:
        op = record.op(record.manifest.saliency.op)
        for hw in shape_buckets(record, op):
            x = dummy_inputs(op.inputs[:1], 1, hw)[op.inputs[0].name]
            record.saliency.input_gradient(x, record.manifest.saliency)
            runs += 1
    return runs


def time_one_item(record: ModelRecord, op_name: str, inputs: dict[str, np.ndarray], settings: Settings) -> int:
    """Time one item on the op's runtime (its second run: the first carries one-off costs) into
    `record.item_ms`; an op lighter than `lone_batch_min_ms` loses its lone-batch session (more threads only
    add their wake-ups: the 28x28 VAE decode at one client, p50 3.5 ms with a 2-thread session against
    3.1 ms without, on the 2-core host) and runs its small lone batches on the event loop (`build_engine`).
    Returns the runs made."""
    if settings.lone_batch_min_ms <= 0:
        return 0
    runtime = record.runtimes[op_name]
    runtime.run(inputs)
    started = time.perf_counter()
    runtime.run(inputs)
    record.item_ms[op_name] = item_ms = (time.perf_counter() - started) * 1000
    if item_ms < settings.lone_batch_min_ms and hasattr(runtime, "drop_lone_session"):
        runtime.drop_lone_session()
    return 2


def inline_items(record: ModelRecord, op_name: str, settings: Settings) -> int:
    """The largest lone batch of the op that runs on the event loop: as many items as fit in
    `lone_batch_min_ms` at the op's warm-up time per item (0: none; a worker thread's round trip costs
    ~0.8 ms here, more than such a batch)."""
    item_ms = record.item_ms.get(op_name)
    if not item_ms or item_ms >= settings.lone_batch_min_ms:
        return 0
    return int(settings.lone_batch_min_ms // item_ms)


def saliency_loaded(record: ModelRecord) -> bool:
    """The model has a saliency program and it is loaded (a program loaded at first use is not, until then)."""
    return record.saliency is not None and getattr(record.saliency, "loaded", True)


def build_engine(record: ModelRecord, settings: Settings, budget: ItemBudget | None = None) -> Engine:
    """The batching engine of a loaded model: one queue family per op, plus the saliency op if loaded.

    `budget` is the items budget shared by every engine of the service."""
    assert record.manifest is not None and record.version is not None
    engine = Engine(
        record.name,
        record.version,
        max_batch_size=settings.max_batch_size,
        max_delay_s=settings.max_delay_ms / 1000.0,
        max_queue_items=settings.max_queue_items,
        idle_start=settings.idle_start,
        budget=budget,
        max_queues=settings.max_queues_per_model,
        instances=record.plan.instances,
    )
    for op_name, runtime in record.runtimes.items():
        op = record.op(op_name)
        engine.register(op_name, runtime.run, max_batch_size=op.max_batch_size, has_inputs=bool(op.inputs),
                        run_alone=getattr(runtime, "run_alone", None),  # ONNX on the CPU (`EnginePlan`)
                        inline_items=inline_items(record, op_name, settings))
    if record.saliency is not None and record.manifest.saliency is not None:
        spec = record.manifest.saliency
        op = record.op(spec.op)
        input_name = op.inputs[0].name
        saliency = record.saliency

        def gradient(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"grad_abs": saliency.input_gradient(inputs[input_name], spec)}

        load = None if saliency_loaded(record) else first_use_loader(record)
        engine.register(SALIENCY_OP, gradient, max_batch_size=op.max_batch_size, load=load)
    return engine


def first_use_loader(record: ModelRecord) -> Callable[[], None]:
    """Load the model's saliency program (the engine runs it once, off its worker thread, for the first
    saliency request); when it cannot load, that request and every later one get 501, as without torch."""
    saliency = record.saliency

    def load() -> None:
        try:
            saliency.load()  # type: ignore[union-attr]
        except RuntimeLoadError as exc:
            record.saliency, record.saliency_reason = None, str(exc)
            raise FeatureUnavailable(
                f"saliency is unavailable for {record.name!r}: {exc}; ask with ?saliency=false for the"
                " attention matrix alone", field="saliency", code="saliency_unavailable",
            ) from exc

    return load


def build_sampler(record: ModelRecord, settings: Settings) -> ContinuousDdimSampler:
    """The ddim sampler of a diffusion model, driving its `denoise` op."""
    assert record.manifest is not None and record.manifest.sampler is not None
    runtime = record.runtimes.get("denoise")
    if runtime is None:
        raise RuntimeError("sampler kind 'ddim' needs op 'denoise'")
    names = [s.name for s in record.op("denoise").inputs]
    output = record.op("denoise").outputs[0].name

    def run_denoise(x_t: np.ndarray, t: np.ndarray, condition: np.ndarray) -> np.ndarray:
        feeds = dict(zip(names, (x_t, t.astype(np.int64), condition), strict=False))
        return runtime.run(feeds)[output]

    max_batch = min(settings.max_batch_size, record.op("denoise").max_batch_size)
    return ContinuousDdimSampler(
        record.manifest.sampler,
        run_denoise,
        max_batch_size=max_batch,
        model=record.name,
        version=record.version or "",
        max_rows=settings.max_sampler_rows,
    )


async def start_model(record: ModelRecord, settings: Settings, budget: ItemBudget | None = None) -> None:
    """Warm up and start one loaded model; failures make it unavailable (or raise under strict)."""
    started = time.perf_counter()
    try:
        if settings.warmup:
            runs = await asyncio.to_thread(warm_up, record, settings)
            log.info("%s/%s warmed up with %d runs", record.name, record.version, runs)
        record.engine = build_engine(record, settings, budget)
        record.engine.on_failure = report_failure(record, "engine")
        await record.engine.start()
        sampler = record.manifest.sampler if record.manifest else None
        if sampler is not None and sampler.kind == "ddim":
            record.sampler = build_sampler(record, settings)
            record.sampler.on_failure = report_failure(record, "sampler")
            await record.sampler.start()
    except Exception as exc:
        log.exception("starting %s/%s failed", record.name, record.version)
        await stop_model(record)
        record.fail(f"start-up failed: {type(exc).__name__}: {exc}")
        return
    record.load_seconds += time.perf_counter() - started
    record.state = "ready"
    MODEL_LOAD_SECONDS.labels(record.name, record.label_version).set(record.load_seconds)
    MODEL_READY.labels(record.name, record.label_version).set(1)


async def stop_model(record: ModelRecord) -> None:
    """Stop the sampler, then drain and stop the engine; the model is no longer ready."""
    if record.sampler is not None:
        try:
            await record.sampler.stop()
        except Exception:
            log.exception("stopping the sampler of %s failed", record.name)
        record.sampler = None
    if record.engine is not None:
        await record.engine.stop(drain=True)
        record.engine = None
    if record.version is not None:
        MODEL_READY.labels(record.name, record.label_version).set(0)


def report_failure(record: ModelRecord, kind: str) -> Callable[[WorkerLoop[Any]], None]:
    """The `on_failure` of a model's engine or sampler: once its scheduler stays down, the model is
    unavailable (an ERROR log line) with a `fault`, which keeps /readyz at 503."""

    def on_failure(worker: WorkerLoop[Any]) -> None:
        record.fault = f"its {kind} stopped: {worker.failure}"
        record.fail(record.fault)
        MODEL_READY.labels(record.name, record.label_version).set(0)

    return on_failure


def register_models(registry: ModelRegistry, settings: Settings) -> None:
    """The versions each selected model's policy picks (`app.versions`), in state `loading`; a model whose
    policy cannot pick (a bad policy.json, a pinned version not in the store) is registered unavailable."""
    table = PolicyTable.parse(settings.version_policy)
    for model in scan_versions(settings.store, table, settings.model_filter()).values():
        registry.policies[model.name] = str(model.policy)
        chosen = [] if model.error else model.policy.select([s.version for s in model.stored])
        if not chosen:
            registry.add(ModelRecord(model.name, None, state="unavailable", reason=model.why_none()))
            continue
        for stored in model.stored:
            if stored.version in chosen:
                registry.add(ModelRecord(model.name, stored.version, stored.path, signature=stored.signature))
                MODEL_READY.labels(model.name, stored.version).set(0)


def stored_bytes(record: ModelRecord) -> int:
    """Bytes of the files of a model's version folder: how long it takes to load, roughly."""
    if record.path is None or not record.path.is_dir():
        return 0
    return sum(f.stat().st_size for f in record.path.iterdir() if f.is_file())


async def load_one(record: ModelRecord, settings: Settings, budget: ItemBudget, slots: asyncio.Semaphore) -> None:
    """Verify, load, warm up and start one model within a loading slot; `StartupError` under strict."""
    if record.state != "unavailable":  # else its policy chose no version (see `register_models`)
        async with slots:
            started = time.perf_counter()
            await asyncio.to_thread(load_model, record, settings)
            record.load_seconds = time.perf_counter() - started
            if record.state != "unavailable":
                await start_model(record, settings, budget)
    if record.state == "unavailable" and settings.strict:
        raise StartupError(f"model {record.name}/{record.version} failed: {record.reason}")


async def load_all(app: FastAPI, registry: ModelRegistry, settings: Settings, budget: ItemBudget) -> None:
    """Verify, load, warm up and start every model, as many at once as there are cores (largest first: the
    last to finish is then a small one), let the reloader pick older versions where the selected ones failed,
    then mark loading done (`app.state.ready`).

    Under strict the first model that fails raises `StartupError` (the others are cancelled)."""
    slots = asyncio.Semaphore(machine_cores())
    largest_first = sorted(registry.records(), key=stored_bytes, reverse=True)
    tasks = [asyncio.create_task(load_one(r, settings, budget, slots), name=f"load-{r.name}") for r in largest_first]
    try:
        for finished in asyncio.as_completed(tasks):
            await finished
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    reloader = getattr(app.state, "reloader", None)
    if reloader is not None:
        reloader.loaded.set()
    if reloader is not None and any(r.state == "unavailable" for r in registry.records()):
        await reloader.reload()  # `latest` policies fall back to older versions of the models that failed
    app.state.ready = True
    log.info("ready: %s", ", ".join(f"{r.name}/{r.version}={r.state}" for r in registry.records()) or "no models")


async def watch_after(loader: asyncio.Task[None] | None, reloader: Any, interval_s: float) -> None:
    """Watch the store (`Reloader.watch`) once the start-up loading is done."""
    if loader is not None:
        await asyncio.gather(loader, return_exceptions=True)
    await reloader.watch(interval_s)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load and start every selected model (in the background unless strict or `load_in_background` is off),
    watch the store when `store_poll_s` > 0, drain on SIGTERM, then stop them all."""
    from app.reload import Reloader  # it builds on this module's start_model / stop_model

    settings: Settings = app.state.settings
    registry = ModelRegistry()
    app.state.models = registry
    app.state.ready = False
    drain: Drain = getattr(app.state, "drain", None) or Drain()
    app.state.drain = drain
    drain.draining = False
    app.state.admission = Admission(settings.max_inflight_requests)  # routes: a slot before the body
    budget = app.state.queue_budget = ItemBudget(settings.max_queued_items_total)
    reloader = app.state.reloader = Reloader(registry, settings, budget, loaded=False)
    loader: asyncio.Task[None] | None = None
    watcher: asyncio.Task[None] | None = None
    undo_hook = install_sigterm_hook(drain, settings.shutdown_grace_s)
    try:
        register_models(registry, settings)
        if settings.load_in_background and not settings.strict:
            loader = asyncio.create_task(load_all(app, registry, settings, budget), name="load-models")
        else:
            await load_all(app, registry, settings, budget)
        if settings.store_poll_s > 0:
            watcher = asyncio.create_task(watch_after(loader, reloader, settings.store_poll_s), name="store-watcher")
        yield
    finally:
        drain.draining = True
        app.state.ready = False
        for task in (loader, watcher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await reloader.close()
        if undo_hook is not None:
            undo_hook()
        for record in registry.records():
            await stop_model(record)
