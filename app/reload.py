"""Hot swap: rescan the store and serve what the version policies select now, without a restart.

For each model, the versions its policy selects that are not serving yet (or whose manifest changed)
are verified, loaded, warmed up (`warmup`) and started beside the versions serving; only then does the
registry switch to them, in one step on the event loop. Versions no longer selected are retired: new
requests stop reaching them, requests holding a lease on them (`app.versions.leased`) finish (for at
most `request_timeout_s`), then their engines and samplers stop, their runtimes are released and freed
memory is handed back to the OS.

A version that fails to load is remembered (until its manifest changes) and skipped: `latest:N` then
selects the next older version, and when nothing new loads the versions serving keep serving. Reloads
run one at a time: `POST /v1/admin/reload` and the store watcher (`store_poll_s` > 0) both call
`Reloader.reload`; at start-up it picks older versions for models whose selected ones failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from app.admission import ItemBudget
from app.lifespan import start_model, stop_model
from app.runtime.threads import machine_cores
from app.settings import Settings
from app.store import ModelRecord, ModelRegistry, load_model
from app.versions import ModelVersions, PolicyTable, Signature, StoredVersion, scan_versions, store_fingerprint

log = logging.getLogger(__name__)


@dataclass
class ReloadReport:
    """What one reload did: versions added, removed (drained and freed) and failed."""

    added: list[dict[str, Any]] = field(default_factory=list)
    removed: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    def fail(self, model: str, version: str | None, reason: str) -> None:
        self.failed.append({"model": model, "version": version, "reason": reason})

    def as_json(self, registry: ModelRegistry, seconds: float) -> dict[str, Any]:
        models = {}
        for name in registry.names():
            default = registry.get(name)
            models[name] = {
                "policy": registry.policies.get(name),
                "default_version": default.version if default is not None else None,
                "versions": {r.version: r.state for r in registry.versions(name)},
            }
        return {
            "added": self.added, "removed": self.removed, "failed": self.failed, "models": models,
            "seconds": round(seconds, 3),
        }


def new_record(stored: StoredVersion) -> ModelRecord:
    return ModelRecord(stored.model, stored.version, stored.path, signature=stored.signature)


def release(record: ModelRecord) -> None:
    """Drop everything a stopped version holds (its runtimes' sessions and programs go with it)."""
    record.runtimes.clear()
    record.saliency = None
    record.engine = None
    record.sampler = None


def return_freed_memory() -> None:
    """Collect cycles, then ask glibc to hand freed heap pages back to the OS (no-op elsewhere)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def is_ready(records: list[ModelRecord]) -> bool:
    return any(r.state == "ready" for r in records)


class Reloader:
    """Rescans the store and swaps versions in and out of `registry` (one reload at a time)."""

    def __init__(
        self, registry: ModelRegistry, settings: Settings, budget: ItemBudget | None = None, *, loaded: bool = True
    ) -> None:
        """`loaded` False: reloads wait for `loaded.set()` (the lifespan's start-up loading is done)."""
        self.registry, self.settings, self.budget = registry, settings, budget
        self.lock = asyncio.Lock()
        self.loaded = asyncio.Event()
        if loaded:
            self.loaded.set()
        self.failures: dict[tuple[str, str], tuple[Signature, str]] = {}  # (model, version) -> why it failed
        self.retiring: set[ModelRecord] = set()  # draining now: stopped by the lifespan if it ends first

    async def reload(self) -> dict[str, Any]:
        """Serve what the store and policies say now; the report of added, removed and failed versions."""
        await self.loaded.wait()
        async with self.lock:
            started = time.perf_counter()
            self.note_failures()
            report = ReloadReport()
            table = PolicyTable.parse(self.settings.version_policy)
            models = await asyncio.to_thread(
                scan_versions, self.settings.store, table, self.settings.model_filter()
            )
            slots = asyncio.Semaphore(machine_cores())
            names = sorted(set(models) | set(self.registry.names()))
            retired = await asyncio.gather(*(self.reload_model(n, models.get(n), report, slots) for n in names))
            await asyncio.gather(*(self.retire(r, report) for records in retired for r in records))
            if any(retired):
                await asyncio.to_thread(return_freed_memory)
            result = report.as_json(self.registry, time.perf_counter() - started)
            log.info("reload: added %s, removed %s, failed %s", result["added"], result["removed"], result["failed"])
            return result

    def note_failures(self) -> None:
        """Remember the versions that failed to load (not those whose engine died: they are loaded again)."""
        for record in self.registry.records():
            if record.state == "unavailable" and not record.fault and record.version and record.path is not None:
                self.failures[(record.name, record.version)] = (record.signature, record.reason)

    def failed_before(self, stored: StoredVersion) -> str | None:
        """Why this version (with this manifest) failed to load before; None if it did not."""
        known = self.failures.get((stored.model, stored.version))
        return known[1] if known is not None and known[0] == stored.signature else None

    async def reload_model(
        self, name: str, model: ModelVersions | None, report: ReloadReport, slots: asyncio.Semaphore
    ) -> list[ModelRecord]:
        """Switch one model to its selected versions; returns the versions it retires."""
        current = self.registry.versions(name)
        if model is None:  # gone from the store, or no longer selected by `models`
            self.registry.set_versions(name, [])
            self.registry.policies.pop(name, None)
            return current
        self.registry.policies[name] = str(model.policy)
        if model.error:
            report.fail(name, None, model.error)
            return []
        chosen = await self.choose(model, current, report, slots)
        if not is_ready(chosen):
            if is_ready(current):
                return []  # nothing new loads: what serves keeps serving
            chosen = self.explain(model, current)
        self.registry.set_versions(name, chosen)
        for record in chosen:
            if record not in current and record.state == "ready":
                report.added.append(
                    {"model": name, "version": record.version, "load_seconds": round(record.load_seconds, 3)}
                )
        return [r for r in current if r not in chosen]

    async def choose(
        self, model: ModelVersions, current: list[ModelRecord], report: ReloadReport, slots: asyncio.Semaphore
    ) -> list[ModelRecord]:
        """The records of the versions the policy selects among those that load, loading new ones as needed:
        a selected version that fails makes the policy select again without it."""
        serving = {r.version: r for r in current if r.state == "ready"}
        loaded: dict[str, ModelRecord] = {}
        while True:
            usable = [
                s for s in model.stored if s.version in serving or s.version in loaded or not self.failed_before(s)
            ]
            chosen = model.policy.select([s.version for s in usable])
            by_version = {s.version: s for s in usable}
            pending = [
                by_version[v] for v in chosen
                if v not in loaded and not self.failed_before(by_version[v])
                and (v not in serving or serving[v].signature != by_version[v].signature)
            ]
            if not pending:
                break
            for record in await asyncio.gather(*(self.load(new_record(s), slots) for s in pending)):
                if record.state == "ready":
                    loaded[record.version or ""] = record
                else:
                    self.failures[(model.name, record.version or "")] = (record.signature, record.reason)
                    report.fail(model.name, record.version, record.reason)
        self.report_skipped(model, report)
        return [loaded.get(v) or serving[v] for v in chosen]

    def report_skipped(self, model: ModelVersions, report: ReloadReport) -> None:
        """Selected versions left out because they failed before (unchanged since), once per reload."""
        reported = {(f["model"], f["version"]) for f in report.failed}
        by_version = {s.version: s for s in model.stored}
        for version in model.policy.select(list(by_version)):
            reason = self.failed_before(by_version[version])
            if reason is not None and (model.name, version) not in reported:
                report.fail(model.name, version, f"unchanged since it failed: {reason}")
        if model.policy.kind == "pinned" and model.policy.version not in by_version:
            report.fail(model.name, model.policy.version, model.why_none())

    def explain(self, model: ModelVersions, current: list[ModelRecord]) -> list[ModelRecord]:
        """No version of the model serves: one unavailable record saying why (its newest selected version)."""
        selected = model.policy.select([s.version for s in model.stored])
        if not selected:
            return [ModelRecord(model.name, None, state="unavailable", reason=model.why_none())]
        stored = next(s for s in model.stored if s.version == selected[-1])
        same = [r for r in current if r.version == stored.version and r.signature == stored.signature]
        if same:
            return same
        record = new_record(stored)
        record.state, record.reason = "unavailable", self.failed_before(stored) or "failed to load"
        return [record]

    async def load(self, record: ModelRecord, slots: asyncio.Semaphore) -> ModelRecord:
        """Verify, load, warm up and start a version off to the side (it serves nothing yet)."""
        async with slots:
            started = time.perf_counter()
            await asyncio.to_thread(load_model, record, self.settings)
            record.load_seconds = time.perf_counter() - started
            if record.state != "unavailable":
                await start_model(record, self.settings, self.budget)
        if record.state != "ready":
            await stop_model(record)
            release(record)
        return record

    async def retire(self, record: ModelRecord, report: ReloadReport | None = None) -> None:
        """Let the requests on a version that no longer serves finish, then stop and free it."""
        record.retired = True
        self.retiring.add(record)
        try:
            started = time.perf_counter()
            deadline = started + self.settings.request_timeout_s + 1.0
            while record.leases and time.perf_counter() < deadline:
                await asyncio.sleep(0.01)
            leases_left = record.leases
            was_serving = record.engine is not None or record.sampler is not None
            await stop_model(record)
            release(record)
        finally:
            self.retiring.discard(record)
        if report is not None and was_serving:
            drained = round(time.perf_counter() - started, 3)
            report.removed.append(
                {"model": record.name, "version": record.version, "drain_seconds": drained, "leases_left": leases_left}
            )

    async def watch(self, interval_s: float) -> None:
        """Reload whenever the store's fingerprint (versions, manifests, policy files) changes."""
        root = self.settings.store
        last = await asyncio.to_thread(store_fingerprint, root)
        while True:
            await asyncio.sleep(interval_s)
            now = await asyncio.to_thread(store_fingerprint, root)
            if now == last:
                continue
            last = now
            try:
                await self.reload()
            except Exception:
                log.exception("reload after a store change failed")

    async def close(self) -> None:
        """Stop versions still draining (the service is shutting down)."""
        for record in list(self.retiring):
            await stop_model(record)
            release(record)
