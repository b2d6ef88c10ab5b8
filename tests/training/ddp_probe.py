"""`--import tests.training.ddp_probe` (for tests/training/test_ddp.py): registers `toy_ae` and records every
file a process writes through `training.checkpoint.atomic_write_bytes` (checkpoints, `log.json`) into
`$AESERVE_WRITES_DIR/rank<RANK>.txt`, one path per line, so a test can tell which rank wrote what. It also
turns the loss-curve PNG off (matplotlib takes most of a tiny run's time on a loaded machine).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import tests.training.toy_family  # noqa: F401  (registers toy_ae)
import training.checkpoint
import training.plots

if "training.loop" in sys.modules:
    raise RuntimeError("import tests.training.ddp_probe before training.loop, or the probe sees no write")

_original_write = training.checkpoint.atomic_write_bytes


def _recording_write(path: str | Path, data: bytes) -> None:
    _original_write(path, data)
    directory = os.environ.get("AESERVE_WRITES_DIR")
    if directory:
        with open(Path(directory) / f"rank{os.environ.get('RANK', 'none')}.txt", "a") as record:
            record.write(f"{path}\n")


training.checkpoint.atomic_write_bytes = _recording_write
training.plots.plot_loss_curve = lambda *args, **kwargs: None
