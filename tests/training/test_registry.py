"""The model registry, the family table and the dispatch of original checkpoints through it."""

from __future__ import annotations

import pytest
import torch

from training.originals import load_original
from training.registry import FAMILIES, create_model, family_module, list_models

SMALL_VARIANTS = ["v3_tiny", "stem_ae", "progressive_decoder_tiny", "conv_decoder_vae", "diffusion_unet_tiny"]


@pytest.mark.parametrize("name", SMALL_VARIANTS)
def test_create_model_tags_the_architecture(name: str) -> None:
    model = create_model(name)
    assert model.architecture == name
    assert not any("architecture" in key for key in model.state_dict())


def test_architecture_is_the_variant_name_whatever_the_overrides() -> None:
    model = create_model("conv_decoder_fashion_mnist", latent_dim=8)
    assert model.architecture == "conv_decoder_fashion_mnist" and model.config.latent_dim == 8


def test_unknown_model_names_the_registered_ones() -> None:
    with pytest.raises(KeyError, match=r"unknown model 'nope'; registered: .*v3_tiny"):
        create_model("nope")


def test_every_family_has_its_models_losses_and_originals() -> None:
    for family in FAMILIES:
        assert callable(family_module(family, "originals").load_original)
        losses = family_module(family, "losses")
        assert callable(losses.training_losses) and callable(losses.validation_metrics)
    registered = {getattr(create_model(name), "family", None) for name in SMALL_VARIANTS}
    assert registered == set(FAMILIES)
    assert set(SMALL_VARIANTS) <= set(list_models())


def test_load_original_dispatches_by_family() -> None:
    source = create_model("diffusion_unet_tiny")
    args = {k: v for k, v in source.get_config().items() if k in ("base_channels", "channel_multipliers")}
    args |= {"attention_levels": [1], "time_emb_dim": 64, "meta_emb_dim": 64, "num_res_blocks": 1}
    loaded = load_original("diffusion-decoder", args, source.state_dict())
    assert not loaded.training
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(KeyError, match="unknown family 'nope'; known: autoencoder-cnn-v3"):
        load_original("nope", {}, {})
