"""Checkpoints: complete, verified (truncation/damage refused with a clear message), atomic."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from training.checkpoint import (
    TRAILER_BYTES,
    CheckpointDir,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _state() -> dict:
    return {
        "model": {"w": torch.arange(12.0).view(3, 4)},
        "step": 7,
        "history": {"steps": [{"loss": 0.5}]},
        "name": "x",
        "best": float("inf"),
    }


def test_round_trip_keeps_tensors_and_python_values(tmp_path) -> None:
    path = save_checkpoint(_state(), tmp_path / "a.ckpt")
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], torch.arange(12.0).view(3, 4))
    assert loaded["step"] == 7 and loaded["history"] == {"steps": [{"loss": 0.5}]} and loaded["best"] == float("inf")
    assert not [p for p in tmp_path.iterdir() if p.name != "a.ckpt"], "no temp files left behind"


@pytest.mark.parametrize("cut", [1, TRAILER_BYTES, TRAILER_BYTES + 10, "half"])
def test_truncated_checkpoint_is_refused(tmp_path, cut) -> None:
    path = save_checkpoint(_state(), tmp_path / "a.ckpt")
    data = path.read_bytes()
    keep = len(data) // 2 if cut == "half" else len(data) - cut
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=r"a\.ckpt.*(truncated|trailer)"):
        load_checkpoint(path)


def test_damaged_checkpoint_is_refused(tmp_path) -> None:
    path = save_checkpoint(_state(), tmp_path / "a.ckpt")
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


def test_missing_checkpoint_names_the_file(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.ckpt does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_rng_state_round_trip_for_python_numpy_torch() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)), np.random.randn())
    restore_rng_state(state)
    second = (random.random(), float(np.random.rand()), float(torch.rand(1)), np.random.randn())
    assert first == second


def test_rng_state_survives_a_checkpoint(tmp_path) -> None:
    torch.manual_seed(5)
    np.random.seed(5)
    path = save_checkpoint({"rng": capture_rng_state()}, tmp_path / "r.ckpt")
    expected = (float(torch.rand(1)), float(np.random.rand()))
    torch.manual_seed(99)
    np.random.seed(99)
    restore_rng_state(load_checkpoint(path)["rng"])
    assert (float(torch.rand(1)), float(np.random.rand())) == expected


def test_checkpoint_dir_epochs_latest_and_best(tmp_path) -> None:
    ckpt = CheckpointDir(tmp_path / "checkpoints")
    for epoch, is_best in [(1, True), (2, False), (3, True), (4, False)]:
        ckpt.save_epoch({"epoch": epoch}, epoch, is_best)
    assert ckpt.epochs() == [1, 2, 3, 4]
    assert load_checkpoint(ckpt.resolve("latest"))["epoch"] == 4
    assert load_checkpoint(ckpt.resolve("best"))["epoch"] == 3
    assert load_checkpoint(ckpt.resolve("2"))["epoch"] == 2
    assert load_checkpoint(ckpt.resolve(tmp_path))["epoch"] == 4  # a run directory -> its latest
    ckpt.save_latest({"epoch": 4, "position": 2})  # mid-epoch state replaces latest only
    assert load_checkpoint(ckpt.resolve("latest"))["position"] == 2
    assert load_checkpoint(ckpt.epoch_path(4))["epoch"] == 4 and "position" not in load_checkpoint(ckpt.epoch_path(4))
    with pytest.raises(CheckpointError, match="no checkpoint for epoch 9"):
        ckpt.resolve("9")
    with pytest.raises(CheckpointError, match="no best checkpoint"):
        CheckpointDir(tmp_path / "empty").resolve("best")
