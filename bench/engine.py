"""The engine ceiling of a workload: the best this machine does in-process, no HTTP, no codecs.

ONNX Runtime (the store's .onnx, `bench.peers.common.make_session`), in three thread layouts:
one session with 1 intra-op thread, one with every core, and one 1-thread session per core run side by
side from Python threads (ORT releases the GIL), each at batch 1, 2, 4, ..., 32 (a layout stops once a
batch of 4 or more falls below 85% of its best: larger ones only lose); then, at the best (layout,
batch), spinning threads on and the parallel executor (inter-op threads = intra-op threads).
The other formats of the op in the store run with torch at every core: the `torch.export` program
(.pt2, through the service's own loader) and the AOTInductor package when one was built, at batch 1, 8
and ONNX Runtime's best batch, and torch eager (the model rebuilt from the manifest and its safetensors
weights; needs the `train` extra) at batch 8, the formats goal's yardstick. The ceiling is the highest
items/s of them all; the batch-1 latency is the lowest median call time of one single-session call at
batch 1. `with_codecs`: the best plain ONNX layout again, each call also decoding the request bodies and
encoding each answer (what any server must do; still no HTTP) - how much of the gap to the ceiling the
codecs alone explain.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from bench.peers.common import answer_batch, make_session
from bench.workloads import Prepared

BATCHES = (1, 2, 4, 8, 16, 32)
FORMAT_BATCH = 8  # the formats goal compares exported formats with torch eager at this batch


def machine_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Measurement:
    format: str  # onnx | torch_export | aoti | eager
    batch: int
    instances: int  # engines run side by side
    threads: int  # intra-op threads of each
    parallel: bool = False
    spinning: bool = False
    items_per_s: float = 0.0
    call_ms: float = float("nan")  # median wall time of one call

    @property
    def label(self) -> str:
        extra = ("+spin" if self.spinning else "") + ("+parallel" if self.parallel else "")
        return f"{self.format} {self.instances}x{self.threads}t{extra} b{self.batch}"


@dataclass
class Ceiling:
    workload: str
    measurements: list[Measurement]
    notes: list[str] = field(default_factory=list)
    with_codecs: Measurement | None = None  # the best layout again, decoding and encoding each item (no HTTP)

    @property
    def best(self) -> Measurement:
        return max(self.measurements, key=lambda m: m.items_per_s)

    @property
    def batch1_ms(self) -> float:
        return min(m.call_ms for m in self.measurements if m.batch == 1 and m.instances == 1)

    def at_batch(self, batch: int, formats: tuple[str, ...]) -> float | None:
        rates = [m.items_per_s for m in self.measurements if m.batch == batch and m.format in formats]
        return max(rates) if rates else None

    def fastest_at(self, batch: int, formats: tuple[str, ...]) -> str | None:
        found = [m for m in self.measurements if m.batch == batch and m.format in formats]
        return max(found, key=lambda m: m.items_per_s).format if found else None

    def to_json(self) -> dict[str, Any]:
        return {
            "best": {**asdict(self.best), "label": self.best.label},
            "items_per_s": self.best.items_per_s,
            "batch1_ms": self.batch1_ms,
            "eager_b8_items_per_s": self.at_batch(FORMAT_BATCH, ("eager",)),
            "exported_b8_items_per_s": self.at_batch(FORMAT_BATCH, ("onnx", "torch_export", "aoti")),
            "fastest_b8_format": self.fastest_at(FORMAT_BATCH, ("onnx", "torch_export", "aoti")),
            "measurements": [{**asdict(m), "label": m.label} for m in self.measurements],
            "notes": self.notes,
            "with_codecs": None if self.with_codecs is None else {**asdict(self.with_codecs),
                                                                   "label": self.with_codecs.label},
        }


def time_calls(runs: list[Callable[[], Any]], seconds: float, warmup: int = 1) -> tuple[float, float]:
    """Call every run in a loop on its own thread for `seconds`, at least twice, after `warmup` calls each:
    (calls per second of them all, median ms of one call)."""
    for run in runs * warmup:
        run()

    def loop(run: Callable[[], Any]) -> list[float]:
        durations: list[float] = []
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop or len(durations) < 2:
            start = time.perf_counter()
            run()
            durations.append(time.perf_counter() - start)
        return durations

    start = time.perf_counter()
    if len(runs) == 1:
        per_run = [loop(runs[0])]
    else:
        with ThreadPoolExecutor(len(runs)) as pool:
            per_run = list(pool.map(loop, runs))
    elapsed = time.perf_counter() - start
    calls = sum(len(d) for d in per_run)
    return calls / elapsed, 1e3 * statistics.median(d for durations in per_run for d in durations)


def onnx_measure(prepared: Prepared, probe: Measurement, seconds: float) -> Measurement:
    spec = prepared.spec
    feeds = {spec.input: np.repeat(prepared.item, probe.batch, axis=0)}
    sessions = [
        make_session(spec.onnx, probe.threads, spinning=probe.spinning, parallel=probe.parallel)
        for _ in range(probe.instances)
    ]
    runs = [lambda s=s: s.run([spec.output], feeds) for s in sessions]
    calls, call_ms = time_calls(runs, seconds)
    return replace(probe, items_per_s=calls * probe.batch, call_ms=call_ms)


def layout_sweep(prepared: Prepared, instances: int, threads: int, seconds: float) -> list[Measurement]:
    """Batch 1, 2, 4, ... 32 of one layout, stopping once a batch of 4+ falls below 85% of the best so far."""
    found: list[Measurement] = []
    for batch in BATCHES:
        found.append(onnx_measure(prepared, Measurement("onnx", batch, instances, threads), seconds))
        if batch >= 4 and found[-1].items_per_s < 0.85 * max(m.items_per_s for m in found):
            break
    return found


def onnx_sweep(prepared: Prepared, seconds: float, cores: int) -> list[Measurement]:
    """Every layout's batches, then spinning / the parallel executor at the best one and at batch 1."""
    found = [m for n, t in sorted({(1, 1), (1, cores), (cores, 1)}) for m in layout_sweep(prepared, n, t, seconds)]
    best = max(found, key=lambda m: m.items_per_s)
    fastest_b1 = min((m for m in found if m.batch == 1 and m.instances == 1), key=lambda m: m.call_ms)
    variants = {replace(best, spinning=True), replace(fastest_b1, spinning=True)}
    if best.threads > 1:
        variants.add(replace(best, parallel=True))
    found += [onnx_measure(prepared, probe, seconds) for probe in sorted(variants, key=lambda m: m.label)]
    return found


def codec_measure(prepared: Prepared, layout: Measurement, seconds: float) -> Measurement:
    """`layout` (ONNX, its instances, threads and batch) where each call also decodes the request bodies and
    encodes each answer, as a server must (`answer_batch`): what the machine does for these requests
    in-process, with no HTTP. The engine ceiling leaves the codecs out."""
    spec = prepared.spec
    bodies = [prepared.body] * layout.batch
    sessions = [make_session(spec.onnx, layout.threads) for _ in range(layout.instances)]
    calls, call_ms = time_calls([lambda s=s: answer_batch(spec, s, bodies) for s in sessions], seconds)
    return replace(layout, format="onnx+codecs", spinning=False, parallel=False,
                   items_per_s=calls * layout.batch, call_ms=call_ms)


# ------------------------------------------------------------------------------------------------ torch
def torch_runners(prepared: Prepared, cores: int) -> tuple[dict[str, Callable[[np.ndarray], Any]], list[str]]:
    """A batch -> output function per torch format of the op (absent ones named in the notes)."""
    from app.runtime.torch_export import TorchExportRuntime

    spec, op = prepared.spec, prepared.manifest.ops[prepared.workload.op]
    runners: dict[str, Callable[[np.ndarray], Any]] = {}
    notes: list[str] = []
    program = prepared.artifact("torch_export")
    if program is not None:
        runtime = TorchExportRuntime(
            program, input_names=[spec.input], output_names=[spec.output], device="cpu", intra_op_threads=cores
        )
        runners["torch_export"] = lambda x, r=runtime: r.run({spec.input: x})
    package = prepared.artifact("aoti")
    if package is not None:
        from app.runtime.aoti import AotiRuntime

        aoti = AotiRuntime(package, inputs=op.inputs, outputs=op.outputs, device="cpu", intra_op_threads=cores)
        runners["aoti"] = lambda x, r=aoti: r.run({spec.input: x})
    else:
        notes.append("no AOTInductor package in the store")
    try:
        runners["eager"] = eager_runner(prepared)
    except Exception as exc:  # the train extra missing, or a model the registry cannot rebuild
        notes.append(f"torch eager unavailable: {exc}")
    return runners, notes


def eager_runner(prepared: Prepared) -> Callable[[np.ndarray], Any]:
    """The op of the model rebuilt from its manifest and weights, in eager torch, eval mode."""
    import torch
    from safetensors.torch import load_file

    from app.schemas.store_format import WEIGHTS_NAME
    from training.models.base import OpModule
    from training.registry import create_model

    manifest = prepared.manifest
    model = create_model(manifest.architecture, **manifest.config)
    model.load_state_dict(load_file(str(prepared.directory / WEIGHTS_NAME)))
    module = OpModule(model.eval(), prepared.workload.op).eval()

    def run(batch: np.ndarray) -> Any:
        with torch.inference_mode():
            return module(torch.from_numpy(batch))

    return run


def torch_sweep(
    prepared: Prepared, seconds: float, cores: int, batches: tuple[int, ...]
) -> tuple[list[Measurement], list[str]]:
    """The torch formats at `batches` (eager at FORMAT_BATCH only: it is the formats goal's yardstick),
    two warm-up calls each: torch plans a new batch size on its first calls."""
    try:
        import torch
    except ImportError:
        return [], ["torch is not installed: no torch formats measured"]
    torch.set_num_threads(cores)
    runners, notes = torch_runners(prepared, cores)
    found = []
    for fmt, run in runners.items():
        for batch in (FORMAT_BATCH,) if fmt == "eager" else batches:
            x = np.repeat(prepared.item, batch, axis=0)
            calls, call_ms = time_calls([lambda run=run, x=x: run(x)], seconds, warmup=2)
            found.append(Measurement(fmt, batch, 1, cores, items_per_s=calls * batch, call_ms=call_ms))
    return found, notes


def ceiling(prepared: Prepared, seconds: float, cores: int | None = None) -> Ceiling:
    """Every configuration above, `seconds` each."""
    cores = cores or machine_cores()
    found = onnx_sweep(prepared, seconds, cores)
    best_batch = max(found, key=lambda m: m.items_per_s).batch
    torch_found, notes = torch_sweep(prepared, seconds, cores, tuple(sorted({1, FORMAT_BATCH, best_batch})))
    best_plain = max((m for m in found if not m.spinning and not m.parallel), key=lambda m: m.items_per_s)
    return Ceiling(prepared.workload.name, found + torch_found, notes, codec_measure(prepared, best_plain, seconds))
