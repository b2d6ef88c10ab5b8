"""Evaluate a whole store: one `Evaluation` per model (newest version), printed as a table, written as
`<out>/quality.json` with one PNG per model, and stored in each version's manifest as `metrics.heldout`
(the held-out data is also named in its `training.heldout_data`).

The manifest is rewritten atomically (temp file, fsync, `os.replace`, directory fsync) and verified
again; it is not one of its own artifacts, so every recorded checksum stays valid.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from app.schemas.manifest import Manifest
from app.schemas.store_format import MANIFEST_NAME, model_dirs, newest_version_dir, read_manifest, verify_version
from training.checkpoint import fsync_dir
from training.quality.artifacts import StoreVersion
from training.quality.autoencoders import evaluate_stem, evaluate_v3, evaluate_vae
from training.quality.decoders import evaluate_diffusion, evaluate_progressive
from training.quality.evaluation import Evaluation

EVALUATORS: dict[str, Callable[[StoreVersion, Path], Evaluation]] = {
    "autoencoder-cnn-v3": evaluate_v3,
    "stem-autoencoder": evaluate_stem,
    "conv-decoder": evaluate_vae,
    "progressive-decoder": evaluate_progressive,
    "diffusion-decoder": evaluate_diffusion,
}
REPORT_NAME = "quality.json"


def write_heldout_metrics(version_dir: str | Path, heldout: dict[str, Any]) -> Manifest:
    """Put `heldout` into the manifest's `metrics.heldout` (and its data into `training.heldout_data`),
    rewrite manifest.json atomically and return the re-verified manifest."""
    version_dir = Path(version_dir)
    manifest = read_manifest(version_dir)
    updated = Manifest.model_validate(
        {
            **manifest.model_dump(),
            "metrics": {**manifest.metrics, "heldout": heldout},
            "training": {**manifest.training, "heldout_data": heldout["data"]},
        }
    )
    tmp = version_dir / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as handle:
            handle.write(updated.model_dump_json(indent=2))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, version_dir / MANIFEST_NAME)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(version_dir)
    return verify_version(version_dir)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def evaluate_store(
    store: str | Path,
    out_dir: str | Path,
    only: Iterable[str] | None = None,
    write_manifests: bool = True,
    log: Callable[[str], None] = print,
    command: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate the newest version of every model (or those in `only`); returns {name: heldout record}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = set(only or ())
    dirs = [d for d in model_dirs(Path(store)) if not wanted or d.name in wanted]
    missing = wanted - {d.name for d in dirs}
    if missing:
        raise ValueError(f"--only {sorted(missing)}: no such model in {store}")
    records: dict[str, dict[str, Any]] = {}
    for model_dir in dirs:
        version = StoreVersion.open(newest_version_dir(model_dir))
        evaluate = EVALUATORS.get(version.manifest.family)
        if evaluate is None:
            log(f"{version.name}: no held-out evaluation for family {version.manifest.family!r}; skipped")
            continue
        started = time.monotonic()
        record = evaluate(version, out_dir).to_json()
        record.update(
            version=version.manifest.version,
            artifacts="onnx (onnxruntime, CPU)",
            seconds=round(time.monotonic() - started, 1),
            evaluated_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            command=command,
        )
        if write_manifests:
            write_heldout_metrics(version.path, record)
        records[version.name] = record
        log(f"{version.name}: evaluated in {record['seconds']} s")
    _write_json(out_dir / REPORT_NAME, {"store": str(store), "models": records})
    return records


def _number(value: Any, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _goal_text(goal: dict[str, Any] | None) -> str:
    if not goal:
        return "—"
    if "drop_db" in goal:  # the cross-material goal (training.quality.cross_material)
        return (f"{goal['status']} (drop {goal['drop_db']:.2f} dB from {goal['reference_psnr']:.2f}; "
                f"target < {goal['target_db']:g})")
    return f"{goal['status']} ({goal['margin_db']:+.2f} dB vs {goal['baseline']}; target +{goal['target_db']:g})"


def _rows(name: str, record: dict[str, Any]) -> list[str]:
    """One table row per method of a record (the goal on the model's row), then its cross-material rows."""
    lines = []
    data = f"{record['data']['items']} {record['data']['name']}"
    for method, row in record["methods"].items():
        other = []
        if "kl_nats" in row:
            other.append(f"KL {row['kl_nats']:.2f} nats")
        if "eps_mse" in row:
            bands = record.get("eps_mse_by_t", {})
            other.append("ε-MSE " + ", ".join(f"t∈{k} {v['eps_mse']:.4f}" for k, v in bands.items()))
        if method in record.get("psnr_drop_db", {}):
            other.append(f"drop {record['psnr_drop_db'][method]:.2f} dB")
        lines.append(
            f"| {name} | {data} | {method} | {row['values'] if row['values'] is not None else '—'} | "
            f"{_number(row['psnr'], 2)} | {_number(row['ssim'], 3)} | {'; '.join(other) or '—'} | "
            f"{_goal_text(record['goal']) if method == 'model' else ''} |"
        )
        name, data = "", ""
    for method, row in record.get("references", {}).items():
        lines.append(f"|  |  | {method} | {row['values']} | {_number(row['psnr'], 2)} | {_number(row['ssim'], 3)} | "
                     f"{row['what']} | not a goal |")
    if record.get("cross_material"):
        lines += _rows("", record["cross_material"])
    return lines


def format_table(records: dict[str, dict[str, Any]]) -> str:
    """The report as a markdown table: one row per model and method, the goal on the model's row."""
    lines = [
        "| model | held-out data | method | values | PSNR dB | SSIM | other | goal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, record in records.items():
        lines += _rows(name, record)
    return "\n".join(lines)
