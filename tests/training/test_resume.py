"""Incremental training: resume continues exactly, and SIGKILL never corrupts the newest checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tests.training.toy_family  # noqa: F401  (registers toy_ae)
from training.checkpoint import CheckpointDir, load_checkpoint
from training.loop import train
from training.tasks import default_config

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "training", "--threads", "1", "--import", "tests.training.toy_family"]
TOY_SET = ["--set", "noise=0.1", "--set", "data.n=24"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*CLI, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"CLI failed ({done.returncode}): {done.stderr[-2000:]}")
    return done


def _train_like_the_cli(config, out: Path):
    """`train` in this process with one torch thread, as the CLI runs (`--threads 1`): float sums depend on
    the thread count, and other tests in this pytest worker may have changed it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(config, out, progress=False)
    finally:
        torch.set_num_threads(threads)


def _losses(log_path: Path) -> list[tuple[int, int, float]]:
    log = json.loads(log_path.read_text())
    return [(r["step"], r["epoch"], r["loss"]) for r in log["steps"]]


@pytest.mark.slow
def test_resume_more_epochs_matches_uninterrupted_run(tmp_path) -> None:
    run = tmp_path / "run"
    _cli("train", "--model", "toy_ae", *TOY_SET, "--epochs", "2", "--out", str(run), "--no-progress")
    assert CheckpointDir(run / "checkpoints").epochs() == [1, 2]
    _cli(
        "train",
        "--model",
        "toy_ae",
        "--resume",
        "latest",
        "--more-epochs",
        "1",
        "--out",
        str(run),
        "--no-progress",
    )

    straight = _train_like_the_cli(
        default_config("toy_ae", epochs=3, model_overrides={"noise": 0.1}, data={"n": 24}), tmp_path / "straight"
    )
    resumed = _losses(run / "log.json")
    expected = [(r["step"], r["epoch"], r["loss"]) for r in straight.history["steps"]]
    assert [s for s, _, _ in resumed] == list(range(1, len(expected) + 1)), "no gap, no repeat"
    assert [e for _, e, _ in resumed] == [e for _, e, _ in expected]
    assert max(abs(a[2] - b[2]) for a, b in zip(resumed, expected, strict=True)) <= 1e-6
    log = json.loads((run / "log.json").read_text())
    assert [r["epoch"] for r in log["epochs"]] == [1, 2, 3]
    assert [r["val_loss"] for r in log["epochs"]] == pytest.approx(
        [r["val_loss"] for r in straight.history["epochs"]], abs=1e-6
    )
    assert (run / "loss_curve.png").stat().st_size > 1000


def test_resuming_a_finished_target_trains_nothing(tmp_path) -> None:
    config = default_config("toy_ae", epochs=1)
    first = train(config, tmp_path, progress=False)
    again = train(config, tmp_path, resume="latest", progress=False)
    assert first.step == again.step == 6 and again.epochs_completed == 1


@pytest.mark.slow
def test_resume_subcommand(tmp_path) -> None:
    run = tmp_path / "run"
    train(default_config("toy_ae", epochs=1), run, progress=False)
    out = _cli("resume", str(run), "latest", "--more-epochs", "1", "--no-progress")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["epochs_completed"] == 2 and summary["step"] == 12


def test_truncated_latest_is_refused_with_a_clear_message(tmp_path) -> None:
    run = tmp_path / "run"
    train(default_config("toy_ae", epochs=1), run, progress=False)
    latest = run / "checkpoints" / "latest.ckpt"
    data = latest.read_bytes()
    latest.unlink()  # break the hard link so epoch_0001 stays intact
    latest.write_bytes(data[: len(data) - 100])
    done = _cli(
        "train",
        "--model",
        "toy_ae",
        "--resume",
        "latest",
        "--more-epochs",
        "1",
        "--out",
        str(run),
        "--no-progress",
        check=False,
    )
    assert done.returncode == 2
    assert "latest.ckpt is truncated or damaged" in done.stderr


_SAVER = """
import sys, torch
from training.checkpoint import CheckpointDir
ckpt = CheckpointDir(sys.argv[1])
for i in range(1, 10_000):
    state = {"i": i, "blob": torch.full((4_000_000,), float(i))}
    ckpt.save_epoch(state, i, is_best=i % 2 == 0)
    ckpt.save_latest({**state, "mid": True})
    print(i, flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.013, 0.041, 0.077])
def test_sigkill_mid_save_leaves_newest_checkpoint_loadable(tmp_path, delay) -> None:
    directory = tmp_path / "checkpoints"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(directory)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        saved = [int(proc.stdout.readline()) for _ in range(2)]  # at least two complete saves
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    ckpt = CheckpointDir(directory)
    latest = load_checkpoint(ckpt.resolve("latest"))
    assert latest["i"] >= saved[-1]
    assert float(latest["blob"][0]) == latest["i"] == float(latest["blob"][-1])
    best = load_checkpoint(ckpt.resolve("best"))
    assert best["i"] % 2 == 0
    for epoch in ckpt.epochs()[:-1]:  # every epoch file but the one possibly being written is whole
        assert load_checkpoint(ckpt.epoch_path(epoch))["i"] == epoch


@pytest.mark.slow
def test_training_killed_at_a_random_moment_resumes_exactly(tmp_path) -> None:
    run = tmp_path / "run"
    args = [
        "train",
        "--model",
        "toy_ae",
        "--set",
        "data.n=64",
        "--set",
        "noise=0.1",
        "--epochs",
        "3",
        "--out",
        str(run),
        "--no-progress",
    ]
    proc = subprocess.Popen([*CLI, *args], cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not (run / "checkpoints" / "epoch_0001.ckpt").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "first epoch never finished"
            time.sleep(0.01)
        time.sleep(0.15)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    _cli(
        "train",
        "--model",
        "toy_ae",
        "--resume",
        "latest",
        "--epochs",
        "3",
        "--out",
        str(run),
        "--no-progress",
    )
    straight = _train_like_the_cli(
        default_config("toy_ae", epochs=3, model_overrides={"noise": 0.1}, data={"n": 64}), tmp_path / "straight"
    )
    resumed = _losses(run / "log.json")
    expected = [(r["step"], r["epoch"], r["loss"]) for r in straight.history["steps"]]
    assert [s for s, _, _ in resumed] == [s for s, _, _ in expected]
    assert max(abs(a[2] - b[2]) for a, b in zip(resumed, expected, strict=True)) <= 1e-6
