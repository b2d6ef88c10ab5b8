"""The train/eval loop.

`train(config, out_dir)` trains until `config.epochs` epochs are complete, resuming from a checkpoint
when asked. Everything that decides the numbers is a pure function of the saved state:
  * the LR is `lr_at(step, config)` (linear warm-up, then cosine to `lr * lr_min_ratio` over
    `lr_decay_steps` optimizer steps, then flat);
  * the order of the training samples in epoch e is `epoch_order(n, seed, e)`, and data sets with a
    `set_epoch` method are told the epoch (random crops are a function of seed, epoch and index);
  * the RNG states of python/numpy/torch are saved with the model, optimizer and AMP scaler,
so `--resume latest` continues with exactly the per-step losses of an uninterrupted run. Under torchrun
the run is shared by DistributedDataParallel (see `training.distributed`: global batch, rank 0 writes).

Outputs in `out_dir`: `checkpoints/` (see `training.checkpoint`; retention and disk budget from the
config), `log.json` (config, per-step losses, per-epoch train/val loss and validation metrics, events)
and `loss_curve.png`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from training.checkpoint import (
    CheckpointDir,
    atomic_write_bytes,
    capture_rng_state,
    load_checkpoint,
    remove_stale_temps,
)
from training.config import TrainConfig
from training.distributed import SINGLE, Distributed, session
from training.runtime import StopFlag, amp_dtype, seed_everything
from training.sampling import batches_of_epoch, collate, epoch_order
from training.tasks import Task, build_model, task_for_model

LOG_NAME = "log.json"
CURVE_NAME = "loss_curve.png"


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, cosine decay, then flat."""
    base = config.lr
    if step < config.lr_warmup_steps:
        return base * (step + 1) / config.lr_warmup_steps
    progress = min(1.0, (step - config.lr_warmup_steps) / config.lr_decay_steps)
    floor = base * config.lr_min_ratio
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _scalar(value: Any) -> float:
    return float(value.detach().float().item()) if isinstance(value, torch.Tensor) else float(value)


@dataclass
class RunResult:
    """What a call to `train` achieved."""

    out_dir: Path
    epochs_completed: int
    step: int
    stopped: str  # "done", "time_budget" or "interrupted"
    best_val_loss: float
    val: dict[str, float]  # validation of the final weights (loss + metrics)
    wall_s: float
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    model: nn.Module | None = None


class Trainer:
    """Holds the run's state; `fit()` runs it to the configured number of epochs."""

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | Path,
        *,
        resume: str | Path | None = None,
        progress: bool = True,
        init_state: dict[str, torch.Tensor] | None = None,
        task: Task | None = None,
        dist: Distributed = SINGLE,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.ckpt = CheckpointDir(self.out_dir / "checkpoints", config.keep_last, config.min_free_disk_mb)
        for directory in (self.out_dir, self.ckpt.directory) if dist.is_main else ():
            remove_stale_temps(directory)
        self.dist = dist
        self.progress = progress and dist.is_main
        self.device = dist.device(config.device)
        resumed: dict[str, Any] | None = None
        if resume is not None:
            resumed = load_checkpoint(self.ckpt.resolve(resume))
            saved = TrainConfig.from_dict(resumed["train_config"])
            mismatch = {
                k
                for k in ("model", "model_overrides", "data", "seed", "batch_size", "grad_accum")
                if getattr(saved, k) != getattr(config, k)
            }
            if mismatch:
                raise ValueError(
                    f"cannot resume with changed {sorted(mismatch)}: the checkpoint was trained "
                    f"with { ({k: getattr(saved, k) for k in sorted(mismatch)}) }"
                )
        self.config = config
        seed_everything(config.seed)
        self.model = build_model(config).to(self.device)
        if init_state is not None:
            self.model.load_state_dict(init_state, strict=True)
        self.task = task or task_for_model(self.model)
        self.train_set, self.val_set = self.task.datasets(self.model, config)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        self.autocast_dtype = amp_dtype(config, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        self.step = 0
        self.epoch = 0  # completed epochs
        self.position = 0  # optimizer steps already done inside the current epoch
        self.best_val_loss = math.inf
        self.history: dict[str, list[dict[str, Any]]] = {"steps": [], "epochs": [], "events": []}
        if resumed is not None:
            self._load_state(resumed, resume)
        else:
            dist.seed_rank_stream(config.seed, 0)
        self.trainee = dist.wrap(self.model, self.task.losses, self.device)  # DDP under torchrun

    # --- state ------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "format": 1,
            "model_name": self.config.model,
            "model_config": self.model.get_config() if hasattr(self.model, "get_config") else {},
            "family": getattr(self.model, "family", ""),
            "train_config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "data_order": {
                "seed": self.config.seed,
                "epoch": self.epoch,
                "order": epoch_order(len(self.train_set), self.config.seed, self.epoch),
            },
            "rng": capture_rng_state(),
            "best_val_loss": self.best_val_loss,
            "history": self.history,
            **self.dist.rng_streams(),  # every rank's RNG state, only under torchrun
        }

    def _load_state(self, state: dict[str, Any], source: Any) -> None:
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.position = int(state["step"]), int(state["epoch"]), int(state["position"])
        expected = epoch_order(len(self.train_set), self.config.seed, self.epoch)
        if not torch.equal(state["data_order"]["order"], expected):
            raise ValueError(
                "the data order saved in the checkpoint differs from the one recomputed from "
                "(seed, epoch): the data set changed since the checkpoint was written"
            )
        self.best_val_loss = float(state["best_val_loss"])
        self.history = state["history"]
        self.history["events"].append(
            {
                "event": "resume",
                "from": str(source),
                "step": self.step,
                "epoch": self.epoch,
                "time": time.time(),
            }
        )
        self.dist.restore_rng(state, self.config.seed)

    # --- steps --------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _train_step(self, micro_batches: list[list[int]]) -> dict[str, float]:
        lr = lr_at(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        totals: dict[str, float] = {}
        for number, global_indices in enumerate(micro_batches, start=1):
            indices, weight = self.dist.shard(global_indices)  # weight 1.0 unless a rank's share is uneven
            batch = collate(self.train_set, indices, self.device)
            with self.dist.gradient_sync(self.trainee, number == len(micro_batches)):
                with self._autocast():
                    terms = self.trainee(batch)
                loss = terms["loss"].float() / len(micro_batches) * weight
                self.scaler.scale(loss).backward()
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + _scalar(value) * weight / len(micro_batches)
        totals = self.dist.mean(totals)  # the global batch's losses
        if self.config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(totals["loss"]):
            raise FloatingPointError(
                f"loss is {totals['loss']} at step {self.step} (lr {lr:.3g}); lower the lr or turn amp off"
            )
        return {"lr": lr, **totals}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss terms and metrics over the whole validation set (weighted by batch size; under torchrun the
        batches are dealt over the ranks and the sums reduced, so every rank gets the same figures)."""
        self.dist.broadcast_buffers(self.model)
        self.model.eval()
        sums: dict[str, float] = {}
        count = 0
        n = len(self.val_set)
        if self.config.max_val_samples:
            n = min(n, self.config.max_val_samples)
        for start in self.dist.share(list(range(0, n, self.config.val_batch_size))):
            indices = list(range(start, min(n, start + self.config.val_batch_size)))
            batch = collate(self.val_set, indices, self.device)
            with self._autocast():
                terms = {k: _scalar(v) for k, v in self.task.losses(self.model, batch).items()}
            with torch.autocast(self.device.type, enabled=False):
                metrics = {k: float(v) for k, v in self.task.metrics(self.model, batch).items()}
            for key, value in {**terms, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + value * len(indices)
            count += len(indices)
        self.model.train()
        sums, count = self.dist.total(sums, count)
        return {key: value / max(count, 1) for key, value in sums.items()}

    def steps_per_epoch(self) -> int:
        batches = len(batches_of_epoch(len(self.train_set), self.config.batch_size, torch.arange(len(self.train_set))))
        steps = max(1, batches // self.config.grad_accum)
        if self.config.max_steps_per_epoch:
            steps = min(steps, self.config.max_steps_per_epoch)
        return steps

    # --- the loop -----------------------------------------------------------------------------------
    def fit(self) -> RunResult:
        config = self.config
        started = time.monotonic()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.history["events"].append(
            {"event": "start", "step": self.step, "epoch": self.epoch, "target_epochs": config.epochs,
             "time": time.time(), **self.dist.describe()}
        )
        stopped = "done"
        steps_per_epoch = self.steps_per_epoch()
        final_val: dict[str, float] = {}
        with StopFlag().installed() as stop_flag:
            while self.epoch < config.epochs and stopped == "done":
                stopped, train_loss = self._train_epoch(steps_per_epoch, stop_flag, started)
                if stopped != "done":
                    self.history["events"].append(
                        {"event": stopped, "step": self.step, "epoch": self.epoch, "position": self.position,
                         "time": time.time()}
                    )
                    self.dist.on_main(partial(self.ckpt.save_latest, self.state()))  # rank 0 writes
                    break
                final_val = self._end_epoch(train_loss, started)
        if stopped != "done" or not final_val:
            final_val = self.validate()
        self.history["events"].append(
            {"event": "end", "stopped": stopped, "step": self.step, "epoch": self.epoch, "time": time.time()}
        )
        self.write_log()
        if self.task.report is not None and self.dist.is_main:
            self.model.eval()
            with torch.no_grad():
                self.task.report(self.model, config, self.out_dir)
        self.dist.barrier()
        return RunResult(
            out_dir=self.out_dir,
            epochs_completed=self.epoch,
            step=self.step,
            stopped=stopped,
            best_val_loss=self.best_val_loss,
            val=final_val,
            wall_s=time.monotonic() - started,
            history=self.history,
            model=self.model,
        )

    def _epoch_batches(self) -> list[list[int]]:
        """The batches of the current epoch (data sets with `set_epoch` are told the epoch first)."""
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(self.epoch)
        order = epoch_order(len(self.train_set), self.config.seed, self.epoch)
        return batches_of_epoch(len(self.train_set), self.config.batch_size, order)

    def _stop_reason(self, stop_flag: StopFlag, started: float) -> str:
        """"done" to go on, else why the run stops before the next step."""
        if stop_flag.reason is not None:
            return stop_flag.reason
        budget = self.config.time_budget_s
        if budget and time.monotonic() - started >= budget:
            return "time_budget"
        return "done"

    def _train_epoch(self, steps_per_epoch: int, stop_flag: StopFlag, started: float) -> tuple[str, float]:
        """Optimizer steps from `self.position` to the end of the epoch, or until a stop is requested.

        Returns the stop reason ("done" when the epoch is complete) and the epoch's mean training loss
        (over the steps logged before a resume and the steps run here).
        """
        config = self.config
        batches = self._epoch_batches()
        bar = tqdm(total=steps_per_epoch, initial=self.position, disable=not self.progress,
                   desc=f"{config.model} epoch {self.epoch + 1}/{config.epochs}", unit="step",
                   dynamic_ncols=True, leave=False)
        logged = [r["loss"] for r in self.history["steps"] if r["epoch"] == self.epoch + 1]
        train_sum, train_count = sum(logged, 0.0), len(logged)
        stopped = "done"
        while self.position < steps_per_epoch:
            stopped = self.dist.agree(self._stop_reason(stop_flag, started))  # every rank stops together
            if stopped != "done":
                break
            first = self.position * config.grad_accum
            values = self._train_step(batches[first : first + config.grad_accum])
            self.step += 1
            self.position += 1
            train_sum += values["loss"]
            train_count += 1
            if self.step % config.log_every == 0 or self.position == steps_per_epoch:
                self.history["steps"].append({"step": self.step, "epoch": self.epoch + 1, **values})
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4g}", lr=f"{values['lr']:.2g}")
        bar.close()
        return stopped, train_sum / max(train_count, 1)

    def _end_epoch(self, train_loss: float, started: float) -> dict[str, float]:
        """Validate, record and checkpoint a completed epoch; returns its validation results."""
        config = self.config
        val = self.validate()
        self.epoch += 1
        self.position = 0
        is_best = val["loss"] < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, val["loss"])
        self.history["epochs"].append(
            {"epoch": self.epoch, "step": self.step, "train_loss": train_loss, "val_loss": val["loss"],
             "val": val, "lr": lr_at(max(self.step - 1, 0), config), "elapsed_s": time.monotonic() - started}
        )
        self.dist.on_main(partial(self.ckpt.save_epoch, self.state(), self.epoch, is_best))  # rank 0 writes
        self.write_log()
        if self.progress:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in val.items())
            tqdm.write(f"{config.model} epoch {self.epoch}/{config.epochs}: train loss {train_loss:.4g}, "
                       f"val {shown}")
        return val

    def write_log(self) -> None:
        """`log.json` (atomically) and the loss-curve PNG (rank 0 only under torchrun)."""
        from training.plots import plot_loss_curve

        if not self.dist.is_main:
            return
        log = {
            "model": self.config.model,
            "family": getattr(self.model, "family", ""),
            "model_config": self.model.get_config() if hasattr(self.model, "get_config") else {},
            "train_config": self.config.to_dict(),
            **self.history,
        }
        atomic_write_bytes(self.out_dir / LOG_NAME, json.dumps(log, indent=1, default=float).encode())
        plot_loss_curve(self.history, self.out_dir / CURVE_NAME, title=self.config.model)


def train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    init_state: dict[str, torch.Tensor] | None = None,
    task: Task | None = None,
) -> RunResult:
    """Train `config.model` until `config.epochs` epochs are complete (see the module docstring); under
    torchrun, as one of several DDP processes."""
    with session(config.device) as dist:
        return Trainer(
            config, out_dir, resume=resume, progress=progress, init_state=init_state, task=task, dist=dist
        ).fit()
