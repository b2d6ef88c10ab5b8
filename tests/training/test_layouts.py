"""The synthetic (goal, format, tone)-conditioned layout data set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from training.data.layouts import (
    CONDITION_KEYS,
    FORMATS,
    GOALS,
    TONES,
    DesignLayouts,
    condition_grid,
    decode_condition,
    encode_condition,
    render_layout,
)


@pytest.mark.parametrize("size", [32, 64])
def test_items_have_shape_range_and_valid_condition(size):
    data = DesignLayouts(size=size, length=12, seed=3)
    for i in range(len(data)):
        item = data[i]
        assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
        assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
        goal, fmt, tone = item["condition"].tolist()
        assert goal == int(goal) and 0 <= goal < len(GOALS)
        assert fmt == int(fmt) and 0 <= fmt < len(FORMATS)
        assert 0.3 <= tone <= 0.9
    assert data[-1]["condition"].tolist() == data[11]["condition"].tolist()
    with pytest.raises(IndexError):
        data[12]


def test_deterministic_by_seed_and_independent_of_order():
    a, b, c = DesignLayouts(32, 8, seed=1), DesignLayouts(32, 8, seed=1), DesignLayouts(32, 8, seed=2)
    later_first = b[5]
    torch.testing.assert_close(a[5]["image"], later_first["image"], rtol=0, atol=0)
    torch.testing.assert_close(a[0]["image"], b[0]["image"], rtol=0, atol=0)
    assert not torch.equal(a[0]["image"], c[0]["image"])


def test_batches_collate():
    batch = next(iter(DataLoader(DesignLayouts(32, 8), batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["condition"].shape == (4, 3)


def test_conditions_shape_the_image():
    def render(goal, fmt, tone, seed=0):
        return render_layout(goal, fmt, tone, 64, np.random.default_rng(seed))

    # format: the banner is a horizontal strip (dark surround above it), social_post fills the canvas
    banner, social = render(0, FORMATS.index("banner"), 0.6), render(0, FORMATS.index("social_post"), 0.6)
    assert banner[:, :8].mean() < -0.2 and social[:, 10:14].mean() > 0.0
    # goal: the palette hue changes (mean colour differs); tone: higher tone, more saturation
    assert np.abs(render(0, 0, 0.6).mean(axis=(1, 2)) - render(5, 0, 0.6).mean(axis=(1, 2))).max() > 0.03

    def saturation(img):
        rgb = (img + 1) / 2
        return float((rgb.max(axis=0) - rgb.min(axis=0)).mean())

    assert saturation(render(3, 0, 0.9)) > saturation(render(3, 0, 0.3)) + 0.05


def test_encode_condition_names_and_numbers():
    vector = encode_condition({"goal": "celebrate", "format": "flyer", "tone": "energetic"})
    expected = [GOALS.index("celebrate"), FORMATS.index("flyer"), pytest.approx(TONES["energetic"])]
    assert vector.tolist() == expected
    assert encode_condition({"goal": "inform", "format": "banner", "tone": 0.25})[2].item() == 0.25
    assert decode_condition(vector) == {"goal": "celebrate", "format": "flyer", "tone": pytest.approx(0.9)}
    assert CONDITION_KEYS == ("goal", "format", "tone")


@pytest.mark.parametrize("meta, words", [
    ({"goal": "party", "format": "flyer", "tone": 0.5}, ["'goal'", "promote_event", "brand_awareness"]),
    ({"goal": "inform", "format": "leaflet", "tone": 0.5}, ["'format'", "social_post"]),
    ({"goal": "inform", "format": "flyer", "tone": "angry"}, ["'tone'", "calm", "[0, 1]"]),
    ({"goal": "inform", "format": "flyer", "tone": 1.5}, ["'tone'", "[0, 1]"]),
    ({"goal": "inform", "format": "flyer", "tone": 0.5, "mood": "x"}, ["mood", "allowed keys"]),
    ({"goal": "inform", "format": "flyer"}, ["missing", "tone"]),
])
def test_encode_condition_errors_name_key_and_allowed_values(meta, words):
    with pytest.raises(ValueError) as err:
        encode_condition(meta)
    for word in words:
        assert word in str(err.value)


def test_bad_options_fail_clearly():
    with pytest.raises(ValueError, match="size must be an integer >= 16"):
        DesignLayouts(size=8)
    with pytest.raises(ValueError, match="length"):
        DesignLayouts(length=0)
    with pytest.raises(ValueError, match="goal id"):
        render_layout(10, 0, 0.5, 32, np.random.default_rng(0))


def test_condition_grid_covers_every_format():
    grid = condition_grid(2)
    assert grid.shape == (8, 3)
    assert sorted(set(grid[:, 1].tolist())) == [0.0, 1.0, 2.0, 3.0]
    assert bool((grid[:, 0] < len(GOALS)).all())
