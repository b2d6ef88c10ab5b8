"""Write one model version into the model store: `<store>/<model>/<version>/`.

The version is assembled in a hidden temp directory beside its final place (artifacts, weights,
training log, `manifest.json`) and renamed into place only when complete, so a half-built version
never looks valid. The manifest is built with `app.schemas.manifest.Manifest` (the contract with the
service) and lists every file with its sha256, size, format, op and export parity.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from app.schemas.manifest import (
    ArtifactRecord,
    Manifest,
    OpSpec,
    Preprocessing,
    SaliencySpec,
    SamplerSpec,
    TensorSpec,
)
from app.schemas.store_format import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    StoreError,
    read_manifest,
    sha256_file,
    verify_version,
    version_is_valid,
)
from training.checkpoint import fsync_dir
from training.export import FORMATS, OpExport, export_model
from training.format_timing import fastest_format, time_formats

REPO_ROOT = Path(__file__).resolve().parents[1]
# the store format lives on the contract side; re-exported for training's callers
__all__ = ["StoreError", "read_manifest", "sha256_file", "verify_version", "version_is_valid", "write_version"]


def _record(
    root: Path, path: Path, fmt: str = "other", op: str | None = None, parity: dict[str, float] | None = None
) -> ArtifactRecord:
    return ArtifactRecord(
        path=path.relative_to(root).as_posix(),
        sha256=sha256_file(path),
        bytes=path.stat().st_size,
        format=fmt,
        op=op,
        parity_max_abs_err=parity or {},
    )


def git_commit() -> str:
    """HEAD of the repository (with "+dirty" when the tree has changes), or "unknown"."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(command: str | None = None, **extra: Any) -> dict[str, Any]:
    """Where a version came from: code, command, library versions, time."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {
        "git_commit": git_commit(),
        "command": command or " ".join(sys.argv),
        **versions,
        "platform": platform.platform(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **extra,
    }


def _op_spec(result: OpExport, root: Path, max_batch_size: int) -> OpSpec:
    batch, timings = time_formats(result, max_batch_size)
    return OpSpec(
        preferred_format=fastest_format(timings),
        format_ms=timings,
        format_timing_batch=batch,
        inputs=[TensorSpec(**s) for s in result.inputs],
        outputs=[TensorSpec(**s) for s in result.outputs],
        artifacts={a.format: a.path.relative_to(root).as_posix() for a in result.artifacts},
        shape_buckets=result.shape_buckets,
        max_batch_size=max_batch_size,
    )


def save_weights(model: nn.Module, path: Path, half: bool = False) -> Path:
    """The model's state dict as safetensors; `half`: floating tensors as float16 (loading upcasts them)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(path))
    return path


def _saliency_spec(name: str, capabilities: list[str], ops: dict[str, OpSpec]) -> SaliencySpec | None:
    """Gradient saliency needs the reconstruct op as a torch.export program."""
    if "attention-map" not in capabilities:
        return None
    reconstruct = ops.get("reconstruct")
    if reconstruct is None or "torch_export" not in reconstruct.artifacts:
        raise StoreError(
            f"{name}: 'attention-map' needs a torch_export artifact of op 'reconstruct' "
            "(gradient saliency); add torch_export to the formats"
        )
    return SaliencySpec(op="reconstruct")


def _write_manifest(manifest: Manifest, directory: Path) -> None:
    with open(directory / MANIFEST_NAME, "w") as handle:
        handle.write(manifest.model_dump_json(indent=2))
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(directory)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete temp directory into place (replacing an older copy of the same version)."""
    if final.exists():
        trash = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def _check_names(name: str, version: str, architecture: str | None) -> None:
    if not name or "/" in name or name.startswith("."):
        raise StoreError(f"invalid model name {name!r}")
    if not version or "/" in version or version.startswith("."):
        raise StoreError(f"invalid version {version!r}")
    if not architecture:
        raise StoreError(f"{name}: the model has no registered architecture (build it with create_model)")


def write_version(
    model: nn.Module,
    store: str | Path,
    name: str,
    version: str,
    *,
    formats: Iterable[str] = FORMATS,
    training: dict[str, Any] | None = None,
    description: str = "",
    command: str | None = None,
    extra_files: Iterable[Path] = (),
    export_batch_size: int = 2,
    max_batch_size: int = 32,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Export `model` and write `<store>/<name>/<version>/` with its manifest; returns that directory.
    The manifest records the model's registered `architecture` (set by `create_model`) and its config,
    so the model can be rebuilt from the manifest alone."""
    architecture = getattr(model, "architecture", None)
    _check_names(name, version, architecture)
    final = Path(store) / name / version
    if final.exists() and not overwrite:
        raise StoreError(f"{final} already exists (pass overwrite=True to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        exports = export_model(model.eval(), tmp, formats=formats, batch_size=export_batch_size, log=log)
        records = [_record(tmp, a.path, a.format, a.op, a.parity_max_abs_err) for e in exports for a in e.artifacts]
        records.append(_record(tmp, save_weights(model, tmp / WEIGHTS_NAME)))
        for extra in map(Path, extra_files):
            if extra.is_file():
                records.append(_record(tmp, Path(shutil.copy2(extra, tmp / extra.name))))
        capabilities = list(model.capabilities())
        ops = {e.op.name: _op_spec(e, tmp, max_batch_size) for e in exports}
        manifest = Manifest(
            name=name,
            version=version,
            family=model.family,
            architecture=architecture,
            description=description,
            config=model.get_config(),
            capabilities=capabilities,
            preprocessing=Preprocessing(**model.preprocessing()),
            ops=ops,
            artifacts=records,
            saliency=_saliency_spec(name, capabilities, ops),
            sampler=SamplerSpec(**model.sampler_spec()) if hasattr(model, "sampler_spec") else None,
            training=training or {},
            provenance=provenance(command, folded_conv_bn={e.op.name: e.folded_pairs for e in exports}),
        )
        _write_manifest(manifest, tmp)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
