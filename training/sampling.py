"""Which samples each optimizer step trains on, and on which process.

The order of epoch e is `epoch_order(n, seed, e)`; its batches are `batches_of_epoch` (global batches
of `batch_size` samples). With several processes (`training.distributed`), rank r of W trains on
`shard_of_batch(batch, r, W)`: a contiguous slice of every global batch, so the samples of a step do
not depend on the world size and a run can resume with a different number of processes.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, default_collate


def epoch_order(length: int, seed: int, epoch: int) -> torch.Tensor:
    """Permutation of the training indices for one epoch: a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(length, generator=generator)


def batches_of_epoch(length: int, batch_size: int, order: torch.Tensor) -> list[list[int]]:
    """Index lists of the epoch's batches (the last partial batch is dropped when one full batch exists)."""
    indices = order.tolist()
    full = length // batch_size
    count = full if full > 0 else 1
    return [indices[i * batch_size : (i + 1) * batch_size] for i in range(count)]


def shard_of_batch(indices: list[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s contiguous slice of a global batch; the first `len % world_size` ranks get one more."""
    if len(indices) < world_size:
        raise ValueError(
            f"a batch of {len(indices)} sample(s) cannot be split over {world_size} processes: raise "
            f"--batch-size (the global batch) to at least the world size"
        )
    size, extra = divmod(len(indices), world_size)
    start = rank * size + min(rank, extra)
    return indices[start : start + size + (1 if rank < extra else 0)]


def collate(dataset: Dataset, indices: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """The samples `indices` of `dataset` stacked into one batch on `device`."""
    batch = default_collate([dataset[i] for i in indices])
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
