"""AutoEncoder CNN V3: config, presets, shapes, API methods, family protocol, training contract, ONNX."""

from __future__ import annotations

import io
import json
import math
import warnings

import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from app.schemas.manifest import Preprocessing
from training.losses.autoencoder_cnn_v3 import training_losses, validation_metrics
from training.models.autoencoder_cnn_v3 import (
    PRESETS,
    AutoEncoderCNNV3,
    AutoEncoderV3Config,
    create_autoencoder,
    preset_config,
)
from training.models.base import Family
from training.originals.autoencoder_cnn_v3 import load_original
from training.registry import create_model, list_models


@pytest.fixture(scope="module")
def tiny() -> AutoEncoderCNNV3:
    torch.manual_seed(0)
    return create_autoencoder("tiny").eval()


# --- config --------------------------------------------------------------------------------------


def test_presets_and_class_defaults() -> None:
    assert AutoEncoderV3Config() == preset_config("small")
    cfg = preset_config("large", input_size=[152, 1280], latent_strategy="spatial")
    assert cfg.block_config == ("resnext", "resnext", "se", "se")
    assert cfg.channel_config == (64, 128, 256, 512)
    assert cfg.input_size == (152, 1280) and cfg.latent_shape == (512, 4, 4) and cfg.latent_dim == 8192
    assert set(PRESETS) == {"tiny", "small", "medium", "large"}
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset_config("huge")


@pytest.mark.parametrize("size", [127, 8193, 0])
def test_latent_size_out_of_range_is_a_clear_error(size: int) -> None:
    with pytest.raises(ValueError, match=r"latent_size .* \[128, 8192\]"):
        AutoEncoderV3Config(latent_size=size)
    with pytest.raises(ValueError, match=r"\[128, 8192\]"):
        preset_config("tiny", embedding_dim=size)


def test_latent_size_bounds_are_accepted() -> None:
    for size in (128, 8192):
        for strategy in ("conv", "spatial"):
            with torch.device("meta"):
                model = create_autoencoder("tiny", latent_size=size, latent_strategy=strategy)
            assert model.config.latent_size == size


def test_embedding_dim_alias_and_dropout_alias() -> None:
    cfg = preset_config("tiny", embedding_dim=256, DropOut=True)
    assert cfg.latent_size == 256 and cfg.dropout is True
    assert AutoEncoderV3Config(latent_size=1024, embedding_dim=300).latent_size == 300


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"latent_strategy": "vector"}, "latent_strategy must be one of"),
        ({"block_config": ("resnet", "dense")}, "unknown block types"),
        ({"channel_config": (32, 64, 128)}, "equally long"),
        ({"block_config": ("inception", "resnet"), "channel_config": (30, 64)}, "divisible by 4"),
        ({"stride_config": (2, 0)}, "stride_config"),
        ({"input_size": (0, 10)}, "input_size"),
    ],
)
def test_invalid_options_name_the_option(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        preset_config("tiny", **overrides)


def test_unknown_option_lists_allowed() -> None:
    with pytest.raises(TypeError, match=r"unknown AutoEncoderCNNV3 option 'depth'.*latent_strategy"):
        create_autoencoder("tiny", depth=3)


def test_get_config_round_trips_through_json(tiny: AutoEncoderCNNV3) -> None:
    cfg = create_autoencoder("tiny", input_size=(152, 640), latent_strategy="spatial",
                             block_config=["se", "resnext"], DropOut=True).get_config()
    rebuilt = AutoEncoderV3Config.from_dict(json.loads(json.dumps(cfg)))
    assert rebuilt.block_config == ("se", "resnext") and rebuilt.input_size == (152, 640)
    assert AutoEncoderCNNV3(rebuilt).get_config() == cfg
    clone = AutoEncoderCNNV3(AutoEncoderV3Config.from_dict(tiny.get_config()))
    clone.load_state_dict(tiny.state_dict())


# --- shapes and methods ----------------------------------------------------------------------------


def test_tiny_conv_shapes_at_201(tiny: AutoEncoderCNNV3) -> None:
    x = torch.rand(2, 1, 201, 201)
    with torch.no_grad():
        assert tiny(x).shape == (2, 1, 201, 201)
        assert tiny.Embedding(x).shape == (2, 128)
        assert tiny.encode(x).shape == (2, 128)
        assert tiny.decode(torch.rand(2, 128)).shape == (2, 1, 201, 201)
        assert tiny.get_attention_matrix(x).shape == (2, 169, 169)  # 201 -> 13×13 positions
    recon = tiny(x).detach()
    assert recon.min() >= 0 and recon.max() <= 1


def test_spatial_latent_at_152x1280() -> None:
    torch.manual_seed(1)
    model = create_autoencoder("tiny", input_size=(152, 1280), latent_strategy="spatial").eval()
    x = torch.rand(1, 1, 152, 1280)
    with torch.no_grad():
        native = model.Embedding(x)
        assert native.shape == (1, 8, 4, 4)
        flat = model.encode(x)
        torch.testing.assert_close(flat, native.flatten(1))  # channel-major
        torch.testing.assert_close(model.decode(flat), model.decode(native))
        torch.testing.assert_close(model(x), model.decode_from_latent(flat))
        assert model(x).shape == (1, 1, 152, 1280)
        assert model.get_attention_matrix(x).shape == (1, 10 * 80, 10 * 80)


@pytest.mark.parametrize("width", [300, 640, 1000])
def test_encode_accepts_variable_width_times_152(tiny: AutoEncoderCNNV3, width: int) -> None:
    with torch.no_grad():
        assert tiny.encode(torch.rand(1, 1, 152, width)).shape == (1, 128)
        cells = math.ceil(152 / 16) * math.ceil(width / 16)
        assert tiny.get_attention_matrix(torch.rand(1, 1, 152, width)).shape == (1, cells, cells)


@pytest.mark.parametrize("blocks", [("inception", "resnext"), ("se", "inception"), ("resnext", "se")])
def test_block_types_mix_per_stage(blocks: tuple[str, str]) -> None:
    model = create_autoencoder("tiny", block_config=blocks, input_size=(64, 96)).eval()
    expected_final = 64 * (2 if blocks[1] == "resnext" else 1)
    assert model.encoder.final_channels == expected_final
    with torch.no_grad():
        assert model(torch.rand(1, 1, 64, 96)).shape == (1, 1, 64, 96)
        assert model.encode(torch.rand(1, 1, 64, 96)).shape == (1, 128)


def test_decoder_quirks_last_stage_64_and_square_render() -> None:
    model = create_autoencoder("tiny", input_size=(152, 640))
    assert [stage[1].out_channels for stage in model.decoder.stages] == [32, 64]
    assert model.encoder.stem[0].out_channels == 16  # c0 // 2
    assert model.config.rendered_size == 32 and model.decoder.needs_resize
    assert not create_autoencoder("tiny", input_size=(32, 32)).decoder.needs_resize


def test_dropout_quirk_only_in_forward_and_train_mode() -> None:
    torch.manual_seed(0)
    model = create_autoencoder("tiny", input_size=(48, 48), DropOut=True).train()
    x = torch.rand(2, 1, 48, 48)
    torch.testing.assert_close(model.encode(x), model.encode(x))          # no dropout in encode
    assert not torch.equal(model(x), model(x))                            # dropout on the latent
    model.eval()
    torch.testing.assert_close(model(x), model.decode(model.encode(x)))   # eval: identity
    plain = create_autoencoder("tiny", input_size=(48, 48)).train()
    torch.testing.assert_close(plain(x), plain(x))


def test_get_attention_map_is_global_minmax_saliency(tiny: AutoEncoderCNNV3) -> None:
    x = torch.rand(2, 1, 201, 201)
    with torch.no_grad():
        saliency = tiny.get_attention_map(x)
    assert saliency.shape == (2, 1, 201, 201) and not saliency.requires_grad
    assert saliency.min() == 0 and abs(float(saliency.max()) - 1) < 1e-6
    assert all(p.grad is None for p in tiny.parameters())
    leaf = x.clone().requires_grad_(True)
    ((tiny(leaf) - leaf) ** 2).sum().backward()
    grad = leaf.grad.abs()
    expected = (grad - grad.min()) / (grad.max() - grad.min() + 1e-8)
    torch.testing.assert_close(saliency, expected, rtol=0, atol=1e-6)
    tiny.zero_grad(set_to_none=True)


def test_without_attention() -> None:
    model = create_autoencoder("tiny", use_attention=False, input_size=(64, 64)).eval()
    assert model.encoder.attention is None
    assert model.get_attention_matrix(torch.rand(1, 1, 64, 64)) is None
    assert model.capabilities() == ["encode", "decode", "reconstruct"]
    assert [op.name for op in model.export_ops()] == ["encode", "decode", "reconstruct"]
    with pytest.raises(RuntimeError, match="use_attention=False"):
        model.encoder.attention_matrix(torch.rand(1, 1, 64, 64))


# --- family protocol, registry ---------------------------------------------------------------------


def test_family_protocol(tiny: AutoEncoderCNNV3) -> None:
    assert isinstance(tiny, Family) and AutoEncoderCNNV3.family == "autoencoder-cnn-v3"
    assert tiny.capabilities() == ["encode", "decode", "reconstruct", "attention-map"]
    pre = tiny.preprocessing()
    assert pre == {"channels": 1, "input_size": [201, 201], "resize": "bilinear", "dynamic_hw": True,
                   "min_hw": [17, 17], "max_hw": [4096, 4096], "max_pixels": 262144,
                   "output_range": [0.0, 1.0]}
    assert preset_config("large").min_input_side == 65  # 4·2^4 + 1
    assert Preprocessing(**pre).min_hw == (17, 17)  # valid against the manifest schema
    side = pre["min_hw"][0]
    with torch.no_grad():
        assert tiny.encode(torch.rand(1, 1, side, side)).shape == (1, 128)


def test_export_ops_shapes(tiny: AutoEncoderCNNV3) -> None:
    ops = {op.name: op for op in tiny.export_ops(batch_size=2)}
    assert list(ops) == ["encode", "decode", "reconstruct", "attention_matrix"]
    assert ops["encode"].dynamic_hw and not ops["reconstruct"].dynamic_hw
    encode_sizes = {shape[0][2:] for shape in ops["encode"].check_shapes}
    assert len(encode_sizes) >= 2 and (201, 201) not in encode_sizes
    expected_out = {"encode": (128,), "decode": (1, 201, 201), "reconstruct": (1, 201, 201),
                    "attention_matrix": (169, 169)}
    for name, op in ops.items():
        assert not op.module.training
        with torch.no_grad():
            out = op.module(*op.example_inputs)
            assert out.shape == (2, *expected_out[name])
            for shapes in op.check_shapes:
                out = op.module(*(torch.rand(s) for s in shapes))
                assert out.shape[0] == shapes[0][0]
    torch.testing.assert_close(ops["reconstruct"].module(ops["reconstruct"].example_inputs[0]),
                               tiny(ops["reconstruct"].example_inputs[0]))


def test_registered_variants() -> None:
    names = set(list_models())
    assert {"v3_tiny", "v3_small", "v3_medium", "v3_large"} <= names
    model = create_model("v3_tiny", input_size=(152, 640), latent_strategy="spatial")
    assert isinstance(model, AutoEncoderCNNV3)
    assert model.config.input_size == (152, 640) and model.config.latent_strategy == "spatial"
    with torch.device("meta"):
        assert create_model("v3_medium").config.latent_size == 2048


def test_load_original_from_class_args(tiny: AutoEncoderCNNV3) -> None:
    args = {"latent_size": 128, "block_config": ["resnet", "resnet"], "channel_config": [32, 64],
            "stride_config": [2, 2], "latent_strategy": "conv", "input_size": [201, 201],
            "use_attention": True, "DropOut": False, "embedding_dim": None}
    loaded = load_original(args, tiny.state_dict())
    assert not loaded.training and loaded.config == tiny.config
    with pytest.raises(RuntimeError, match="Missing key"):
        load_original({"preset": "tiny", "use_attention": False}, {})


# --- training contract -----------------------------------------------------------------------------


def test_training_losses_and_validation_metrics() -> None:
    torch.manual_seed(0)
    model = create_autoencoder("tiny", input_size=(48, 48)).train()
    batch = {"image": torch.rand(2, 1, 48, 48)}
    losses = training_losses(model, batch)
    assert set(losses) == {"loss", "mse"} and losses["loss"].ndim == 0
    losses["loss"].backward()
    assert model.encoder.stem[0].weight.grad is not None
    model.eval()
    metrics = validation_metrics(model, batch)
    assert set(metrics) == {"psnr", "ssim", "mse"} and all(isinstance(v, float) for v in metrics.values())
    with torch.no_grad():
        mse = float(((model(batch["image"]) - batch["image"]) ** 2).mean())
    assert metrics["mse"] == pytest.approx(mse, rel=1e-5)
    assert metrics["psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-4)
    assert -1 <= metrics["ssim"] <= 1


# --- export ----------------------------------------------------------------------------------------


def test_encode_onnx_dynamic_hw_matches_eager(tiny: AutoEncoderCNNV3) -> None:
    op = next(op for op in tiny.export_ops(batch_size=2) if op.name == "encode")
    buffer = io.BytesIO()
    axes = {"image": {0: "batch", 2: "height", 3: "width"}, "latent": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(op.module, op.example_inputs, buffer, dynamo=False, opset_version=18,
                          input_names=op.input_names, output_names=op.output_names, dynamic_axes=axes)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    side = tiny.preprocessing()["min_hw"][0]
    shapes = [s[0] for s in op.check_shapes] + [(1, 1, 152, 300), (3, 1, 152, 1280), (1, 1, side, side)]
    assert len({s[2:] for s in shapes} - {(201, 201)}) >= 3
    for shape in shapes:
        x = torch.rand(shape)
        with torch.no_grad():
            expected = op.module(x)
        got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        assert got.shape == expected.shape
        assert float((got - expected).abs().max()) <= 1e-4, shape


def test_encode_torch_export_dynamic_hw_from_min_hw(tiny: AutoEncoderCNNV3) -> None:
    """min_hw is where a dynamic-shape torch.export program starts to hold."""
    from torch.export import Dim, export

    op = next(op for op in tiny.export_ops(batch_size=2) if op.name == "encode")
    side = tiny.preprocessing()["min_hw"][0]
    dims = {0: Dim("batch", min=1, max=64), 2: Dim("h", min=side, max=4096), 3: Dim("w", min=side, max=4096)}
    program = export(op.module, op.example_inputs, dynamic_shapes=(dims,))
    for shape in [(1, 1, side, side), (2, 1, 152, 300)]:
        x = torch.rand(shape)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), op.module(x), rtol=0, atol=1e-5)
    assert isinstance(program.module(), nn.Module)


@pytest.mark.gpu
def test_cuda_matches_cpu_and_trains_under_autocast() -> None:
    torch.manual_seed(0)
    model = create_autoencoder("small", input_size=(152, 640), latent_strategy="spatial").eval()
    x = torch.rand(2, 1, 152, 640)
    with torch.no_grad():
        expected = model.encode(x)
        cuda_model = model.cuda()
        got = cuda_model.encode(x.cuda()).cpu()
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)  # cuDNN may use TF32
    cuda_model.train()
    with torch.autocast("cuda", dtype=torch.float16):
        losses = training_losses(cuda_model, {"image": x.cuda()})
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and cuda_model.encoder.stem[0].weight.grad is not None
