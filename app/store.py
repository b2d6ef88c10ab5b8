"""The model store: scan, validate manifests, verify every artifact, pick and load a runtime per op.

Layout: `<store>/<model>/<version>/manifest.json` plus the files its `artifacts` list. Which versions
of a model are served is its version policy (`app.versions`; default: the newest, in numeric order
"10" > "9", "1.10" > "1.9"). A model that fails any check is kept as `unavailable` with its reason, so
`/v1/models` can say why it is missing.

Verify, then load exactly what was verified: every artifact's size and sha256 are checked first
(`verify_artifacts`), and each artifact a runtime loads is read once more into memory, checked again
(`read_verified`) and handed to the runtime as bytes, so a file swapped in the meantime is never loaded.
What each format may unpickle or execute is documented in its `app.runtime` module.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from app.metrics import track_execution_provider
from app.runtime.base import Runtime, RuntimeLoadError
from app.runtime.threads import EnginePlan, machine_cores, plan_engine
from app.schemas.manifest import ArtifactFormat, Manifest, OpSpec
from app.schemas.store_format import (
    StoreError,
    model_dirs,
    newest_version_dir,
    read_manifest,
    resolve_artifact,
    verify_artifacts,
    version_key,
)
from app.settings import Settings

if TYPE_CHECKING:
    from app.batcher import Engine
    from app.diffusion import ContinuousDdimSampler

log = logging.getLogger(__name__)

ModelState = Literal["loading", "ready", "unavailable"]
__all__ = ["ModelRecord", "ModelRegistry", "StoreError", "load_model", "scan_store", "version_key"]


@dataclass(eq=False)
class ModelRecord:
    """One model of the store and everything the service built for it (owned by the lifespan)."""

    name: str
    version: str | None = None
    path: Path | None = None
    manifest: Manifest | None = None
    state: ModelState = "loading"
    reason: str = ""
    runtimes: dict[str, Runtime] = field(default_factory=dict)
    formats: dict[str, ArtifactFormat] = field(default_factory=dict)
    saliency: Runtime | None = None  # torch.export program of manifest.saliency.op, when loadable
    saliency_reason: str = ""  # why it is not, when it is not
    engine: Engine | None = None  # set by the lifespan once the model is loaded
    sampler: ContinuousDdimSampler | None = None  # ddim models only
    load_seconds: float = 0.0
    fault: str = ""  # why a model that was serving stopped (its engine or sampler scheduler failed)
    signature: tuple[int, ...] = ()  # its manifest's `app.versions.file_signature` when scanned
    leases: int = 0  # requests running on this version (`app.versions.leased`)
    retired: bool = False  # no longer served: new requests resolve the model again
    # its engine's instances and each runtime's threads (set by load_model)
    plan: EnginePlan = field(default_factory=lambda: EnginePlan(1, 1))
    item_ms: dict[str, float] = field(default_factory=dict)  # one item on an op's runtime, timed at warm-up

    def fail(self, reason: str) -> None:
        self.state = "unavailable"
        self.reason = reason
        log.error("model %s/%s unavailable: %s", self.name, self.version, reason)

    @property
    def label_version(self) -> str:
        return self.version or ""

    def op(self, name: str) -> OpSpec:
        assert self.manifest is not None
        return self.manifest.ops[name]  # type: ignore[index]


def scan_store(root: Path) -> list[ModelRecord]:
    """One record per model directory, pointing at its newest version."""
    if not root.is_dir():
        log.warning("model store %s does not exist; serving no models", root)
        return []
    records = []
    for model_dir in model_dirs(root):
        newest = newest_version_dir(model_dir)
        if newest is not None:
            records.append(ModelRecord(name=model_dir.name, version=newest.name, path=newest))
    return records


def choose_format(op: OpSpec, prefer: str) -> ArtifactFormat:
    """The format to serve an op with: `prefer` ("manifest": the op's measured `preferred_format`), then
    onnx, aoti, torch_export."""
    first = op.preferred_format if prefer == "manifest" else prefer
    for fmt in (first, "onnx", "aoti", "torch_export"):
        if fmt in op.artifacts:
            return fmt  # type: ignore[return-value]
    raise StoreError("op has no artifact")


def read_verified(version_dir: Path, manifest: Manifest, relative: str) -> bytes:
    """The bytes of one artifact, read once and checked against its manifest record (size and sha256).

    Runtimes load exactly these bytes, never the path again: a file replaced after this check (or
    after `verify_artifacts`) is not what runs."""
    record = next(a for a in manifest.artifacts if a.path == relative)  # the manifest schema ensures one
    path = resolve_artifact(version_dir, relative)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"artifact {relative} unreadable: {exc.strerror}") from exc
    if len(data) != record.bytes:
        raise StoreError(f"artifact {relative} has {len(data)} bytes, manifest says {record.bytes}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.sha256.lower():
        raise StoreError(f"artifact {relative} sha256 mismatch: {digest[:12]}… != {record.sha256[:12]}…")
    return data


def engine_plan(manifest: Manifest, settings: Settings) -> EnginePlan:
    """Instances and threads of a model's engine on this machine (`app.runtime.threads.plan_engine`)."""
    single_slot = manifest.sampler is not None and manifest.sampler.kind == "ddim"
    return plan_engine(settings.engine_instances, settings.intra_op_threads, cores=machine_cores(),
                       single_slot=single_slot, lone_threads=settings.lone_batch_threads)


def load_runtime(
    fmt: ArtifactFormat, version_dir: Path, manifest: Manifest, op: OpSpec, settings: Settings, threads: int = 0,
    lone_threads: int = 0,
) -> Runtime:
    """The runtime of `op` in format `fmt`, built from the verified bytes of its artifact, on `threads` cores
    (0: the `intra_op_threads` setting); an ONNX one also on `lone_threads` for a lone batch (`EnginePlan`)."""
    relative = op.artifacts[fmt]
    path = resolve_artifact(version_dir, relative)
    data = read_verified(version_dir, manifest, relative)
    common = {"device": settings.device, "intra_op_threads": threads or settings.intra_op_threads, "data": data}
    if fmt == "onnx":
        from app.runtime.onnx import OnnxRuntime

        return OnnxRuntime(path, cpu_mem_arena=settings.cpu_mem_arena, lone_threads=lone_threads, **common)
    if fmt == "aoti":
        from app.runtime.aoti import AotiRuntime

        return AotiRuntime(path, inputs=op.inputs, outputs=op.outputs, **common)
    from app.runtime.torch_export import TorchExportRuntime

    return TorchExportRuntime(
        path, input_names=[s.name for s in op.inputs], output_names=[s.name for s in op.outputs], **common
    )


def load_model(record: ModelRecord, settings: Settings) -> None:
    """Validate, verify and load runtimes into `record` (blocking); on failure `record.fail(reason)`."""
    assert record.path is not None
    try:
        manifest = read_manifest(record.path)
        record.manifest = manifest
        if manifest.name != record.name or manifest.version != record.version:
            log.warning(
                "manifest of %s says %s/%s; serving it under the directory names",
                record.path,
                manifest.name,
                manifest.version,
            )
        verify_artifacts(manifest, record.path)
        plan = engine_plan(manifest, settings)
        for op_name, op in manifest.ops.items():
            fmt = choose_format(op, settings.prefer)
            try:
                record.runtimes[op_name] = load_runtime(
                    fmt, record.path, manifest, op, settings, plan.threads, plan.lone_threads
                )
            except RuntimeLoadError as exc:
                # the preferred format may need torch; fall back to ONNX when it exists
                if fmt != "onnx" and "onnx" in op.artifacts:
                    log.warning("%s/%s %s: %s; using onnx", record.name, record.version, op_name, exc)
                    fmt = "onnx"
                    record.runtimes[op_name] = load_runtime(
                    fmt, record.path, manifest, op, settings, plan.threads, plan.lone_threads
                )
                else:
                    raise StoreError(f"op {op_name}: {exc}") from exc
            record.formats[op_name] = fmt
            # aeserve_model_execution_provider{model,version,provider}, while this runtime lives
            track_execution_provider(record.runtimes[op_name], record.name, record.label_version)
        record.plan = on_device(plan, record, settings)
        _load_saliency(record, manifest, settings)
    except (StoreError, RuntimeLoadError) as exc:
        record.fail(str(exc))
    except Exception as exc:  # a broken artifact must not take the service down
        log.exception("loading %s/%s failed", record.name, record.version)
        record.fail(f"{type(exc).__name__}: {exc}")


def on_device(plan: EnginePlan, record: ModelRecord, settings: Settings) -> EnginePlan:
    """`plan`, with one instance by default once a runtime really runs on CUDA (the cores do not bound it)."""
    on_cuda = any("cuda" in runtime.provider.lower() for runtime in record.runtimes.values())
    if on_cuda and not settings.engine_instances:
        return EnginePlan(1, plan.threads)  # the lone-batch sessions are CPU-only (`OnnxRuntime`)
    return plan


def _load_saliency(record: ModelRecord, manifest: Manifest, settings: Settings) -> None:
    if manifest.saliency is None:
        return
    op = manifest.ops.get(manifest.saliency.op)
    if op is None or "torch_export" not in op.artifacts:
        record.saliency_reason = f"op {manifest.saliency.op!r} has no torch_export artifact"
        return
    existing = record.runtimes.get(manifest.saliency.op)
    if existing is not None and existing.format == "torch_export":
        record.saliency = existing
        return
    try:
        assert record.path is not None
        record.saliency = load_runtime("torch_export", record.path, manifest, op, settings, record.plan.threads)
    except RuntimeLoadError as exc:
        record.saliency_reason = str(exc)
        log.warning("%s/%s: saliency unavailable: %s", record.name, record.version, exc)


class ModelRegistry:
    """The served versions of every model, on `app.state.models`.

    `get(name)` is the model's default version: its newest ready one (else its newest, whose reason
    then explains the 503); `get_version` any served version. Iterating yields each model's default
    version (one record per model, by name); `records()` every served version."""

    def __init__(self) -> None:
        self.served: dict[str, dict[str, ModelRecord]] = {}  # name -> version -> record, oldest first
        self.policies: dict[str, str] = {}  # name -> its version policy, as text

    def add(self, record: ModelRecord) -> None:
        """Serve one more version of a model."""
        versions = self.served.get(record.name, {})
        self.set_versions(record.name, [*versions.values(), record])

    def set_versions(self, name: str, records: list[ModelRecord]) -> None:
        """Serve exactly `records` for model `name` from now on (none: the model is gone)."""
        if not records:
            self.served.pop(name, None)
            return
        ordered = sorted(records, key=lambda r: version_key(r.version or ""))
        self.served[name] = {r.version or "": r for r in ordered}

    def get(self, name: str) -> ModelRecord | None:
        versions = self.served.get(name)
        if not versions:
            return None
        for record in reversed(versions.values()):
            if record.state == "ready":
                return record
        return next(reversed(versions.values()))

    def get_version(self, name: str, version: str) -> ModelRecord | None:
        return self.served.get(name, {}).get(version)

    def versions(self, name: str) -> list[ModelRecord]:
        """The served versions of `name`, oldest first."""
        return list(self.served.get(name, {}).values())

    def names(self) -> list[str]:
        return sorted(self.served)

    def records(self) -> list[ModelRecord]:
        """Every served version of every model, by name then version."""
        return [r for name in self.names() for r in self.served[name].values()]

    def __iter__(self) -> Iterator[ModelRecord]:
        return iter([record for name in self.names() if (record := self.get(name)) is not None])

    def __len__(self) -> int:
        return len(self.served)
