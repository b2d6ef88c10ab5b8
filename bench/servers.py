"""The servers of the benchmark as subprocesses on 127.0.0.1: start, time to ready, talk to, memory, stop.

aeserve runs as `make serve` runs it (`python -m app`: uvicorn with the service's default settings,
`AESERVE_STORE` only); each peer (`bench/peers/`) in its own process group. Every server is stopped by
signalling the process group it was started in, so the helpers a peer spawns (LitServe's workers,
tritonserver and its Python stub) go with it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.peers.common import PeerSpec
from bench.peers.triton_protocol import HEADER_LENGTH, infer_answer, infer_request
from bench.workloads import Prepared

REPO = Path(__file__).resolve().parent.parent
PEERS = ("plain", "litserve", "triton")
TRITON_VENV_PYTHON = REPO / "bench" / ".venv-triton" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------- memory
def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


def status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_bytes(pid: int) -> int:
    """The peak resident set (VmHWM) of the process and its descendants, added up."""
    return 1024 * sum(status_kib(p, "VmHWM") for p in process_tree(pid))


# ------------------------------------------------------------------------------------------- process
@dataclass
class Server:
    kind: str
    process: subprocess.Popen
    port: int
    log: Path
    ready_s: float = float("nan")
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def peak_rss_bytes(self) -> int:
        return peak_rss_bytes(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # helpers of the group that outlived their parent
            os.killpg(self.process.pid, signal.SIGKILL)


def wait_ready(server: Server, paths: Iterable[str], started: float, timeout: float) -> float:
    """Seconds from `started` until every path answered 200 (polled every 50 ms)."""
    pending = list(paths)
    with httpx.Client(timeout=2) as client:
        while pending:
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.kind} exited with {server.process.returncode}; see {server.log}")
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"{server.kind} not ready within {timeout:.0f} s; see {server.log}")
            try:
                if client.get(server.base + pending[0]).status_code == 200:
                    pending.pop(0)
                    continue
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    return time.perf_counter() - started


def launch(
    kind: str,
    cmd: list[str],
    env: dict[str, str],
    port: int,
    ready_paths: list[str],
    log_dir: Path,
    timeout: float = 300,
) -> Server:
    log = log_dir / f"{kind}.log"
    with open(log, "wb") as out:
        started = time.perf_counter()
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    server = Server(kind, process, port, log)
    try:
        server.ready_s = wait_ready(server, ready_paths, started, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def start_aeserve(store: Path, log_dir: Path, extra_env: dict[str, str] | None = None) -> Server:
    """The service as `make serve` starts it (`python -m app`), default settings (plus `extra_env`)."""
    port = free_port()
    cmd = [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "AESERVE_STORE": str(store.resolve()), **(extra_env or {})}
    return launch("aeserve", cmd, env, port, ["/readyz"], log_dir)


# ------------------------------------------------------------------------------------------- peers
def triton_python() -> Path | None:
    """The interpreter of the PyTriton venv: AESERVE_BENCH_TRITON_PYTHON, else bench/.venv-triton."""
    configured = os.environ.get("AESERVE_BENCH_TRITON_PYTHON")
    path = Path(configured) if configured else TRITON_VENV_PYTHON
    return path if path.exists() else None


def unavailable(kind: str) -> str | None:
    """Why a peer cannot run here (None: it can)."""
    if kind == "litserve" and importlib.util.find_spec("litserve") is None:
        return "litserve is not installed (pip install -e '.[bench]')"
    if kind == "triton" and triton_python() is None:
        return "no PyTriton venv (python -m bench.peers.triton_env builds bench/.venv-triton)"
    return None


def start_peer(kind: str, specs_file: Path, specs: list[PeerSpec], log_dir: Path) -> Server:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    module = {
        "plain": "bench.peers.plain_fastapi",
        "floor": "bench.peers.plain_fastapi",  # the harness floor: the plain peer with --floor
        "litserve": "bench.peers.litserve_peer",
        "triton": "bench.peers.triton_peer",
    }[kind]
    python = str(triton_python()) if kind == "triton" else sys.executable
    cmd = [python, "-m", module, "--specs", str(specs_file), "--port", str(port)]
    ready = {
        "plain": ["/healthz"],
        "floor": ["/healthz"],
        "litserve": ["/health"],
        "triton": [f"/v2/models/{s.triton_name}/ready" for s in specs],
    }[kind]
    if kind == "triton":
        cmd += ["--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    if kind == "floor":
        cmd.append("--floor")
    return launch(kind, cmd, env, port, ready, log_dir)


def request_for(kind: str, prepared: Prepared) -> tuple[str, bytes, dict[str, str]]:
    """(path, body, headers) of one request of the workload to a server of `kind`."""
    spec = prepared.spec
    if kind == "triton":
        body, headers = infer_request(prepared.body)
        return f"/v2/models/{spec.triton_name}/infer", body, headers
    # every server gets the same already-scaled values: aeserve's raw-detector normalisation (STEM) is off
    path = spec.route + ("?intensity=scaled" if kind == "aeserve" and prepared.manifest.preprocessing.intensity else "")
    return path, prepared.body, {"Content-Type": spec.content_type, "Accept": spec.accept}


def sample_answer(server: Server, prepared: Prepared) -> bytes:
    """The server's answer to the workload's body (its payload: the PNG or NPY bytes)."""
    path, body, headers = request_for(server.kind, prepared)
    response = httpx.post(server.base + path, content=body, headers=headers, timeout=60)
    response.raise_for_status()
    if server.kind == "triton":
        return infer_answer(response.content, response.headers.get(HEADER_LENGTH))
    return response.content
