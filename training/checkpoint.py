"""Complete, atomic, verified checkpoints.

A checkpoint file is `torch.save(state)` followed by a 48-byte trailer: the magic `AESCKPT1`, the
sha256 of the payload and its length. `load_checkpoint` refuses a file whose trailer is missing or
whose size or hash disagrees (a truncated or damaged file) with a message naming the file.

Writes are atomic: the bytes go to a temp file in the same directory, are fsync'ed, `os.replace`d
over the target and the directory is fsync'ed, so a process killed at any moment leaves either the
old or the new file under the final name, never a half-written one; a temp file left by a killed
write is removed by `remove_stale_temps` on the next start. `CheckpointDir` keeps the newest
`keep_last` epoch files plus `latest.ckpt` and `best.ckpt` (hard links to the epoch file when
possible), checks the free disk space before each write and turns a full disk into `DiskSpaceError`
with the previous checkpoints untouched.

The state saved by the loop holds: model, optimizer, AMP grad scaler, step, epoch, position inside
the epoch, the RNG states of python/numpy/torch (and CUDA), the TrainConfig, the model config, the
data order of the current epoch, the best validation loss and the history (the JSON log's content).
A run of several processes (`training.distributed`) adds `rng_by_rank`, every rank's RNG state; its
other entries are rank 0's, with the same keys as a one-process checkpoint (the unwrapped model).
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import random
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

MAGIC = b"AESCKPT1"
_TRAILER = struct.Struct("<8s32sQ")  # magic, sha256 digest, payload length
TRAILER_BYTES = _TRAILER.size
EPOCH_PATTERN = re.compile(r"^epoch_(\d+)\.ckpt$")
TEMP_PATTERN = re.compile(r"^\..+\.(tmp|link)$")  # atomic_write_bytes temps and CheckpointDir link temps
MIB = 2**20
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, damaged or of the wrong kind."""


class DiskSpaceError(CheckpointError):
    """A checkpoint that was not written for lack of disk space (the previous ones are intact)."""


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry (the rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same directory, fsync, rename, fsync the dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete the temp files a killed write left in `directory` (`.NAME.XXXX.tmp`, `.NAME.PID.link`)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if TEMP_PATTERN.match(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
        log.warning("removed %s, left over from an interrupted write", path)
    return stale


def encode_checkpoint(state: dict[str, Any]) -> bytes:
    """Serialise a state dict and append the verification trailer."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    return payload + _TRAILER.pack(MAGIC, hashlib.sha256(payload).digest(), len(payload))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically write a verified checkpoint."""
    atomic_write_bytes(path, encode_checkpoint(state))
    return Path(path)


def verify_checkpoint(path: str | Path) -> bytes:
    """Return the payload of a checkpoint after checking its size and sha256; raise `CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    if len(data) < TRAILER_BYTES:
        raise CheckpointError(f"checkpoint {path} is truncated: {len(data)} bytes, shorter than its trailer")
    magic, digest, length = _TRAILER.unpack(data[-TRAILER_BYTES:])
    if magic != MAGIC:
        raise CheckpointError(
            f"checkpoint {path} is truncated or damaged: no valid trailer (or it was not "
            "written by training.checkpoint)"
        )
    payload = data[:-TRAILER_BYTES]
    if len(payload) != length:
        raise CheckpointError(
            f"checkpoint {path} is truncated: payload has {len(payload)} bytes, trailer says {length}"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is damaged: sha256 mismatch")
    return payload


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify and load a checkpoint (tensors and plain python types only: `weights_only=True`)."""
    payload = verify_checkpoint(path)
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


# --- RNG state --------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch (CPU and every CUDA device) as weights_only-loadable values."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- a run's checkpoint directory ----------------------------------------------------------------------


class CheckpointDir:
    """`epoch_NNNN.ckpt` per completed epoch, `latest.ckpt` (newest state, also mid-epoch) and `best.ckpt`.

    `keep_last`: epoch files kept (the newest N; 0 = none besides `latest` and `best`; None = all).
    `min_free_disk_mb`: space that must stay free after a write (None = as much as the checkpoint).
    """

    def __init__(
        self, directory: str | Path, keep_last: int | None = None, min_free_disk_mb: float | None = None
    ) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.min_free_disk_mb = min_free_disk_mb

    @property
    def latest(self) -> Path:
        return self.directory / "latest.ckpt"

    @property
    def best(self) -> Path:
        return self.directory / "best.ckpt"

    def epoch_path(self, epoch: int) -> Path:
        return self.directory / f"epoch_{epoch:04d}.ckpt"

    def epochs(self) -> list[int]:
        """Completed epochs that have a checkpoint file, ascending."""
        if not self.directory.is_dir():
            return []
        found = (EPOCH_PATTERN.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def _alias(self, source: Path, alias: Path) -> None:
        """Point `alias` at `source` atomically: a hard link renamed into place (a copy if links fail)."""
        tmp = alias.with_name(f".{alias.name}.{os.getpid()}.link")
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            atomic_write_bytes(alias, source.read_bytes())
            return
        os.replace(tmp, alias)
        fsync_dir(self.directory)

    def _still_intact(self) -> str:
        if self.latest.is_file():
            return f"; the newest good checkpoint {self.latest} is intact"
        return "; no checkpoint had been written yet"

    def check_disk_space(self, path: Path, size: int) -> None:
        """Raise `DiskSpaceError` unless `size` bytes fit with `min_free_disk_mb` to spare."""
        self.directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.directory).free
        reserve = size if self.min_free_disk_mb is None else int(self.min_free_disk_mb * MIB)
        if free < size + reserve:
            raise DiskSpaceError(
                f"not enough disk space to write checkpoint {path}: {free / MIB:.1f} MiB free, the checkpoint "
                f"needs {size / MIB:.1f} MiB and {reserve / MIB:.1f} MiB must stay free (--min-free-disk-mb)"
                + self._still_intact()
            )

    @contextmanager
    def _disk_full_is_an_error(self, path: Path) -> Iterator[None]:
        """Turn ENOSPC/EDQUOT while writing `path` into `DiskSpaceError` (the temp file is already gone)."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            raise DiskSpaceError(f"disk full while writing checkpoint {path}: {exc}" + self._still_intact()) from exc

    def _write(self, state: dict[str, Any], path: Path) -> Path:
        """Encode, check the disk budget, write atomically."""
        data = encode_checkpoint(state)
        self.check_disk_space(path, len(data))
        with self._disk_full_is_an_error(path):
            atomic_write_bytes(path, data)
        return path

    def save_epoch(self, state: dict[str, Any], epoch: int, is_best: bool) -> Path:
        """Write the end-of-epoch checkpoint, move `latest` (and `best` when it improved) onto it, then
        delete the epoch files beyond `keep_last` (`best` and `latest` keep their own links)."""
        path = self._write(state, self.epoch_path(epoch))
        with self._disk_full_is_an_error(path):
            self._alias(path, self.latest)
            if is_best:
                self._alias(path, self.best)
        if self.keep_last is not None:
            epochs = self.epochs()
            for old in epochs[: max(0, len(epochs) - self.keep_last)]:
                self.epoch_path(old).unlink(missing_ok=True)
        return path

    def save_latest(self, state: dict[str, Any]) -> Path:
        """Write a mid-epoch checkpoint (time budget or interrupt) as `latest` only."""
        return self._write(state, self.latest)

    def resolve(self, which: str | Path) -> Path:
        """`latest`, `best`, an epoch number, or a path -> the checkpoint file."""
        text = str(which)
        if text in ("latest", "best"):
            path = self.latest if text == "latest" else self.best
            if not path.is_file():
                raise CheckpointError(f"no {text} checkpoint in {self.directory}")
            return path
        if text.isdigit():
            path = self.epoch_path(int(text))
            if not path.is_file():
                raise CheckpointError(
                    f"no checkpoint for epoch {text} in {self.directory} (have: {self.epochs() or 'none'})"
                )
            return path
        path = Path(text)
        if path.is_dir():
            return CheckpointDir(path / "checkpoints" if (path / "checkpoints").is_dir() else path).resolve("latest")
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        return path
