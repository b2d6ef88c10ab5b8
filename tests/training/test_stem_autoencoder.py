"""The 4D-STEM autoencoder: structure, quirks, losses, config, registry and the Family protocol.

Behaviour tests use a narrow model (channels=8): the original width renders 128 channels at
256x256 (~44 GMAC per reconstruction) and is only run in the conformance test.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from app.schemas.manifest import Preprocessing
from training.losses.stem_autoencoder import compute_loss, training_losses, validation_metrics
from training.models.base import Family
from training.models.stem_autoencoder import (
    ConditionalBatchNorm2d,
    ResNetBlock,
    StemAutoencoder,
    StemAutoencoderConfig,
    adaptive_avg_pool,
)
from training.originals.stem_autoencoder import load_original, original_key_to_ours
from training.registry import create_model, list_models


def _tiny(**overrides) -> StemAutoencoder:
    torch.manual_seed(0)
    values = {"latent_dim": 6, "out_shape": (64, 64), "channels": 8, **overrides}
    return StemAutoencoder(StemAutoencoderConfig(**values)).eval()


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("latent", "total", "encoder", "decoder"),
                         [(32, 3_914_404, 1_924_003, 1_990_401), (128, 4_112_644, 1_925_635, 2_187_009)])
def test_parameter_counts_match_the_original(latent: int, total: int, encoder: int, decoder: int) -> None:
    model = StemAutoencoder(StemAutoencoderConfig(latent_dim=latent))
    assert (_count(model), _count(model.encoder), _count(model.decoder)) == (total, encoder, decoder)
    # out_shape changes no parameter
    assert _count(StemAutoencoder(StemAutoencoderConfig(latent_dim=latent, out_shape=(256, 256)))) == total


def test_state_dict_has_the_original_204_entries() -> None:
    model = create_model("stem_ae")
    assert len(model.state_dict()) == 204
    assert "decoder.resnet_up3.identity_block.bn.running_var" in model.state_dict()


@pytest.mark.parametrize(("size_in", "size_out"),
                         [((1, 1), (4, 4)), ((2, 2), (4, 4)), ((3, 3), (4, 4)), ((7, 5), (4, 4)),
                          ((16, 16), (4, 4)), ((10, 9), (3, 2)), ((4, 4), (4, 4))])
def test_matrix_pooling_equals_adaptive_avg_pool(size_in: tuple[int, int], size_out: tuple[int, int]) -> None:
    x = torch.randn(2, 3, *size_in)
    expected = F.adaptive_avg_pool2d(x, size_out)
    torch.testing.assert_close(adaptive_avg_pool(x, size_out), expected, atol=1e-6, rtol=1e-6)


def test_resnet_block_pools_from_the_width_to_a_square() -> None:
    block = ResNetBlock(4, 4).eval()
    assert block(torch.rand(1, 4, 48, 96)).shape == (1, 4, 24, 24)
    assert block(torch.rand(1, 4, 64, 64)).shape == (1, 4, 16, 16)
    assert block(torch.rand(1, 4, 3, 3)).shape == (1, 4, 1, 1)


def test_conditional_batchnorm_skips_single_pixel_maps() -> None:
    bn = ConditionalBatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.fill_(5.0)
        bn.weight.fill_(2.0)
    one = torch.rand(2, 3, 1, 1)
    assert torch.equal(bn(one), one)
    wide = torch.rand(2, 3, 1, 2)
    torch.testing.assert_close(bn(wide), F.batch_norm(wide, bn.running_mean, bn.running_var, bn.weight,
                                                      bn.bias, False, 0.0, bn.eps))


def test_shapes_non_negative_latent_and_output_range() -> None:
    model = _tiny()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        z = model.embed(x)
        y = model(x)
        d = model.decoder(torch.rand(3, 6))
    assert z.shape == (2, 6) and (z >= 0).all()
    assert y.shape == (2, 1, 64, 64) and d.shape == (3, 1, 64, 64)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert torch.equal(model.encode(x), z) and torch.equal(model.reconstruct(x), y)


def test_encoder_accepts_other_sizes_and_forward_matches_the_input() -> None:
    model = _tiny()
    with torch.no_grad():
        for shape in [(32, 32), (48, 96), (128, 128)]:
            x = torch.rand(1, 1, *shape)
            assert model.embed(x).shape == (1, 6)
            assert model(x).shape == (1, 1, *shape)


def test_decoder_renders_256_then_resizes_to_max_out_shape() -> None:
    model = _tiny(out_shape=(48, 80))
    z = torch.rand(2, 6)
    with torch.no_grad():
        out = model.decoder(z)
        assert out.shape == (2, 1, 80, 80)
        full = _tiny(out_shape=(256, 256))
        full.load_state_dict(model.state_dict())
        rendered = full.decoder(z)
    assert rendered.shape == (2, 1, 256, 256)
    torch.testing.assert_close(out, F.interpolate(rendered, size=(80, 80), mode="bilinear",
                                                  align_corners=False))


def test_64px_bottleneck_is_one_value_per_sample() -> None:
    """At 64x64 the encoder map is 1x1, so the 16 embedding inputs are equal (original quirk)."""
    model = _tiny()
    captured = {}
    model.encoder.embedding.register_forward_hook(lambda m, i, o: captured.setdefault("in", i[0]))
    with torch.no_grad():
        model.embed(torch.rand(2, 1, 64, 64))
    features = captured["in"]
    assert features.shape == (2, 16)
    assert torch.equal(features, features[:, :1].expand(2, 16))


def test_compute_loss_terms_and_documented_defaults() -> None:
    gen = torch.Generator().manual_seed(1)
    x, x_hat = torch.rand(4, 1, 8, 8, generator=gen), torch.rand(4, 1, 8, 8, generator=gen)
    z = torch.rand(4, 5, generator=gen)
    terms = compute_loss(x, x_hat, z)
    assert set(terms) == {"total_loss", "mse_loss", "l1_reg", "contrastive_reg", "divergence_reg"}
    assert terms["mse_loss"].item() == pytest.approx(((x_hat - x) ** 2).mean().item())
    assert terms["l1_reg"].item() == pytest.approx(z.abs().mean().item())
    assert terms["contrastive_reg"].item() == pytest.approx(0.0, abs=1e-6)   # margin 1: cos <= 1
    expected_div = (1.0 / (z.var(dim=0, unbiased=True) + 1e-8)).mean()
    assert terms["divergence_reg"].item() == pytest.approx(expected_div.item(), rel=1e-6)
    expected_total = (terms["mse_loss"] + 1e-4 * terms["l1_reg"] + 5e-5 * terms["contrastive_reg"]
                      + 2e-4 * terms["divergence_reg"])
    assert terms["total_loss"].item() == pytest.approx(expected_total.item(), rel=1e-6)
    custom = compute_loss(x, x_hat, z, lambda_act=1.0, lambda_sim=0.0, lambda_div=0.0)
    expected_custom = terms["mse_loss"] + terms["l1_reg"]
    assert custom["total_loss"].item() == pytest.approx(expected_custom.item(), rel=1e-6)


def test_contrastive_and_divergence_edge_cases() -> None:
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0]])     # parallel rows: cos = 1 -> ReLU(0) = 0
    terms = compute_loss(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), z)
    assert terms["contrastive_reg"].item() == 0.0
    # a latent dim that is 0 for the whole batch contributes 1 / 1e-8
    assert terms["divergence_reg"].item() == pytest.approx((1 / (0.5 + 1e-8) + 1e8) / 2, rel=1e-6)
    single = compute_loss(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), torch.rand(1, 3))
    assert all(torch.isfinite(v) for v in single.values())
    assert single["contrastive_reg"].item() == 0.0 and single["divergence_reg"].item() == 0.0


def test_training_losses_backpropagate_and_use_config_weights() -> None:
    model = _tiny(lambda_div=0.0).train()
    batch = {"image": torch.rand(3, 1, 64, 64)}
    losses = training_losses(model, batch)
    assert {"loss", "total_loss", "mse_loss", "l1_reg", "contrastive_reg", "divergence_reg"} <= set(losses)
    assert losses["loss"] is losses["total_loss"]
    expected = losses["mse_loss"] + 1e-4 * losses["l1_reg"] + 5e-5 * losses["contrastive_reg"]
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.decoder.conv_final.weight.grad.abs().sum() > 0


def test_validation_metrics() -> None:
    model = _tiny()
    metrics = validation_metrics(model, {"image": torch.rand(2, 1, 64, 64)})
    assert set(metrics) == {"psnr", "ssim", "mse"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["mse"] > 0 and -1.0 <= metrics["ssim"] <= 1.0
    assert metrics["psnr"] == pytest.approx(-10 * torch.log10(torch.tensor(metrics["mse"])).item(), abs=0.5)


def test_config_is_frozen_round_trips_and_validates() -> None:
    model = _tiny()
    config = model.get_config()
    assert config == {"latent_dim": 6, "out_shape": [64, 64], "channels": 8, "lambda_act": 1e-4,
                      "lambda_sim": 5e-5, "lambda_div": 2e-4}
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.config.latent_dim = 3
    rebuilt = StemAutoencoder(StemAutoencoderConfig.from_dict(config))
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.config == model.config
    for bad, name in [({"latent_dim": 0}, "latent_dim"), ({"out_shape": (64,)}, "out_shape"),
                      ({"channels": 7}, "channels"), ({"lambda_div": -1.0}, "lambda_div")]:
        with pytest.raises(ValueError, match=name):
            StemAutoencoderConfig(**bad)
    with pytest.raises(ValueError, match="unknown StemAutoencoderConfig fields"):
        StemAutoencoderConfig.from_dict({"latent": 3})


def test_registry_variant() -> None:
    assert "stem_ae" in list_models()
    model = create_model("stem_ae", channels=8)
    assert model.config == StemAutoencoderConfig(latent_dim=32, out_shape=(64, 64), channels=8)
    assert model.family == "stem-autoencoder"


def test_family_protocol_preprocessing_and_export_ops() -> None:
    model = _tiny()
    assert isinstance(model, Family)
    assert model.capabilities() == ["encode", "decode", "reconstruct"]
    prep = Preprocessing(**model.preprocessing())
    assert prep.input_size == (64, 64) and prep.channels == 1 and not prep.dynamic_hw
    assert prep.output_range == (0.0, 1.0) and prep.resize == "bilinear"
    ops = {op.name: op for op in model.export_ops(batch_size=2)}
    assert set(ops) == {"encode", "decode", "reconstruct"}
    expected = {"encode": (2, 6), "decode": (2, 1, 64, 64), "reconstruct": (2, 1, 64, 64)}
    with torch.no_grad():
        for name, op in ops.items():
            assert not op.module.training
            assert op.module(*op.example_inputs).shape == expected[name]
            assert op.check_shapes, name
            for shapes in op.check_shapes:
                assert shapes[0] != tuple(op.example_inputs[0].shape)
                out = op.module(*[torch.rand(s) for s in shapes])
                assert out.shape[0] == shapes[0][0]
    x = ops["encode"].example_inputs[0]
    with torch.no_grad():
        torch.testing.assert_close(ops["encode"].module(x), model.embed(x))
        torch.testing.assert_close(ops["reconstruct"].module(x), model(x))


def test_original_key_map_and_load_original() -> None:
    assert original_key_to_ours("decoder.decoder.linear.weight") == "decoder.linear.weight"
    assert original_key_to_ours("model.encoder.bn_pre.running_mean") == "encoder.bn_pre.running_mean"
    assert original_key_to_ours("model.decoder.decoder.conv_final.bias") == "decoder.conv_final.bias"
    torch.manual_seed(3)
    source = StemAutoencoder(StemAutoencoderConfig(latent_dim=32, out_shape=(32, 32)))
    original = {("model." + k).replace("model.decoder.", "model.decoder.decoder."): v
                for k, v in source.state_dict().items()}
    loaded = load_original({"latent_dim": 32, "out_shape": [32, 32]}, original)
    assert not loaded.training and loaded.config.out_shape == (32, 32)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ValueError, match="unknown original Autoencoder arguments"):
        load_original({"latent_dim": 32, "in_channels": 1}, original)
