"""Model name -> what training it needs: the family's objective functions, its data sets and a
default `TrainConfig`.

A `Task` is looked up by the model's `family` (the fixture folder name), so every registered variant
of a family trains the same way. `register_task` lets tests and plug-ins add families.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from training.config import TrainConfig
from training.registry import create_model, family_module

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
MetricFn = Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, float]]
DatasetFactory = Callable[[nn.Module, TrainConfig], tuple[Dataset, Dataset]]
# Writes a family's pictures of a finished run into its directory; returns the files written.
ReportFn = Callable[[nn.Module, TrainConfig, Path], list[Path]]


@dataclass(frozen=True)
class Task:
    """How one family trains."""

    family: str
    losses: LossFn
    metrics: MetricFn
    datasets: DatasetFactory
    defaults: dict[str, Any]  # TrainConfig field defaults for this family (besides `model`)
    report: ReportFn | None = None  # run after every training run (embedding maps, sample grids)

    def default_config(self, model_name: str, **changes: Any) -> TrainConfig:
        return TrainConfig(model=model_name, **{**self.defaults, **changes})


_TASKS: dict[str, Task | Callable[[], Task]] = {}


def register_task(family: str, task: Task | Callable[[], Task]) -> None:
    """Register a task (or a zero-argument factory building it lazily) for a family."""
    _TASKS[family] = task


def task_for_family(family: str) -> Task:
    if family not in _TASKS:
        raise KeyError(f"no training task for family {family!r}; known: {', '.join(sorted(_TASKS))}")
    entry = _TASKS[family]
    if not isinstance(entry, Task):
        entry = entry()
        _TASKS[family] = entry
    return entry


def build_model(config: TrainConfig) -> nn.Module:
    """The model a TrainConfig describes (registry name + config overrides)."""
    return create_model(config.model, **config.model_overrides)


def task_for_model(model: nn.Module) -> Task:
    family = getattr(model, "family", None)
    if family is None:
        raise TypeError(f"{type(model).__name__} has no `family` attribute (see training/models/base.py)")
    return task_for_family(family)


def default_config(model_name: str, **changes: Any) -> TrainConfig:
    """Default TrainConfig of a registered model (its family's defaults)."""
    return task_for_model(create_model(model_name)).default_config(model_name, **changes)


def _data_options(config: TrainConfig, allowed: tuple[str, ...]) -> dict[str, Any]:
    unknown = sorted(set(config.data) - set(allowed))
    if unknown:
        raise ValueError(f"unknown data option(s) {unknown} for model {config.model!r}; allowed: {', '.join(allowed)}")
    return dict(config.data)


def _family_functions(family: str) -> tuple[LossFn, MetricFn]:
    """The family's objective from `training.losses` (see `training.registry.FAMILIES`)."""
    module = family_module(family, "losses")
    return module.training_losses, module.validation_metrics


# --- the families ------------------------------------------------------------------------------------


def _v3_datasets(model: nn.Module, config: TrainConfig) -> tuple[Dataset, Dataset]:
    """Random crops of scikit-image pictures at the model's input size (split by image); with the data
    option `source: droplets`, frames of droplet videos (training/data/droplets.py)."""
    from training.data.images import DEFAULT_VAL_IMAGES, SkimageCrops

    if config.data.get("source") == "droplets":
        from training.data.droplets import droplet_datasets

        return droplet_datasets(model.preprocessing()["input_size"], config)
    options = _data_options(config, ("samples_per_epoch", "val_samples", "val_images", "crop_size", "augment"))
    crop = tuple(options.get("crop_size", model.preprocessing()["input_size"]))
    val_images = tuple(options.get("val_images", DEFAULT_VAL_IMAGES))
    train = SkimageCrops(
        "train",
        crop,
        samples_per_epoch=int(options.get("samples_per_epoch", 256)),
        val_images=val_images,
        seed=config.seed,
        augment=bool(options.get("augment", False)),
    )
    val = SkimageCrops(
        "val",
        crop,
        samples_per_epoch=int(options.get("val_samples", 16)),
        val_images=val_images,
        seed=config.seed,
    )
    return train, val


def _v3_task() -> Task:
    losses, metrics = _family_functions("autoencoder-cnn-v3")
    return Task(
        "autoencoder-cnn-v3",
        losses,
        metrics,
        _v3_datasets,
        defaults={
            "epochs": 20,
            "batch_size": 8,
            "val_batch_size": 8,
            "lr": 1e-3,
            "lr_warmup_steps": 20,
            "lr_decay_steps": 2000,
            "weight_decay": 1e-5,
        },
    )


register_task("autoencoder-cnn-v3", _v3_task)


def _stem_datasets(model: nn.Module, config: TrainConfig) -> tuple[Dataset, Dataset]:
    """The committed 4D-STEM SrTiO3 simulation (disjoint scan positions for validation)."""
    from training.data.stem_4d import Stem4DDataset

    options = _data_options(config, ("path", "block", "configs"))
    return Stem4DDataset("train", **options), Stem4DDataset("val", **options)


def _stem_report(model: nn.Module, config: TrainConfig, out_dir: Path) -> list[Path]:
    """The latent embedding maps over the scan grid of the first simulated configuration (one PNG)."""
    from training.data.stem_4d import Stem4DDataset
    from training.visualize_stem import render_embedding_maps

    scan = Stem4DDataset("all", **_data_options(config, ("path", "block", "configs")))
    config_index = scan.config_indices[0]
    path = out_dir / f"embedding_maps_config{config_index}.png"
    render_embedding_maps(model, scan.config_images(config_index), tuple(scan.scan_shape), path)
    return [path]


def _stem_task() -> Task:
    losses, metrics = _family_functions("stem-autoencoder")
    return Task(
        "stem-autoencoder",
        losses,
        metrics,
        _stem_datasets,
        report=_stem_report,
        defaults={
            "epochs": 5,
            "batch_size": 16,
            "val_batch_size": 32,
            "lr": 1e-3,
            "lr_warmup_steps": 20,
            "lr_decay_steps": 5000,
            "max_val_samples": 128,
        },
    )


def _conv_decoder_datasets(model: nn.Module, config: TrainConfig) -> tuple[Dataset, Dataset]:
    """Grayscale scikit-image patches (and LFW faces) at the VAE's output size."""
    from training.data.patches import ImagePatches

    options = _data_options(config, ("scales", "include_faces", "val_every", "augment"))
    pre = model.preprocessing()
    size = pre.get("input_size")
    if size is None or pre.get("channels", 1) != 1 or size[0] != size[1]:
        raise ValueError(
            f"model {config.model!r} cannot train on grayscale square patches "
            f"(preprocessing {pre}); only the conv-decoder VAE variants train here"
        )
    if "scales" in options:
        options["scales"] = tuple(options["scales"])
    return ImagePatches("train", patch_size=size[0], **options), ImagePatches("val", patch_size=size[0], **options)


def _conv_decoder_task() -> Task:
    losses, metrics = _family_functions("conv-decoder")
    return Task(
        "conv-decoder",
        losses,
        metrics,
        _conv_decoder_datasets,
        defaults={
            "epochs": 10,
            "batch_size": 64,
            "val_batch_size": 128,
            "lr": 2e-3,
            "lr_warmup_steps": 20,
            "lr_decay_steps": 3000,
            "max_val_samples": 512,
        },
    )


def _progressive_datasets(model: nn.Module, config: TrainConfig) -> tuple[Dataset, Dataset]:
    """One scikit-image picture measured once through a forward operator (decoder-only fitting)."""
    from training.data.single_image import SingleImageDataset

    options = _data_options(
        config,
        (
            "operator",
            "image",
            "noise_std",
            "observed_fraction",
            "aperture_radius",
            "value_range",
            "steps_per_epoch",
        ),
    )
    steps = int(options.pop("steps_per_epoch", 50))
    arch = model.arch
    if "value_range" in options:
        options["value_range"] = tuple(options["value_range"])
    options.setdefault("operator", "identity")
    options.setdefault("noise_std", 0.05)
    grid = arch.input_size if options["operator"] != "identity" else None
    train = SingleImageDataset.from_options(
        arch.output_size, grid_size=grid, seed=config.seed, length=steps * config.batch_size, **options
    )
    return train, SingleImageDataset.from_options(
        arch.output_size, grid_size=grid, seed=config.seed, length=1, **options
    )


def _progressive_task() -> Task:
    losses, metrics = _family_functions("progressive-decoder")
    return Task(
        "progressive-decoder",
        losses,
        metrics,
        _progressive_datasets,
        defaults={
            "epochs": 4,
            "batch_size": 1,
            "val_batch_size": 1,
            "lr": 1e-2,
            "lr_warmup_steps": 10,
            "lr_decay_steps": 400,
        },
    )


def _diffusion_datasets(model: nn.Module, config: TrainConfig) -> tuple[Dataset, Dataset]:
    """Procedural design layouts conditioned on (goal, format, tone); validation from another seed."""
    from training.data.layouts import DesignLayouts

    options = _data_options(config, ("length", "val_length"))
    size = model.config.image_size
    return (
        DesignLayouts(size=size, length=int(options.get("length", 2048)), seed=config.seed),
        DesignLayouts(size=size, length=int(options.get("val_length", 64)), seed=config.seed + 10_000),
    )


def _diffusion_report(model: nn.Module, config: TrainConfig, out_dir: Path) -> list[Path]:
    """A grid of DDIM samples (50 steps, seed 0) over a spread of conditions."""
    from training.data.layouts import condition_grid
    from training.visualize_diffusion import sample_grid_png

    return [sample_grid_png(model, None, condition_grid(), out_dir / "samples.png", steps=50, seed=0)]


def _diffusion_task() -> Task:
    losses, metrics = _family_functions("diffusion-decoder")
    return Task(
        "diffusion-decoder",
        losses,
        metrics,
        _diffusion_datasets,
        report=_diffusion_report,
        defaults={
            "epochs": 10,
            "batch_size": 16,
            "val_batch_size": 32,
            "lr": 1e-3,
            "lr_warmup_steps": 50,
            "lr_decay_steps": 5000,
            "grad_clip": 1.0,
        },
    )


register_task("stem-autoencoder", _stem_task)
register_task("conv-decoder", _conv_decoder_task)
register_task("progressive-decoder", _progressive_task)
register_task("diffusion-decoder", _diffusion_task)
