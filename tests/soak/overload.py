"""Overload against a real service process: the load that `tests/app/test_overload_server.py` asserts on
for a few seconds and `make soak` runs for minutes (`python -m tests.soak.overload`).

The service runs over the tiny store (`tests.app.tiny_store`, model tiny-dyn) with small limits and
every engine run slowed by `run_ms`, one request per batch (`max_batch_size=1`, one frame per request),
so its capacity is known: about 1000 / `run_ms` requests per second, measured by `capacity` with
`inflight` closed-loop clients (the admission limit: none is refused). `flood` then offers an open-loop
stream of requests at `factor` times that rate (a request every 1 / rate seconds, whatever the answers),
so the excess must be shed: answers are 200 or 429, nothing else.

Environment of `make soak`: SOAK_SECONDS (120), SOAK_FACTOR (5), SOAK_RUN_MS (40), SOAK_INFLIGHT (8);
the service inherits the rest (e.g. MALLOC_ARENA_MAX=2, which flattens the steps in which glibc's
per-thread malloc arenas grow its RSS). It prints req/s, status counts, p50/p99 latencies, the client's
own worst stall and the server's RSS at start, peak and end (and every ~10 % of the run), and exits 1
when an answer is neither 200 nor 429, a connection failed, or the service does not recover.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from tests.app.service_process import Service, running_service, slow_runs

PATH = "/v1/models/tiny-dyn/encode"
SIDE = 128  # one 128x128 float32 frame: a 64 KiB body, sent in more than one read
MAX_OUTSTANDING = 128  # unanswered requests at once; ~INFLIGHT + a few quick 429s are expected


def payload() -> bytes:
    """One grayscale frame of SIDE x SIDE as NPY."""
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(0).random((1, 1, SIDE, SIDE), dtype=np.float32))
    return buffer.getvalue()


@dataclass(frozen=True)
class Answer:
    """One request as the client saw it: status (0: no answer), seconds, Retry-After, transport error."""

    status: int
    latency_s: float
    retry_after: str | None = None
    error: str = ""


def environment(run_ms: float, inflight: int) -> dict[str, str]:
    """Settings of the overloaded service: tiny-dyn only, one frame per batch, `inflight` admitted."""
    return {
        "AESERVE_MODELS": "tiny-dyn",
        "AESERVE_LOG_LEVEL": "WARNING",
        "AESERVE_MAX_BATCH_SIZE": "1",
        "AESERVE_MAX_INFLIGHT_REQUESTS": str(inflight),
        "AESERVE_REQUEST_TIMEOUT_S": "30",
    }


@contextlib.contextmanager
def slow_service(store: Path, tmp: Path, run_ms: float, inflight: int) -> Iterator[Service]:
    """The service over `store`, ready, each engine run `run_ms` slower; warmed by a few requests."""
    prelude = slow_runs(run_ms / 1000)
    with running_service(store, tmp, env=environment(run_ms, inflight), prelude=prelude) as service:
        service.wait_until(lambda: httpx.get(f"{service.base_url}/readyz", timeout=2).status_code == 200,
                           what="/readyz")
        with service.client() as client:
            for _ in range(3):
                assert client.post(PATH, content=payload()).status_code == 200
        yield service


class Connections:
    """A minimal HTTP/1.1 client over keep-alive connections to one host (asyncio streams): far cheaper per
    request than httpx, so the client's own CPU time stays out of the latencies it measures."""

    def __init__(self, base_url: str) -> None:
        host, port = base_url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, dict[str, str]]:
        """Status and headers (lower-case names) of a POST; the answer's body is read and dropped."""
        while self.idle and self.idle[-1][0].at_eof():  # closed by the server while idle
            self.idle.pop()[1].close()
        reader, writer = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        try:
            writer.write(head.encode() + body)
            status, headers = await self._answer(reader)
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return status, headers

    @staticmethod
    async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        await reader.readexactly(int(headers["content-length"]))
        return status, headers

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def send(connections: Connections, body: bytes) -> Answer:
    """One request, timed; a transport failure is status 0 with the error."""
    started = time.perf_counter()
    try:
        status, headers = await asyncio.wait_for(connections.post(PATH, body, "application/x-npy"), 30)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, LookupError, ValueError, IndexError) as exc:
        return Answer(0, time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}")
    return Answer(status, time.perf_counter() - started, headers.get("retry-after"))


async def capacity(base_url: str, clients: int, seconds: float) -> tuple[float, list[Answer]]:
    """Requests per second answered 200 by `clients` closed-loop clients (each sends when answered)."""
    body, answers, connections = payload(), [], Connections(base_url)
    stop = time.perf_counter() + seconds

    async def loop() -> None:
        while time.perf_counter() < stop:
            answers.append(await send(connections, body))

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    connections.close()
    return sum(a.status == 200 for a in answers) / elapsed, answers


@dataclass(frozen=True)
class Flood:
    """What a flood saw: every answer, its length, and the client's own worst stall (the latest a request
    was sent after it was due: a stalled machine, not a slow server)."""

    answers: list[Answer]
    seconds: float
    client_lag_s: float


async def flood(base_url: str, rate: float, seconds: float,
                every_second: Callable[[], None] | None = None) -> Flood:
    """An open-loop stream: a request every 1 / `rate` seconds for `seconds`, all awaited at the end;
    `every_second` runs about once a second (e.g. to sample the server's RSS). A request due while
    MAX_OUTSTANDING are unanswered is not sent: it counts as a failure (status 0)."""
    body, connections = payload(), Connections(base_url)
    tasks: list[asyncio.Future[Answer]] = []
    pending: set[asyncio.Future[Answer]] = set()
    loop = asyncio.get_running_loop()
    started = next_tick = loop.time()
    lag = 0.0
    for index in range(math.ceil(rate * seconds)):
        due = started + index / rate
        await asyncio.sleep(max(0.0, due - loop.time()))  # yields even when late
        lag = max(lag, loop.time() - due)
        if len(pending) >= MAX_OUTSTANDING:
            tasks.append(loop.create_future())
            tasks[-1].set_result(Answer(0, 0.0, error=f"not sent: {MAX_OUTSTANDING} requests unanswered"))
            continue
        task = asyncio.ensure_future(send(connections, body))
        pending.add(task)
        task.add_done_callback(pending.discard)
        tasks.append(task)
        if every_second is not None and loop.time() >= next_tick:
            every_second()
            next_tick += 1.0
    answers = list(await asyncio.gather(*tasks))
    connections.close()
    return Flood(answers, loop.time() - started, lag)


def rss_mib(pid: int) -> float:
    """The process's resident set (VmRSS) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError("VmRSS")


def percentile(values: list[float], q: float) -> float:
    """The `q` percentile (0..100, nearest rank) of `values`; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def latencies(answers: list[Answer], status: int) -> list[float]:
    return [a.latency_s for a in answers if a.status == status]


def describe(answers: list[Answer], seconds: float) -> str:
    """req/s, status counts and p50/p99 of the 200s and 429s, one line each."""
    counts = Counter(a.status for a in answers)
    lines = [f"{len(answers)} requests in {seconds:.1f} s ({len(answers) / seconds:.1f} req/s offered,"
             f" {counts[200] / seconds:.1f} req/s answered 200); statuses {dict(sorted(counts.items()))}"]
    for status in (200, 429):
        spent = latencies(answers, status)
        p50, p99, top = percentile(spent, 50), percentile(spent, 99), max(spent, default=math.nan)
        lines.append(f"  {status}: p50 {1000 * p50:.1f} ms, p99 {1000 * p99:.1f} ms, max {1000 * top:.1f} ms")
    errors = Counter(a.error for a in answers if a.error)
    lines += [f"  transport error x{n}: {error}" for error, n in errors.most_common(5)]
    return "\n".join(lines)


def soak(store: Path, tmp: Path, seconds: float, factor: float, run_ms: float, inflight: int) -> bool:
    """Start the service, measure its capacity, flood it for `seconds`; print the summary; True if clean."""
    with slow_service(store, tmp, run_ms, inflight) as service:
        pid = service.process.pid
        rate, _ = asyncio.run(capacity(service.base_url, inflight, 3.0))
        print(f"capacity: {rate:.1f} req/s ({inflight} closed-loop clients, {run_ms:g} ms per run)")
        samples = [rss_mib(pid)]
        run = asyncio.run(flood(service.base_url, factor * rate, seconds, lambda: samples.append(rss_mib(pid))))
        samples.append(rss_mib(pid))
        print(describe(run.answers, run.seconds))
        print(f"  the client's own worst stall: {1000 * run.client_lag_s:.0f} ms")
        print(f"server RSS: start {samples[0]:.1f} MiB, peak {max(samples):.1f} MiB, end {samples[-1]:.1f} MiB")
        timeline = samples[:: max(1, len(samples) // 10)]
        print("server RSS every ~10 % of the flood (MiB): " + " ".join(f"{m:.1f}" for m in timeline))
        with service.client() as client:
            recovered = client.post(PATH, content=payload()).status_code == 200
            ready = client.get("/readyz").status_code == 200
        print(f"after the flood: a request {'succeeds' if recovered else 'FAILS'},"
              f" /readyz {'200' if ready else 'not 200'}")
    return recovered and ready and all(a.status in (200, 429) for a in run.answers)


def main() -> int:
    seconds = float(os.environ.get("SOAK_SECONDS", "120"))
    factor = float(os.environ.get("SOAK_FACTOR", "5"))
    run_ms = float(os.environ.get("SOAK_RUN_MS", "40"))
    inflight = int(os.environ.get("SOAK_INFLIGHT", "8"))
    from tests.app.tiny_store import build_store  # torch: only to export the tiny store

    with tempfile.TemporaryDirectory(prefix="aeserve-soak-") as tmp:
        store = Path(tmp) / "store"
        build_store(store)
        clean = soak(store, Path(tmp), seconds, factor, run_ms, inflight)
    print("soak: clean" if clean else "soak: FAILED (see above)")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
