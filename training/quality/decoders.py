"""Held-out evaluations of the decoder families: the ProgressiveDecoder (its render against the clean object
next to the measurement it was fitted to) and the diffusion U-Net (ε-MSE per timestep band on held-out
layouts, and a DDIM sample grid per condition, sampled through the `denoise` artifact as the service does)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training.quality.artifacts import StoreVersion
from training.quality.evaluation import Evaluation, score, to_unit
from training.quality.figures import comparison_figure, image_grid

TIMESTEP_BANDS = 4           # ε-MSE over t in [0, T/4), [T/4, T/2), ...
HELDOUT_LAYOUTS = 128
SAMPLES_PER_CONDITION = 4
SAMPLE_STEPS = 50
SEED = 0


def evaluate_progressive(version: StoreVersion, out_dir: Path) -> Evaluation:
    """The rendered object against the clean one; the noisy measurement's own PSNR beside it."""
    from training.config import TrainConfig
    from training.tasks import task_for_model

    model = version.rebuilt_model()
    config = TrainConfig.from_dict(version.manifest.training["train_config"])
    measured = task_for_model(model).datasets(model, config)[1]      # the one (measurement, target) pair
    target = measured.target[None]
    render = torch.from_numpy(version.op("decode")())
    low, high = version.manifest.preprocessing.output_range
    rendered = (measured.operator.object_of(render) - low) / (high - low)
    columns = {"clean object": target, "model": rendered.clamp(0.0, 1.0)}
    if measured.operator.name == "identity":      # a measurement in object space has a PSNR of its own
        columns["measurement"] = measured.measurement[None]
    methods, psnrs = {}, {}
    for name in list(columns)[1:]:
        methods[name], psnrs[name] = score(target, columns[name])
        methods[name]["values"] = None
    options = dict(config.data)
    data = {
        "name": "clean object",
        "split": "the clean object of training.data.single_image (the run saw only its measurement)",
        "image": options.get("image", "camera"),
        "items": 1,
        "what": f"{options.get('operator', 'identity')} measurement with noise_std {options.get('noise_std')}",
    }
    figure = comparison_figure(
        out_dir / f"{version.name}.png",
        f"{version.name}: render vs the clean object and the measurement it was fitted to",
        {k: np.clip(v.numpy(), -0.5, 1.5) for k, v in columns.items()},
        psnrs,
    )
    evaluation = Evaluation(data, methods, figures=[str(figure)])
    if "measurement" in methods:
        gain = methods["model"]["psnr"] - methods["measurement"]["psnr"]
        evaluation.extra["gain_over_measurement_db"] = round(gain, 2)
    return evaluation


def _eps_by_band(version: StoreVersion, alpha_bar: np.ndarray, images: np.ndarray, conditions: np.ndarray) -> dict:
    """{"[lo,hi)": {"eps_mse", "x0_psnr"}} of the `denoise` op over timesteps drawn in each band."""
    rng = np.random.default_rng(SEED)
    num_t = len(alpha_bar)
    bands = {}
    for band in range(TIMESTEP_BANDS):
        low, high = band * num_t // TIMESTEP_BANDS, (band + 1) * num_t // TIMESTEP_BANDS
        t = rng.integers(low, high, len(images))
        eps = rng.standard_normal(images.shape).astype(np.float32)
        a = alpha_bar[t].reshape(-1, 1, 1, 1)
        x_t = (np.sqrt(a) * images + np.sqrt(1 - a) * eps).astype(np.float32)
        predicted = version.op("denoise")(x_t, t.astype(np.int64), conditions)
        x0 = np.clip((x_t - np.sqrt(1 - a) * predicted) / np.sqrt(a), -1.0, 1.0)
        x0_psnr, _ = score(torch.from_numpy(images), torch.from_numpy(x0), data_range=2.0)
        bands[f"[{low},{high})"] = {
            "eps_mse": round(float(np.mean((predicted - eps) ** 2)), 5),
            "x0_psnr": x0_psnr["psnr"],
        }
    return bands


def _ddim_samples(version: StoreVersion, alpha_bar: np.ndarray, conditions: np.ndarray) -> np.ndarray:
    """Deterministic DDIM (η = 0) through the `denoise` artifact with the service's step (`app.ddim`)."""
    from app.ddim import ddim_step, ddim_timesteps

    spec = version.manifest.sampler
    timesteps = ddim_timesteps(len(alpha_bar), SAMPLE_STEPS)
    stride = len(alpha_bar) // SAMPLE_STEPS
    x = np.random.default_rng(SEED).standard_normal((len(conditions), *spec.image_shape)).astype(np.float32)
    eta = np.zeros(len(x), dtype=np.float32)
    for t in timesteps:
        eps = version.op("denoise")(x, np.full(len(x), t, dtype=np.int64), conditions)
        previous = alpha_bar[t - stride] if t - stride >= 0 else np.float32(1.0)
        x = ddim_step(x, eps, np.full(len(x), alpha_bar[t]), np.full(len(x), previous), eta, None,
                      spec.clip_denoised)
    return x


def evaluate_diffusion(version: StoreVersion, out_dir: Path, count: int = HELDOUT_LAYOUTS) -> Evaluation:
    """ε-MSE per timestep band on held-out layouts; a grid of a held-out layout and samples per condition."""
    from app.ddim import schedule_from_spec
    from training.data.layouts import FORMATS, GOALS, HELDOUT_SEED, DesignLayouts, condition_grid, render_layout

    spec = version.manifest.sampler
    _, alpha_bar = schedule_from_spec(spec)
    layouts = DesignLayouts.heldout(size=spec.image_shape[-1], length=count)
    items = [layouts[i] for i in range(count)]
    images = torch.stack([item["image"] for item in items]).numpy()
    conditions = torch.stack([item["condition"] for item in items]).numpy()
    bands = _eps_by_band(version, alpha_bar, images, conditions)
    grid_conditions = condition_grid().numpy()
    repeated = np.repeat(grid_conditions, SAMPLES_PER_CONDITION, axis=0)
    samples = to_unit(version, _ddim_samples(version, alpha_bar, repeated)).numpy()
    rows, labels = [], []
    for r, (goal, fmt, tone) in enumerate(grid_conditions):
        rng = np.random.default_rng((HELDOUT_SEED, r))
        reference = (render_layout(int(goal), int(fmt), float(tone), spec.image_shape[-1], rng) + 1) / 2
        rows.append([reference, *samples[r * SAMPLES_PER_CONDITION : (r + 1) * SAMPLES_PER_CONDITION]])
        labels.append(f"{GOALS[int(goal)]}\n{FORMATS[int(fmt)]}, tone {tone:.1f}")
    figure = image_grid(
        out_dir / f"{version.name}.png",
        f"{version.name}: a held-out layout · {SAMPLES_PER_CONDITION} DDIM samples ({SAMPLE_STEPS} steps) "
        "per condition",
        rows,
        labels,
        ["held-out"] + [f"sample {k + 1}" for k in range(SAMPLES_PER_CONDITION)],
    )
    data = {
        "name": "layouts",
        "split": f"training.data.layouts.DesignLayouts.heldout (seed {HELDOUT_SEED}, reserved)",
        "items": count,
        "what": "procedural layouts drawn from a seed no training or validation set may use",
    }
    overall = float(np.mean([b["eps_mse"] for b in bands.values()]))
    methods = {"model": {"values": None, "psnr": None, "ssim": None, "eps_mse": round(overall, 5)}}
    return Evaluation(data, methods, extra={"eps_mse_by_t": bands}, figures=[str(figure)])
