"""The training loop: LR schedule, data order, grad accumulation, AMP, time budget, logs, best checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

import tests.training.toy_family  # noqa: F401  (registers toy_ae)
from training.checkpoint import CheckpointDir, load_checkpoint
from training.config import TrainConfig, apply_overrides
from training.loop import Trainer, batches_of_epoch, epoch_order, lr_at, train
from training.runtime import amp_dtype
from training.tasks import default_config


def test_lr_is_warmup_then_cosine_then_flat() -> None:
    config = TrainConfig(model="m", lr=1.0, lr_warmup_steps=4, lr_decay_steps=10, lr_min_ratio=0.1)
    assert [lr_at(s, config) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(4, config) == pytest.approx(1.0)
    assert lr_at(9, config) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, config) == pytest.approx(0.1)
    assert lr_at(10_000, config) == pytest.approx(0.1)
    no_warmup = config.replace(lr_warmup_steps=0)
    assert lr_at(0, no_warmup) == pytest.approx(1.0)


def test_data_order_is_a_pure_function_of_seed_and_epoch() -> None:
    assert torch.equal(epoch_order(50, 3, 2), epoch_order(50, 3, 2))
    assert not torch.equal(epoch_order(50, 3, 2), epoch_order(50, 3, 3))
    assert not torch.equal(epoch_order(50, 3, 2), epoch_order(50, 4, 2))
    assert sorted(epoch_order(50, 3, 2).tolist()) == list(range(50))
    batches = batches_of_epoch(10, 4, torch.arange(10))
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7]]  # partial batch dropped
    assert batches_of_epoch(3, 4, torch.arange(3)) == [[0, 1, 2]]  # unless no full batch exists


def test_train_config_round_trip_and_overrides() -> None:
    config = TrainConfig(model="toy_ae", model_overrides={"size": 16}, betas=(0.8, 0.9), amp="bf16")
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    changed = apply_overrides(config, ["latent_dim=4", "data.n=[1, 2]", "train.lr=0.5", "train.betas=[0.5,0.6]"])
    assert changed.model_overrides == {"size": 16, "latent_dim": 4}
    assert changed.data == {"n": [1, 2]} and changed.lr == 0.5 and changed.betas == (0.5, 0.6)
    with pytest.raises(ValueError, match="not a TrainConfig field"):
        apply_overrides(config, ["train.nope=1"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(config, ["oops"])
    with pytest.raises(ValueError, match="amp='fast'; allowed: off, auto, bf16, fp16"):
        TrainConfig(model="m", amp="fast")
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"model": "m", "epochz": 3})


def test_training_lowers_the_loss_and_writes_log_curve_and_checkpoints(tmp_path) -> None:
    result = train(default_config("toy_ae", epochs=3, data={"n": 32}), tmp_path, progress=False)
    assert result.stopped == "done" and result.epochs_completed == 3 and result.step == 24
    log = json.loads((tmp_path / "log.json").read_text())
    assert len(log["steps"]) == 24 and [r["step"] for r in log["steps"]] == list(range(1, 25))
    assert {"lr", "loss", "mse"} <= set(log["steps"][0])
    assert [r["epoch"] for r in log["epochs"]] == [1, 2, 3]
    assert {"loss", "mse", "psnr"} <= set(log["epochs"][-1]["val"])
    assert log["epochs"][-1]["train_loss"] < log["epochs"][0]["train_loss"]
    assert log["train_config"]["model"] == "toy_ae" and log["model_config"]["size"] == 16
    assert (tmp_path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    ckpt = CheckpointDir(tmp_path / "checkpoints")
    assert ckpt.epochs() == [1, 2, 3]
    best_epoch = min(log["epochs"], key=lambda r: r["val_loss"])["epoch"]
    assert load_checkpoint(ckpt.best)["epoch"] == best_epoch
    state = load_checkpoint(ckpt.latest)
    assert {"model", "optimizer", "scaler", "rng", "data_order", "train_config", "model_config"} <= set(state)
    assert state["step"] == 24 and state["epoch"] == 3 and state["position"] == 0


def test_gradient_accumulation_equals_the_large_batch(tmp_path) -> None:
    base = default_config("toy_ae", epochs=1, model_overrides={"norm": False}, data={"n": 32})
    big = train(base.replace(batch_size=8), tmp_path / "big", progress=False)
    small = train(base.replace(batch_size=4, grad_accum=2), tmp_path / "acc", progress=False)
    assert big.step == small.step == 4
    for a, b in zip(big.history["steps"], small.history["steps"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    for (name, p), q in zip(big.model.state_dict().items(), small.model.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), name


def test_time_budget_stops_mid_epoch_and_resume_is_exact(tmp_path, monkeypatch) -> None:
    config = default_config("toy_ae", epochs=2, data={"n": 64}, model_overrides={"noise": 0.2})
    straight = train(config, tmp_path / "straight", progress=False)

    import training.loop

    clock = iter(range(10_000))  # a fake clock: every reading is one second later
    monkeypatch.setattr(training.loop.time, "monotonic", lambda: float(next(clock)))
    cut = train(config.replace(time_budget_s=7), tmp_path / "cut", progress=False)
    monkeypatch.undo()
    assert cut.stopped == "time_budget" and 0 < cut.step < 16
    state = load_checkpoint(tmp_path / "cut" / "checkpoints" / "latest.ckpt")
    assert (state["epoch"], state["position"]) == (0, cut.step)
    assert math.isfinite(cut.val["loss"])  # validated after stopping, for the report
    resumed = train(config, tmp_path / "cut", resume="latest", progress=False)
    assert [r["loss"] for r in resumed.history["steps"]] == [r["loss"] for r in straight.history["steps"]]


def test_stop_flag_mid_epoch_then_resume_matches(tmp_path, monkeypatch) -> None:
    config = default_config("toy_ae", epochs=2, data={"n": 48}, model_overrides={"noise": 0.2})
    straight = train(config, tmp_path / "straight", progress=False)
    trainer = Trainer(config, tmp_path / "cut", progress=False)
    original = trainer._train_step
    calls = {"n": 0}

    def step_then_interrupt(batches):  # Ctrl-C arrives during step 15 (12 steps per epoch)
        out = original(batches)
        calls["n"] += 1
        if calls["n"] == 15:
            import signal

            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(trainer, "_train_step", step_then_interrupt)
    cut = trainer.fit()
    assert cut.stopped == "interrupted" and cut.step == 15
    state = load_checkpoint(tmp_path / "cut" / "checkpoints" / "latest.ckpt")
    assert (state["epoch"], state["position"]) == (1, 3)
    resumed = train(config, tmp_path / "cut", resume="latest", progress=False)
    assert [r["loss"] for r in resumed.history["steps"]] == [r["loss"] for r in straight.history["steps"]]


def test_amp_bf16_on_cpu_and_fp16_needs_cuda(tmp_path) -> None:
    config = default_config("toy_ae", epochs=1, amp="auto")
    assert amp_dtype(config, torch.device("cpu")) == torch.bfloat16
    assert amp_dtype(config, torch.device("cuda")) == torch.float16
    result = train(config, tmp_path, progress=False)
    assert math.isfinite(result.history["steps"][-1]["loss"]) and result.stopped == "done"
    with pytest.raises(ValueError, match="amp=fp16 needs a CUDA device"):
        amp_dtype(config.replace(amp="fp16"), torch.device("cpu"))


def test_resume_refuses_a_changed_batch_size(tmp_path) -> None:
    config = default_config("toy_ae", epochs=1)
    train(config, tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"cannot resume with changed \['batch_size'\]"):
        train(config.replace(epochs=2, batch_size=2), tmp_path, resume="latest", progress=False)


@pytest.mark.gpu
def test_cuda_fp16_with_grad_scaler(tmp_path) -> None:
    config = default_config("toy_ae", epochs=1, amp="auto", device="cuda")
    trainer = Trainer(config, tmp_path, progress=False)
    assert trainer.scaler.is_enabled()
    result = trainer.fit()
    assert result.stopped == "done" and math.isfinite(result.val["loss"])
    state = load_checkpoint(tmp_path / "checkpoints" / "latest.ckpt")
    assert state["scaler"]["scale"] > 0
