"""ProgressiveDecoder: configuration modes, options, methods, family protocol, export, learning."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from torch.utils.data import default_collate

from app.schemas.manifest import Preprocessing, SamplerSpec
from training.data.single_image import SingleImageDataset
from training.forward_operators import place_object
from training.layers.crop_pad import CropPad
from training.losses.progressive_decoder import training_losses, validation_metrics
from training.models.base import Family
from training.models.progressive_decoder import (
    NetworkConfig,
    ProgressiveDecoder,
    ProgressiveDecoderConfig,
)
from training.registry import create_model, list_models

pytestmark = pytest.mark.filterwarnings("ignore:output_size=.* is not a power of 2:UserWarning")


def _randomize_norms(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = torch.rand(n, generator=generator) * 0.5 + 0.75
            module.bias.data = torch.randn(n, generator=generator) * 0.1
            module.running_mean = torch.randn(n, generator=generator) * 0.1
            module.running_var = torch.rand(n, generator=generator) + 0.5


# ------------------------------------------------------------------ configuration modes
def test_mode1_automatic_matches_documented_architecture() -> None:
    arch = ProgressiveDecoderConfig(input_size=1024, output_size=512).resolve()
    assert arch.latent_channels == 1024
    assert arch.num_upsample_layers == 7
    assert arch.channel_progression == (512, 256, 128, 64, 32, 16, 8, 4, 2, 1)
    model = ProgressiveDecoder.create(input_size=64, output_size=32)
    assert model.arch.channel_progression == (32, 16, 8, 4, 2, 1)
    assert model().shape == (1, 1, 64, 64)
    assert ProgressiveDecoder.create(input_size=32).arch.output_size == 32


def test_mode2_manual_latent() -> None:
    arch = ProgressiveDecoderConfig(input_size=1024, output_size=512, latent_channels=2048).resolve()
    assert arch.latent_channels == 2048 and arch.channel_progression[0] == 1024
    model = ProgressiveDecoder.create(input_size=32, latent_channels=48)
    assert model.input_vec.shape == (1, 48, 1, 1)
    assert model.arch.channel_progression == (24, 12, 6, 3, 1)
    assert model().shape == (1, 1, 32, 32)


def test_mode3_manual_channel_progression() -> None:
    model = ProgressiveDecoder.create(input_size=32, output_size=32, channel_progression=[16, 8, 8, 4, 1])
    assert model.arch.latent_channels == 32 and model.arch.num_upsample_layers == 3
    assert model().shape == (1, 1, 32, 32)
    # The document's 7-entry example for 1024/512 has too few entries for 7 upsamplings: clear error.
    with pytest.raises(ValueError, match="needs at least num_upsample_layers \\+ 1 = 8 entries"):
        ProgressiveDecoderConfig(input_size=1024, output_size=512,
                                 channel_progression=(512, 256, 128, 64, 32, 16, 1))
    with pytest.raises(ValueError, match="must have at least 2 entries and end with 1"):
        ProgressiveDecoderConfig(input_size=32, channel_progression=(16, 8, 4, 2))


def test_mode4_full_manual_and_no_refinement_quirk() -> None:
    model = ProgressiveDecoder.create(input_size=64, output_size=40, latent_channels=24,
                                      channel_progression=[16, 8, 8, 4, 2, 1], num_upsample_layers=4)
    assert model.arch.generated_size == 62
    assert model().shape == (1, 1, 64, 64)
    # exactly n + 1 entries: no refinement conv, the map keeps its full 4·2^n size
    quirk = ProgressiveDecoder.create(input_size=16, latent_channels=8, channel_progression=[4, 2, 1],
                                      num_upsample_layers=2)
    assert quirk.arch.generated_size == 16
    assert not any(isinstance(m, nn.Conv2d) for m in quirk.decoder)


def test_mode5_network_config_and_yaml_round_trip(tmp_path) -> None:
    config = NetworkConfig(input_size=64, output_size=32, latent_channels=64,
                           hidden_channels=[32, 16, 8, 4, 2, 1], activation="relu", use_batch_norm=True,
                           init_method="xavier", output_activation="sigmoid")
    path = tmp_path / "model_config.yaml"
    path.write_text(yaml.dump(dataclasses.asdict(config)))
    loaded = NetworkConfig(**yaml.safe_load(path.read_text()))
    assert loaded == config
    model = ProgressiveDecoder.from_config(loaded)
    assert model.arch.channel_progression == (32, 16, 8, 4, 2, 1)
    assert model.config.init_method == "xavier"
    biases = [m.bias for m in model.decoder if isinstance(m, nn.Conv2d) and m.bias is not None]
    assert biases and all(bool((b == 0).all()) for b in biases)  # xavier init zeroes biases
    assert model().shape == (1, 1, 64, 64)
    # our own config (and its dict) also build through from_config
    assert ProgressiveDecoder.from_config(model.get_config()).config == model.config
    with pytest.raises(ValueError, match="activation must be one of relu, leaky_relu, gelu, silu"):
        ProgressiveDecoder.from_config(dataclasses.replace(config, activation="swish"))


def test_config_dict_round_trip_and_registry() -> None:
    model = create_model("progressive_decoder_tiny", output_activation="tanh", use_bn=False)
    assert isinstance(model, ProgressiveDecoder)
    data = model.get_config()
    assert data["output_activation"] == "tanh" and data["use_bn"] is False
    rebuilt = ProgressiveDecoder(ProgressiveDecoderConfig(**data))
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())
    manual = ProgressiveDecoderConfig(input_size=32, channel_progression=[16, 8, 4, 2, 1])
    assert ProgressiveDecoderConfig(**ProgressiveDecoder(manual).get_config()) == manual
    assert {"progressive_decoder", "progressive_decoder_tiny"} <= set(list_models())
    default = create_model("progressive_decoder")
    assert sum(p.numel() for p in default.parameters()) == 699_735
    with pytest.raises(ValueError, match="unknown ProgressiveDecoderConfig keys \\['depth'\\]"):
        create_model("progressive_decoder", depth=3)


# ------------------------------------------------------------------ validation and options
@pytest.mark.parametrize("size", [0, 3, 100, 1000, -8])
def test_input_size_must_be_power_of_two(size: int) -> None:
    with pytest.raises(ValueError, match="input_size must be power of 2"):
        ProgressiveDecoderConfig(input_size=size)


def test_option_errors_name_the_option() -> None:
    with pytest.raises(ValueError, match="output_size must be between 1 and input_size \\(64\\)"):
        ProgressiveDecoderConfig(input_size=64, output_size=65)
    with pytest.raises(ValueError, match="output_activation must be one of sigmoid, tanh, relu, none"):
        ProgressiveDecoderConfig(input_size=64, output_activation="softmax")
    with pytest.raises(ValueError, match="init_method must be one of"):
        ProgressiveDecoderConfig(input_size=64, init_method="he")
    with pytest.raises(ValueError, match="latent_channels=4 is too small"):
        ProgressiveDecoderConfig(input_size=64, latent_channels=4)
    with pytest.raises(TypeError, match="ProgressiveDecoderConfig"):
        ProgressiveDecoder(64)  # type: ignore[arg-type]
    with pytest.warns(UserWarning, match="output_size=30 is not a power of 2"):
        ProgressiveDecoder.create(input_size=32, output_size=30)


@pytest.mark.parametrize(("activation", "low", "high", "module"), [
    ("sigmoid", 0.0, 1.0, nn.Sigmoid), ("tanh", -1.0, 1.0, nn.Tanh),
    ("relu", 0.0, 1.0, nn.ReLU), ("none", 0.0, 1.0, nn.Identity),
])
def test_output_activation(activation: str, low: float, high: float, module: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = ProgressiveDecoder.create(input_size=32, output_size=28, output_activation=activation).eval()
    assert any(type(m) is module for m in model.decoder)
    image = model().detach()
    if activation in ("sigmoid", "tanh"):
        assert low <= image.min().item() and image.max().item() <= high
    if activation == "relu":
        assert image.min().item() >= 0.0
    if activation == "none":
        assert image.min().item() < 0.0  # unbounded: raw conv output
    assert model.preprocessing()["output_range"] == (low, high)


def test_padding_is_zero_outside_the_object_after_activation() -> None:
    model = ProgressiveDecoder.create(input_size=64, output_size=32).eval()  # generated 30, padded 1 + 16
    image = model().detach()[0, 0]
    border = torch.ones(64, 64, dtype=torch.bool)
    border[17:47, 17:47] = False
    assert bool((image[border] == 0).all())  # zero, not sigmoid(0) = 0.5
    assert bool((image[17:47, 17:47] > 0).all())


def test_use_bn_false_has_no_norms_and_biases_everywhere() -> None:
    model = ProgressiveDecoder.create(input_size=32, use_bn=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    convs = [m for m in model.decoder if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    assert all(c.bias is not None for c in convs)
    with_bn = ProgressiveDecoder.create(input_size=32, use_bn=True)
    assert all(m.bias is None for m in with_bn.decoder if isinstance(m, nn.ConvTranspose2d))


def test_use_amp_on_cpu_and_generate_fp32_match_forward() -> None:
    torch.manual_seed(0)
    plain = ProgressiveDecoder.create(input_size=32).eval()
    amp = ProgressiveDecoder.create(input_size=32, use_amp=True).eval()
    amp.load_state_dict(plain.state_dict())
    with torch.no_grad():
        reference = plain()
        assert torch.equal(amp(), reference)  # autocast only on CUDA
        assert torch.equal(amp.generate_fp32(), reference)
        assert amp.generate_fp32().dtype == torch.float32


# ------------------------------------------------------------------ methods
def test_prepare_for_inference_fuses_conv_bn_within_1e5() -> None:
    torch.manual_seed(0)
    model = ProgressiveDecoder.create(input_size=64, output_size=48)
    _randomize_norms(model)
    model.eval()
    with torch.no_grad():
        unfused = model().clone()
    assert model.prepare_for_inference(compile_mode=None) is model
    assert not model.training and model.fused
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        fused = model()
    assert (fused - unfused).abs().max().item() <= 1e-5
    assert len(model.decoder) == len(ProgressiveDecoder.create(input_size=64, output_size=48).decoder)
    with pytest.raises(RuntimeError, match="needs eval mode"):
        ProgressiveDecoder.create(input_size=16).fuse_conv_bn()


def test_compile_wires_torch_compile() -> None:
    torch.manual_seed(0)
    model = ProgressiveDecoder.create(input_size=16).eval()
    with torch.no_grad():
        reference = model()
        assert model.compile("default", backend="eager") is model  # inductor is exercised on GPU
        assert torch.allclose(model(), reference, atol=1e-6)
    with pytest.raises(ValueError, match="compile mode must be one of default, reduce-overhead"):
        model.compile("fastest")


def test_gradient_checkpointing_same_gradients_and_running_stats() -> None:
    torch.manual_seed(0)
    plain = ProgressiveDecoder.create(input_size=32, output_size=28)
    checkpointed = ProgressiveDecoder.create(input_size=32, output_size=28)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.enable_gradient_checkpointing()
    target = torch.rand(1, 1, 32, 32)
    for model in (plain, checkpointed):
        model.train()
        (model() - target).pow(2).mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    for (name, a), (_, b) in zip(plain.named_buffers(), checkpointed.named_buffers(), strict=True):
        assert torch.equal(a, b), name  # running stats updated once, not again in the recomputation


def test_benchmark_reports_documented_keys() -> None:
    model = ProgressiveDecoder.create(input_size=32)
    model.train()
    results = model.benchmark(num_iterations=3, warmup=1)
    assert set(results) == {"avg_time_ms", "fps", "num_parameters"}  # memory_mb only on CUDA
    assert results["avg_time_ms"] > 0
    assert results["fps"] == pytest.approx(1000.0 / results["avg_time_ms"])
    assert results["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="num_iterations >= 1"):
        model.benchmark(num_iterations=0)


# ------------------------------------------------------------------ family protocol and export
def test_family_protocol() -> None:
    model = ProgressiveDecoder.create(input_size=32, output_activation="tanh")
    assert isinstance(model, Family)
    assert ProgressiveDecoder.family == "progressive-decoder"
    assert model.capabilities() == ["decode", "sample"]
    pre = model.preprocessing()
    assert pre == {"channels": 1, "input_size": None, "resize": "none", "output_range": (-1.0, 1.0)}
    Preprocessing(**pre)
    assert SamplerSpec(**model.sampler_spec()).image_shape == [1, 32, 32]


def test_export_op_takes_no_input_and_exports_to_onnx(tmp_path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = ProgressiveDecoder.create(input_size=32, output_size=24)
    _randomize_norms(model)
    model.eval()
    (op,) = model.export_ops()
    assert op.name == "decode" and op.example_inputs == () and op.input_names == []
    assert op.output_names == ["image"]
    with torch.no_grad():
        expected = op.module()
        assert torch.equal(expected, model())
    assert expected.shape == (1, 1, 32, 32)

    path = tmp_path / "decode.onnx"
    torch.onnx.export(op.module, (), str(path), opset_version=18, input_names=[], output_names=["image"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs() == []
    (image,) = session.run(None, {})
    assert np.abs(image - expected.numpy()).max() <= 1e-5

    program = torch.export.export(op.module, ())
    assert torch.allclose(program.module()(), expected, atol=1e-6)


# ------------------------------------------------------------------ training from measurements
def _fit(model: ProgressiveDecoder, dataset: SingleImageDataset, steps: int, lr: float) -> tuple[dict, dict]:
    batch = default_collate([dataset[0]])
    model.eval()
    before = validation_metrics(model, batch)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        losses = training_losses(model, batch)
        losses["loss"].backward()
        optimizer.step()
    model.eval()
    return before, validation_metrics(model, batch)


def test_training_losses_and_metrics_keys() -> None:
    model = ProgressiveDecoder.create(input_size=32, output_size=28)
    batch = default_collate([SingleImageDataset.from_options(28, "identity", noise_std=0.1)[0]] * 2)
    losses = training_losses(model, batch)
    assert set(losses) == {"loss", "data_mse", "object_mse"}
    assert losses["loss"].requires_grad and losses["loss"].dim() == 0
    metrics = validation_metrics(model.eval(), batch)
    assert set(metrics) == {"psnr", "ssim", "mse", "data_mse"}
    assert all(isinstance(v, float) for v in metrics.values())


def test_learns_denoising_from_identity_measurements() -> None:
    torch.manual_seed(0)
    model = ProgressiveDecoder.create(input_size=32, output_size=30)  # automatic config, BN, sigmoid
    dataset = SingleImageDataset.from_options(30, "identity", image="camera", noise_std=0.1, seed=0)
    noisy_psnr = 10 * torch.log10(1 / (dataset.measurement - dataset.target).pow(2).mean()).item()
    before, after = _fit(model, dataset, steps=100, lr=1e-2)
    assert before["psnr"] < 13.0
    assert after["psnr"] > before["psnr"] + 9.0  # measured: 11.3 -> 22.8 dB
    assert after["psnr"] > noisy_psnr + 1.0      # better than the noisy measurement (20.0 dB)
    assert after["ssim"] > before["ssim"] + 0.4


def test_learns_from_masked_fourier_measurements() -> None:
    torch.manual_seed(0)
    model = ProgressiveDecoder.create(input_size=64, output_size=30, use_bn=False)
    dataset = SingleImageDataset.from_options(30, "fourier", image="camera", grid_size=64,
                                              aperture_radius=0.6, noise_std=0.05, seed=0)
    before, after = _fit(model, dataset, steps=100, lr=3e-3)
    assert after["data_mse"] < before["data_mse"] / 4
    assert after["psnr"] > before["psnr"] + 8.0  # measured: 11.1 -> 23.1 dB
    assert after["psnr"] > 20.0


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_cuda_amp_compile_and_benchmark_memory() -> None:
    torch.manual_seed(0)
    model = ProgressiveDecoder.create(input_size=128, output_size=100, use_amp=True).cuda()
    _randomize_norms(model)
    model.eval()
    with torch.no_grad():
        fp32 = model.generate_fp32()
        half = model()
    assert fp32.dtype == torch.float32 and half.dtype == torch.float16
    assert (half.float() - fp32).abs().max().item() < 1e-2
    results = model.benchmark(num_iterations=5, warmup=2)
    assert results["memory_mb"] > 0
    model.prepare_for_inference(compile_mode="default")
    with torch.no_grad():
        compiled = model.generate_fp32()
    assert (compiled - fp32).abs().max().item() <= 1e-4
    assert isinstance(model.decoder[-1], CropPad)


def test_magnitude_only_metrics_score_the_better_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ProgressiveDecoder.create(input_size=32, output_size=16, output_activation="none").eval()
    dataset = SingleImageDataset.from_options(16, "fourier_intensity", grid_size=32)
    batch = default_collate([dataset[0]])
    twin = place_object(dataset.target.flip(-1, -2).unsqueeze(0), 32)  # same |F|, rotated by 180°
    monkeypatch.setattr(model, "generate_fp32", lambda: twin)
    metrics = validation_metrics(model, batch)
    assert metrics["psnr"] >= 99.0 and metrics["data_mse"] < 1e-8
