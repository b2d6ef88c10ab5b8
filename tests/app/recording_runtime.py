"""Runtimes that record what they run and can be held, for tests against a real service process.

`install(log, gate)`, run in the service process before it starts (the `prelude` of
tests.app.service_process.running_service), wraps every runtime the engines get: each run first
appends one JSON line to `log`, `{"op": ..., "marks": [mean of each item of the first input]}`, then
waits while the file `gate` exists. A test holds the engine busy, queues requests behind it and sees
which of them ever ran.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from app import lifespan


class RecordingRuntime:
    """A runtime that logs each batch it is given, then waits for the gate to open."""

    def __init__(self, runtime: Any, op: str, log: Path, gate: Path) -> None:
        self.runtime, self.op, self.log, self.gate = runtime, op, log, gate
        self.provider = runtime.provider

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = next(iter(inputs.values()), np.zeros((0,)))
        marks = [round(float(item.mean()), 3) for item in first]
        with self.log.open("a") as out:
            out.write(json.dumps({"op": self.op, "marks": marks}) + "\n")
        while self.gate.exists():
            time.sleep(0.01)
        return self.runtime.run(inputs)


def install(log: str, gate: str) -> None:
    """Make every engine the lifespan builds run through `RecordingRuntime`s."""
    build_engine = lifespan.build_engine

    def recording_engine(record: Any, *args: Any, **kwargs: Any) -> Any:
        record.runtimes = {op: RecordingRuntime(rt, op, Path(log), Path(gate)) for op, rt in record.runtimes.items()}
        return build_engine(record, *args, **kwargs)

    lifespan.build_engine = recording_engine
