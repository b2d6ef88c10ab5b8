"""The store writer: atomic version directories, a manifest that validates, checksums that verify."""

from __future__ import annotations

import json

import pytest

import tests.training.toy_family  # noqa: F401  (registers toy_ae)
import training.store as store_module
from app.schemas.manifest import Manifest
from training.registry import create_model
from training.store import (
    StoreError,
    read_manifest,
    sha256_file,
    verify_version,
    version_is_valid,
    write_version,
)

FORMATS = ["onnx", "torch_export"]


@pytest.fixture(scope="module")
def toy_version(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    extra = store / "notes.txt"
    extra.write_text("hello")
    path = write_version(
        create_model("toy_ae").eval(),
        store,
        "toy",
        "1",
        formats=FORMATS,
        training={"val": {"psnr": 12.5}, "steps": 3},
        description="a toy",
        command="pytest",
        extra_files=[extra],
    )
    return store, path


@pytest.mark.slow
def test_version_layout_and_manifest(toy_version) -> None:
    store, path = toy_version
    assert path == store / "toy" / "1"
    assert not [p for p in (store / "toy").iterdir() if p.name.startswith(".")], "no temp dirs left"
    manifest = Manifest.model_validate(json.loads((path / "manifest.json").read_text()))
    assert manifest.name == "toy" and manifest.version == "1" and manifest.family == "toy"
    assert manifest.architecture == "toy_ae"
    assert manifest.config == {"size": 16, "channels": 4, "latent_dim": 8, "noise": 0.0, "norm": True}
    assert manifest.capabilities == ["encode", "decode", "reconstruct", "sample"]
    assert manifest.preprocessing.input_size == (16, 16) and manifest.preprocessing.dynamic_hw
    assert manifest.sampler is not None and manifest.sampler.kind == "prior_gaussian"
    assert manifest.sampler.latent_dim == 8 and manifest.saliency is None
    assert manifest.training == {"val": {"psnr": 12.5}, "steps": 3}
    assert manifest.provenance["command"] == "pytest" and manifest.provenance["torch"]
    assert {"git_commit", "onnx", "onnxruntime", "created_at"} <= set(manifest.provenance)
    encode = manifest.ops["encode"]
    assert encode.artifacts == {"onnx": "encode.onnx", "torch_export": "encode.pt2"}
    assert encode.inputs[0].shape == [-1, 1, -1, -1] and encode.shape_buckets == [[24, 12]]
    records = {r.path: r for r in manifest.artifacts}
    assert {"encode.onnx", "decode.pt2", "weights.safetensors", "notes.txt"} <= set(records)
    onnx_record = records["encode.onnx"]
    assert onnx_record.format == "onnx" and onnx_record.op == "encode"
    assert onnx_record.sha256 == sha256_file(path / "encode.onnx")
    assert onnx_record.bytes == (path / "encode.onnx").stat().st_size
    assert max(onnx_record.parity_max_abs_err.values()) < 1e-5
    assert records["weights.safetensors"].format == "other"


@pytest.mark.slow
def test_verify_detects_tampering_and_missing_files(toy_version, tmp_path) -> None:
    import shutil

    _, path = toy_version
    assert verify_version(path).name == "toy"
    copy = tmp_path / "toy" / "1"
    shutil.copytree(path, copy)
    (copy / "decode.onnx").write_bytes((copy / "decode.onnx").read_bytes()[:-1] + b"\0")
    with pytest.raises(StoreError, match=r"decode\.onnx sha256 mismatch"):
        verify_version(copy)
    (copy / "notes.txt").unlink()
    assert not version_is_valid(copy)
    with pytest.raises(StoreError, match=r"has no manifest\.json"):
        read_manifest(tmp_path)


@pytest.mark.slow
def test_existing_version_is_kept_unless_overwritten(toy_version) -> None:
    store, path = toy_version
    with pytest.raises(StoreError, match="already exists"):
        write_version(create_model("toy_ae"), store, "toy", "1", formats=["onnx"])
    assert version_is_valid(path)


def test_failed_build_leaves_no_version(tmp_path, monkeypatch) -> None:
    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(store_module, "export_model", broken_export)
    with pytest.raises(RuntimeError, match="exploded"):
        write_version(create_model("toy_ae"), tmp_path, "toy", "1", formats=["onnx"])
    assert list((tmp_path / "toy").iterdir()) == []


def test_a_model_without_registered_architecture_is_refused(tmp_path) -> None:
    model = create_model("toy_ae")
    del model.architecture
    with pytest.raises(StoreError, match="no registered architecture"):
        write_version(model, tmp_path, "toy", "1", formats=["onnx"])


def test_invalid_names_are_refused(tmp_path) -> None:
    with pytest.raises(StoreError, match="invalid model name"):
        write_version(create_model("toy_ae"), tmp_path, "../x", "1")
    with pytest.raises(StoreError, match="invalid version"):
        write_version(create_model("toy_ae"), tmp_path, "toy", ".hidden")


@pytest.mark.slow
def test_overwrite_replaces_atomically(tmp_path) -> None:
    first = write_version(create_model("toy_ae"), tmp_path, "toy", "2", formats=["onnx"], training={"n": 1})
    second = write_version(
        create_model("toy_ae", latent_dim=4),
        tmp_path,
        "toy",
        "2",
        formats=["onnx"],
        training={"n": 2},
        overwrite=True,
    )
    assert first == second and read_manifest(second).training == {"n": 2}
    assert read_manifest(second).config["latent_dim"] == 4
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == ["2"]


def test_each_op_records_its_format_timings_and_the_fastest(toy_version) -> None:
    manifest = Manifest.model_validate(json.loads((toy_version[1] / "manifest.json").read_text()))
    for name, op in manifest.ops.items():
        assert set(op.format_ms) == set(op.artifacts), name  # every artifact was timed
        assert all(ms > 0 for ms in op.format_ms.values()), op.format_ms
        assert op.format_timing_batch == min(8, op.max_batch_size)
        assert op.preferred_format in op.artifacts


def test_fastest_format_prefers_onnx_unless_torch_is_clearly_faster() -> None:
    from training.format_timing import fastest_format

    assert fastest_format({"onnx": 10.0, "torch_export": 9.5}) == "onnx"  # within the 10 % margin
    assert fastest_format({"onnx": 10.0, "aoti": 8.0}) == "aoti"
    assert fastest_format({"onnx": 5.0, "aoti": 8.0}) == "onnx"
    assert fastest_format({"torch_export": 3.0}) == "torch_export"
    assert fastest_format({}) is None
