"""A second 4D-STEM specimen for cross-material evaluation: Au [110] (abTEM multislice), held out.

The STEM autoencoder is trained on SrTiO3 [001] (`training.data.stem_4d`); this file is a different crystal
(fcc gold, a = 4.078 Å), zone axis ([110]), pattern size (96 x 96) and angular sampling (about 1.23 mrad
per pixel, slightly different along ky and kx) under the same probe (200 kV, 20 mrad). Only the quality
report reads it: the raw intensities go through the service's raw-detector preprocessing
(`app.preprocess.RawDetector`: rebinned to the model's 64 x 64 pixels of 1.606 mrad, then the model's
global log scaling), exactly as a microscopist's upload would.

Stored like the SrTiO3 files (`save_npz`): `patterns` (n_configs, scan_y, scan_x, 96, 96) uint16, each
v = log1p(I/eps)/log1p(I_max/eps) with this file's own I_max and `dynamic_range` 1e6, times 4095; the
metadata's `angular_sampling_mrad` is in (ky, kx) order. `raw_intensities` inverts the scaling
(`stem_4d.stored_intensities`: within 0.2 % of the simulated intensities).
`python -m training.data.stem_au110` rewrites it (see assets/README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.data.stem_4d import ASSET_PATH, log_quantise, save_npz, stored_intensities

AU110_PATH = ASSET_PATH.with_name("stem_au110_heldout.npz")
AU_LATTICE_A = 4.078
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Au110Params:
    """Everything the simulation depends on (stored verbatim in the npz metadata)."""

    energy_eV: float = 200e3
    semiangle_mrad: float = 20.0
    supercell: tuple[int, int] = (5, 7)          # repeats of the (a, a/sqrt2) projected cell: 20.4 x 20.2 Å
    thickness_cells: tuple[int, ...] = (14, 27)  # exit thicknesses in [110] periods (a/sqrt2): 40.4, 77.9 Å
    defocus_A: float = 0.0
    scan_gpts: int = 8                           # positions per axis over one projected cell
    pattern_size: int = 96                       # kept pixels per axis around the zero angle
    sampling_A: float = 0.1
    parametrization: str = "lobato"
    dynamic_range: float = 1e6
    quant_max: int = 4095


def build_au110(params: Au110Params, periods: int) -> Any:
    """Au with the beam along [110] (ase.Atoms): x along [001] (a), y along [1-10] (a/sqrt2), z along
    [110], `periods` stacking periods (two atomic planes each) thick."""
    from ase.build import fcc110

    nx, ny = params.supercell
    return fcc110("Au", size=(nx, ny, 2 * periods), a=AU_LATTICE_A, orthogonal=True, periodic=True)


def _crop(array: np.ndarray, angular_coords: Sequence[np.ndarray], size: int) -> np.ndarray:
    """The `size` x `size` pixels whose centre pixel (size // 2) is the zero scattering angle."""
    slices = []
    for axis_coords in angular_coords:
        centre = int(np.argmin(np.abs(np.asarray(axis_coords))))
        if centre - size // 2 < 0 or centre + size - size // 2 > len(axis_coords):
            raise ValueError(f"simulated patterns ({len(axis_coords)} px) are too small to crop {size} px")
        slices.append(slice(centre - size // 2, centre + size - size // 2))
    return array[..., slices[0], slices[1]]


def _metadata(params: Au110Params, wavelength_A: float, sampling_xy: tuple[float, ...], i_max: float,
              thickness: list[float]) -> dict[str, Any]:
    """The JSON metadata stored with the patterns."""
    import abtem
    import ase

    cell_x, cell_y = AU_LATTICE_A, AU_LATTICE_A / math.sqrt(2)
    return {
        "format_version": FORMAT_VERSION,
        "material": f"Au (fcc, a = {AU_LATTICE_A} Å), beam along [110]; x along [001], y along [1-10]",
        "heldout": True,
        "params": asdict(params),
        "configs": [{"defocus_A": params.defocus_A, "thickness_cells": t, "thickness_A": round(a, 3)}
                    for t, a in zip(params.thickness_cells, thickness, strict=True)],
        "scan_step_A": [cell_y / params.scan_gpts, cell_x / params.scan_gpts],
        "scan_origin_A": 0.0,
        "axes": "patterns[config, scan_y, scan_x, ky, kx]",
        "wavelength_A": wavelength_A,
        "angular_sampling_mrad": [sampling_xy[1], sampling_xy[0]],
        "angular_sampling_order": "(ky, kx)",
        "zero_angle_pixel": [params.pattern_size // 2] * 2,
        "normalisation": "v = log1p(I/eps)/log1p(I_max/eps), eps = I_max/dynamic_range; stored = "
                         "round(v*quant_max) (uint16); I = abTEM intensity (probe sums to 1)",
        "intensity_max": i_max,
        "software": {"abtem": abtem.__version__, "ase": ase.__version__, "numpy": np.__version__},
    }


def simulate_au110(params: Au110Params | None = None, verbose: bool = False) -> dict[str, Any]:
    """One multislice run with an exit plane per thickness; returns what `save_npz` writes."""
    import abtem
    import dask

    params = params or Au110Params()
    dask.config.set(scheduler="synchronous")   # single thread: the machine is shared
    start = time.time()
    atoms = build_au110(params, max(params.thickness_cells))
    period = AU_LATTICE_A / math.sqrt(2)
    potential = abtem.Potential(atoms, sampling=params.sampling_A, slice_thickness=period / 2,
                                parametrization=params.parametrization,
                                exit_planes=tuple(2 * t - 1 for t in params.thickness_cells))
    probe = abtem.Probe(energy=params.energy_eV, semiangle_cutoff=params.semiangle_mrad,
                        defocus=params.defocus_A)
    probe.grid.match(potential)
    cell_x, cell_y = AU_LATTICE_A, period
    scan = abtem.GridScan(start=(0.0, 0.0), end=(cell_x, cell_y), gpts=(params.scan_gpts,) * 2, endpoint=False)
    pixel_mrad = 1e3 * float(probe.wavelength) / min(atoms.cell[0, 0], atoms.cell[1, 1])
    detector = abtem.PixelatedDetector(max_angle=(params.pattern_size // 2 + 2) * pixel_mrad)
    measurement = probe.scan(potential, scan=scan, detectors=detector, lazy=False)
    sampling_xy = tuple(float(s) for s in measurement.angular_sampling)
    array = np.asarray(measurement.array, dtype=np.float64)
    array = _crop(array, measurement.angular_coordinates, params.pattern_size)
    # abTEM's axes are (x, y); store (scan_y, scan_x) and (ky, kx) like image rows/columns
    stack = array.transpose(0, 2, 1, 4, 3)
    stored, i_max = log_quantise(stack, params.dynamic_range, params.quant_max)
    if verbose:
        print(f"Au [110]: {stack.shape} in {time.time() - start:.1f} s")
    thickness = [t * period for t in params.thickness_cells]
    metadata = _metadata(params, float(probe.wavelength), sampling_xy, i_max, thickness)
    return {
        "patterns": stored,
        "scan_shape": np.array([params.scan_gpts] * 2, dtype=np.int64),
        "thickness_A": np.array(thickness, dtype=np.float64),
        "defocus_A": np.full(len(thickness), params.defocus_A, dtype=np.float64),
        "metadata": metadata,
    }


def raw_intensities(path: str | Path = AU110_PATH) -> tuple[np.ndarray, dict[str, Any]]:
    """(n_configs * scan_y * scan_x, H, W) float64 intensities (fraction of the incident probe, config-major
    in scan order) and the file's metadata: the stored log scaling inverted."""
    with np.load(path, allow_pickle=False) as data:
        stored = data["patterns"]
        metadata = json.loads(str(data["metadata"]))
    return stored_intensities(stored.reshape(-1, *stored.shape[-2:]), metadata), metadata


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Simulate the held-out Au [110] 4D-STEM scan with abTEM.")
    parser.add_argument("--out", type=Path, default=AU110_PATH)
    args = parser.parse_args(argv)
    start = time.time()
    result = simulate_au110(verbose=True)
    command = "python -m training.data.stem_au110 " + " ".join(argv if argv is not None else sys.argv[1:])
    save_npz(result, args.out, command=command.strip())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): patterns {result['patterns'].shape} "
          f"in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
