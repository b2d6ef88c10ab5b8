"""Contract: a store written by `training` (real family, tiny config, a few steps) is what `app` reads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app.schemas.manifest import Manifest
from training.__main__ import main
from training.registry import create_model

RECIPE = """
name: v3-tiny-contract
version: "1"
model: v3_tiny
description: contract test store
overrides: {input_size: [48, 48], latent_strategy: conv}
data: {samples_per_epoch: 8, val_samples: 4}
train: {epochs: 1, batch_size: 4, val_batch_size: 4, lr: 0.001, time_budget_s: 60}
formats: [onnx, torch_export]
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("contract")
    (root / "store" / "recipes").mkdir(parents=True)
    (root / "store" / "recipes" / "v3.yaml").write_text(RECIPE)
    torch.set_num_threads(1)
    assert main(["build-store", "--store", str(root / "store"), "--runs", str(root / "runs"), "--no-progress"]) == 0
    return root / "store"


def _version(store: Path) -> Path:
    return store / "v3-tiny-contract" / "1"


def _rebuilt(manifest: Manifest, version: Path) -> torch.nn.Module:
    """The model rebuilt from the manifest alone (registry name + config) and the stored weights."""
    from safetensors.torch import load_file

    model = create_model(manifest.architecture, **manifest.config)
    model.load_state_dict(load_file(str(version / "weights.safetensors")), strict=True)
    return model.eval()


@pytest.mark.slow
def test_manifest_validates_and_checksums_verify(store) -> None:
    version = _version(store)
    manifest = Manifest.model_validate(json.loads((version / "manifest.json").read_text()))
    assert manifest.family == "autoencoder-cnn-v3" and manifest.name == "v3-tiny-contract"
    assert manifest.architecture == "v3_tiny" and "model" not in manifest.training
    assert {"encode", "decode", "reconstruct"} <= set(manifest.ops)
    assert manifest.training["steps"] == 2 and {"psnr", "ssim", "mse"} <= set(manifest.training["val"])
    assert manifest.preprocessing.input_size == (48, 48)
    if "attention-map" in manifest.capabilities:
        assert manifest.saliency is not None and "torch_export" in manifest.ops["reconstruct"].artifacts
    for record in manifest.artifacts:
        data = (version / record.path).read_bytes()
        assert len(data) == record.bytes and hashlib.sha256(data).hexdigest() == record.sha256, record.path
        if record.format != "other":
            assert record.parity_max_abs_err and max(record.parity_max_abs_err.values()) <= 1e-4


@pytest.mark.slow
def test_onnx_outputs_equal_eager(store) -> None:
    import onnxruntime as ort

    version = _version(store)
    manifest = Manifest.model_validate(json.loads((version / "manifest.json").read_text()))
    model = _rebuilt(manifest, version)
    ops = {op.name: op for op in model.export_ops(batch_size=3)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    for name, spec in manifest.ops.items():
        session = ort.InferenceSession(
            str(version / spec.artifacts["onnx"]), options, providers=["CPUExecutionProvider"]
        )
        inputs = tuple(torch.rand(t.shape) for t in ops[name].example_inputs)  # batch 3, unlike the export
        assert [i.name for i in session.get_inputs()] == [t.name for t in spec.inputs]
        got = session.run(None, {t.name: x.numpy() for t, x in zip(spec.inputs, inputs, strict=True)})[0]
        with torch.no_grad():
            want = ops[name].module(*inputs).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.slow
def test_app_store_loads_and_runs_it(store) -> None:
    from app import store as app_store
    from app.settings import Settings

    records = {r.name: r for r in app_store.scan_store(store)}
    record = records["v3-tiny-contract"]
    assert record.version == "1"
    app_store.load_model(record, Settings(store=store, device="cpu", warmup=False))
    assert record.state != "unavailable", record.reason
    assert {"encode", "decode", "reconstruct"} <= set(record.runtimes)
    model = _rebuilt(record.manifest, record.path)
    image = np.random.default_rng(0).random((2, 1, 48, 48), dtype=np.float32)
    latent = record.runtimes["encode"].run({"image": image})["latent"]
    with torch.no_grad():
        want = model.encode(torch.from_numpy(image)).numpy()
    np.testing.assert_allclose(latent, want, atol=1e-4, rtol=0)
