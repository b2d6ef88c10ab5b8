"""A real service process for lifecycle tests: uvicorn in a subprocess on 127.0.0.1 over a given store.

`prelude` is Python run in the subprocess before uvicorn starts (e.g. to slow a runtime down), so a test
can shape timing without touching the code under test.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]

def slow_runs(seconds: float | str) -> str:
    """A prelude that makes every ONNX Runtime call (an instance's and a lone batch's) sleep `seconds` first."""
    return f"""
import time
from app.runtime.onnx import OnnxRuntime
def slowed(call):
    def slow_run(self, inputs):
        time.sleep({seconds})
        return call(self, inputs)
    return slow_run
OnnxRuntime.run, OnnxRuntime._run_alone = slowed(OnnxRuntime.run), slowed(OnnxRuntime._run_alone)
"""


SERVE = """
import sys
{prelude}
import uvicorn
uvicorn.run("app.main:create_app", factory=True, host="127.0.0.1", port=int(sys.argv[1]), log_level="info")
"""


@dataclass
class Service:
    process: subprocess.Popen
    base_url: str
    log: Path

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30, **kwargs)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, condition: Callable[[], bool], timeout_s: float = 60, what: str = "condition") -> None:
        """Poll `condition` (transport errors count as False) until it holds; fail with the log otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(httpx.TransportError):
                if condition():
                    return
            assert self.process.poll() is None, f"service exited ({self.process.returncode}):\n{self.log_text()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.log_text()}"
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_service(
    store: Path, tmp_path: Path, env: dict[str, str] | None = None, prelude: str = ""
) -> Iterator[Service]:
    """Start the service; yield once its port answers /healthz; kill it if the test left it running."""
    port = free_port()
    log = tmp_path / f"service-{port}.log"
    environment = {
        **os.environ,
        "AESERVE_STORE": str(store),
        "AESERVE_WARMUP": "false",
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE.format(prelude=prelude), str(port)],
            cwd=ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT,
        )
    service = Service(process, f"http://127.0.0.1:{port}", log)
    try:
        service.wait_until(lambda: httpx.get(f"{service.base_url}/healthz", timeout=2).status_code == 200,
                           what="/healthz")
        yield service
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
