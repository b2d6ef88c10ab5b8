"""A tiny family used to test the training infrastructure on its own (loop, checkpoints, export, store).

`import tests.training.toy_family` registers the model `toy_ae` (family "toy") and its task; the CLI
loads it with `--import tests.training.toy_family`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from training import image_quality
from training.config import TrainConfig
from training.models.base import ExportOp, OpModule, config_to_dict
from training.registry import _REGISTRY, register_model
from training.tasks import Task, register_task


@dataclass(frozen=True)
class ToyConfig:
    size: int = 16
    channels: int = 4
    latent_dim: int = 8
    noise: float = 0.0  # training-time latent noise (exercises the torch RNG inside the loss)
    norm: bool = True  # BatchNorm after the convolutions (False: batch-size independent, for grad accum)


class ToyAutoencoder(nn.Module):
    family: ClassVar[str] = "toy"

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        c = config.channels

        def norm() -> nn.Module:
            return nn.BatchNorm2d(c) if config.norm else nn.Identity()

        self.enc = nn.Sequential(
            nn.Conv2d(1, c, 3, stride=2, padding=1),
            norm(),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False),
            norm(),
            nn.ReLU(),
        )
        self.to_latent = nn.Linear(c, config.latent_dim)
        side = config.size // 4
        self.from_latent = nn.Linear(config.latent_dim, c * side * side)
        self.dec = nn.Sequential(
            nn.ConvTranspose2d(c, c, 4, stride=2, padding=1),
            norm(),
            nn.ReLU(),
            nn.ConvTranspose2d(c, 1, 4, stride=2, padding=1),
            nn.Sigmoid(),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_latent(self.enc(x).mean(dim=(2, 3)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        side = self.config.size // 4
        return self.dec(self.from_latent(z).view(z.shape[0], self.config.channels, side, side))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def get_config(self) -> dict[str, Any]:
        return config_to_dict(self.config)

    def capabilities(self) -> list[str]:
        return ["encode", "decode", "reconstruct", "sample"]

    def preprocessing(self) -> dict[str, Any]:
        return {
            "channels": 1,
            "input_size": [self.config.size, self.config.size],
            "dynamic_hw": True,
            "min_hw": [4, 4],
        }

    def sampler_spec(self) -> dict[str, Any]:
        return {"kind": "prior_gaussian", "latent_dim": self.config.latent_dim}

    def export_ops(self, batch_size: int = 2) -> list[ExportOp]:
        s = self.config.size
        image = torch.rand(batch_size, 1, s, s)
        latent = torch.randn(batch_size, self.config.latent_dim)
        return [
            ExportOp(
                "encode",
                OpModule(self, "encode"),
                (image,),
                ["image"],
                ["latent"],
                dynamic_hw=True,
                check_shapes=[((batch_size + 1, 1, s + 8, s - 4),)],
                aoti=False,
            ),
            ExportOp(
                "decode",
                OpModule(self, "decode"),
                (latent,),
                ["latent"],
                ["image"],
                check_shapes=[((1, self.config.latent_dim),)],
                aoti=False,
            ),
            ExportOp("reconstruct", OpModule(self, "forward"), (image,), ["image"], ["reconstruction"], aoti=False),
        ]


class Blobs(Dataset):
    """Smooth random images; item i of epoch e is a pure function of (seed, e, i)."""

    def __init__(self, n: int, size: int, seed: int, split: str) -> None:
        self.n, self.size, self.seed, self.split, self.epoch = n, size, seed, split, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        epoch = self.epoch if self.split == "train" else -1
        g = torch.Generator().manual_seed(self.seed * 7919 + (epoch + 2) * 104729 + i)
        coarse = torch.rand(1, 1, 4, 4, generator=g)
        image = F.interpolate(coarse, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return {"image": image[0]}


def toy_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    x = batch["image"]
    z = model.encode(x)
    if model.training and model.config.noise:
        z = z + model.config.noise * torch.randn_like(z)
    mse = F.mse_loss(model.decode(z), x)
    return {"loss": mse, "mse": mse.detach()}


@torch.no_grad()
def toy_metrics(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    x = batch["image"]
    y = model(x)
    return {"psnr": float(image_quality.psnr(y, x)), "mse": float(image_quality.mse(y, x))}


def toy_datasets(model: nn.Module, config: TrainConfig) -> tuple[Dataset, Dataset]:
    n = int(config.data.get("n", 24))
    return (
        Blobs(n, model.config.size, config.seed, "train"),
        Blobs(int(config.data.get("val_n", 8)), model.config.size, config.seed, "val"),
    )


if "toy_ae" not in _REGISTRY:

    @register_model("toy_ae")
    def toy_ae(**overrides: Any) -> ToyAutoencoder:
        return ToyAutoencoder(ToyConfig(**overrides))


register_task(
    "toy",
    Task(
        "toy",
        toy_losses,
        toy_metrics,
        toy_datasets,
        defaults={"epochs": 2, "batch_size": 4, "lr": 3e-3, "lr_warmup_steps": 2, "lr_decay_steps": 20},
    ),
)
