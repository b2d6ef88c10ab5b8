"""`python -m training ...`: train, export, sample, build-store (in-process through `main`)."""

from __future__ import annotations

import json

import pytest

import tests.training.toy_family  # noqa: F401  (registers toy_ae)
from training.__main__ import main
from training.recipes import load_recipe, load_recipes
from training.store import read_manifest, verify_version

TOY_RECIPE = """
name: toy-small
version: "3"
model: toy_ae
description: a toy for the CLI test
overrides: {latent_dim: 6}
data: {n: 16}
train: {epochs: 2, batch_size: 4, lr: 0.003}
formats: [onnx]
"""


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_flags_reach_the_config(tmp_path, capsys) -> None:
    code = main(
        [
            "train",
            "--model",
            "toy_ae",
            "--set",
            "latent_dim=5",
            "--set",
            "data.n=8",
            "--epochs",
            "2",
            "--batch-size",
            "2",
            "--lr",
            "0.01",
            "--grad-accum",
            "2",
            "--seed",
            "3",
            "--amp",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    summary = _last_json(capsys)
    assert summary["epochs_completed"] == 2 and summary["step"] == 4 and summary["stopped"] == "done"
    log = json.loads((tmp_path / "log.json").read_text())
    config = log["train_config"]
    assert (config["batch_size"], config["lr"], config["grad_accum"], config["seed"], config["amp"]) == (
        2,
        0.01,
        2,
        3,
        "auto",
    )
    assert config["model_overrides"] == {"latent_dim": 5} and config["data"] == {"n": 8}
    assert (
        main(
            [
                "train",
                "--model",
                "toy_ae",
                "--resume",
                "latest",
                "--more-epochs",
                "1",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    assert _last_json(capsys)["epochs_completed"] == 3


def test_errors_are_clear(tmp_path, capsys) -> None:
    assert main(["train", "--model", "nope_model", "--out", str(tmp_path)]) == 2
    assert "unknown model 'nope_model'" in capsys.readouterr().err
    assert main(["train", "--model", "toy_ae", "--set", "train.zzz=1", "--out", str(tmp_path)]) == 2
    assert "train.zzz: not a TrainConfig field" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no such file"):
        main(
            [
                "train",
                "--model",
                "toy_ae",
                "--init",
                str(tmp_path / "missing.safetensors"),
                "--out",
                str(tmp_path),
            ]
        )
    with pytest.raises(SystemExit, match="either --epochs or --more-epochs"):
        main(["train", "--model", "toy_ae", "--epochs", "2", "--more-epochs", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["train", "--model", "toy_ae", "--amp", "fp8"])


@pytest.mark.slow
def test_export_and_sample_from_a_checkpoint(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--model", "toy_ae", "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(run / "checkpoints" / "best.ckpt"),
                "--store",
                str(tmp_path / "s"),
                "--name",
                "toy",
                "--version",
                "7",
                "--formats",
                "onnx",
            ]
        )
        == 0
    )
    manifest = verify_version(tmp_path / "s" / "toy" / "7")
    assert manifest.training["epochs"] == 1 and "psnr" in manifest.training["val"]
    assert set(manifest.ops) == {"encode", "decode", "reconstruct"}
    png = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(run), "--n", "4", "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_recipes_parse_and_reject_unknown_keys(tmp_path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(TOY_RECIPE)
    recipe = load_recipe(path)
    assert (recipe.name, recipe.version, recipe.formats) == ("toy-small", "3", ("onnx",))
    config = recipe.train_config()
    assert config.model_overrides == {"latent_dim": 6} and config.epochs == 2 and config.lr == 0.003
    assert config.lr_decay_steps == 20  # the family default survives
    (tmp_path / "b.yaml").write_text(TOY_RECIPE)
    with pytest.raises(ValueError, match="both build toy-small/3"):
        load_recipes(tmp_path)
    path.write_text(TOY_RECIPE + "colour: blue\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour'\]"):
        load_recipe(path)
    path.write_text(TOY_RECIPE.replace("[onnx]", "[onnx, tflite]"))
    with pytest.raises(ValueError, match="unknown format"):
        load_recipe(path)


def test_default_recipes_parse_and_name_registered_models() -> None:
    from pathlib import Path

    from training.registry import list_models

    recipes = load_recipes(Path(__file__).resolve().parents[2] / "model_store" / "recipes")
    assert recipes, "the default store has recipes"
    known = set(list_models())
    for recipe in recipes:
        assert recipe.model in known, recipe.source
        recipe.train_config()  # builds a valid TrainConfig
        assert recipe.train.get("time_budget_s", 0) > 0, f"{recipe.source}: the default store is time-boxed"


@pytest.mark.slow
def test_build_store_builds_then_skips_when_present(tmp_path, capsys) -> None:
    recipes = tmp_path / "store" / "recipes"
    recipes.mkdir(parents=True)
    (recipes / "toy.yaml").write_text(TOY_RECIPE)
    args = [
        "build-store",
        "--store",
        str(tmp_path / "store"),
        "--runs",
        str(tmp_path / "runs"),
        "--if-missing",
        "--no-progress",
        "--jobs",
        "1",
    ]
    assert main(args) == 0
    assert _last_json(capsys)["built"].keys() == {"toy-small"}
    manifest = read_manifest(tmp_path / "store" / "toy-small" / "3")
    assert manifest.training["epochs"] == 2 and manifest.architecture == "toy_ae"
    assert manifest.training["train_config"]["model_overrides"] == {"latent_dim": 6}
    assert {"log.json", "loss_curve.png"} <= {a.path for a in manifest.artifacts}
    assert main(args) == 0
    assert _last_json(capsys)["built"] == {}
    with pytest.raises(SystemExit, match="no such recipe"):
        main([*args, "--only", "nope"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("progressive_decoder_tiny", ["--set", "data.steps_per_epoch=2"]),
        (
            "diffusion_unet_tiny",
            ["--set", "data.length=4", "--set", "data.val_length=2", "--batch-size", "2"],
        ),
    ],
)
def test_sample_by_sampler_kind(tmp_path, capsys, model, extra) -> None:
    run = tmp_path / "run"
    assert main(["train", "--model", model, *extra, "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    png = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(run), "--n", "3", "--steps", "2", "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_store_takes_the_best_epoch_when_the_final_weights_validate_worse(tmp_path) -> None:
    import dataclasses

    import torch

    from training.build_store import select_weights
    from training.checkpoint import load_checkpoint
    from training.loop import train
    from training.tasks import default_config

    result = train(default_config("toy_ae", epochs=2), tmp_path, progress=False)
    model, val, selected = select_weights(result)
    assert selected == "final" and val == result.val
    worse = dataclasses.replace(result, val={**result.val, "loss": result.best_val_loss + 1.0})
    with torch.no_grad():
        for p in worse.model.parameters():
            p.add_(1.0)
    model, val, selected = select_weights(worse)
    best_epoch = min(result.history["epochs"], key=lambda r: r["val_loss"])
    assert selected == f"best epoch {best_epoch['epoch']}" and val == best_epoch["val"]
    assert val["loss"] == result.best_val_loss
    best_state = load_checkpoint(tmp_path / "checkpoints" / "best.ckpt")["model"]
    assert all(torch.equal(v, best_state[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_build_store_jobs_build_recipes_in_worker_processes(tmp_path, capsys) -> None:
    recipes = tmp_path / "store" / "recipes"
    recipes.mkdir(parents=True)
    (recipes / "a.yaml").write_text(TOY_RECIPE.replace("train: {epochs: 2", "train: {epochs: 1"))
    (recipes / "b.yaml").write_text(TOY_RECIPE.replace("name: toy-small", "name: toy-other"))
    store = tmp_path / "store"
    args = [
        "--import",
        "tests.training.toy_family",
        "build-store",
        "--store",
        str(store),
        "--runs",
        str(tmp_path / "runs"),
        "--jobs",
        "2",
        "--no-progress",
    ]
    assert main(args) == 0
    summary = _last_json(capsys)
    assert summary["jobs"] == 2 and summary["built"].keys() == {"toy-small", "toy-other"}
    assert read_manifest(store / "toy-small" / "3").training["epochs"] == 1
    assert read_manifest(store / "toy-other" / "3").training["epochs"] == 2


@pytest.mark.slow
def test_weights_subcommand_feeds_a_recipe_init_checkpoint(tmp_path, capsys) -> None:
    from safetensors.torch import load_file

    run = tmp_path / "run"
    assert (
        main(
            ["train", "--model", "toy_ae", "--set", "latent_dim=6", "--epochs", "1", "--out", str(run), "--no-progress"]
        )
        == 0
    )
    init = tmp_path / "init.safetensors"
    assert main(["weights", "--checkpoint", str(run), "--out", str(init)]) == 0
    recipes = tmp_path / "store" / "recipes"
    recipes.mkdir(parents=True)
    recipe = TOY_RECIPE.replace("train: {epochs: 2", "train: {epochs: 0") + f"init_checkpoint: {init}\n"
    (recipes / "toy.yaml").write_text(recipe)
    assert (
        main(
            [
                "build-store",
                "--store",
                str(tmp_path / "store"),
                "--runs",
                str(tmp_path / "runs"),
                "--jobs",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    version = tmp_path / "store" / "toy-small" / "3"
    manifest = read_manifest(version)
    assert manifest.training["init_checkpoint"] == str(init) and manifest.training["steps"] == 0
    stored, initial = load_file(str(version / "weights.safetensors")), load_file(str(init))
    assert stored.keys() == initial.keys() and all(stored[k].equal(initial[k]) for k in stored)


def test_weights_fp16_halves_the_floats_and_loads_back_within_half_precision(tmp_path) -> None:
    import torch
    from safetensors.torch import load_file

    from training.registry import create_model

    run = tmp_path / "run"
    assert main(["train", "--model", "toy_ae", "--set", "latent_dim=6", "--epochs", "1", "--out", str(run),
                 "--no-progress"]) == 0
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    assert main(["weights", "--checkpoint", str(run), "--out", str(full)]) == 0
    assert main(["weights", "--checkpoint", str(run), "--out", str(half), "--fp16"]) == 0
    a, b = load_file(str(full)), load_file(str(half))
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert b[key].dtype == (torch.float16 if value.is_floating_point() else value.dtype)
        torch.testing.assert_close(b[key].to(value.dtype), value, rtol=1e-3, atol=1e-4)  # fp16: 11-bit mantissa
    model = create_model("toy_ae", latent_dim=6)
    model.load_state_dict(b, strict=True)  # upcast on load: the parameters stay float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
