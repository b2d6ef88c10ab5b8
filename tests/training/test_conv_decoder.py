"""ConvDecoder and its VAE: every documented option, validation errors, presets and config round trip
(family protocol, export and the VAE's losses: test_conv_vae.py)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import torch

from training.layers.attention import SelfAttention2d
from training.layers.factories import ACTIVATIONS, FINAL_ACTIVATIONS, NORMALIZATIONS, make_norm2d
from training.models.conv_decoder import PRESETS, UPSAMPLING_MODES, ConvDecoder, ConvDecoderConfig
from training.models.conv_vae import ConvVAE, ConvVAEConfig
from training.registry import create_model, list_models

TINY = dict(latent_dim=8, hidden_dims=(16, 8), output_size=(16, 16))


def tiny(**overrides: Any) -> ConvDecoder:
    torch.manual_seed(0)
    return ConvDecoder(ConvDecoderConfig(**{**TINY, **overrides}))


def tiny_vae(**overrides: Any) -> ConvVAE:
    torch.manual_seed(0)
    base = dict(latent_dim=8, hidden_dims=(16, 8), encoder_channels=(8, 16), init_size=(4, 4),
                normalization="group")
    return create_model("conv_decoder_vae", **{**base, **overrides})


# ---------------------------------------------------------------------------------------------
# Derived sizes and options
# ---------------------------------------------------------------------------------------------


def test_derived_sizes_follow_the_original() -> None:
    config = ConvDecoderConfig(latent_dim=64, hidden_dims=(256, 128, 64), output_size=(28, 28))
    assert config.resolved_init_size == (3, 3) and config.num_upsamples == 3
    assert config.channels == (32, 64, 128, 256)          # extended by one, then reversed
    assert config.rendered_size == (48, 48)               # the final layer adds one more ×2
    # Extension repeats one value; widths <= 8 are not halved.
    assert ConvDecoderConfig(hidden_dims=(64, 32), output_size=(32, 32), init_size=(2, 2)).channels == \
        (16, 16, 16, 32, 64)
    assert ConvDecoderConfig(hidden_dims=(8,), output_size=(16, 16)).channels == (8, 8, 8, 8)


def test_hidden_dims_list_is_not_modified() -> None:
    given = [256, 128, 64]
    config = ConvDecoderConfig(latent_dim=4, hidden_dims=given)
    assert given == [256, 128, 64] and config.hidden_dims == (256, 128, 64)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_builds_and_runs(activation: str) -> None:
    model = tiny(activation=activation).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 8))
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    assert ((out >= 0) & (out <= 1)).all()


def test_activation_modules_are_per_block() -> None:
    model = tiny(activation="prelu", normalization="none")
    slopes = [m.weight for m in model.modules() if isinstance(m, torch.nn.PReLU)]
    assert len(slopes) == len(model.decoder) + 1
    assert len({id(s) for s in slopes}) == len(slopes)


@pytest.mark.parametrize("final_activation", FINAL_ACTIVATIONS)
def test_every_final_activation_sets_the_output_range(final_activation: str) -> None:
    model = tiny(final_activation=final_activation).eval()
    with torch.no_grad():
        out = model(3 * torch.randn(4, 8))
    lo, hi = model.config.output_range
    if final_activation not in ("identity", "none"):
        assert lo - 1e-6 <= float(out.min()) and float(out.max()) <= hi + 1e-6
    assert model.preprocessing()["output_range"] == [lo, hi]


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_every_normalization(normalization: str) -> None:
    model = tiny(normalization=normalization)
    expected = {"batch": torch.nn.BatchNorm2d, "layer": torch.nn.GroupNorm, "group": torch.nn.GroupNorm,
                "instance": torch.nn.InstanceNorm2d}.get(normalization)
    block = model.decoder[0]
    conv = block[0]
    assert (conv.bias is not None) == (normalization == "none")  # bias only without normalization
    if expected is None:
        assert not any(isinstance(m, torch.nn.GroupNorm | torch.nn.BatchNorm2d) for m in model.modules())
    else:
        assert isinstance(block[1], expected)
    model.train()
    out = model(torch.randn(3, 8))
    out.mean().backward()
    assert out.shape == (3, 1, 16, 16)


def test_group_and_layer_norm_groups() -> None:
    assert make_norm2d("group", 256).num_groups == 8
    assert make_norm2d("group", 4).num_groups == 4
    assert make_norm2d("group", 12).num_groups == 6      # largest divisor <= 8
    assert make_norm2d("layer", 64).num_groups == 1


@pytest.mark.parametrize("mode", UPSAMPLING_MODES)
@pytest.mark.parametrize("size", [(16, 16), (28, 28), (20, 12)])
def test_every_upsampling_mode_reaches_the_output_size(mode: str, size: tuple[int, int]) -> None:
    model = tiny(upsampling_mode=mode, output_size=size).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 8)).shape == (2, 1, *size)
    kinds = {type(m) for m in model.decoder[0]}
    assert (torch.nn.ConvTranspose2d in kinds) == (mode == "transpose")
    assert (torch.nn.Upsample in kinds) == (mode != "transpose")


def test_kernel_stride_padding_options() -> None:
    wide = tiny(upsampling_mode="transpose", kernel_size=4, stride=2, padding=1, output_padding=0)
    assert wide.config.stage_sizes[:3] == [(2, 2), (4, 4), (8, 8)]        # (s-1)·2 - 2 + 4 = 2s
    assert wide.config.rendered_size == (32, 32)                          # then resized to 16×16
    assert isinstance(wide.final_resize, torch.nn.Upsample)
    triple = tiny(upsampling_mode="transpose", stride=3, output_padding=2, output_size=(30, 30))
    assert triple.config.stage_sizes[:3] == [(3, 3), (9, 9), (27, 27)]    # (s-1)·3 - 2 + 3 + 2 = 3s
    with torch.no_grad():
        assert triple(torch.randn(1, 8)).shape == (1, 1, 30, 30)
    five = tiny(upsampling_mode="nearest", kernel_size=5, padding=2)
    assert five.decoder[0][1].kernel_size == (5, 5)
    no_bias = tiny(normalization="none", bias=False)
    assert all(getattr(m, "bias", None) is None for m in no_bias.decoder.modules()
               if isinstance(m, torch.nn.ConvTranspose2d))


def test_dropout_is_active_only_in_training() -> None:
    model = tiny(dropout_rate=0.3)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in model.decoder[0])
    z = torch.randn(2, 8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(z), model(z))
    model.train()
    torch.manual_seed(1)
    a = model(z)
    b = model(z)
    assert not torch.equal(a, b)


def test_self_attention_placement_and_math() -> None:
    config = dict(hidden_dims=(16, 16, 8), output_size=(32, 32), init_size=(2, 2), use_self_attention=True)
    # channels (8, 8, 8, 16, 16); blocks render 4, 8, 16, 32 (nominal h0·2^(i+1)); attention where that
    # reaches the resolution
    assert ConvDecoderConfig(**config).channels == (8, 8, 8, 16, 16)
    assert ConvDecoderConfig(**config, attention_resolution=8).attention_blocks == (1, 2, 3)
    assert ConvDecoderConfig(**config, attention_resolution=32).attention_blocks == (3,)
    assert ConvDecoderConfig(**config, attention_resolution=64).attention_blocks == ()
    model = ConvDecoder(ConvDecoderConfig(**config, attention_resolution=32))
    assert isinstance(model.decoder[3][-1], SelfAttention2d)
    assert sum(isinstance(m, SelfAttention2d) for m in model.modules()) == 1

    torch.manual_seed(0)
    layer = SelfAttention2d(16, heads=8)
    x = torch.randn(2, 16, 3, 5)
    q, k, v = (f(x).reshape(2, 8, 2, 15) for f in (layer.query, layer.key, layer.value))
    attn = torch.softmax(q.transpose(-2, -1) @ k * 2 ** -0.5, dim=-1)      # (B, heads, N, N)
    expected = x + layer.proj_out((v @ attn.transpose(-2, -1)).reshape(2, 16, 3, 5))
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_spectral_norm_is_used_and_folded_for_export() -> None:
    model = tiny(normalization="none", use_spectral_norm=True, final_activation="tanh")
    keys = list(model.state_dict())
    assert "decoder.0.0.parametrizations.weight.original" in keys
    model.train()
    for _ in range(3):  # power iterations update u, v
        model(torch.randn(4, 8))
    model.eval()
    conv = model.decoder[0][0]
    w = conv.parametrizations.weight.original
    u, v = conv.parametrizations.weight[0]._u, conv.parametrizations.weight[0]._v
    sigma = u @ (w.transpose(0, 1).reshape(w.shape[1], -1) @ v)              # ConvTranspose: dim 1
    exported = model.export_module()
    assert not any("parametrizations" in k for k in exported.state_dict())
    assert torch.allclose(exported.decoder[0][0].weight, w / sigma, atol=1e-6)
    z = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.allclose(exported(z), model(z), atol=1e-6)
    assert model.training is False and "decoder.0.0.parametrizations.weight.original" in model.state_dict()


INVALID = [
    (dict(activation="glu"), "activation='glu' is not supported; allowed values: relu, relu6, leaky_relu"),
    (dict(activation="swishy"), "activation='swishy' is not supported; allowed values:"),
    (dict(final_activation="relu"), "final_activation='relu' is not supported; allowed values: sigmoid, "
                                    "hardsigmoid, tanh, hardtanh, softsign, identity, none"),
    (dict(normalization="spectral"), "normalization='spectral' is not supported; allowed values: batch, "
                                     "layer, group, instance, none"),
    (dict(upsampling_mode="pixel_shuffle"), "upsampling_mode='pixel_shuffle' is not supported; allowed "
                                            "values: transpose, bilinear, nearest, bicubic"),
    (dict(dropout_rate=1.0), "dropout_rate must be a number in [0, 1)"),
    (dict(latent_dim=0), "latent_dim must be an integer >= 1"),
    (dict(hidden_dims=()), "hidden_dims must be a non-empty list"),
    (dict(output_size=(28,)), "output_size must be a pair"),
    (dict(output_padding=2), "output_padding=2 must be smaller than stride=2"),
    (dict(use_self_attention=True, attention_resolution=1, attention_heads=3), "attention_heads=3"),
    (dict(upsampling_mode="nearest", kernel_size=9, padding=0, init_size=(2, 2)), "kernel_size=9, padding=0"),
    (dict(use_spectral_norm="yes"), "use_spectral_norm must be True or False"),
]


@pytest.mark.parametrize(("overrides", "message"), INVALID)
def test_invalid_values_fail_at_construction(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        ConvDecoderConfig(**{**TINY, **overrides})
    assert message in str(info.value)


def test_invalid_vae_values() -> None:
    with pytest.raises(ValueError, match="reconstruction_loss='l1' is not supported; allowed values: bce"):
        tiny_vae(reconstruction_loss="l1")
    with pytest.raises(ValueError, match="reconstruction_loss='bce' needs outputs in"):
        tiny_vae(final_activation="tanh")
    with pytest.raises(ValueError, match="beta must be a number >= 0"):
        tiny_vae(beta=-1.0)
    with pytest.raises(ValueError, match="encoder_channels"):
        tiny_vae(encoder_channels=())


# ---------------------------------------------------------------------------------------------
# Presets, registry, config round trip
# ---------------------------------------------------------------------------------------------

PRESET_NAMES = [f"conv_decoder_{name}" for name in PRESETS]


def test_presets_are_registered_with_the_document_values() -> None:
    names = list_models()
    for name in [*PRESET_NAMES, "conv_decoder_vae", "conv_decoder_vae_32"]:
        assert name in names
    gan = create_model("conv_decoder_gan").config
    assert (gan.latent_dim, gan.hidden_dims, gan.final_activation, gan.normalization, gan.use_spectral_norm,
            gan.upsampling_mode) == (128, (512, 256, 128, 64), "tanh", "none", True, "transpose")
    high = create_model("conv_decoder_high_res").config
    assert (high.activation, high.use_self_attention, high.attention_resolution, high.output_size) == \
        ("swish", True, 32, (128, 128))
    cifar = create_model("conv_decoder_cifar10").config
    assert (cifar.latent_dim, cifar.activation, cifar.normalization, cifar.dropout_rate) == \
        (128, "gelu", "group", 0.1)
    assert create_model("conv_decoder_vae").config.decoder.output_size == (28, 28)
    assert create_model("conv_decoder_vae_32").config.decoder.output_size == (32, 32)


@pytest.mark.parametrize("name", ["conv_decoder_fashion_mnist", "conv_decoder_cifar10", "conv_decoder_gan"])
def test_presets_decode(name: str) -> None:
    model = create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(1, model.config.latent_dim))
    assert out.shape == (1, 1, *model.config.output_size)
    assert sum(p.numel() for p in create_model("conv_decoder_fashion_mnist").parameters()) == 999_329


def test_high_res_preset_overrides() -> None:
    model = create_model("conv_decoder_high_res", latent_dim=8, hidden_dims=(32, 16), output_size=(32, 32))
    assert model.config.use_self_attention and model.config.activation == "swish"
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 8)).shape == (1, 1, 32, 32)


@pytest.mark.parametrize("name", [*PRESET_NAMES, "conv_decoder_vae", "conv_decoder_vae_32"])
def test_config_round_trips_through_json(name: str) -> None:
    model = create_model(name)
    as_json = json.loads(json.dumps(model.get_config()))
    rebuilt = create_model(name, **as_json)
    assert rebuilt.config == model.config
    config_type = ConvVAEConfig if isinstance(model, ConvVAE) else ConvDecoderConfig
    assert config_type(**as_json) == model.config
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.config.latent_dim = 3


def test_vae_overrides_route_to_decoder_and_vae_fields() -> None:
    vae = tiny_vae(beta=0.5, output_size=(32, 32))
    assert vae.config.beta == 0.5 and vae.config.decoder.output_size == (32, 32)
    assert vae.config.decoder.latent_dim == 8
