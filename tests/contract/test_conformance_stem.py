"""Replay every call of the original 4D-STEM autoencoder fixtures on our implementation.

Original weights are loaded through `training.originals.load_original`; every output, every
compute_loss term and every recorded submodule trace (each read from a module of ours by a forward hook)
must agree within TOL. Errors measured with every kernel set of tests/contract/conformance.py: outputs
and traces <= 1.05e-5 (the decoder's), TOL is 4.8 times that; compute_loss terms <= 1.5e-8, LOSS_TOL
leaves a wide margin because 1/variance terms amplify any latent difference.
One forward of the original-width model costs ~44 GMAC per sample: the model runs once per case.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.conftest import fixture_cases, fixture_dir
from tests.contract.conformance import report, scaled_err
from training.models.stem_autoencoder import StemAutoencoder
from training.originals import load_original

FAMILY = "stem-autoencoder"
TOL = 5e-5
LOSS_TOL = 1e-6

Take = Callable[[tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]
# Where each recorded trace of the original lies in our model: (module path, what to take from the
# module's (inputs, output)). The original's functional steps have no module of their own here; each is
# read where our forward hands it on: ReLU(bn_post) is the input of conv_final, ReLU(bn_final) is our
# forward's ReLU of bn_final's output (bn_final is skipped at 1x1), the 4x4 pool is the embedding's input.
TRACE_SOURCES: dict[str, tuple[str, Take]] = {
    "trace.encoder.resnet2": ("encoder.resnet2", lambda args, out: out),
    "trace.encoder.resnet3": ("encoder.resnet3", lambda args, out: out),
    "trace.encoder.conv_post": ("encoder.conv_post", lambda args, out: out),
    "trace.encoder.relu_post": ("encoder.conv_final", lambda args, out: args[0]),
    "trace.encoder.conv_final": ("encoder.conv_final", lambda args, out: out),
    "trace.encoder.relu_final": ("encoder.bn_final", lambda args, out: F.relu(out)),
    "trace.encoder.adaptive_pool": ("encoder.embedding", lambda args, out: args[0].unflatten(1, (1, 4, 4))),
    "trace.encoder.embedding": ("encoder.embedding", lambda args, out: out),
    "trace.decoder.decoder.linear": ("decoder.linear", lambda args, out: out),
    "trace.decoder.decoder.conv_initial": ("decoder.conv_initial", lambda args, out: out),
    "trace.decoder": ("decoder", lambda args, out: out),
}


def _hook_traces(model: StemAutoencoder, keys: list[str], traces: dict[str, torch.Tensor]) -> list:
    """Forward hooks that store each recorded trace's counterpart of ours (first call only) in `traces`."""
    modules = dict(model.named_modules())
    hooks = []
    for key in keys:
        assert key in TRACE_SOURCES, f"{key} has no counterpart in our model"
        path, take = TRACE_SOURCES[key]

        def store(module: torch.nn.Module, args: tuple, out: torch.Tensor, key: str = key, take: Take = take) -> None:
            if key not in traces:  # returns None: the module's output is left as it is
                traces[key] = take(args, out).detach().clone()

        hooks.append(modules[path].register_forward_hook(store))
    return hooks


@pytest.fixture(scope="module", params=fixture_cases(FAMILY) or ["<no fixtures>"])
def replay(request: pytest.FixtureRequest) -> dict[str, Any]:
    folder = fixture_dir(FAMILY)
    case = json.loads((folder / f"{request.param}.json").read_text())
    weights = load_file(folder / case["files"]["weights"])
    io = load_file(folder / case["files"]["io"])
    model = load_original(FAMILY, case["constructor_args"], weights)
    assert isinstance(model, StemAutoencoder)

    traces: dict[str, torch.Tensor] = {}
    hooks = _hook_traces(model, [key for key in io if key.startswith("trace.")], traces)
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
    err = scaled_err(replay["outputs"][key], replay["io"][key])
    report(key, {"error": err})
    assert err <= TOL, f"{key}: error {err:.3g}"


@pytest.mark.parametrize("term", ["total_loss", "mse_loss", "l1_reg", "contrastive_reg", "divergence_reg"])
def test_compute_loss_terms_match(replay: dict[str, Any], term: str) -> None:
    ours = replay["outputs"]["compute_loss"][term]
    theirs = replay["io"][f"output.compute_loss.{term}"]
    assert ours.shape == theirs.shape == ()
    # divergence_reg is ~4e7 here (1/variance): scaled_err compares it relative to its size
    err = scaled_err(ours, theirs)
    report(term, {"error": err})
    assert err <= LOSS_TOL, f"{term}: {float(ours)} vs {float(theirs)}"


def test_compute_loss_on_our_own_outputs(replay: dict[str, Any]) -> None:
    io, outputs = replay["io"], replay["outputs"]
    ours = replay["model"].compute_loss(io["input.x"], outputs["output.forward"], outputs["output.embed"])
    errors = {term: scaled_err(value, io[f"output.compute_loss.{term}"]) for term, value in ours.items()}
    report("compute_loss of our outputs", errors)
    assert all(err <= LOSS_TOL for err in errors.values()), errors


def test_traces_match(replay: dict[str, Any]) -> None:
    io, traces = replay["io"], replay["traces"]
    recorded = [key for key in io if key.startswith("trace.")]
    assert len(recorded) >= 10 and sorted(traces) == sorted(recorded)
    errors = {key: scaled_err(traces[key], io[key]) for key in recorded}
    report("traces", errors)
    assert all(err <= TOL for err in errors.values()), errors
    assert (io["trace.encoder.relu_final"] > 0).all()   # the fixture's bottleneck is not clamped to 0
