"""AutoEncoder CNN V3 against the original code's fixtures: weights load with the identity key map,
every recorded call and submodule trace is reproduced, and parameter counts match the reference.

Errors measured with every kernel set of tests/contract/conformance.py: calls <= 4.3e-6 (the gradient
saliency 1.4e-6), traces <= 5.8e-6; TOLERANCE is more than 4 times the largest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import fixture_cases, fixture_dir
from tests.contract.conformance import report, scaled_err
from training.models.autoencoder_cnn_v3 import create_autoencoder
from training.originals import load_original

FAMILY = "autoencoder-cnn-v3"
TOLERANCE = 2.5e-5
GRADIENT_METHODS = {"get_attention_map"}  # saliency needs autograd


def _load_case(case: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    folder: Path = fixture_dir(FAMILY)
    meta = json.loads((folder / f"{case}.json").read_text())
    weights = load_file(folder / meta["files"]["weights"])
    tensors = load_file(folder / meta["files"]["io"])
    return meta, weights, tensors


@pytest.mark.parametrize("case", fixture_cases(FAMILY))
def test_original_calls_are_reproduced(case: str) -> None:
    meta, weights, tensors = _load_case(case)
    model = load_original(FAMILY, meta["constructor_args"], weights)
    assert sum(p.numel() for p in model.parameters()) == meta["param_count"]
    assert list(model.state_dict()) == [key for key, _, _ in meta["state_dict"]]  # identity key map

    errors: dict[str, float] = {}
    for call in meta["calls"]:
        args = [tensors[name] for name in call["args"]]
        method = getattr(model, call["method"])
        if call["method"] in GRADIENT_METHODS:
            result = method(*args)
        else:
            with torch.no_grad():
                result = method(*args)
        errors[call["output"]] = scaled_err(result, tensors[call["output"]])
    report(f"{case} errors", errors)
    assert errors and all(err <= TOLERANCE for err in errors.values()), errors


@pytest.mark.parametrize("case", fixture_cases(FAMILY))
def test_submodule_traces_are_reproduced(case: str) -> None:
    meta, weights, tensors = _load_case(case)
    model = load_original(FAMILY, meta["constructor_args"], weights)
    traces = {key[len("trace."):]: value for key, value in tensors.items() if key.startswith("trace.")}
    assert traces
    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[path].register_forward_hook(
        lambda _m, _i, out, path=path: captured.__setitem__(path, out.detach()))
        for path in traces]
    try:
        with torch.no_grad():
            model(tensors["input.x"])
    finally:
        for handle in handles:
            handle.remove()
    errors = {path: scaled_err(captured[path], expected) for path, expected in traces.items()}
    report(f"{case} trace errors", errors)
    assert all(err <= TOLERANCE for err in errors.values()), errors


# Reference table (section 7 of reference/autoencoder-cnn-v3.md): total, encoder, decoder.
PARAM_COUNTS = {
    ("tiny", "conv"): (450_961, 212_464, 238_497),
    ("tiny", "spatial"): (188_833, 81_792, 107_041),
    ("small", "conv"): (6_131_137, 3_341_024, 2_790_113),
    ("small", "spatial"): (1_949_185, 1_251_616, 697_569),
    ("medium", "conv"): (18_903_233, 9_856_480, 9_046_753),
    ("medium", "spatial"): (2_186_177, 1_498_848, 687_329),
    ("large", "conv"): (142_011_073, 72_392_288, 69_618_785),
    ("large", "spatial"): (8_303_297, 5_538_400, 2_764_897),
}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("preset", "strategy"), list(PARAM_COUNTS))
def test_parameter_counts_match_reference(preset: str, strategy: str) -> None:
    with torch.device("meta"):  # counts only: no memory, no init cost (large/conv has 142M)
        model = create_autoencoder(preset, latent_strategy=strategy)
    assert (_count(model), _count(model.encoder), _count(model.decoder)) == PARAM_COUNTS[preset, strategy]


def test_small_without_attention_parameter_count() -> None:
    with torch.device("meta"):
        assert _count(create_autoencoder("small", use_attention=False)) == 6_098_369
