"""Held-out evaluations of the autoencoder families: V3 (photos vs the bicubic thumbnail), the 4D-STEM
autoencoder (held-out scan positions vs PCA and NMF fitted on the training scans) and the conv-decoder
VAE (held-out patches vs the bicubic thumbnail; KL; a figure of prior samples)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.quality.artifacts import StoreVersion
from training.quality.baselines import (
    SubspaceBaseline,
    bicubic_thumbnail,
    render_bound,
    rendered_subspace,
    thumbnail_shape,
)
from training.quality.cross_material import evaluate_cross_material
from training.quality.evaluation import Evaluation, compare_reconstructions, score, to_unit
from training.quality.figures import image_grid

CROPS_PER_PICTURE = 8      # V3: fixed crops of every held-out picture
DROPLET_FRAMES = 40        # V3 trained on droplet videos: one frame of each of this many held-out videos
# V3: the linear reference (PCA at the render size) fits on 60 M pixels of training crops/frames, at least
# latent + 64 and at most 3 x latent of them (201x201 crops, latent 512: 1485; 152x1280 strips: 576)
REFERENCE_TRAIN_PIXELS = 60_000_000
SAMPLES_SEED = 0           # VAE prior samples


def _train_data_options(version: StoreVersion) -> dict[str, Any]:
    """The data options the version's training run used (its recipe's `data:`)."""
    return dict(version.manifest.training.get("train_config", {}).get("data", {}))


def _first_of_each(sources: list[str], limit: int) -> list[int]:
    """Indices of the first item of each source, at most `limit` of them."""
    firsts = {name: i for i, name in reversed(list(enumerate(sources)))}
    return sorted(firsts.values())[:limit]


def _thumbnail(images: torch.Tensor, latent: int) -> tuple[str, tuple[torch.Tensor, int]]:
    h, w = thumbnail_shape(tuple(images.shape[-2:]), latent)
    return f"bicubic {w}x{h}", bicubic_thumbnail(images, latent)


def _droplet_frames(version: StoreVersion, size: tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
    """One frame of each of the first `DROPLET_FRAMES` videos of the droplet stream no autoencoder reads."""
    from training.data.droplets import generate_sequence, stream_seed

    options = _train_data_options(version)
    view = options.get("view", "strip" if size[1] > 4 * size[0] else "crop")
    length = int(options.get("video_frames", 64))
    seed = int(version.manifest.training.get("train_config", {}).get("seed", 0))
    frames = []
    for index in range(DROPLET_FRAMES):
        video = stream_seed("lstm-heldout", index, seed)
        frame = int(np.random.default_rng([video, 3]).integers(length))
        frames.append(generate_sequence(video, length, view, size, indices=[frame]).frames[0][None])
    data = {
        "name": "droplet frames",
        "split": "training.data.droplets stream 'lstm-heldout' (videos no autoencoder run reads)",
        "items": DROPLET_FRAMES,
        "what": f"one random {view} frame ({size[0]}x{size[1]}) of each of {DROPLET_FRAMES} held-out videos",
    }
    return torch.from_numpy(np.stack(frames).astype(np.float32)), data


def evaluate_v3(version: StoreVersion, out_dir: Path, per_picture: int = CROPS_PER_PICTURE) -> Evaluation:
    """Fixed crops of the held-out pictures (or, for a model trained on droplet videos, frames of held-out
    videos) at the model's input size: model vs bicubic thumbnail."""
    from training.data.images import HELDOUT_IMAGES, heldout_crops

    size = version.manifest.preprocessing.input_size
    wide = size[1] > 2 * size[0]
    if _train_data_options(version).get("source") == "droplets":
        images, data = _droplet_frames(version, size)
        name, thumbnail = _thumbnail(images, version.latent_size())
        examples = [int(i) for i in np.linspace(0, len(images) - 1, 3 if wide else 6)]
        sources = ["droplet frames"] * len(images)
        evaluation = compare_reconstructions(version, images, {name: thumbnail}, data, out_dir, examples, sources)
        return _with_render_references(version, images, evaluation)
    images, sources = heldout_crops(size, per_picture)
    name, thumbnail = _thumbnail(images, version.latent_size())
    data = {
        "name": "pictures",
        "split": "training.data.images.HELDOUT_IMAGES (heldout_crops)",
        "pictures": list(HELDOUT_IMAGES),
        "items": len(images),
        "what": f"{per_picture} fixed {size[0]}x{size[1]} crops of each bundled scikit-image picture that no "
        "training or validation split reads",
    }
    evaluation = compare_reconstructions(
        version, images, {name: thumbnail}, data, out_dir, _first_of_each(sources, 3 if wide else 6), sources
    )
    return _with_render_references(version, images, evaluation)


def _training_split(version: StoreVersion, model: torch.nn.Module, **data_changes: Any) -> Any:
    """The training split the version was trained on: its training task's own data set, built from the
    manifest's train config (the recipe's data options, with `data_changes`), at epoch 0."""
    from training.config import TrainConfig
    from training.tasks import default_config, task_for_model

    recorded = version.manifest.training.get("train_config") or {}
    raw = {**default_config(version.manifest.architecture).to_dict(), **recorded}
    config = TrainConfig.from_dict({**raw, "data": {**raw.get("data", {}), **data_changes}})
    return task_for_model(model).datasets(model, config)[0]


def _with_render_references(version: StoreVersion, images: torch.Tensor, evaluation: Evaluation) -> Evaluation:
    """Add `references`: the architecture's own bound (the least-squares render at the decoder's square size,
    enlarged as the decoder enlarges it) and the best linear code with as many values as the latent at that
    render (PCA on training items). They say how far a missed goal is from what the design allows."""
    model = version.rebuilt_model()
    side = int(model.config.rendered_size)
    latent = version.latent_size()
    count = min(3 * latent, max(latent + 64, REFERENCE_TRAIN_PIXELS // (images.shape[-2] * images.shape[-1])))
    dataset = _training_split(version, model, samples_per_epoch=count)
    train = torch.stack([dataset[i]["image"] for i in range(count)])
    what = f"{count} items of its training split ({type(dataset).__name__} 'train')"
    outputs = {
        f"bound: best {side}x{side} render": (render_bound(images, side), side * side,
                                              "least-squares render, enlarged as the decoder does"),
        f"reference: PCA-{latent} at {side}x{side}": (rendered_subspace(train, images, latent, side), latent,
                                                    f"linear code fitted on {what}"),
    }
    evaluation.extra["references"] = {
        name: {"values": values, **score(images, estimate)[0], "what": note}
        for name, (estimate, values, note) in outputs.items()
    }
    return evaluation


def evaluate_stem(version: StoreVersion, out_dir: Path) -> Evaluation:
    """Held-out scan positions of the SrTiO3 simulation: model vs PCA and NMF fitted on the training scans;
    then the same on another material (`training.quality.cross_material`, in `cross_material`)."""
    from training.data.stem_4d import HELDOUT_PATH, Stem4DDataset

    heldout = Stem4DDataset("all", HELDOUT_PATH)
    train = Stem4DDataset("train", **_train_data_options(version))
    images, latent = heldout.images, version.latent_size()
    size = version.manifest.preprocessing.input_size
    if tuple(images.shape[-2:]) != tuple(size) or tuple(train.images.shape[-2:]) != tuple(size):
        raise ValueError(f"{version.name} takes {size} patterns; the held-out set has {tuple(images.shape[-2:])}")
    fitted = {}
    for kind in ("pca", "nmf"):
        baseline = SubspaceBaseline(kind, latent).fit(train.images.numpy())
        fitted[f"{kind.upper()}-{baseline.n_components}"] = baseline
    baselines = {
        name: (torch.from_numpy(f.reconstruct(images.numpy())).clamp(0.0, 1.0), f.n_components)
        for name, f in fitted.items()
    }
    configs = [
        f"defocus {c['defocus_A']:g} Å, {c['thickness_A']:.1f} Å thick" for c in heldout.metadata["configs"]
    ]
    sources = [configs[c] for c in heldout.configs]
    data = {
        "name": "scan positions",
        "split": "training.data.stem_4d.HELDOUT_PATH",
        "file": f"training/data/assets/{HELDOUT_PATH.name}",
        "items": len(images),
        "what": f"SrTiO3, every configuration, {heldout.scan_shape[0]}x{heldout.scan_shape[1]} scan positions "
        f"offset by half a training step (origin {heldout.metadata['scan_origin_A']:.3f} Å): no training or "
        "validation position",
        "baselines_fitted_on": f"Stem4DDataset('train'): {len(train)} training patterns",
    }
    examples = [int(i) for i in np.linspace(0, len(images) - 1, 4)]
    evaluation = compare_reconstructions(version, images, baselines, data, out_dir, examples, sources)
    cross = evaluate_cross_material(version, fitted, evaluation, out_dir)
    evaluation.extra["cross_material"] = cross
    evaluation.figures.extend(cross["figures"])
    return evaluation


def evaluate_vae(version: StoreVersion, out_dir: Path) -> Evaluation:
    """Patches of the held-out pictures: reconstruction vs the bicubic thumbnail, KL, prior samples."""
    from training.data.images import HELDOUT_IMAGES
    from training.data.patches import heldout_patches
    from training.losses.conv_decoder import kl_divergence

    size = version.manifest.preprocessing.input_size
    scales = tuple(_train_data_options(version).get("scales", (0.25, 0.5)))
    images = heldout_patches(size[0], scales)
    name, thumbnail = _thumbnail(images, version.latent_size())
    data = {
        "name": "patches",
        "split": "training.data.patches.heldout_patches",
        "pictures": list(HELDOUT_IMAGES),
        "items": len(images),
        "what": f"{size[0]}x{size[1]} grid patches (scales {list(scales)}) of the held-out pictures",
    }
    examples = [int(i) for i in np.linspace(0, len(images) - 1, 6)]
    sources = ["patches"] * len(images)
    evaluation = compare_reconstructions(version, images, {name: thumbnail}, data, out_dir, examples, sources)
    evaluation.extra.pop("psnr_by_source")
    model = version.rebuilt_model()
    train = _training_split(version, model).images  # the training patches, unaugmented
    linear = SubspaceBaseline("pca", version.latent_size()).fit(train.numpy())
    rebuilt = torch.from_numpy(linear.reconstruct(images.numpy())).clamp(0.0, 1.0)
    evaluation.extra["references"] = {  # what the best linear code of the latent's size reaches: not a goal
        f"reference: PCA-{linear.n_components}": {
            "values": linear.n_components, **score(images, rebuilt)[0],
            "what": f"linear code fitted on the {len(train)} training patches (ImagePatches 'train')",
        }
    }
    with torch.no_grad():
        stats = [model.encode_stats(chunk) for chunk in images.split(512)]
    mu, logvar = torch.cat([s[0] for s in stats]), torch.cat([s[1] for s in stats])
    evaluation.methods["model"]["kl_nats"] = round(float(kl_divergence(mu, logvar)), 3)
    latents = np.random.default_rng(SAMPLES_SEED).standard_normal((64, version.latent_size())).astype(np.float32)
    samples = to_unit(version, version.op("decode")(latents)).numpy()
    grid = image_grid(
        out_dir / f"{version.name}-samples.png",
        f"{version.name}: decoded N(0, I) prior samples (seed {SAMPLES_SEED})",
        [list(samples[r * 8 : (r + 1) * 8]) for r in range(8)],
        [""] * 8,
        [],
    )
    evaluation.figures.append(str(grid))
    return evaluation
