"""`TrainConfig`: everything a training run needs besides the model's own config.

One frozen dataclass that travels: it goes into every checkpoint, the JSON log and the store
manifest, and `from_dict(to_dict(c)) == c`. `--set key=value` on the command line edits the model config
(`latent_dim=64`), a data option (`data.crop_size=[64,64]`) or a TrainConfig field (`train.lr=3e-4`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

AmpMode = Literal["off", "auto", "bf16", "fp16"]
AMP_MODES: tuple[str, ...] = ("off", "auto", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: model, data, optimisation, schedule, budget and bookkeeping."""

    model: str  # registry name, e.g. "v3_small"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # fields of the family config
    data: dict[str, Any] = field(default_factory=dict)  # options of the task's data sets
    epochs: int = 10  # train until this many epochs are complete
    batch_size: int = 16
    val_batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    lr_warmup_steps: int = 50  # linear warm-up (optimizer steps)
    lr_decay_steps: int = 5000  # cosine horizon (optimizer steps), fixed per run
    lr_min_ratio: float = 0.1  # final LR = lr * lr_min_ratio
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    amp: AmpMode = "off"  # auto = fp16 on CUDA, bf16 on CPU
    seed: int = 0
    time_budget_s: float = 0.0  # stop (with a checkpoint) after this long; 0 = none
    max_steps_per_epoch: int = 0  # 0 = the whole epoch
    max_val_samples: int = 0  # validate on the first N samples; 0 = all
    device: str = "cpu"
    log_every: int = 1  # per-step log records every N optimizer steps
    keep_last: int | None = 3  # epoch files kept besides best and latest; 0 = none; None = every one
    min_free_disk_mb: float | None = None  # free space left after each checkpoint write; None = one checkpoint

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 0,
            "batch_size": self.batch_size >= 1,
            "val_batch_size": self.val_batch_size >= 1,
            "lr": self.lr > 0,
            "lr_warmup_steps": self.lr_warmup_steps >= 0,
            "lr_decay_steps": self.lr_decay_steps >= 1,
            "lr_min_ratio": 0.0 <= self.lr_min_ratio <= 1.0,
            "grad_accum": self.grad_accum >= 1,
            "grad_clip": self.grad_clip >= 0,
            "time_budget_s": self.time_budget_s >= 0,
            "max_steps_per_epoch": self.max_steps_per_epoch >= 0,
            "max_val_samples": self.max_val_samples >= 0,
            "log_every": self.log_every >= 1,
            "keep_last": self.keep_last is None or self.keep_last >= 0,
            "min_free_disk_mb": self.min_free_disk_mb is None or self.min_free_disk_mb >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is out of range")
        if self.amp not in AMP_MODES:
            raise ValueError(f"TrainConfig.amp={self.amp!r}; allowed: {', '.join(AMP_MODES)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; unknown keys are an error naming them. The former field
        `keep_epoch_checkpoints` (recipes, old checkpoints; 0 = keep all) sets `keep_last` (None = keep all)."""
        values = dict(data)
        if "keep_epoch_checkpoints" in values:
            values["keep_last"] = values.pop("keep_epoch_checkpoints") or None
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def parse_value(text: str) -> Any:
    """`--set` value: JSON when it parses (numbers, lists, true/false/null), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: TrainConfig, assignments: list[str]) -> TrainConfig:
    """Apply `key=value` strings: `train.X` sets a TrainConfig field, `data.X` a data option, and a plain
    `X` (or `model.X`) a field of the model config (checked when the model is built)."""
    fields_ = {f.name for f in dataclasses.fields(TrainConfig)}
    changes: dict[str, Any] = {}
    model_overrides = dict(config.model_overrides)
    data = dict(config.data)
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value; got {item!r}")
        value = parse_value(raw)
        if key.startswith("train."):
            name = key[len("train.") :]
            if name not in fields_ or name in ("model", "model_overrides", "data"):
                raise ValueError(f"--set {key}: not a TrainConfig field; allowed: {', '.join(sorted(fields_))}")
            changes[name] = tuple(value) if name == "betas" else value
        elif key.startswith("data."):
            data[key[len("data.") :]] = value
        else:
            model_overrides[key.removeprefix("model.")] = value
    return dataclasses.replace(config, model_overrides=model_overrides, data=data, **changes)
