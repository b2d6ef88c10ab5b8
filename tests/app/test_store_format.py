"""app.schemas.store_format: the one store-format implementation that app, training and bench share."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from app.schemas.store_format import (
    StoreError,
    model_dirs,
    newest_version_dir,
    read_manifest,
    resolve_artifact,
    verify_version,
    version_dirs,
    version_is_valid,
    version_key,
)


def _manifest(artifact_path: str, data: bytes) -> dict:
    return {
        "name": "m",
        "version": "1",
        "family": "toy",
        "architecture": "toy_ae",
        "config": {},
        "capabilities": [],
        "preprocessing": {},
        "ops": {},
        "artifacts": [
            {"path": artifact_path, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        ],
    }


def _version(root: Path, model: str, version: str, artifact: str = "w.bin", data: bytes = b"abc") -> Path:
    path = root / model / version
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps(_manifest(artifact, data)))
    if "/" not in artifact:
        (path / artifact).write_bytes(data)
    return path


def test_version_order_is_numeric_and_skips_hidden_and_manifestless(tmp_path: Path) -> None:
    for version in ("9", "10", "1.9", "1.10"):
        _version(tmp_path, "m", version)
    (tmp_path / "m" / ".tmp-11-123").mkdir()
    (tmp_path / "m" / "12").mkdir()  # no manifest: not a version
    assert [p.name for p in version_dirs(tmp_path / "m")] == ["1.9", "1.10", "9", "10"]
    assert newest_version_dir(tmp_path / "m") == tmp_path / "m" / "10"
    assert newest_version_dir(tmp_path / "missing") is None
    assert max(["v2", "v10"], key=version_key) == "v10"


def test_model_dirs_lists_only_models_with_versions(tmp_path: Path) -> None:
    _version(tmp_path, "b", "1")
    _version(tmp_path, "a", "3")
    (tmp_path / "recipes").mkdir()
    (tmp_path / ".cache").mkdir()
    assert [p.name for p in model_dirs(tmp_path)] == ["a", "b"]
    assert model_dirs(tmp_path / "nope") == []


def test_verify_checks_presence_size_and_digest(tmp_path: Path) -> None:
    version = _version(tmp_path, "m", "1")
    assert verify_version(version).architecture == "toy_ae" and version_is_valid(version)
    (version / "w.bin").write_bytes(b"abd")  # same size, other bytes
    with pytest.raises(StoreError, match="sha256 mismatch"):
        verify_version(version)
    (version / "w.bin").write_bytes(b"abcd")
    with pytest.raises(StoreError, match="has 4 bytes, manifest says 3"):
        verify_version(version)
    (version / "w.bin").unlink()
    with pytest.raises(StoreError, match="is missing"):
        verify_version(version)
    assert not version_is_valid(version)


@pytest.mark.parametrize("escape", ["../outside.bin", "sub/../../outside.bin", "/etc/hostname"])
def test_artifact_paths_cannot_leave_the_version_dir(tmp_path: Path, escape: str) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "outside.bin").write_bytes(b"abc")
    version = _version(tmp_path, "m", "1", artifact=escape)
    with pytest.raises(StoreError, match="outside its version directory"):
        verify_version(version)
    with pytest.raises(StoreError, match="outside"):
        resolve_artifact(version, escape)


def test_symlink_out_of_the_version_dir_is_refused(tmp_path: Path) -> None:
    version = _version(tmp_path, "m", "1", artifact="link.bin")
    (version / "link.bin").unlink()
    (tmp_path / "secret.bin").write_bytes(b"abc")
    (version / "link.bin").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(StoreError, match="outside"):
        verify_version(version)


def test_read_manifest_names_what_is_wrong(tmp_path: Path) -> None:
    version = _version(tmp_path, "m", "1")
    raw = json.loads((version / "manifest.json").read_text())
    raw["capabilities"] = ["teleport"]
    (version / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(StoreError, match=r"manifest invalid at capabilities\.0"):
        read_manifest(version)
    (version / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="unreadable"):
        read_manifest(version)
    with pytest.raises(StoreError, match=r"has no manifest\.json"):
        read_manifest(tmp_path / "nowhere")


def test_training_and_app_share_the_implementation() -> None:
    import app.store as app_store
    import training.store as training_store

    assert training_store.verify_version is verify_version
    assert training_store.StoreError is StoreError is app_store.StoreError
    assert app_store.version_key is version_key
