"""Checkpoint retention: the newest N epochs plus best and latest, a disk budget checked before each
write, a full disk that leaves the newest good checkpoint intact, and temp files of a killed write
removed on the next start."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tests.training.toy_family  # noqa: F401  (registers toy_ae)
from training.__main__ import main
from training.checkpoint import (
    CheckpointDir,
    DiskSpaceError,
    encode_checkpoint,
    load_checkpoint,
    remove_stale_temps,
)
from training.config import TrainConfig
from training.loop import Trainer, train
from training.tasks import default_config

REPO = Path(__file__).resolve().parents[2]


def _state(epoch: int) -> dict:
    return {"epoch": epoch, "blob": torch.full((50_000,), float(epoch))}


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _disk_quota(monkeypatch: pytest.MonkeyPatch, quota: int) -> Callable[[], int]:
    """Make `os.write` fail with ENOSPC once `quota` more bytes have been written (a tiny filesystem)."""
    real_write = os.write
    written = [0]

    def write(fd: int, data: bytes) -> int:
        room = quota - written[0]
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        count = real_write(fd, memoryview(data)[:room])
        written[0] += count
        return count

    monkeypatch.setattr(os, "write", write)
    return lambda: written[0]


def _free_space(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    usage = SimpleNamespace(total=10 * free, used=9 * free, free=free)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage)


# --- CheckpointDir ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_last", [3, 1, 0, None])
def test_keep_last_keeps_the_newest_epochs_plus_best_and_latest(tmp_path, keep_last) -> None:
    ckpt = CheckpointDir(tmp_path, keep_last=keep_last)
    for epoch in range(1, 6):
        ckpt.save_epoch(_state(epoch), epoch, is_best=epoch == 1)
        first = 1 if keep_last is None else epoch - keep_last + 1
        assert ckpt.epochs() == list(range(max(first, 1), epoch + 1))
    assert load_checkpoint(ckpt.latest)["epoch"] == 5
    assert load_checkpoint(ckpt.best)["epoch"] == 1  # best outlives the pruning of its epoch file
    assert _leftovers(tmp_path) == []


def test_enospc_during_a_write_keeps_latest_best_and_older_epochs(tmp_path, monkeypatch) -> None:
    ckpt = CheckpointDir(tmp_path, keep_last=2)
    for epoch in (1, 2, 3):
        ckpt.save_epoch(_state(epoch), epoch, is_best=epoch == 2)
    written = _disk_quota(monkeypatch, quota=len(encode_checkpoint(_state(4))) // 2)
    with pytest.raises(DiskSpaceError, match=r"disk full while writing checkpoint .*epoch_0004\.ckpt.*intact"):
        ckpt.save_epoch(_state(4), 4, is_best=True)
    assert written() > 0, "the write had started when the disk filled up"
    monkeypatch.undo()
    assert _leftovers(tmp_path) == [], "the partial temp file is removed"
    assert ckpt.epochs() == [2, 3], "nothing is pruned when the new checkpoint was not written"
    assert load_checkpoint(ckpt.latest)["epoch"] == 3
    assert load_checkpoint(ckpt.best)["epoch"] == 2


def test_enospc_during_a_mid_epoch_save_keeps_latest(tmp_path, monkeypatch) -> None:
    ckpt = CheckpointDir(tmp_path)
    ckpt.save_epoch(_state(1), 1, is_best=True)
    ckpt.save_latest({**_state(1), "position": 3})
    _disk_quota(monkeypatch, quota=1000)
    with pytest.raises(DiskSpaceError, match="disk full"):
        ckpt.save_latest({**_state(1), "position": 4})
    monkeypatch.undo()
    assert load_checkpoint(ckpt.latest)["position"] == 3 and _leftovers(tmp_path) == []


def test_other_write_errors_are_not_reported_as_a_full_disk(tmp_path, monkeypatch) -> None:
    def broken(fd: int, data: bytes) -> int:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "write", broken)
    with pytest.raises(OSError, match="I/O error") as raised:
        CheckpointDir(tmp_path).save_latest(_state(1))
    assert not isinstance(raised.value, DiskSpaceError)
    monkeypatch.undo()
    assert _leftovers(tmp_path) == []


def test_disk_budget_is_checked_before_writing(tmp_path, monkeypatch) -> None:
    size = len(encode_checkpoint(_state(2)))
    ckpt = CheckpointDir(tmp_path)
    ckpt.save_epoch(_state(1), 1, is_best=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    _free_space(monkeypatch, int(1.5 * size))  # room for the checkpoint, but not for the default reserve
    monkeypatch.setattr(os, "write", lambda fd, data: pytest.fail("nothing may be written"))
    with pytest.raises(DiskSpaceError, match=r"not enough disk space .*epoch_0002\.ckpt.*latest\.ckpt is intact"):
        ckpt.save_epoch(_state(2), 2, is_best=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(DiskSpaceError, match=r"1\.0 MiB must stay free"):
        CheckpointDir(tmp_path, min_free_disk_mb=1).save_latest(_state(2))
    monkeypatch.undo()
    _free_space(monkeypatch, int(1.5 * size))
    CheckpointDir(tmp_path, min_free_disk_mb=0).save_epoch(_state(2), 2, is_best=False)  # just fits
    assert load_checkpoint(ckpt.latest)["epoch"] == 2


def test_stale_temp_files_are_removed_and_logged(tmp_path, caplog) -> None:
    names = [".latest.ckpt.k2j4h1.tmp", ".epoch_0003.ckpt.abc.tmp", ".best.ckpt.4242.link", ".log.json.x1.tmp"]
    for name in [*names, "notes.txt", "epoch_0001.ckpt"]:
        (tmp_path / name).write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0001.ckpt", "notes.txt"]
    assert sum("left over from an interrupted write" in r.getMessage() for r in caplog.records) == len(names)
    assert remove_stale_temps(tmp_path / "missing") == []


# --- TrainConfig ---------------------------------------------------------------------------------------------


def test_config_defaults_validation_and_the_former_field_name() -> None:
    config = TrainConfig(model="m")
    assert config.keep_last == 3 and config.min_free_disk_mb is None
    assert TrainConfig.from_dict(config.to_dict()) == config
    for changes in ({"keep_last": -1}, {"min_free_disk_mb": -1.0}):
        with pytest.raises(ValueError, match="out of range"):
            TrainConfig(model="m", **changes)
    assert TrainConfig.from_dict({"model": "m", "keep_epoch_checkpoints": 0}).keep_last is None  # 0 was "all"
    assert TrainConfig.from_dict({"model": "m", "keep_last": 3, "keep_epoch_checkpoints": 1}).keep_last == 1


# --- the loop and the CLI ------------------------------------------------------------------------------------


def test_a_run_keeps_three_epoch_checkpoints_by_default(tmp_path) -> None:
    result = train(default_config("toy_ae", epochs=5, data={"n": 8}), tmp_path, progress=False)
    ckpt = CheckpointDir(tmp_path / "checkpoints")
    assert result.epochs_completed == 5 and ckpt.epochs() == [3, 4, 5]
    best_epoch = min(result.history["epochs"], key=lambda r: r["val_loss"])["epoch"]
    assert load_checkpoint(ckpt.best)["epoch"] == best_epoch
    assert load_checkpoint(ckpt.latest)["epoch"] == 5


def test_a_full_disk_stops_the_run_and_the_next_start_resumes(tmp_path, monkeypatch, caplog) -> None:
    config = default_config("toy_ae", epochs=1, data={"n": 8})
    train(config, tmp_path, progress=False)
    trainer = Trainer(config.replace(epochs=3), tmp_path, resume="latest", progress=False)
    _disk_quota(monkeypatch, quota=1000)
    with pytest.raises(DiskSpaceError, match="disk full"):
        trainer.fit()
    monkeypatch.undo()
    ckpt = CheckpointDir(tmp_path / "checkpoints")
    assert load_checkpoint(ckpt.latest)["epoch"] == 1 and ckpt.epochs() == [1]
    assert json.loads((tmp_path / "log.json").read_text())["epochs"][-1]["epoch"] == 1
    assert _leftovers(ckpt.directory) == [] and _leftovers(tmp_path) == []
    (ckpt.directory / ".epoch_0002.ckpt.killed.tmp").write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        result = train(config.replace(epochs=2), tmp_path, resume="latest", progress=False)
    assert "epoch_0002.ckpt.killed.tmp, left over from an interrupted write" in caplog.text
    assert result.epochs_completed == 2 and ckpt.epochs() == [1, 2] and _leftovers(ckpt.directory) == []


def _cli_train(run: Path, *flags: str) -> list[str]:
    data = [] if "--resume" in flags else ["--set", "data.n=8"]
    return ["train", "--model", "toy_ae", *data, "--out", str(run), "--no-progress", *flags]


def test_cli_keep_last_and_disk_budget(tmp_path, capsys) -> None:
    assert main(_cli_train(tmp_path, "--epochs", "3", "--keep-last", "1")) == 0
    ckpt = CheckpointDir(tmp_path / "checkpoints")
    assert ckpt.epochs() == [3]
    assert json.loads((tmp_path / "log.json").read_text())["train_config"]["keep_last"] == 1
    capsys.readouterr()
    code = main(_cli_train(tmp_path, "--resume", "latest", "--more-epochs", "1", "--min-free-disk-mb", "1e12"))
    assert code == 2
    err = capsys.readouterr().err
    assert "error: not enough disk space to write checkpoint" in err and "latest.ckpt is intact" in err
    assert load_checkpoint(ckpt.latest)["epoch"] == 3 and ckpt.epochs() == [3]
    assert main(_cli_train(tmp_path, "--epochs", "1", "--keep-last", "-1")) == 2
    assert "keep_last=-1 is out of range" in capsys.readouterr().err
    assert main(_cli_train(tmp_path / "none", "--epochs", "2", "--keep-last", "0")) == 0
    assert CheckpointDir(tmp_path / "none" / "checkpoints").epochs() == []
    assert load_checkpoint(tmp_path / "none" / "checkpoints" / "latest.ckpt")["epoch"] == 2


_SAVER = """
import sys, torch
from training.checkpoint import CheckpointDir
ckpt = CheckpointDir(sys.argv[1], keep_last=1)
for i in range(1, 10_000):
    state = {"i": i, "blob": torch.full((4_000_000,), float(i))}
    ckpt.save_epoch(state, i, is_best=i % 2 == 0)
    ckpt.save_latest({**state, "mid": True})
    print(i, flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.029])
def test_sigkill_mid_save_with_pruning_leaves_latest_loadable(tmp_path, delay) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(tmp_path)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        saved = [int(proc.stdout.readline()) for _ in range(2)]
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    ckpt = CheckpointDir(tmp_path)
    latest = load_checkpoint(ckpt.resolve("latest"))
    assert latest["i"] >= saved[-1] and float(latest["blob"][-1]) == latest["i"]
    assert load_checkpoint(ckpt.resolve("best"))["i"] % 2 == 0
    assert len(ckpt.epochs()) <= 2, "pruning kept up with the saves"
    remove_stale_temps(tmp_path)
    assert _leftovers(tmp_path) == []
