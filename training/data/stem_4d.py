"""Simulated 4D-STEM data set of SrTiO3 [001] (abTEM multislice) and its torch Dataset.

(a) `simulate_4dstem(...)` runs abTEM (optional extra `stem`: `pip install abtem ase`, imported lazily)
    and returns the quantised patterns and their metadata; `python -m training.data.stem_4d --out
    training/data/assets/stem_srtio3.npz` writes the committed data set (see assets/README.md).
(b) `Stem4DDataset(split="train"|"val")` reads that npz (no abTEM needed) and yields
    {"image": (1, 64, 64) float32 in [0, 1]}.

Stored intensities. For each simulated pattern I (abTEM intensity, the incident probe sums to 1)
the central 64x64 pixels around the zero angle are kept (no resampling; `angular_sampling_mrad` per
pixel) and log-scaled with one global scale for the whole file:

    v = log1p(I / eps) / log1p(I_max / eps),   eps = I_max / dynamic_range,   v in [0, 1]
    stored = round(v * quant_max)  as uint16   (quant_max = 4095: 12-bit, compresses far better
                                                 than 16-bit and is ~80 dB below any model error)

`Stem4DDataset` returns stored / quant_max (`log_scale` is v; `raw_preprocessing` hands I_max, the dynamic
range and the pixel grid to the manifest, so the service scales raw detector frames alike). The npz holds
`patterns` (n_configs, scan_y, scan_x, 64, 64) uint16, `scan_shape`, `thickness_A`, `defocus_A` per
configuration and `metadata` (a JSON string with every simulation parameter, the normalisation and the
software versions).

Train/val split: the scan grid is cut into `block` x `block` tiles of positions; tile (by, bx) is
validation when (by + 2 * bx) % 5 == 0 (about one tile in five, spread over the grid), for every
configuration alike, so no validation scan position is ever seen in training.

Held-out test set (`HELDOUT_PATH`, read only by the quality report `training.evaluate`): the same
specimen, probe and configurations scanned on an 8 x 8 grid offset by half a training step
(`HELDOUT_PARAMS`), so none of its positions is a training or validation position, log-scaled with the
training file's I_max. `Stem4DDataset` refuses it for "train" and "val"; `python -m training.data.stem_4d
--heldout` rewrites it.
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
import torch
from torch.utils.data import Dataset

ASSET_PATH = Path(__file__).resolve().parent / "assets" / "stem_srtio3.npz"
HELDOUT_PATH = ASSET_PATH.with_name("stem_srtio3_heldout.npz")
PATTERN_SIZE = 64
SRTIO3_LATTICE_A = 3.905
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SimulationParams:
    """Everything the simulation depends on (stored verbatim in the npz metadata)."""

    energy_eV: float = 200e3
    semiangle_mrad: float = 20.0
    supercell: tuple[int, int] = (4, 4)          # lateral repeats of the cubic unit cell
    thickness_cells: tuple[int, ...] = (10, 20)  # exit thicknesses, in unit cells along [001]
    defocus_A: tuple[float, ...] = (0.0, 50.0)   # abTEM `defocus` (Å); one multislice run each
    # (defocus index, thickness index) pairs to keep; None = every combination
    configs: tuple[tuple[int, int], ...] | None = ((0, 0), (0, 1), (1, 0))
    scan_cells: float = 2.0                      # scanned square, in unit cells, from the origin
    scan_gpts: int = 16                          # scan positions per axis
    scan_start_steps: float = 0.0                # grid origin, in steps of the grid (0.25 = a quarter step)
    sampling_A: float = 0.1                      # potential / wave sampling
    slices_per_cell: int = 2
    parametrization: str = "lobato"
    defects: bool = True                         # one La column on a Sr site + O vacancies (see below)
    num_phonons: int = 0                         # frozen-phonon configurations (0 = static lattice)
    phonon_sigma_A: float = 0.08
    seed: int = 0                                # frozen-phonon displacements
    dynamic_range: float = 1e4
    quant_max: int = 4095

    def __post_init__(self) -> None:
        if any(t < 1 for t in self.thickness_cells) or not self.thickness_cells:
            raise ValueError(f"thickness_cells must be positive unit-cell counts; got {self.thickness_cells}")
        if not self.defocus_A:
            raise ValueError("defocus_A needs at least one value")
        if self.scan_gpts < 1 or self.scan_cells <= 0:
            raise ValueError("scan_gpts must be >= 1 and scan_cells > 0")
        if not 1 <= self.quant_max <= 65535:
            raise ValueError(f"quant_max must be in 1..65535 (uint16); got {self.quant_max}")
        if self.configs is not None:
            for d, t in self.configs:
                if not (0 <= d < len(self.defocus_A) and 0 <= t < len(self.thickness_cells)):
                    raise ValueError(f"config {(d, t)} indexes outside defocus_A/thickness_cells")

    def selected_configs(self) -> list[tuple[int, int]]:
        if self.configs is not None:
            return [tuple(c) for c in self.configs]
        return [(d, t) for d in range(len(self.defocus_A)) for t in range(len(self.thickness_cells))]


# The held-out test scan: every configuration of the training file, 8 x 8 positions over the same two unit
# cells, offset by half a training step (a quarter of its own step): no training or validation position.
HELDOUT_PARAMS = SimulationParams(scan_gpts=8, scan_start_steps=0.25)


def build_srtio3(params: SimulationParams, cells_z: int | None = None) -> Any:
    """SrTiO3 [001] supercell (ase.Atoms). With `defects`: the Sr column at (a, a) — the centre of
    the scanned area — becomes La, and every other O atom of the pure-O column at (1.5a, a) is removed.
    """
    from ase.spacegroup import crystal

    a = SRTIO3_LATTICE_A
    unit = crystal(["Sr", "Ti", "O"], basis=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0)], spacegroup=221,
                   cellpar=[a, a, a, 90, 90, 90])
    nx, ny = params.supercell
    atoms = unit * (nx, ny, cells_z or max(params.thickness_cells))
    if params.defects:
        pos = atoms.get_positions()
        on_column = lambda x, y: (np.abs(pos[:, 0] - x) < 1e-3) & (np.abs(pos[:, 1] - y) < 1e-3)  # noqa: E731
        symbols = atoms.get_chemical_symbols()
        for i in np.flatnonzero(on_column(a, a)):
            symbols[i] = "La"
        atoms.set_chemical_symbols(symbols)
        oxygen = np.flatnonzero(on_column(1.5 * a, a) & (np.array(symbols) == "O"))
        oxygen = oxygen[np.argsort(pos[oxygen, 2])]
        del atoms[oxygen[::2].tolist()]
    return atoms


def log_scale(intensity: np.ndarray, dynamic_range: float, i_max: float) -> np.ndarray:
    """The global log scaling to [0, 1]: v = min(log1p(I/eps)/log1p(I_max/eps), 1), eps = I_max/dynamic_range,
    negative intensities as 0 (the model input; the service applies it as `Preprocessing.intensity`)."""
    eps = i_max / dynamic_range
    return np.minimum(np.log1p(np.clip(intensity, 0, None) / eps) / math.log1p(i_max / eps), 1.0)


def log_quantise(intensity: np.ndarray, dynamic_range: float, quant_max: int,
                 i_max: float | None = None) -> tuple[np.ndarray, float]:
    """Global log scaling to [0, 1] and rounding to 0..quant_max (uint16). Returns (stored, I_max).
    `i_max` (default: the data's own maximum) scales another file like a reference one (values above clip)."""
    i_max = float(intensity.max()) if i_max is None else float(i_max)
    if i_max <= 0:
        raise ValueError("all simulated intensities are zero")
    return np.round(log_scale(intensity, dynamic_range, i_max) * quant_max).astype(np.uint16), i_max


def stored_intensities(stored: np.ndarray, metadata: dict[str, Any]) -> np.ndarray:
    """Stored patterns back to intensities (float64, fraction of the incident probe): the file's log scaling
    inverted, I = eps * expm1(v * log1p(I_max/eps)); 12-bit storage keeps I within 0.2 % above eps."""
    i_max = float(metadata["intensity_max"])
    eps = i_max / float(metadata["params"]["dynamic_range"])
    values = stored.astype(np.float64) / float(metadata["params"]["quant_max"])
    return eps * np.expm1(values * math.log1p(i_max / eps))


def raw_preprocessing(path: str | Path = ASSET_PATH) -> dict[str, Any]:
    """The `Preprocessing` fields that let the service take raw detector frames like this file's patterns:
    its log scaling (`intensity`) and pattern grid (`pattern`: size, (ky, kx) mrad per pixel, zero angle at
    pixel size // 2). Only the small `metadata` member of the npz is read."""
    with np.load(path, allow_pickle=False) as data:
        metadata = json.loads(str(data["metadata"]))
    # abTEM's (x, y) order; x is kx (see `_simulate_defocus`)
    (kx, ky), (extent_x, extent_y) = metadata["angular_sampling_mrad"], metadata["pattern_extent_mrad"]
    return {
        "intensity": {"kind": "log_global", "i_max": float(metadata["intensity_max"]),
                      "dynamic_range": float(metadata["params"]["dynamic_range"]), "floor": 0.0},
        "pattern": {"size": [round(extent_y / ky), round(extent_x / kx)], "angular_sampling_mrad": [ky, kx]},
    }


def _central_crop(array: np.ndarray, angular_coords: Sequence[np.ndarray]) -> np.ndarray:
    """The PATTERN_SIZE x PATTERN_SIZE pixels around the zero scattering angle."""
    half = PATTERN_SIZE // 2
    slices = []
    for axis_coords in angular_coords:
        centre = int(np.argmin(np.abs(np.asarray(axis_coords))))
        if centre - half < 0 or centre + half > len(axis_coords):
            raise ValueError(f"simulated patterns ({len(axis_coords)} px) are too small to crop "
                             f"{PATTERN_SIZE}x{PATTERN_SIZE}; increase the supercell or max angle")
        slices.append(slice(centre - half, centre + half))
    return array[..., slices[0], slices[1]]


def _simulate_defocus(params: SimulationParams, d: int, thickness_ids: list[int], scan: Any,
                      verbose: bool) -> tuple[dict[int, np.ndarray], float, tuple[float, ...]]:
    """One multislice run at defocus index `d`, as thick as its thickest configuration, with exit planes
    at each thickness; returns {thickness index: (scan_y, scan_x, ky, kx)}, wavelength, angular sampling."""
    import abtem

    a = SRTIO3_LATTICE_A
    cells = [params.thickness_cells[t] for t in thickness_ids]
    start = time.time()
    atoms = build_srtio3(params, cells_z=max(cells))
    if params.num_phonons > 0:
        atoms = abtem.FrozenPhonons(atoms, num_configs=params.num_phonons,
                                    sigmas=params.phonon_sigma_A, seed=params.seed)
    potential = abtem.Potential(atoms, sampling=params.sampling_A,
                                slice_thickness=a / params.slices_per_cell,
                                parametrization=params.parametrization,
                                exit_planes=tuple(c * params.slices_per_cell - 1 for c in cells))
    probe = abtem.Probe(energy=params.energy_eV, semiangle_cutoff=params.semiangle_mrad,
                        defocus=params.defocus_A[d])
    probe.grid.match(potential)
    wavelength_A = float(probe.wavelength)
    pixel_mrad = 1e3 * wavelength_A / (params.supercell[0] * a)
    max_angle = (PATTERN_SIZE // 2 + 2) * pixel_mrad
    measurement = probe.scan(potential, scan=scan,
                             detectors=abtem.PixelatedDetector(max_angle=max_angle), lazy=False)
    angular_sampling = tuple(float(s) for s in measurement.angular_sampling)
    array = np.asarray(measurement.array, dtype=np.float64)
    if array.ndim == 4:                       # a single exit plane has no thickness axis
        array = array[None]
    array = _central_crop(array, measurement.angular_coordinates)   # (n_exit, sx, sy, 64, 64)
    if verbose:
        print(f"defocus {params.defocus_A[d]} Å, {max(cells)} cells: {array.shape} "
              f"in {time.time() - start:.1f} s")
    # abTEM's axes are (x, y); store (scan_y, scan_x) and (ky, kx) like image rows/columns.
    return ({t: array[k].transpose(1, 0, 3, 2) for k, t in enumerate(thickness_ids)}, wavelength_A,
            angular_sampling)


def _metadata(params: SimulationParams, configs: list[tuple[int, int]], wavelength_A: float | None,
              angular_sampling: tuple[float, ...] | None, i_max: float) -> dict[str, Any]:
    """The JSON metadata stored with the patterns."""
    import abtem
    import ase

    a = SRTIO3_LATTICE_A
    return {
        "format_version": FORMAT_VERSION,
        "material": "SrTiO3 (cubic perovskite, a = 3.905 Å), beam along [001]",
        "params": asdict(params),
        "defects": ("La on the Sr column at (a, a); every other O removed from the O column at (1.5a, a)"
                    if params.defects else "none"),
        "configs": [{"defocus_A": params.defocus_A[d], "thickness_cells": params.thickness_cells[t],
                     "thickness_A": params.thickness_cells[t] * a} for d, t in configs],
        "scan_step_A": params.scan_cells * a / params.scan_gpts,
        "scan_origin_A": params.scan_start_steps * params.scan_cells * a / params.scan_gpts,
        "axes": "patterns[config, scan_y, scan_x, ky, kx]",
        "wavelength_A": wavelength_A,
        "angular_sampling_mrad": angular_sampling,
        "pattern_extent_mrad": [PATTERN_SIZE * s for s in angular_sampling],
        "normalisation": "v = log1p(I/eps)/log1p(I_max/eps), eps = I_max/dynamic_range; "
                         "stored = round(v*quant_max) (uint16); I = abTEM intensity (probe sums to 1)",
        "intensity_max": i_max,
        "software": {"abtem": abtem.__version__, "ase": ase.__version__, "numpy": np.__version__},
    }


def simulate_4dstem(params: SimulationParams | None = None, verbose: bool = False,
                    reference_i_max: float | None = None) -> dict[str, Any]:
    """Run the multislice simulation; returns the arrays and metadata written by `save_npz`.
    `reference_i_max`: log-scale with another file's I_max (the held-out set uses the training file's)."""
    import abtem
    import dask

    params = params or SimulationParams()
    dask.config.set(scheduler="synchronous")   # single thread: the machine is shared
    a = SRTIO3_LATTICE_A
    origin = params.scan_start_steps * params.scan_cells * a / params.scan_gpts
    scan = abtem.GridScan(start=(origin, origin), end=(origin + params.scan_cells * a,) * 2,
                          gpts=(params.scan_gpts, params.scan_gpts), endpoint=False)
    configs = params.selected_configs()
    wavelength_A = None
    angular_sampling = None
    patterns: dict[tuple[int, int], np.ndarray] = {}
    for d in sorted({d for d, _ in configs}):
        thickness_ids = sorted({t for dd, t in configs if dd == d})
        by_thickness, wavelength_A, angular_sampling = _simulate_defocus(params, d, thickness_ids, scan, verbose)
        patterns.update({(d, t): pattern for t, pattern in by_thickness.items()})

    stack = np.stack([patterns[c] for c in configs])
    stored, i_max = log_quantise(stack, params.dynamic_range, params.quant_max, reference_i_max)
    metadata = _metadata(params, configs, wavelength_A, angular_sampling, i_max)
    return {
        "patterns": stored,
        "scan_shape": np.array([params.scan_gpts, params.scan_gpts], dtype=np.int64),
        "thickness_A": np.array([c["thickness_A"] for c in metadata["configs"]], dtype=np.float64),
        "defocus_A": np.array([c["defocus_A"] for c in metadata["configs"]], dtype=np.float64),
        "metadata": metadata,
    }


def save_npz(result: dict[str, Any], path: Path, command: str | None = None) -> None:
    """Write the simulation result as a compressed npz (metadata as a JSON string)."""
    metadata = dict(result["metadata"])
    if command:
        metadata["command"] = command
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, patterns=result["patterns"], scan_shape=result["scan_shape"],
                        thickness_A=result["thickness_A"], defocus_A=result["defocus_A"],
                        metadata=np.array(json.dumps(metadata, sort_keys=True)))
    tmp.replace(path)


# ------------------------------------------------------------------------------------------ dataset


def split_mask(scan_shape: tuple[int, int], split: str, block: int = 4) -> np.ndarray:
    """Boolean (scan_y, scan_x) mask of the positions in `split` (tiles of block x block positions)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
    if block < 1:
        raise ValueError(f"block must be >= 1; got {block}")
    rows, cols = np.indices(scan_shape)
    is_val = ((rows // block) + 2 * (cols // block)) % 5 == 0
    return is_val if split == "val" else ~is_val


class Stem4DDataset(Dataset):
    """Diffraction patterns of the committed simulation: {"image": (1, 64, 64) float32 in [0, 1]}.

    split: "train" or "val" (disjoint scan positions, see `split_mask`); "all" keeps every pattern in
    scan order (config-major), for latent maps. `configs` selects configuration indices (default all).
    """

    def __init__(self, split: str = "train", path: str | Path | None = None, block: int = 4,
                 configs: Sequence[int] | None = None) -> None:
        path = Path(path) if path is not None else ASSET_PATH
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; create it with `python -m training.data.stem_4d "
                                    "--out training/data/assets/stem_srtio3.npz`")
        with np.load(path, allow_pickle=False) as data:
            patterns = data["patterns"]
            self.scan_shape: tuple[int, int] = tuple(int(s) for s in data["scan_shape"])
            self.thickness_A = data["thickness_A"].astype(np.float64)
            self.defocus_A = data["defocus_A"].astype(np.float64)
            self.metadata: dict[str, Any] = json.loads(str(data["metadata"]))
        if self.metadata.get("heldout") and split != "all":
            raise ValueError(f"{path} is the held-out test set of the quality report: no {split!r} split "
                             "reads it (use split='all' to evaluate on it)")
        quant_max = float(self.metadata["params"]["quant_max"])
        n_configs = patterns.shape[0]
        self.config_indices = list(range(n_configs)) if configs is None else [int(c) for c in configs]
        for c in self.config_indices:
            if not 0 <= c < n_configs:
                raise ValueError(f"configs index {c} out of range 0..{n_configs - 1}")
        if split == "all":
            mask = np.ones(self.scan_shape, dtype=bool)
        else:
            mask = split_mask(self.scan_shape, split, block)
        self.split = split
        positions = np.argwhere(mask)                               # (n, 2) scan (y, x)
        selected = patterns[self.config_indices][:, mask]           # (n_cfg, n, 64, 64)
        self.images = torch.from_numpy(selected.reshape(-1, 1, *patterns.shape[-2:]).astype(np.float32)
                                       / quant_max)
        self.positions = np.concatenate([positions] * len(self.config_indices))
        self.configs = np.repeat(self.config_indices, len(positions))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index]}

    def config_images(self, config: int) -> torch.Tensor:
        """One configuration's patterns in scan order, (scan_y * scan_x, 1, 64, 64); needs split="all"."""
        if self.split != "all":
            raise ValueError("config_images needs Stem4DDataset(split='all') (every scan position)")
        return self.images[torch.from_numpy(self.configs == config)]


# --------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    defaults = SimulationParams()
    parser = argparse.ArgumentParser(description="Simulate the SrTiO3 4D-STEM data set with abTEM.")
    parser.add_argument("--out", type=Path, default=ASSET_PATH)
    parser.add_argument("--scan-gpts", type=int, default=defaults.scan_gpts)
    parser.add_argument("--num-phonons", type=int, default=defaults.num_phonons)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-defects", action="store_true")
    parser.add_argument("--heldout", action="store_true",
                        help="write the held-out test scan (HELDOUT_PARAMS, scaled by --out's reference "
                             f"file {ASSET_PATH.name}) to {HELDOUT_PATH.name} beside it")
    args = parser.parse_args(argv)
    params = SimulationParams(scan_gpts=args.scan_gpts, num_phonons=args.num_phonons, seed=args.seed,
                              defects=not args.no_defects)
    reference_i_max = None
    if args.heldout:
        params, reference_i_max = HELDOUT_PARAMS, Stem4DDataset("all", args.out).metadata["intensity_max"]
        args.out = args.out.with_name(HELDOUT_PATH.name)
    start = time.time()
    result = simulate_4dstem(params, verbose=True, reference_i_max=reference_i_max)
    if args.heldout:
        result["metadata"]["heldout"] = True
    command = "python -m training.data.stem_4d " + " ".join(argv if argv is not None else sys.argv[1:])
    save_npz(result, args.out, command=command.strip())
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.2f} MB): patterns {result['patterns'].shape} "
          f"in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
