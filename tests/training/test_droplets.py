"""Procedural droplet videos: deterministic by seed, the documented physics, both views, fast, and wired
into the V3 task as `data: {source: droplets}`."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from training.data.droplet_render import coverage, outline
from training.data.droplets import (
    FRAME_DT,
    DropletFrames,
    DropletParams,
    droplet_datasets,
    generate_sequence,
    simulate,
    stream_seed,
)

PARAMS = DropletParams(viscosity=0.01, tilt_deg=40.0, volume_ul=30.0, theta_adv0_deg=105.0, theta_rec0_deg=92.0,
                       release_ms=20.0, ring_amplitude=0.08, ring_phase=0.0)
TIMES = np.arange(32) * FRAME_DT


def test_sequences_are_a_pure_function_of_the_seed_and_both_views_show_the_same_drop() -> None:
    a, b = generate_sequence(7, 4, "crop"), generate_sequence(7, 4, "crop")
    assert a.frames.shape == (4, 201, 201) and a.frames.dtype == np.float32
    assert np.array_equal(a.frames, b.frames) and a.params == b.params
    assert a.frames.min() >= 0.0 and a.frames.max() <= 1.0 and a.frames.std() > 0.05
    assert not np.array_equal(a.frames, generate_sequence(8, 4, "crop").frames)
    strip = generate_sequence(7, 4, "strip")
    assert strip.frames.shape == (4, 152, 1280) and strip.params == a.params and strip.start_mm == a.start_mm
    only = generate_sequence(7, 4, "crop", indices=[2])
    assert only.frames.shape == (1, 201, 201)


def test_a_32_frame_crop_sequence_renders_in_well_under_a_second() -> None:
    best = min(_seconds_to_render(seed) for seed in (1, 2, 3))  # best of 3: the machine is shared
    assert best < 1.0, f"{best:.2f} s"


def _seconds_to_render(seed: int) -> float:
    begun = time.perf_counter()
    generate_sequence(seed, 32, "crop")
    return time.perf_counter() - begun


def test_speed_falls_with_viscosity_and_rises_with_tilt() -> None:
    def terminal(**changes) -> float:
        return simulate(dataclasses.replace(PARAMS, **changes), TIMES).summary["u_inf"]

    thin, thick = terminal(viscosity=0.002), terminal(viscosity=0.05)
    assert thin > 10 * thick > 0  # U ∝ 1/η (the mixture's ρ and γ change a little)
    assert terminal(tilt_deg=55.0) > terminal(tilt_deg=30.0)
    steep = simulate(PARAMS, TIMES)
    assert np.all(np.diff(steep.center_mm) > 0) and steep.center_mm[0] == 0.0


def test_contact_angles_follow_cox_voinov_and_viscous_ringing_dies_out() -> None:
    motion = simulate(PARAMS, TIMES)
    assert np.all(np.degrees(motion.theta_adv) > PARAMS.theta_adv0_deg)
    assert np.all(np.degrees(motion.theta_rec) < PARAMS.theta_rec0_deg)
    thin = simulate(dataclasses.replace(PARAMS, viscosity=0.001), TIMES).summary
    thick = simulate(dataclasses.replace(PARAMS, viscosity=0.1), TIMES).summary
    assert thick["beta"] > 20 * thin["beta"]  # Lamb: β = 5ν/R²
    assert 100 < thin["omega"] < 600  # Rayleigh n = 2: tens of Hz for a drop of tens of µL


def test_silhouette_coverage_is_the_polygon_area() -> None:
    x, y = outline(4.0, 2.0, np.radians(110.0), np.radians(80.0))
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    scale = 10.0
    mask = coverage(x * scale + 5, 30 - y * scale, 40, 0, 60)
    assert mask.max() <= 1.0 and abs(mask.sum() - area * scale**2) < 0.01 * area * scale**2


def test_autoencoder_frames_depend_on_seed_epoch_and_index_and_split_streams_are_disjoint() -> None:
    train = DropletFrames("train", "crop", (64, 64), samples_per_epoch=3, seed=1)
    first = train[2]["image"]
    assert first.shape == (1, 64, 64) and first.dtype == torch.float32
    assert torch.equal(first, DropletFrames("train", "crop", (64, 64), samples_per_epoch=3, seed=1)[2]["image"])
    train.set_epoch(1)
    assert not torch.equal(first, train[2]["image"])
    val = DropletFrames("val", "strip", (38, 320), samples_per_epoch=2)
    before = val[1]["image"]
    val.set_epoch(4)
    assert torch.equal(before, val[1]["image"]) and before.shape == (1, 38, 320)
    autoencoder = {stream_seed(s, i, 0, e) for s in ("ae-train", "ae-val") for i in range(64) for e in range(4)}
    assert autoencoder.isdisjoint(stream_seed("lstm-heldout", i) for i in range(256))


def test_the_v3_task_trains_on_droplets_when_asked() -> None:
    from training.recipes import Recipe
    from training.tasks import build_model, task_for_model

    recipe = Recipe("d", "1", "v3_tiny", overrides={"input_size": [48, 48]},
                    data={"source": "droplets", "samples_per_epoch": 2, "val_samples": 1})
    config = recipe.train_config()
    model = build_model(config)
    train, val = task_for_model(model).datasets(model, config)
    assert isinstance(train, DropletFrames) and train.view == "crop" and len(train) == 2 and len(val) == 1
    assert train[0]["image"].shape == (1, 48, 48)
    with pytest.raises(ValueError, match="crop_size"):
        droplet_datasets((48, 48), config.replace(data={"source": "droplets", "crop_size": [4, 4]}))
