"""Training on several processes: `torchrun` + DistributedDataParallel.

`python -m torch.distributed.run --nproc_per_node=N -m training train ...` (or `torchrun`) starts N
processes; each finds RANK, WORLD_SIZE and LOCAL_RANK in its environment and `session` joins them in one
process group (gloo on CPU, nccl on CUDA with one GPU per process, cuda:LOCAL_RANK). Without those
variables every method here is a no-op and a run is exactly a one-process run.

How `training.loop` shares a run:
  * `--batch-size` is the global batch. Every step, rank r trains on its slice of the same global batch
    (`training.sampling.shard_of_batch`) and DDP averages the gradients (each rank's loss weighted by its
    share), so a step is a one-process step on the same batch up to float summation order; the logged
    losses are global-batch means (reduced over the ranks).
  * BatchNorm: on CUDA the BatchNorm layers become SyncBatchNorm (statistics of the global batch); on
    CPU (gloo has no SyncBatchNorm) each rank normalises with its own slice's statistics, and the running
    statistics kept are rank 0's (DDP broadcasts them every step).
  * Validation batches are dealt round-robin over the ranks and the sums reduced, so every rank gets the
    metrics of the whole validation set (with rank 0's BatchNorm running statistics).
  * Random draws inside a loss (noise, diffusion time steps) come from one stream per rank: rank 0's is
    the one-process stream, rank r > 0 seeds its own from (seed, rank, step) at a fresh start.
  * Only rank 0 writes checkpoints, `log.json`, the loss curve, the report and progress; the others
    wait and fail if its write fails. A checkpoint holds the unwrapped model (a one-process checkpoint
    plus `rng_by_rank`, every rank's RNG state) and resumes with any world size at the same step.
  * Stops (time budget, Ctrl-C/SIGTERM) are agreed by all ranks at every step boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from training.checkpoint import CheckpointError, capture_rng_state, restore_rng_state
from training.runtime import resolve_device, seed_everything
from training.sampling import shard_of_batch

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
RNG_BY_RANK = "rng_by_rank"
_STOP_REASONS = ("done", "time_budget", "interrupted")  # the most severe one wins
T = TypeVar("T")


class LossModule(nn.Module):
    """`losses(model, batch)` as one module, so DDP sees the forward pass of any family's objective."""

    def __init__(self, model: nn.Module, losses: Callable[[nn.Module, Any], dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.model = model
        self.losses = losses

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.losses(self.model, batch)


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The seed of rank `rank`'s random stream when it has no saved one (a pure function, 63 bits)."""
    digest = hashlib.sha256(f"aeserve-rank-stream:{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run; `active` is False (one process) unless launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The device of this rank (`cuda` means cuda:LOCAL_RANK under torchrun)."""
        return resolve_device(name, self.local_rank if self.active else None)

    def describe(self) -> dict[str, int]:
        """What the log records about the run's processes ({} for one process)."""
        return {"world_size": self.world_size} if self.active else {}

    # --- data ---------------------------------------------------------------------------------------
    def shard(self, indices: list[int]) -> tuple[list[int], float]:
        """This rank's samples of a global batch and its loss weight (share × world size; 1 if even)."""
        if not self.active:
            return indices, 1.0
        part = shard_of_batch(indices, self.rank, self.world_size)
        return part, len(part) * self.world_size / len(indices)

    def share(self, items: list[T]) -> list[T]:
        """This rank's items of a list dealt round-robin (validation batches)."""
        return items[self.rank :: self.world_size] if self.active else items

    # --- training -----------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, losses: Callable[..., dict[str, torch.Tensor]], device: torch.device) -> nn.Module:
        """The module a training step calls with a batch: the objective, under DDP when active."""
        trainee: nn.Module = LossModule(model, losses)
        if not self.active:
            return trainee
        if device.type == "cuda":
            trainee = nn.SyncBatchNorm.convert_sync_batchnorm(trainee)
        return DistributedDataParallel(
            trainee,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,  # some families' objectives leave parameters unused
        )

    def gradient_sync(self, trainee: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on every micro-batch of a step but the last."""
        if self.active and not last:
            return trainee.no_sync()
        return contextlib.nullcontext()

    # --- reductions ---------------------------------------------------------------------------------
    def _tensor(self, values: list[float]) -> torch.Tensor:
        device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        return torch.tensor(values, dtype=torch.float64, device=device)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Per-rank values averaged over the ranks (every rank has the same keys in the same order)."""
        if not self.active:
            return values
        reduced = self._tensor(list(values.values()))
        dist.all_reduce(reduced)
        return {key: value / self.world_size for key, value in zip(values, reduced.tolist(), strict=True)}

    def total(self, sums: dict[str, float], count: int) -> tuple[dict[str, float], int]:
        """Sums and counts of all ranks added up (a rank without a batch has no keys)."""
        if not self.active:
            return sums, count
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (sums, count))
        merged: dict[str, float] = {}
        for part, _ in gathered:
            for key, value in part.items():
                merged[key] = merged.get(key, 0.0) + value
        return merged, sum(part_count for _, part_count in gathered)

    def agree(self, reason: str) -> str:
        """The stop reason every rank acts on: the most severe one of any rank."""
        if not self.active:
            return reason
        code = self._tensor([_STOP_REASONS.index(reason)])
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        return _STOP_REASONS[int(code.item())]

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics) before evaluating."""
        if self.active:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def on_main(self, write: Callable[[], Any]) -> None:
        """Run `write` on rank 0 only; the other ranks wait for it and fail when it failed."""
        if not self.active:
            write()
            return
        failure: Exception | None = None
        if self.is_main:
            try:
                write()
            except Exception as exc:
                failure = exc
        message = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(message, src=0)
        if failure is not None:
            raise failure
        if message[0] is not None:
            raise CheckpointError(f"rank 0 failed to write: {message[0]}")

    # --- random streams -----------------------------------------------------------------------------
    def seed_rank_stream(self, seed: int, step: int) -> None:
        """Give ranks > 0 their own random stream (rank 0 keeps the one-process stream)."""
        if self.active and self.rank > 0:
            seed_everything(rank_seed(seed, self.rank, step))

    def rng_streams(self) -> dict[str, Any]:
        """Every rank's RNG state for the checkpoint (`rng_by_rank`); {} for one process."""
        if not self.active:
            return {}
        states: list[Any] = [None] * self.world_size
        dist.all_gather_object(states, capture_rng_state())
        return {RNG_BY_RANK: states}

    def restore_rng(self, state: Mapping[str, Any], seed: int) -> None:
        """This rank's saved stream, else rank 0's (`rng`) re-seeded for ranks > 0 at the saved step."""
        streams = state.get(RNG_BY_RANK) if self.active else None
        if streams and self.rank < len(streams):
            restore_rng_state(streams[self.rank])
            return
        restore_rng_state(state["rng"])
        self.seed_rank_stream(seed, int(state["step"]))


SINGLE = Distributed()


def from_environment(env: Mapping[str, str] | None = None) -> Distributed:
    """The launch torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK), a running process group, or SINGLE."""
    env = os.environ if env is None else env
    if dist.is_available() and dist.is_initialized():
        local = int(env.get("LOCAL_RANK", 0))
        return Distributed(dist.get_rank(), dist.get_world_size(), local, True, str(dist.get_backend()))
    if not all(name in env for name in LAUNCH_VARIABLES):
        return SINGLE
    rank, world_size, local_rank = (int(env[name]) for name in LAUNCH_VARIABLES)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    return Distributed(rank, world_size, local_rank, active=True)


@contextlib.contextmanager
def session(device_name: str) -> Iterator[Distributed]:
    """Join the torchrun process group for one run (gloo on CPU, nccl on CUDA); SINGLE outside torchrun."""
    launch = from_environment()
    if not launch.active or launch.backend:  # one process, or a group someone else runs
        yield launch
        return
    device = launch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dataclasses.replace(launch, backend=str(dist.get_backend()))
    finally:
        dist.destroy_process_group()
