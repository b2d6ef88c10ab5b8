"""What one model's evaluation produces (`Evaluation`), and the shared scoring: per-image PSNR/SSIM, the
goal against the equal-size baselines, and the usual `input · model · baselines` comparison."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.image_quality import ssim
from training.quality.artifacts import StoreVersion
from training.quality.figures import comparison_figure

GOAL_MARGIN_DB = 1.0  # an autoencoder should beat its best equal-size baseline by this much (issue 9)


@dataclass
class Evaluation:
    """Held-out data, one entry per method (model first), the goal, family-specific numbers, figures."""

    data: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    goal: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"data": self.data, "methods": self.methods, "goal": self.goal, **self.extra, "figures": self.figures}


def per_image_psnr(reference: torch.Tensor, estimate: torch.Tensor, data_range: float = 1.0) -> np.ndarray:
    """PSNR (dB) of each image of a batch (MSE floored at 1e-10 * range², as `image_quality.psnr`)."""
    mse = (reference.float() - estimate.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10 * data_range**2)
    return (10.0 * torch.log10(data_range**2 / mse)).numpy()


def score(
    reference: torch.Tensor, estimate: torch.Tensor, data_range: float = 1.0
) -> tuple[dict[str, Any], np.ndarray]:
    """({"psnr", "ssim"} batch means, per-image PSNR) of an estimate of (B, C, H, W) references."""
    psnrs = per_image_psnr(reference, estimate, data_range)
    side = min(reference.shape[-2:])
    window = min(11, side - (1 - side % 2))
    quality = float(ssim(reference.float(), estimate.float(), data_range, window=window)) if window >= 3 else None
    return {"psnr": round(float(psnrs.mean()), 3), "ssim": None if quality is None else round(quality, 4)}, psnrs


def goal_against(methods: dict[str, dict[str, Any]], baselines: list[str], margin_db: float = GOAL_MARGIN_DB) -> dict:
    """The model's PSNR against the best of `baselines`: PASS when it is ahead by `margin_db` or more."""
    best = max(baselines, key=lambda b: methods[b]["psnr"])
    margin = methods["model"]["psnr"] - methods[best]["psnr"]
    return {
        "goal": f"model PSNR >= best equal-size baseline + {margin_db:g} dB",
        "baseline": best,
        "margin_db": round(margin, 2),
        "target_db": margin_db,
        "status": "PASS" if margin >= margin_db else "MISS",
    }


def to_unit(version: StoreVersion, output: np.ndarray) -> torch.Tensor:
    """A model image output mapped from the manifest's output range to [0, 1]."""
    low, high = version.manifest.preprocessing.output_range
    return ((torch.from_numpy(np.asarray(output, dtype=np.float32)) - low) / (high - low)).clamp(0.0, 1.0)


def compare_reconstructions(
    version: StoreVersion,
    images: torch.Tensor,
    baselines: dict[str, tuple[torch.Tensor, int]],
    data: dict[str, Any],
    out_dir: Path,
    examples: list[int],
    sources: list[str],
    figure_name: str | None = None,
) -> Evaluation:
    """The `reconstruct` op on held-out images next to baseline reconstructions ((images, values) each):
    PSNR/SSIM per method, mean PSNR per source (picture, configuration), the goal against the baselines
    and the `input · model · baselines` figure of the `examples` (`figure_name`, default `<model>.png`)."""
    reconstruction = to_unit(version, version.op("reconstruct")(images.numpy()))
    outputs = {"model": (reconstruction, version.latent_size()), **baselines}
    methods: dict[str, dict[str, Any]] = {}
    psnrs: dict[str, np.ndarray] = {}
    for name, (estimate, values) in outputs.items():
        summary, psnrs[name] = score(images, estimate)
        methods[name] = {"values": int(values), **summary}
    columns = {"input": images[examples].numpy(), **{k: v[0][examples].numpy() for k, v in outputs.items()}}
    figure = comparison_figure(
        out_dir / (figure_name or f"{version.name}.png"),
        f"{version.name}: held-out {data['name']} (input · model · equal-size baselines)",
        columns,
        {k: v[examples] for k, v in psnrs.items()},
    )
    evaluation = Evaluation(data, methods, goal_against(methods, list(baselines)), figures=[str(figure)])
    names = np.asarray(sources)
    evaluation.extra["psnr_by_source"] = {
        source: {k: round(float(v[names == source].mean()), 2) for k, v in psnrs.items()}
        for source in dict.fromkeys(sources)
    }
    return evaluation
