"""Write the small example inputs that the README's curl commands and the benchmark use.

    python -m bench.make_inputs        # -> bench/inputs/*

Real images only: scikit-image's bundled `camera` and `coins`, and patterns of the committed 4D-STEM
simulation. Deterministic; the outputs are committed so the README works without running this.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data, transform

OUT = Path(__file__).resolve().parent / "inputs"


def _u8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    camera = data.camera().astype(np.float32) / 255
    Image.fromarray(_u8(transform.resize(camera, (201, 201), anti_aliasing=True))).save(OUT / "camera_201.png")

    # A "movie" of 4 frames, 152x1280 (H x W), sliding across the coins image: the LSTM use.
    coins = data.coins().astype(np.float32) / 255
    wide = transform.resize(coins, (152, 1280 + 3 * 40), anti_aliasing=True)
    frames = np.stack([wide[:, 40 * t: 40 * t + 1280] for t in range(4)])
    np.save(OUT / "frames_152x1280.npy", _u8(frames))

    from training.data.stem_4d import Stem4DDataset

    val = Stem4DDataset("val")
    pattern = val[0]["image"][0].numpy()
    Image.fromarray(np.round(pattern * 65535).astype(np.uint16)).save(OUT / "stem_pattern.png")
    patterns = np.stack([val[i]["image"][0].numpy() for i in range(8)]).astype(np.float32)
    np.save(OUT / "stem_patterns.npy", patterns)

    for path in sorted(OUT.iterdir()):
        print(f"{path.relative_to(OUT.parent.parent)}  {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
