"""The HTTP edge against a real uvicorn process (two models of the tiny store):
a client that disconnects cancels its queued request for real (it never runs), a client that stalls
mid-body is cut off with 408 and cannot hold up shutdown, a chunked body over the limit is a 413, the
deadline runs from the request's arrival, and none of it is counted as a 500."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.app.conftest import npy_bytes
from tests.app.service_process import Service, running_service

READ_TIMEOUT_S = 1.0
LIMIT = 200_000


class Server:
    """One service process whose runtimes record (tests.app.recording_runtime): `log` has a JSON line per
    engine run, and the engine waits while the file `gate` exists."""

    def __init__(self, service: Service, log: Path, gate: Path) -> None:
        self.service, self.log, self.gate = service, log, gate
        self.url = service.base_url
        self.port = int(self.url.rsplit(":", 1)[1])
        service.wait_until(lambda: httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200, what="/readyz")

    def marks(self) -> list[float]:
        return [m for line in self.log.read_text().splitlines() for m in json.loads(line)["marks"]]

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for row in httpx.get(f"{self.url}/metrics", timeout=5).text.splitlines():
            if row.startswith(name + "{") and all(f'{k}="{v}"' in row for k, v in labels.items()):
                total += float(row.split()[-1])
        return total

    def stop(self) -> int:
        """SIGTERM; the exit status."""
        self.gate.unlink(missing_ok=True)  # a failed test may leave the engine held
        self.service.process.send_signal(signal.SIGTERM)
        return self.service.process.wait(timeout=60)


@contextlib.contextmanager
def recording_server(store: Path, tmp: Path) -> Iterator[Server]:
    log, gate = tmp / "runs.jsonl", tmp / "gate"
    log.touch()
    env = {
        "AESERVE_MODELS": "tiny-dyn,tiny-render",  # no torch to import: a quick start
        "AESERVE_MAX_BATCH_SIZE": "1",
        "AESERVE_ENGINE_INSTANCES": "1",  # one batch in flight: a second request queues behind the gate
        "AESERVE_MAX_UPLOAD_BYTES": str(LIMIT),
        "AESERVE_BODY_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
    }
    prelude = f"from tests.app.recording_runtime import install; install({str(log)!r}, {str(gate)!r})"
    with running_service(store, tmp, env, prelude) as service:
        server = Server(service, log, gate)
        yield server
        gate.unlink(missing_ok=True)


def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with recording_server(store, tmp_path_factory.mktemp("edge_server")) as running:
        yield running


def send(port: int, head: str, body: bytes = b"") -> socket.socket:
    """A raw HTTP/1.1 request (`head`: request line and headers, without the blank line)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock.sendall(f"{head}\r\nHost: test\r\n\r\n".encode() + body)
    return sock


def answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the response on `sock` (read until Content-Length or close)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def encode_request(port: int, mark: float, extra: str = "") -> socket.socket:
    body = npy_bytes(np.full((1, 1, 16, 16), mark, np.float32))
    head = f"POST /v1/models/tiny-dyn/encode HTTP/1.1\r\nContent-Type: application/x-npy\r\nContent-Length: {len(body)}"
    return send(port, head + extra, body)


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except OSError:
        return True


def internal_errors(server: Server) -> float:
    return server.metric("aeserve_requests_total", status="500") + server.metric(
        "aeserve_failures_total", reason="internal"
    )


def test_a_client_that_disconnects_cancels_its_queued_request(server: Server) -> None:
    server.gate.touch()
    first = encode_request(server.port, 0.25)  # runs, and holds the engine at the gate
    until(lambda: 0.25 in server.marks(), what="the first request to run")
    depth_before = server.metric("aeserve_queue_depth", model="tiny-dyn", op="encode")
    gone_before = server.metric("aeserve_failures_total", model="tiny-dyn", reason="client_disconnected")
    leaving = encode_request(server.port, 0.75)  # queued behind it
    until(lambda: server.metric("aeserve_queue_depth", model="tiny-dyn", op="encode") > depth_before,
          what="the second request to be queued")
    leaving.close()
    until(lambda: server.metric("aeserve_failures_total", model="tiny-dyn", reason="client_disconnected")
          > gone_before, what="the disconnect to be noticed while the request waits")
    server.gate.unlink()
    assert answer(first)[0] == 200
    assert answer(encode_request(server.port, 0.5))[0] == 200
    marks = server.marks()
    assert 0.25 in marks and 0.5 in marks
    assert 0.75 not in marks, "the request of the client that left ran anyway"
    assert server.metric("aeserve_requests_total", model="tiny-dyn", op="encode", status="499") >= 1


@pytest.mark.parametrize(
    ("path", "content_type", "partial"),
    [("tiny-dyn/encode", "application/x-npy", b"\x93NUMPY"), ("tiny-render/sample", "application/json", b'{"num_')],
)
def test_a_client_that_stalls_mid_body_gets_408_and_is_cut_off(server: Server, path, content_type, partial) -> None:
    before = internal_errors(server)
    started = time.monotonic()
    head = f"POST /v1/models/{path} HTTP/1.1\r\nContent-Type: {content_type}\r\nContent-Length: 1000"
    stalled = send(server.port, head, partial)
    status, headers, body = answer(stalled)
    assert status == 408, body
    assert headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert READ_TIMEOUT_S <= time.monotonic() - started < READ_TIMEOUT_S + 5
    assert closed_by_server(stalled)
    assert internal_errors(server) == before


def test_a_chunked_body_over_the_limit_is_413_while_streaming(server: Server) -> None:
    before = internal_errors(server)
    for path in ("tiny-dyn/encode", "tiny-render/sample"):
        sock = send(server.port, f"POST /v1/models/{path} HTTP/1.1\r\nTransfer-Encoding: chunked")
        chunk = b" " * 50_000
        for _ in range(LIMIT // len(chunk) + 1):  # never ends the body: the answer must come first
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        status, _, body = answer(sock)
        assert status == 413, body
        assert json.loads(body)["error"] == {
            "code": "payload_too_large", "message": f"body exceeds {LIMIT} bytes", "field": "body", "limit": LIMIT,
        }
        sock.close()
    assert internal_errors(server) == before


def test_the_deadline_runs_from_arrival_not_from_the_end_of_the_upload(server: Server) -> None:
    body = npy_bytes(np.full((1, 1, 16, 16), 0.125, np.float32))
    head = ("POST /v1/models/tiny-dyn/encode HTTP/1.1\r\nContent-Type: application/x-npy\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-Timeout-S: 0.3")
    slow = send(server.port, head, body[:10])
    time.sleep(0.6)  # within the read timeout, past the client's own deadline
    slow.sendall(body[10:])
    status, _, answer_body = answer(slow)
    assert status == 504, answer_body
    assert 0.125 not in server.marks(), "expired work ran"


def test_a_stalled_client_does_not_hold_up_shutdown(store: Path, tmp_path: Path) -> None:
    with recording_server(store, tmp_path) as server:
        stalled = send(server.port, "POST /v1/models/tiny-dyn/encode HTTP/1.1\r\nContent-Length: 1000", b"\x93NUMPY")
        time.sleep(0.2)
        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < READ_TIMEOUT_S + 5
        stalled.close()
