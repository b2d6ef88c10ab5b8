"""ProgressiveDecoder (PRISM) against the original code's fixtures: outputs, traces, crop_pad vectors,
parameter counts.

crop_pad only moves values and pads zeros, so it must match exactly on any CPU. Model errors measured
with every kernel set of tests/contract/conformance.py: outputs and traces <= 1.5e-6 (6e-8 natively);
TOLERANCE is 4 times the largest."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import fixture_cases, fixture_dir
from tests.contract.conformance import report, scaled_err
from training.layers.crop_pad import CropPad, crop_pad
from training.models.progressive_decoder import ProgressiveDecoder, ProgressiveDecoderConfig
from training.originals import load_original

FAMILY = "progressive-decoder"
TOLERANCE = 6e-6
MODEL_CASES = [case for case in fixture_cases(FAMILY) if case != "crop_pad_vectors"]


def _case(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = fixture_dir(FAMILY)
    meta = json.loads((folder / f"{name}.json").read_text())
    return meta, load_file(str(folder / f"{name}.io.safetensors"))


def _crop_pad_calls() -> list[int]:
    if "crop_pad_vectors" not in fixture_cases(FAMILY):
        return list(range(13))  # the test body skips with the missing path
    folder = fixture_dir(FAMILY)
    return [call["index"] for call in json.loads((folder / "crop_pad_vectors.json").read_text())["calls"]]


@pytest.mark.parametrize("index", _crop_pad_calls())
def test_crop_pad_vectors(index: int) -> None:
    meta, io = _case("crop_pad_vectors")
    call = next(c for c in meta["calls"] if c["index"] == index)
    source, expected = io[f"input.{index}"], io[f"output.{index}"]
    assert list(source.shape) == call["input_shape"]
    for result in (crop_pad(source, call["target_size"]), CropPad(call["target_size"])(source)):
        assert list(result.shape) == call["output_shape"]
        assert torch.equal(result, expected)


def test_all_thirteen_crop_pad_vectors_present() -> None:
    meta, io = _case("crop_pad_vectors")
    assert len(meta["calls"]) == 13
    assert len([key for key in io if key.startswith("input.")]) == 13
    assert {c["branch"] for c in meta["calls"]} == {"pad", "crop"}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_model_case_matches_original(case: str) -> None:
    meta, io = _case(case)
    weights = load_file(str(fixture_dir(FAMILY) / meta["files"]["weights"]))
    model = load_original(FAMILY, meta["constructor_args"], weights)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == meta["param_count"]
    assert len(model.state_dict()) == meta["state_dict_entries"]

    resolved = meta["resolved"]
    assert model.arch.latent_channels == resolved["latent_channels"]
    assert list(model.arch.channel_progression) == resolved["channel_progression"]
    assert model.arch.num_upsample_layers == resolved["num_upsample_layers"]
    original_layers = [row[1].replace("ConditionalBatchNorm", "BatchNorm2d")
                       for row in meta["decoder_layers"]]
    assert [type(m).__name__ for m in model.decoder] == original_layers
    expected_keys = {key.replace(".main.", ".") for key, _, _ in meta["state_dict"]}
    assert set(model.state_dict()) == expected_keys
    assert torch.equal(model.input_vec.detach(), io["input.input_vec"])

    errors = {}
    with torch.no_grad():
        for call in meta["calls"]:
            errors[call["method"]] = scaled_err(getattr(model, call["method"])(), io[call["output"]])

        traces = {key[len("trace.decoder."):]: value for key, value in io.items()
                  if key.startswith("trace.decoder.")}
        assert traces, "fixture has no decoder traces"
        x = model.input_vec
        for index, layer in enumerate(model.decoder):
            x = layer(x)
            if str(index) in traces:
                errors[f"decoder.{index}"] = scaled_err(x, traces[str(index)])
    report(f"{case} errors", errors)
    assert all(f"decoder.{index}" in errors for index in traces), "a trace was not compared"
    assert all(err <= TOLERANCE for err in errors.values()), errors


# Parameter counts of the automatic configuration, from the reference fact sheet (section 7).
PARAM_COUNTS = [
    (64, 64, 43_855, 43_793),
    (64, 32, 43_799, 43_737),
    (128, 128, 175_119, 174_993),
    (128, 64, 175_063, 174_937),
    (256, 256, 699_791, 699_537),
    (256, 128, 699_735, 699_481),
    (512, 512, 2_797_711, 2_797_201),
    (512, 256, 2_797_655, 2_797_145),
    (1024, 1024, 11_187_855, 11_186_833),
    (1024, 512, 11_187_799, 11_186_777),
]


@pytest.mark.parametrize(("input_size", "output_size", "with_bn", "without_bn"), PARAM_COUNTS)
def test_parameter_counts(input_size: int, output_size: int, with_bn: int, without_bn: int) -> None:
    for use_bn, expected in ((True, with_bn), (False, without_bn)):
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            config = ProgressiveDecoderConfig(input_size=input_size, output_size=output_size, use_bn=use_bn)
            model = ProgressiveDecoder(config)
        assert sum(p.numel() for p in model.parameters()) == expected


def test_public_manual_case_param_count() -> None:
    config = ProgressiveDecoderConfig(input_size=128, output_size=100, latent_channels=64,
                                      channel_progression=(32, 16, 16, 8, 8, 8, 4, 1), use_bn=False,
                                      output_activation="tanh")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = ProgressiveDecoder(config)
    assert sum(p.numel() for p in model.parameters()) == 49_633
