"""How request chunks become one batch and back: chunk sizes, concatenation, splitting outputs by offsets."""

from __future__ import annotations

import numpy as np

from app.runtime.base import RunFn

Arrays = dict[str, np.ndarray]


def split_sizes(total: int, max_batch: int) -> list[int]:
    """Chunk sizes of a request of `total` frames: full chunks of `max_batch`, then the rest."""
    sizes = [max_batch] * (total // max_batch)
    if total % max_batch:
        sizes.append(total % max_batch)
    return sizes or [0]


def run_batch(run: RunFn, inputs: list[Arrays], sizes: list[int], has_inputs: bool) -> list[Arrays]:
    """Concatenate items, run once, split outputs back by offsets (runs in the engine thread)."""
    if not has_inputs:
        outputs = run({})
        return [outputs for _ in inputs]
    names = list(inputs[0])
    batch = {n: inputs[0][n] if len(inputs) == 1 else np.concatenate([i[n] for i in inputs]) for n in names}
    outputs = run(batch)
    total = sum(sizes)
    for name, array in outputs.items():
        if array.shape[0] != total:
            raise RuntimeError(f"output {name!r} has batch {array.shape[0]}, expected {total}")
    results, offset = [], 0
    for size in sizes:
        results.append({name: array[offset : offset + size] for name, array in outputs.items()})
        offset += size
    return results
