"""Overload: the memory pool holds answers too and counts its 429s, and a real process flooded at several
times its capacity sheds the excess quickly, keeps its admitted latency bounded, its RSS flat, and recovers.

The flood (`tests.soak.overload`, also `make soak` for minutes): tiny-dyn encode, one 64 KiB frame per
request, every run slowed by RUN_MS and one request per batch, INFLIGHT requests admitted. Capacity is
measured with INFLIGHT closed-loop clients (~24 req/s = 1000 / ~41 ms), then an open-loop stream at
FACTOR x capacity (~120 req/s, ~480 requests) runs for FLOOD_S seconds. Figures measured on a 2-core
machine shared with other test runs (load 2-12), 50+ windows:
- every answer 200 or 429, no transport error; most are 429 (~4 of 5 at 5x); each 429 carries
  Retry-After and is counted in aeserve_rejections_total{reason="inflight_limit"}; no 500.
- a 429 is answered before the body is read, without waiting: p50 < REFUSAL_P50_S (measured 1-5 ms in
  every window: a 429 that waited for one run would take >= RUN_MS) and p99 < REFUSAL_P99_S (measured
  3-15 ms on a quiet machine, up to ~300 ms when the CPUs are 3x oversubscribed, while the server's own
  time for every 429 stays < 50 ms: the rest is waiting for a CPU).
- admitted p99 < 2 x INFLIGHT / capacity + SLACK_S (~1.2 s): an admitted request has at most INFLIGHT - 1
  ahead of it, each one run of 1 / capacity seconds (one request per batch), so it waits at most
  INFLIGHT / capacity (~0.34 s) however many are refused; x2 and SLACK_S for a loaded machine (measured
  p99 0.33-0.35 s quiet, up to 0.74 s loaded); the 200s still come at >= GOODPUT x capacity (measured
  23.4-24.1 req/s of ~24).
- timing on a shared machine: a window in which the whole machine stalls (seen once in ~50 windows: 2.6 s,
  client and server alike) misses any latency bound, so a window that misses a timing bound is re-run,
  up to WINDOWS in all, and the last one is asserted; a slow 429 path misses them in every window. The
  other checks hold for every window.
- server RSS after the windows minus before (both after the capacity run warmed the same paths)
  < RSS_BOUND_MIB: measured +0.2..1.2 MiB per window; the Python heap is flat (tracemalloc, 9k requests),
  but glibc's per-thread malloc arenas grow RSS in steps of 2-7 MiB now and then (a 7-minute soak: +10 MiB
  then flat; flat with MALLOC_ARENA_MAX=2). Leaking each refused 64 KiB body would be +25 MiB.
- recovery: a request is a 200 within RECOVERY_S (measured ~45 ms: one run), /readyz is 200, and nothing
  is in flight or held in the memory pool.
Run with `-s` for the figures.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from starlette.requests import Request

from app import codecs
from app.api import io as api_io
from app.budget import ANSWER_BYTES_PER_VALUE, InputPool, InputReservation, hold_answer
from app.errors import QueueFull
from app.metrics import REGISTRY
from app.settings import Settings
from tests.soak import overload
from tests.soak.overload import Answer, latencies, percentile

MiB = 2**20
RUN_MS, INFLIGHT, FACTOR = 40.0, 8, 5.0
CAPACITY_S, FLOOD_S = 2.0, 4.0
WINDOWS = 3  # flood windows at most: a window that misses a timing bound is re-run (see the module doc)
REFUSAL_P50_S, REFUSAL_P99_S = 0.02, 0.25
SLACK_S = 0.5
GOODPUT = 0.5  # the 200s per second during the flood, as a share of the capacity, at least
RSS_BOUND_MIB = 16.0
RECOVERY_S = 1.0


def rejections(model: str, version: str, op: str, reason: str = "inflight_memory") -> float:
    labels = {"model": model, "version": version, "op": op, "reason": reason}
    return REGISTRY.get_sample_value("aeserve_rejections_total", labels) or 0.0


def pool_gauge() -> float | None:
    return REGISTRY.get_sample_value("aeserve_inflight_memory_bytes")


# ----------------------------------------------------------------------------------------------- answers in the pool
def test_an_answer_is_held_on_top_of_the_inputs_once_and_given_back_with_them():
    pool = InputPool(1000)
    reservation = InputReservation(pool)
    reservation.hold(300, field="file", what="inputs")
    reservation.hold_answer(200, field="format", what="an answer")
    reservation.hold_answer(150, field="format", what="the same answer, checked again")
    assert (reservation.held, reservation.answer, pool.held) == (500, 200, 500)
    reservation.hold_answer(260, field="format", what="a larger estimate")
    assert pool.held == 560
    reservation.release()
    assert (reservation.held, reservation.answer, pool.held) == (0, 0, 0)


def test_an_answer_that_does_not_fit_now_is_a_429_holding_what_was_held():
    pool = InputPool(1000)
    other, reservation = InputReservation(pool), InputReservation(pool)
    other.hold(600, field="body", what="another request")
    reservation.hold(300, field="file", what="inputs")
    with pytest.raises(QueueFull) as info:
        reservation.hold_answer(200, field="format", what="an answer")
    assert (info.value.field, info.value.limit, info.value.code) == ("format", 1000, "queue_full")
    assert int(info.value.headers["Retry-After"]) >= 1
    assert (reservation.held, reservation.answer, pool.held) == (300, 0, 900)


def test_an_answer_the_request_budget_admits_is_capped_at_the_pool_never_a_413():
    pool = InputPool(1000)
    reservation = InputReservation(pool)
    reservation.hold(700, field="file", what="inputs")
    reservation.hold_answer(900, field="format", what="an answer")  # 1600 > the pool: holds all of it
    assert pool.held == 1000
    reservation.release()
    assert pool.held == 0


def request_at(path: str, state: SimpleNamespace) -> Request:
    """A v1 request to `path` (its model name as a path parameter) on an app whose state is `state`."""
    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "state": {},
             "app": SimpleNamespace(state=state), "path_params": {"name": path.split("/")[3]}}
    return Request(scope)


def app_state(pool_bytes: int) -> SimpleNamespace:
    """An app's state: its pool and a registry holding tiny-x version 3."""
    registry = {"tiny-x": SimpleNamespace(label_version="3")}
    return SimpleNamespace(aeserve_input_pool=InputPool(pool_bytes), models=registry)


def test_writers_hold_the_answer_before_encoding_it(monkeypatch):
    state = app_state(64 * MiB)
    pool, seen = state.aeserve_input_pool, []
    encode_npy = codecs.encode_npy
    monkeypatch.setattr(codecs, "encode_npy", lambda array: seen.append(pool.held) or encode_npy(array))
    images, latents = np.zeros((2, 1, 16, 16), np.float32), np.zeros((2, 8), np.float32)

    async def scenario() -> None:
        request = request_at("/v1/models/tiny-x/reconstruct", state)
        async with api_io.input_memory(request, Settings()) as reservation:
            reservation.hold(1000, field="file", what="inputs")
            await api_io.image_response(images, (0.0, 1.0), "npy")
            await api_io.latents_response(latents, "npy")  # smaller: the answer's hold stays
            await api_io.json_answer({"attention": np.zeros((2, 64), np.float32)})
            seen.append(pool.held)

    asyncio.run(scenario())
    npy_bytes, json_bytes = images.size * ANSWER_BYTES_PER_VALUE["npy"], 128 * ANSWER_BYTES_PER_VALUE["json"]
    assert seen == [1000 + npy_bytes, 1000 + npy_bytes, 1000 + max(npy_bytes, json_bytes)]
    assert pool.held == 0
    hold_answer(10**9, "json")  # outside a request: holds nowhere


def test_pool_429s_are_counted_by_model_and_op_and_the_bytes_held_are_a_gauge(monkeypatch):
    monkeypatch.setattr(codecs, "encode_npy", lambda array: pytest.fail("encoded"))
    state = app_state(MiB)
    before = rejections("tiny-x", "3", "reconstruct")

    async def scenario() -> None:
        other = InputReservation(state.aeserve_input_pool)
        other.hold(MiB - 100, field="body", what="another request")
        assert pool_gauge() == MiB - 100
        request = request_at("/v1/models/tiny-x/reconstruct", state)
        async with api_io.input_memory(request, Settings()):
            with pytest.raises(QueueFull):
                await api_io.image_response(np.zeros((1, 1, 16, 16), np.float32), (0.0, 1.0), "npy")
        other.release()

    asyncio.run(scenario())
    assert rejections("tiny-x", "3", "reconstruct") == before + 1
    assert pool_gauge() == 0


# ----------------------------------------------------------------------------------------------- a real process
@dataclass(frozen=True)
class Figure:
    """A measured figure and its bound: a ceiling, or a floor when `at_least`."""

    value: float
    bound: float
    at_least: bool = False

    @property
    def met(self) -> bool:
        return self.value >= self.bound if self.at_least else self.value < self.bound

    def __repr__(self) -> str:
        return f"{self.value:.3f} ({'>=' if self.at_least else '<'} {self.bound:.3f})"


def timing(run: overload.Flood, capacity: float) -> dict[str, Figure]:
    """The timing figures of a flood window (seconds; 200s per second) and their bounds."""
    refused, admitted = latencies(run.answers, 429), latencies(run.answers, 200)
    return {
        "429 p50": Figure(percentile(refused, 50), REFUSAL_P50_S),
        "429 p99": Figure(percentile(refused, 99), REFUSAL_P99_S),
        "200 p99": Figure(percentile(admitted, 99), 2 * INFLIGHT / capacity + SLACK_S),
        "200 per second": Figure(len(admitted) / run.seconds, GOODPUT * capacity, at_least=True),
    }


def within(figures: dict[str, Figure]) -> bool:
    return all(figure.met for figure in figures.values())


@dataclass
class Overload:
    capacity: float  # requests per second answered 200 by INFLIGHT closed-loop clients
    windows: list[overload.Flood]  # the last one met the timing bounds, or there was no window left
    rss_growth_mib: float
    shed_counted: float  # aeserve_rejections_total{reason="inflight_limit"} during the windows
    recovery_s: float
    recovered: int  # the status of the first request after the flood
    after: dict[str, float]  # /metrics values after the flood

    @property
    def answers(self) -> list[Answer]:
        return [a for run in self.windows for a in run.answers]


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples in a /metrics text whose labels include `labels`."""
    total = 0.0
    for row in text.splitlines():
        if row.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in row for k, v in labels.items()):
            total += float(row.split()[-1])
    return total


def flood_windows(url: str, capacity: float) -> list[overload.Flood]:
    """FLOOD_S windows at FACTOR x capacity until one meets the timing bounds, at most WINDOWS."""
    windows = [asyncio.run(overload.flood(url, FACTOR * capacity, FLOOD_S))]
    while len(windows) < WINDOWS and not within(timing(windows[-1], capacity)):
        windows.append(asyncio.run(overload.flood(url, FACTOR * capacity, FLOOD_S)))
    return windows


@pytest.fixture(scope="module")
def flood(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Overload]:
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/<pid>/status")
    with overload.slow_service(store, tmp_path_factory.mktemp("overload"), RUN_MS, INFLIGHT) as service:
        url, pid = service.base_url, service.process.pid
        capacity, _ = asyncio.run(overload.capacity(url, INFLIGHT, CAPACITY_S))
        shed_before = metric(httpx.get(f"{url}/metrics").text, "aeserve_rejections_total", reason="inflight_limit")
        rss_before = overload.rss_mib(pid)
        windows = flood_windows(url, capacity)
        rss_growth = overload.rss_mib(pid) - rss_before
        with service.client() as client:
            started = time.perf_counter()
            recovered = client.post(overload.PATH, content=overload.payload()).status_code
            recovery_s = time.perf_counter() - started
            assert client.get("/readyz").status_code == 200
            text = client.get("/metrics").text
        after = {name: metric(text, name) for name in ("aeserve_inflight_requests", "aeserve_inflight_memory_bytes")}
        after["500s"] = metric(text, "aeserve_requests_total", status="500")
        shed = metric(text, "aeserve_rejections_total", reason="inflight_limit") - shed_before
        yield Overload(capacity, windows, rss_growth, shed, recovery_s, recovered, after)
    print(f"\ncapacity {capacity:.1f} req/s; flood at {FACTOR:g}x:")
    for run in windows:
        print(f"{overload.describe(run.answers, run.seconds)}\n  client stall {1000 * run.client_lag_s:.0f} ms")
    print(f"server RSS {rss_growth:+.1f} MiB; recovery: {recovered} in {1000 * recovery_s:.0f} ms")


def test_every_answer_is_200_or_429_and_the_excess_is_shed(flood: Overload):
    statuses = Counter(a.status for a in flood.answers)
    odd = [a for a in flood.answers if a.status not in (200, 429)]
    assert not odd, odd[:5]
    assert statuses[429] >= 0.5 * len(flood.answers), statuses  # at 5x capacity ~80 % are excess
    assert flood.shed_counted == statuses[429] and flood.after["500s"] == 0


def test_every_429_carries_retry_after(flood: Overload):
    refused = [a for a in flood.answers if a.status == 429]
    assert refused and all(a.retry_after is not None and int(a.retry_after) >= 1 for a in refused)


def test_429s_come_quickly_and_admitted_requests_within_the_admission_bound(flood: Overload):
    figures = timing(flood.windows[-1], flood.capacity)
    assert within(figures), figures


def test_rss_stays_flat(flood: Overload):
    assert flood.rss_growth_mib < RSS_BOUND_MIB


def test_the_service_recovers_at_once(flood: Overload):
    assert flood.recovered == 200 and flood.recovery_s < RECOVERY_S
    assert flood.after["aeserve_inflight_requests"] == 0 and flood.after["aeserve_inflight_memory_bytes"] == 0
