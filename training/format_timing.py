"""Which exported format runs an op fastest on this machine: measured once at export, kept in the manifest.

Each artifact is timed the way the service runs it — ONNX Runtime with one intra-op thread per core and
spinning off, torch programs under `inference_mode` with torch's thread count at the core count — on a
batch of `min(8, max_batch_size)` items at the op's example shape (1 item when one already takes more than
a 16th of the budget: the 4D-STEM decoder), all formats at the same batch: one warm-up call, then calls
until three are done or `budget_s` is spent; the median counts. A torch format is preferred only when it beats
ONNX by `TORCH_MARGIN` (10 %): loading torch costs the service hundreds of MB and seconds of start-up, so
a tie goes to ONNX Runtime.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from training.export import OpExport

TIMING_BATCH = 8
TORCH_MARGIN = 0.10


def machine_cores() -> int:
    """Cores this process may run on (the service sizes its engines the same way)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _onnx_runner(path: Path, names: list[str], threads: int) -> Callable[[tuple[torch.Tensor, ...]], object]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda inputs: session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})


def _torch_runner(path: Path, fmt: str) -> Callable[[tuple[torch.Tensor, ...]], object]:
    if fmt == "aoti":
        compiled = torch._inductor.aoti_load_package(str(path))
        return lambda inputs: compiled(*inputs)
    module = torch.export.load(str(path)).module()
    return lambda inputs: module(*inputs)


def _median_ms(run: Callable[[tuple[torch.Tensor, ...]], object], inputs: tuple[torch.Tensor, ...],
               budget_s: float) -> float:
    with torch.inference_mode():
        run(inputs)
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(times) < 3 and (not times or time.perf_counter() < deadline):
            started = time.perf_counter()
            run(inputs)
            times.append(time.perf_counter() - started)
    return 1000.0 * statistics.median(times)


def timing_inputs(result: OpExport, batch: int) -> tuple[torch.Tensor, ...]:
    """The op's example inputs repeated (or cut) to `batch` items; deterministic values."""
    generator = torch.Generator().manual_seed(0)
    return tuple(
        torch.rand((batch, *t.shape[1:]), generator=generator, dtype=t.dtype) if t.is_floating_point()
        else t[:1].repeat((batch, *([1] * (t.dim() - 1))))
        for t in result.op.example_inputs
    )


def _probe_batch(run: Callable[[tuple[torch.Tensor, ...]], object], result: OpExport, wanted: int,
                 budget_s: float) -> int:
    """`wanted`, unless one item already takes so long that a batch of `wanted` would not fit in the budget
    (the 4D-STEM decoder: ~44 GMAC an item): then 1."""
    if wanted == 1 or not result.op.example_inputs:
        return wanted
    with torch.inference_mode():
        started = time.perf_counter()
        run(timing_inputs(result, 1))
        one = time.perf_counter() - started
    return wanted if one * wanted * 2 <= budget_s else 1


def time_formats(result: OpExport, max_batch_size: int, budget_s: float = 1.5) -> tuple[int, dict[str, float]]:
    """(batch, {format: median ms per call}) for every artifact of one exported op, all at one batch size."""
    threads = machine_cores()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runners = {
            a.format: (_onnx_runner(a.path, result.op.input_names, threads) if a.format == "onnx"
                       else _torch_runner(a.path, a.format))
            for a in result.artifacts
        }
        wanted = max(1, min(TIMING_BATCH, max_batch_size))
        batch = _probe_batch(next(iter(runners.values())), result, wanted, budget_s) if runners else wanted
        inputs = timing_inputs(result, batch) if result.op.example_inputs else ()
        timings = {fmt: round(_median_ms(run, inputs, budget_s), 3) for fmt, run in runners.items()}
    finally:
        torch.set_num_threads(previous)
    return batch, timings


def fastest_format(timings: dict[str, float]) -> str | None:
    """ONNX unless a torch format is more than `TORCH_MARGIN` faster; None when nothing was timed."""
    if not timings:
        return None
    best = min(timings, key=timings.__getitem__)
    if "onnx" in timings and best != "onnx" and timings[best] > (1.0 - TORCH_MARGIN) * timings["onnx"]:
        return "onnx"
    return best
