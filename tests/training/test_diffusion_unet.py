"""The conditional diffusion U-Net: config, layout, family protocol, ONNX export, training contract."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from app.schemas.manifest import Preprocessing, SamplerSpec
from training.data.layouts import CONDITION_KEYS as LAYOUT_CONDITION_KEYS
from training.data.layouts import DesignLayouts
from training.losses.diffusion_unet import training_losses, validation_metrics
from training.models.base import Family
from training.models.diffusion_unet import (
    CONDITION_KEYS,
    AttentionBlock,
    DiffusionUNet,
    DiffusionUNetConfig,
    ResidualBlock,
)
from training.originals.diffusion_unet import config_from_original
from training.registry import create_model, list_models
from training.visualize_diffusion import sample_grid_png


def tiny(**overrides) -> DiffusionUNet:
    torch.manual_seed(0)
    return create_model("diffusion_unet_tiny", **overrides)


def inputs(batch: int, size: int = 32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 3, size, size, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    condition = torch.stack([torch.randint(0, 10, (batch,), generator=generator).float(),
                             torch.randint(0, 4, (batch,), generator=generator).float(),
                             torch.rand(batch, generator=generator)], dim=1)
    return x_t, t, condition


def test_variants_are_registered():
    names = set(list_models())
    assert {"diffusion_unet_tiny", "diffusion_unet_32", "diffusion_unet_64", "diffusion_unet_256"} <= names


@pytest.mark.parametrize("overrides, count", [
    ({}, 58_520_515),                                                               # original defaults
    ({"channel_multipliers": (1, 2, 4, 8), "attention_levels": (3,)}, 62_128_835),  # training script
    ({"base_channels": 32, "channel_multipliers": (1, 2), "attention_levels": (1,)}, 1_442_755),
])
def test_parameter_counts_match_the_original(overrides, count):
    with torch.device("meta"):
        model = DiffusionUNet(DiffusionUNetConfig(**overrides))
    assert sum(p.numel() for p in model.parameters()) == count


def test_layout_of_the_public_config_follows_the_skip_bookkeeping():
    with torch.device("meta"):
        model = DiffusionUNet(config_from_original(
            {"base_channels": 32, "channel_multipliers": [1, 2], "attention_levels": [1]}))
    kinds = [type(b).__name__ for b in model.up_blocks]
    assert kinds == ["ResidualBlock", "AttentionBlock"] * 3 + ["Sequential"] + ["ResidualBlock"] * 3
    in_widths = [b.conv1.in_channels for b in model.up_blocks if isinstance(b, ResidualBlock)]
    assert in_widths == [128, 128, 96, 96, 64, 64]
    assert [type(b).__name__ for b in model.down_blocks] == [
        "ResidualBlock", "ResidualBlock", "Conv2d", "ResidualBlock", "AttentionBlock", "ResidualBlock",
        "AttentionBlock"]
    assert sum(isinstance(b, AttentionBlock) for b in model.modules()) == 6   # 2 down, mid, 3 up


@pytest.mark.parametrize("overrides, match", [
    ({"attention_levels": (2,)}, "attention_levels"),
    ({"base_channels": 12}, "divisible by norm_groups"),
    ({"image_size": 31}, "image_size must be divisible"),
    ({"beta_schedule": "quadratic"}, "beta_schedule must be one of"),
    ({"meta_emb_dim": 30}, "meta_emb_dim"),
    ({"num_res_blocks": 0}, "num_res_blocks"),
])
def test_config_rejects_bad_options(overrides, match):
    with pytest.raises(ValueError, match=match):
        create_model("diffusion_unet_tiny", **overrides)


def test_config_round_trips_through_json():
    model = tiny()
    config = json.loads(json.dumps(model.get_config()))
    rebuilt = DiffusionUNet(DiffusionUNetConfig.from_dict(config))
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(ValueError, match="unknown DiffusionUNetConfig fields"):
        DiffusionUNetConfig.from_dict({**config, "widht": 3})


def test_forward_shapes_and_conditioning_paths():
    model = tiny().eval()
    x_t, t, condition = inputs(3)
    with torch.no_grad():
        eps = model(x_t, t, condition)
        eps_no_meta = model(x_t, t, None)
        other = condition.clone()
        other[:, 1] = (other[:, 1] + 1) % 4
        eps_other = model(x_t, t, other)
        eps_64 = model(*inputs(2, size=64))   # fully convolutional
    assert eps.shape == x_t.shape and eps_no_meta.shape == x_t.shape and eps_64.shape == (2, 3, 64, 64)
    assert (eps - eps_no_meta).abs().max() > 1e-4
    assert (eps - eps_other).abs().max() > 1e-4
    # ids are truncated like the original's .long(): 3.7 behaves as 3
    fractional = condition.clone()
    fractional[:, 0] += 0.7
    with torch.no_grad():
        torch.testing.assert_close(model(x_t, t, fractional), eps)


def test_family_protocol_and_manifest_specs():
    model = create_model("diffusion_unet_64")
    assert isinstance(model, Family) and model.family == "diffusion-decoder"
    assert model.capabilities() == ["sample"]
    pre = Preprocessing(**model.preprocessing())
    assert pre.channels == 3 and pre.input_size == (64, 64) and pre.resize == "none"
    assert pre.output_range == (-1.0, 1.0)
    spec = SamplerSpec(**model.sampler_spec())
    assert spec.kind == "ddim" and spec.num_train_timesteps == 1000 and spec.beta_schedule == "linear"
    assert (spec.beta_start, spec.beta_end) == (1e-4, 0.02) and spec.default_steps == 50
    assert spec.max_steps == 1000 and spec.default_eta == 0.0 and spec.clip_denoised
    assert spec.condition_dim == 3 and spec.condition_keys == ["goal", "format", "tone"]
    assert spec.image_shape == [3, 64, 64]
    assert CONDITION_KEYS == LAYOUT_CONDITION_KEYS


def test_gradient_checkpointing_gives_the_same_gradients():
    x_t, t, condition = inputs(2)
    grads = []
    for flag in (False, True):
        model = tiny(gradient_checkpointing=flag).train()
        model(x_t, t, condition).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def _onnx_parity(tmp_path, dynamo: bool) -> list[float]:
    import onnxruntime as ort

    model = tiny().eval()
    (op,) = model.export_ops(batch_size=2)
    assert op.name == "denoise" and op.input_names == ["x_t", "t", "condition"] and op.output_names == ["eps"]
    assert op.example_inputs[1].dtype == torch.int64
    path = tmp_path / f"denoise_{dynamo}.onnx"
    if dynamo:
        batch = torch.export.Dim("batch")
        extra = {"dynamic_shapes": ({0: batch}, {0: batch}, {0: batch})}
    else:
        extra = {"dynamic_axes": {name: {0: "batch"} for name in op.input_names + op.output_names}}
    torch.onnx.export(op.module, op.example_inputs, str(path), input_names=op.input_names,
                      output_names=op.output_names, opset_version=18, dynamo=dynamo, **extra)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    errors = []
    for seed, shapes in enumerate(op.check_shapes):
        x_t, t, condition = inputs(shapes[0][0], seed=seed + 1)
        assert (x_t.shape, t.shape, condition.shape) == tuple(torch.Size(s) for s in shapes)
        (eps,) = session.run(None, {"x_t": x_t.numpy(), "t": t.numpy(), "condition": condition.numpy()})
        with torch.no_grad():
            expected = model(x_t, t, condition)
        errors.append(float((torch.from_numpy(eps) - expected).abs().max()))
    # out-of-range ids and timesteps are clamped instead of failing the gather
    wild = torch.tensor([[-3.0, 9.0, 0.5]])
    (eps,) = session.run(None, {"x_t": inputs(1)[0].numpy(), "t": torch.tensor([5000]).numpy(),
                                "condition": wild.numpy()})
    assert eps.shape == (1, 3, 32, 32)
    return errors


def test_denoise_exports_to_onnx_with_dynamic_batch(tmp_path):
    assert max(_onnx_parity(tmp_path, dynamo=False)) < 1e-4


@pytest.mark.slow
def test_denoise_exports_with_the_dynamo_exporter(tmp_path):
    assert max(_onnx_parity(tmp_path, dynamo=True)) < 1e-4


def test_training_losses_are_reproducible_and_differentiable():
    model = tiny().train()
    batch = next(iter(DataLoader(DesignLayouts(32, 4), batch_size=4)))
    torch.manual_seed(7)
    first = training_losses(model, batch)
    torch.manual_seed(7)
    second = training_losses(model, batch)
    assert first["loss"].item() == second["loss"].item()
    assert first["loss"].requires_grad and not first["eps_mse"].requires_grad
    first["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_validation_metrics_are_fixed_and_restore_mode():
    model = tiny(dropout=0.2).train()
    batch = next(iter(DataLoader(DesignLayouts(32, 4, seed=5), batch_size=4)))
    torch.manual_seed(1)
    first = validation_metrics(model, batch)
    torch.manual_seed(2)
    second = validation_metrics(model, batch)
    assert first == second and model.training
    assert set(first) >= {"eps_mse", "x0_psnr", "eps_mse_t50", "eps_mse_t950"}
    per_t = [first[f"eps_mse_t{t}"] for t in (50, 250, 500, 750, 950)]
    assert first["eps_mse"] == pytest.approx(sum(per_t) / 5)


def test_sample_and_png_grid(tmp_path):
    from PIL import Image

    model = tiny().eval()
    conditions = torch.tensor([[0, 0, 0.5], [3, 1, 0.7], [9, 3, 0.1]])
    images = model.sample(conditions, steps=3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    path = sample_grid_png(model, None, conditions, tmp_path / "grid.png", steps=3, seed=0)
    with Image.open(path) as png:
        assert png.size == (2 * 33 + 1, 2 * 33 + 1) and png.mode == "RGB"
    again = sample_grid_png(model, None, conditions, tmp_path / "again.png", steps=3, seed=0)
    assert path.read_bytes() == again.read_bytes()


def test_tiny_unet_learns_layouts():
    """A few dozen Adam steps lower the fixed-t validation ε-MSE by a clear margin."""
    torch.manual_seed(0)
    model = create_model("diffusion_unet_tiny", base_channels=8, time_emb_dim=32, meta_emb_dim=32)
    val = next(iter(DataLoader(DesignLayouts(32, 16, seed=99), batch_size=16)))
    train = DataLoader(DesignLayouts(32, 320, seed=0), batch_size=8, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    before = validation_metrics(model, val)["eps_mse"]
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for batch in train:
        loss = training_losses(model.train(), batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = validation_metrics(model, val)["eps_mse"]
    assert after < 0.6 * before, (before, after)
