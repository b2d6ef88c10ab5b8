"""Training on several processes: torchrun + DDP matches one process on the same global batch, only rank 0
writes, and the checkpoint resumes with another world size at the right step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tests.training.toy_family  # noqa: F401  (registers toy_ae)
from training.checkpoint import CheckpointDir, load_checkpoint
from training.config import TrainConfig
from training.distributed import SINGLE, from_environment, rank_seed
from training.loop import train
from training.sampling import shard_of_batch
from training.tasks import build_model, default_config

REPO = Path(__file__).resolve().parents[2]
# A global batch of 5 over 2 ranks (3 + 2 samples: the uneven split's loss weights are exercised), two
# micro-batches per step (DDP's no_sync), no BatchNorm (DDP keeps per-rank batch statistics on CPU).
BATCH, ACCUM, SAMPLES, EPOCHS = 5, 2, 20, 2
STEPS_PER_EPOCH = SAMPLES // BATCH // ACCUM
# Measured: the largest relative difference per step between 2 ranks and 1 process was 1.2e-7 (float32
# summation order of the gradient all-reduce and of the per-rank loss means).
REL_TOL = 1e-5


def _config(epochs: int) -> TrainConfig:
    return default_config(
        "toy_ae",
        epochs=epochs,
        batch_size=BATCH,
        grad_accum=ACCUM,
        model_overrides={"norm": False},
        data={"n": SAMPLES},
    )


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_shards_partition_every_global_batch() -> None:
    batch = list(range(10, 15))
    shards = [shard_of_batch(batch, rank, 2) for rank in range(2)]
    assert shards == [[10, 11, 12], [13, 14]]
    assert [x for s in (shard_of_batch(batch, r, 3) for r in range(3)) for x in s] == batch
    with pytest.raises(ValueError, match="cannot be split over 4 processes"):
        shard_of_batch([1, 2, 3], 0, 4)


def test_launch_is_read_from_the_torchrun_environment() -> None:
    assert from_environment({}) is SINGLE and SINGLE.shard([3, 1]) == ([3, 1], 1.0) and SINGLE.describe() == {}
    launch = from_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.active, launch.is_main) == (1, 2, 1, True, False)
    assert launch.share([0, 1, 2, 3, 4]) == [1, 3]
    with pytest.raises(ValueError, match="RANK=2 is outside WORLD_SIZE=2"):
        from_environment({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert rank_seed(0, 1, 0) != rank_seed(0, 2, 0) and 0 <= rank_seed(7, 1, 5) < 2**63


def _torchrun(out: Path, writes: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "training", "--threads", "1", "--import", "tests.training.ddp_probe",
        "train", "--model", "toy_ae", "--set", "norm=false", "--set", f"data.n={SAMPLES}",
        "--batch-size", str(BATCH), "--grad-accum", str(ACCUM), "--epochs", str(EPOCHS),
        "--out", str(out), "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "AESERVE_WRITES_DIR": str(writes)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_processes_match_one_and_resume_on_one(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("training.plots.plot_loss_curve", lambda *args, **kwargs: None)  # time, not behaviour
    run, writes = tmp_path / "ddp", tmp_path / "writes"
    writes.mkdir()
    done = _torchrun(run, writes)
    summaries = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and json.loads(summaries[0])["step"] == EPOCHS * STEPS_PER_EPOCH  # rank 0 only

    # the same global batches in one process (this one), one epoch further
    reference = train(_config(EPOCHS + 1), tmp_path / "one", progress=False).history
    log = json.loads((run / "log.json").read_text())
    steps = EPOCHS * STEPS_PER_EPOCH
    assert [r["step"] for r in log["steps"]] == list(range(1, steps + 1))
    for ddp, one in zip(log["steps"], reference["steps"][:steps], strict=True):
        assert _relative(ddp["loss"], one["loss"]) <= REL_TOL, (ddp, one)
    for ddp, one in zip(log["epochs"], reference["epochs"][:EPOCHS], strict=True):
        assert _relative(ddp["val_loss"], one["val_loss"]) <= REL_TOL
        assert _relative(ddp["val"]["psnr"], one["val"]["psnr"]) <= REL_TOL
    assert log["events"][0]["world_size"] == 2

    # only rank 0 wrote checkpoints and log
    assert not (writes / "rank1.txt").exists()
    written = {Path(p).name for p in (writes / "rank0.txt").read_text().split()}
    assert written == {"epoch_0001.ckpt", "epoch_0002.ckpt", "log.json"}

    # the checkpoint: the unwrapped model, every rank's RNG state; resumes in one process at its step
    state = load_checkpoint(CheckpointDir(run / "checkpoints").resolve("latest"))
    assert set(state["model"]) == set(build_model(_config(1)).state_dict())
    assert (state["step"], state["epoch"], len(state["rng_by_rank"])) == (steps, EPOCHS, 2)
    assert torch.equal(state["rng"]["torch"], state["rng_by_rank"][0]["torch"])
    resumed = train(_config(EPOCHS + 1), run, resume="latest", progress=False)
    assert resumed.step == steps + STEPS_PER_EPOCH and resumed.epochs_completed == EPOCHS + 1
    resume_event = [e for e in resumed.history["events"] if e["event"] == "resume"]
    assert [(e["step"], e["epoch"]) for e in resume_event] == [(steps, EPOCHS)]
    assert [r["step"] for r in resumed.history["steps"]] == list(range(1, resumed.step + 1))
    for after, one in zip(resumed.history["steps"][steps:], reference["steps"][steps:], strict=True):
        assert _relative(after["loss"], one["loss"]) <= REL_TOL, (after, one)
