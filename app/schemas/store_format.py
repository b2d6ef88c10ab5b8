"""The model-store format on disk: the one implementation both sides use.

Layout: `<store>/<model>/<version>/manifest.json` plus the files its `artifacts` list. `training`
writes it (and imports this module to read back and verify); `app` and `bench` read it. Pure
standard library + pydantic: no torch, no onnxruntime, no fastapi.

- `version_key` orders versions numerically ("10" > "9", "1.10" > "1.9").
- `read_manifest` validates `manifest.json` against the contract (`Manifest`).
- `resolve_artifact` refuses a path that leaves its version directory.
- `verify_version` = read + every artifact present with its exact size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from pydantic import ValidationError

from app.schemas.manifest import Manifest

MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.safetensors"


class StoreError(Exception):
    """A store version that cannot be written, read or served; the message says why."""


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Numeric-aware sort key: '10' > '9', 'v1.10' > 'v1.9'; non-numeric parts compare as text."""
    parts = re.split(r"(\d+)", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts if p != "")


def version_dirs(model_dir: Path) -> list[Path]:
    """The version directories of one model that hold a manifest, oldest first (hidden ones skipped)."""
    if not model_dir.is_dir():
        return []
    found = [
        v for v in model_dir.iterdir() if v.is_dir() and not v.name.startswith(".") and (v / MANIFEST_NAME).is_file()
    ]
    return sorted(found, key=lambda v: version_key(v.name))


def newest_version_dir(model_dir: Path) -> Path | None:
    """The newest version directory of a model, or None when it has none."""
    versions = version_dirs(model_dir)
    return versions[-1] if versions else None


def model_dirs(root: Path) -> list[Path]:
    """Every model directory of a store (sorted by name; hidden directories and `recipes` have no versions)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and version_dirs(p))


def read_manifest(version_dir: str | Path) -> Manifest:
    """Read and validate `<version_dir>/manifest.json`; `StoreError` names what is wrong."""
    path = Path(version_dir) / MANIFEST_NAME
    if not path.is_file():
        raise StoreError(f"{version_dir} has no {MANIFEST_NAME}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{MANIFEST_NAME} unreadable: {exc}") from exc
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise StoreError(
            f"manifest invalid at {where}: {first['msg']} ({exc.error_count()} error(s))"
        ) from exc


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def resolve_artifact(version_dir: str | Path, relative: str) -> Path:
    """The absolute path of an artifact; refuses one that points outside its version directory."""
    root = Path(version_dir).resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise StoreError(f"artifact {relative!r} points outside its version directory")
    return path


def verify_artifacts(manifest: Manifest, version_dir: str | Path) -> None:
    """Every artifact record exists inside the version directory with its exact size and sha256."""
    for record in manifest.artifacts:
        path = resolve_artifact(version_dir, record.path)
        if not path.is_file():
            raise StoreError(f"artifact {record.path} is missing")
        size = path.stat().st_size
        if size != record.bytes:
            raise StoreError(f"artifact {record.path} has {size} bytes, manifest says {record.bytes}")
        digest = sha256_file(path)
        if digest != record.sha256.lower():
            raise StoreError(
                f"artifact {record.path} sha256 mismatch: {digest[:12]}… != {record.sha256[:12]}…"
            )


def verify_version(version_dir: str | Path) -> Manifest:
    """The validated manifest of an intact version; raises `StoreError` otherwise."""
    manifest = read_manifest(version_dir)
    verify_artifacts(manifest, version_dir)
    return manifest


def version_is_valid(version_dir: str | Path) -> bool:
    """True when `verify_version` passes."""
    try:
        verify_version(version_dir)
    except StoreError:
        return False
    return True
