"""The 4D-STEM autoencoder on a material it never saw: Au [110] (`training.data.stem_au110`), another
crystal, zone axis, pattern size (96 x 96) and angular sampling than its SrTiO3 [001] training data.

The raw simulated intensities go through the service's raw-detector preprocessing (`app.preprocess.
RawDetector`, with the manifest's `intensity` and `pattern`; for a store written before those fields, the
same fields from the training data): rebinned onto the model's 64 x 64 pixels of 1.606 mrad and log-scaled
with the SrTiO3 I_max, as a microscopist's upload of these frames would be. The model and the PCA/NMF
baselines fitted on the SrTiO3 training scans reconstruct them; the goal is the model's PSNR drop from the
SrTiO3 held-out scan to this one (target < 3 dB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.preprocess import RawDetector
from app.schemas.manifest import Preprocessing
from training.quality.artifacts import StoreVersion
from training.quality.evaluation import Evaluation, compare_reconstructions

DROP_TARGET_DB = 3.0


def raw_preprocessing_of(version: StoreVersion) -> tuple[Preprocessing, str]:
    """The version's preprocessing with its raw-detector fields, and where they came from."""
    from training.data.stem_4d import ASSET_PATH, raw_preprocessing

    preprocessing = version.manifest.preprocessing
    if preprocessing.intensity is not None:
        return preprocessing, "manifest preprocessing (intensity, pattern)"
    merged = Preprocessing(**{**preprocessing.model_dump(), **raw_preprocessing(ASSET_PATH)})
    return merged, f"the training data's ({ASSET_PATH.name}); the manifest predates raw-detector preprocessing"


def au110_model_input(preprocessing: Preprocessing) -> tuple[torch.Tensor, list[str], dict[str, Any]]:
    """The Au [110] frames as float32 intensities, prepared frame by frame by the service's `RawDetector`
    (their angular sampling given, intensities already a fraction of the probe): (N, 1, h, w) model input,
    a source label per frame and the file's metadata."""
    from training.data.stem_au110 import raw_intensities

    intensities, metadata = raw_intensities()
    if preprocessing.intensity is None or preprocessing.pattern is None:
        raise ValueError("the model's preprocessing has no raw-detector fields (intensity, pattern)")
    detector = RawDetector(preprocessing.intensity, preprocessing.pattern,
                           tuple(metadata["angular_sampling_mrad"]), counts_per_probe=1.0)
    frames = intensities.astype(np.float32)[:, None]
    images = np.stack([detector.prepare(frame) for frame in frames])
    per_config = len(frames) // len(metadata["configs"])
    sources = [f"Au [110], {c['thickness_A']:.1f} Å thick" for c in metadata["configs"] for _ in range(per_config)]
    return torch.from_numpy(images), sources, metadata


def evaluate_cross_material(
    version: StoreVersion, baselines: dict[str, Any], reference: Evaluation, out_dir: Path
) -> dict[str, Any]:
    """Model and the fitted SrTiO3 baselines ({name: SubspaceBaseline}) on Au [110]; each method's PSNR drop
    from `reference` (the SrTiO3 held-out evaluation) and the goal on the model's drop."""
    from training.data.stem_au110 import AU110_PATH

    preprocessing, origin = raw_preprocessing_of(version)
    images, sources, metadata = au110_model_input(preprocessing)
    rebuilt = {
        name: (torch.from_numpy(fitted.reconstruct(images.numpy())).clamp(0.0, 1.0), fitted.n_components)
        for name, fitted in baselines.items()
    }
    scan_y, scan_x = metadata["params"]["scan_gpts"], metadata["params"]["scan_gpts"]
    data = {
        "name": "Au [110] patterns",
        "split": "training.data.stem_au110.AU110_PATH (held out: another material, never trained on)",
        "file": f"training/data/assets/{AU110_PATH.name}",
        "items": len(images),
        "what": f"{metadata['material']}, {len(metadata['configs'])} thicknesses x {scan_y}x{scan_x} positions; "
        f"{metadata['params']['pattern_size']}x{metadata['params']['pattern_size']} pixels of "
        f"{metadata['angular_sampling_mrad'][0]:.4f}x{metadata['angular_sampling_mrad'][1]:.4f} mrad (ky, kx), "
        f"rebinned to the model's {preprocessing.pattern.size[0]}x{preprocessing.pattern.size[1]} of "
        f"{preprocessing.pattern.angular_sampling_mrad[0]:.4f} mrad and log-scaled by app.preprocess.RawDetector",
        "raw_preprocessing_from": origin,
    }
    examples = [int(i) for i in np.linspace(0, len(images) - 1, 4)]
    crossed = compare_reconstructions(version, images, rebuilt, data, out_dir, examples, sources,
                                      figure_name=f"{version.name}-au110.png")
    drops = {name: round(reference.methods[name]["psnr"] - row["psnr"], 2) for name, row in crossed.methods.items()}
    crossed.goal = {
        "goal": f"model PSNR drop from the training material's held-out scan < {DROP_TARGET_DB:g} dB",
        "reference_psnr": reference.methods["model"]["psnr"],
        "drop_db": drops["model"],
        "target_db": DROP_TARGET_DB,
        "status": "PASS" if drops["model"] < DROP_TARGET_DB else "MISS",
    }
    crossed.extra["psnr_drop_db"] = drops
    return crossed.to_json()
