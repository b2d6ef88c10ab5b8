"""No unpickling of what a store provides, and only verified bytes are loaded: tampered or swapped .pt2
files, .pt2 archives that would unpickle, ONNX files with external data, AOTI packages."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import stat
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import app.store as app_store
from app.runtime.aoti import AotiRuntime
from app.runtime.base import RuntimeLoadError
from app.runtime.onnx import OnnxRuntime
from app.schemas.manifest import TensorSpec
from app.store import ModelRecord, load_model
from tests.app.conftest import make_settings

torch = pytest.importorskip("torch")


class Payload:
    """Unpickling this creates `marker`: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def rewrite_zip(source: Path, target: Path, edit: Callable[[str, bytes], bytes], extra: dict | None = None) -> None:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for name in old.namelist():
            new.writestr(name, edit(name, old.read(name)))
        root = old.namelist()[0].split("/")[0]
        for name, data in (extra or {}).items():
            new.writestr(f"{root}/{name}", data)


@pytest.fixture
def good_pt2(tmp_path: Path) -> Path:
    program = torch.export.export(torch.nn.Linear(2, 2).eval(), (torch.rand(1, 2),))
    path = tmp_path / "good.pt2"
    torch.export.save(program, str(path))
    return path


def load_pt2(path: Path):
    from app.runtime.torch_export import TorchExportRuntime

    return TorchExportRuntime(path, input_names=["x"], output_names=["y"], device="cpu")


def test_pt2_archives_that_would_unpickle_or_load_native_code_are_refused(good_pt2: Path, tmp_path: Path):
    marker = tmp_path / "payload-ran"
    evil = pickle.dumps(Payload(marker))

    def pickled_weight(name: str, data: bytes) -> bytes:
        if name.endswith("data/weights/model_weights_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        return evil if name.endswith("data/weights/weight_0") else data

    def pickled_inputs(name: str, data: bytes) -> bytes:
        return evil if name.endswith("data/sample_inputs/model.pt") else data

    cases = {
        "weights.pt2": (pickled_weight, None, "holds pickled objects"),
        "inputs.pt2": (pickled_inputs, None, "Weights only load failed"),
        "native.pt2": (lambda n, d: d, {"data/aotinductor/model/model.so": b"\x7fELF"}, "native code"),
    }
    for name, (edit, extra, refusal) in cases.items():
        rewrite_zip(good_pt2, tmp_path / name, edit, extra)
        with pytest.raises(RuntimeLoadError, match=refusal):
            load_pt2(tmp_path / name)
        assert not marker.exists(), name
    assert load_pt2(good_pt2).run({"x": np.ones((1, 2), np.float32)})["y"].shape == (1, 2)
    with pytest.raises(RuntimeError):  # the control: torch.export.load alone runs the payload
        torch.export.load(str(tmp_path / "inputs.pt2"))
    assert marker.exists()


@pytest.fixture
def ae_copy(store: Path, tmp_path: Path) -> Path:
    version = tmp_path / "store" / "tiny-ae" / "10"
    shutil.copytree(store / "tiny-ae" / "10", version)
    return version


@pytest.fixture
def export_loads(monkeypatch) -> list[object]:
    """Every `torch.export.load` call from now on."""
    calls: list[object] = []
    real = torch.export.load

    def spy(f, *args, **kwargs):
        calls.append(f)
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch.export, "load", spy)
    return calls


def test_a_tampered_pt2_is_never_loaded(ae_copy: Path, export_loads: list, caplog):
    artifact = ae_copy / "reconstruct.pt2"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    artifact.write_bytes(bytes(data))
    record = ModelRecord("tiny-ae", "10", ae_copy)
    load_model(record, make_settings(ae_copy.parents[1]))
    assert record.state == "unavailable" and "reconstruct.pt2 sha256 mismatch" in record.reason
    assert export_loads == [] and record.saliency is None
    assert any("reconstruct.pt2 sha256 mismatch" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_an_artifact_swapped_after_verification_is_not_loaded(ae_copy: Path, export_loads: list, monkeypatch, tmp_path):
    """The runtime gets the bytes that were hashed, not the path: a swap between check and load is caught."""
    verify = app_store.verify_artifacts
    swapped = (ae_copy / "reconstruct.pt2").read_bytes()[::-1]

    def verify_then_swap(manifest, version_dir):
        verify(manifest, version_dir)
        (ae_copy / "reconstruct.pt2").write_bytes(swapped)

    monkeypatch.setattr(app_store, "verify_artifacts", verify_then_swap)
    record = ModelRecord("tiny-ae", "10", ae_copy)
    load_model(record, make_settings(ae_copy.parents[1]))
    assert record.state == "unavailable" and "reconstruct.pt2 sha256 mismatch" in record.reason
    assert export_loads == []


def test_the_store_hands_verified_bytes_to_torch_export(ae_copy: Path, export_loads: list):
    record = ModelRecord("tiny-ae", "10", ae_copy)
    load_model(record, make_settings(ae_copy.parents[1]))
    assert record.state == "loading" and record.saliency is not None
    assert len(export_loads) == 1 and not isinstance(export_loads[0], str | Path)  # bytes, not the path


def onnx_with_external_data(path: Path, location: str) -> None:
    """A no-input model whose one initializer lives in the file `location` (relative to `path`'s folder)."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import set_external_data

    weights = numpy_helper.from_array(np.full((1, 3, 8, 8), 0.5, np.float32), "W")
    raw = weights.raw_data
    target = Path(location) if Path(location).is_absolute() else path.parent / location
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(raw)  # followed, it would load
    set_external_data(weights, location=location, offset=0, length=len(raw))
    weights.ClearField("raw_data")
    weights.data_location = TensorProto.EXTERNAL
    graph = helper.make_graph(
        [helper.make_node("Identity", ["W"], ["image"])], "g", [],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])], [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path.write_bytes(model.SerializeToString())


def test_onnx_external_data_leaving_the_version_folder_is_refused(store: Path, tmp_path: Path, caplog):
    version = tmp_path / "store" / "tiny-render" / "1"
    shutil.copytree(store / "tiny-render" / "1", version)
    artifact = version / "decode.onnx"
    onnx_with_external_data(artifact, "../../something")
    manifest = json.loads((version / "manifest.json").read_text())
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    manifest["artifacts"][0].update(sha256=digest, bytes=artifact.stat().st_size)
    (version / "manifest.json").write_text(json.dumps(manifest))
    record = ModelRecord("tiny-render", "1", version)
    load_model(record, make_settings(tmp_path / "store"))
    assert record.state == "unavailable"
    assert "keeps tensors in external files ['../../something']" in record.reason
    assert any("external files" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


@pytest.mark.parametrize("location", ["../../something", "weights.bin", "ABSOLUTE"])
@pytest.mark.parametrize("with_onnx", [True, False])
def test_onnx_runtime_loads_only_self_contained_files(tmp_path, monkeypatch, location, with_onnx):
    """With `onnx` the model is inspected; without it ONNX Runtime still never reads external data."""
    location = str(tmp_path / "elsewhere" / "w.bin") if location == "ABSOLUTE" else location
    model = tmp_path / "a" / "b" / "model.onnx"
    model.parent.mkdir(parents=True)
    onnx_with_external_data(model, location)
    (tmp_path / "weights.bin").write_bytes(np.full((1, 3, 8, 8), 0.5, np.float32).tobytes())
    monkeypatch.chdir(tmp_path)  # a relative location must not resolve against the working directory either
    if not with_onnx:
        monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(RuntimeLoadError, match="external files" if with_onnx else "(?i)external data"):
        OnnxRuntime(model, device="cpu")


def test_aoti_loads_a_private_copy_of_the_verified_bytes(tmp_path: Path):
    seen = []

    def loader(path: str):
        copy = Path(path)
        seen.append((copy, copy.read_bytes(), stat.S_IMODE(copy.parent.stat().st_mode)))
        return lambda x: (x,)

    spec = [TensorSpec(name="image", shape=[-1, 1, 4, 4])]
    original = tmp_path / "store" / "m.pt2"  # never opened: the store hands over the bytes it hashed
    AotiRuntime(original, inputs=spec, outputs=spec, device="cpu", loader=loader, data=b"verified bytes")
    (copy, data, mode), = seen
    assert data == b"verified bytes" and mode == 0o700 and copy.parent != original.parent
    assert not copy.exists()  # removed once loaded
