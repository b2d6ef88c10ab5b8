"""app.admission: the in-flight slot (429 at once, released however the request ends), the items
budget, Retry-After, and the request deadline from the client's headers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app.admission import (
    DEADLINE_HEADER,
    MAX_RETRY_AFTER_S,
    TIMEOUT_HEADER,
    Admission,
    ItemBudget,
    request_deadline,
    retry_after,
)
from app.errors import DeadlineExceeded, InvalidInput, QueueFull, status_and_reason
from app.metrics import REGISTRY


def rejections(reason: str, model: str = "", op: str = "") -> float:
    labels = {"model": model, "version": "", "op": op, "reason": reason}
    return REGISTRY.get_sample_value("aeserve_rejections_total", labels) or 0.0


# ------------------------------------------------------------------------------------ Admission


def test_over_the_limit_is_429_at_once_and_a_freed_slot_admits_again() -> None:
    admission = Admission(2, clock=lambda: 0.0)
    before = rejections("inflight_limit", "adm-model", "encode")
    first, _second = admission.try_acquire(), admission.try_acquire()
    with pytest.raises(QueueFull) as info:
        admission.try_acquire(model="adm-model", op="encode")
    error = info.value
    assert status_and_reason(error) == (429, "queue_full")
    assert error.field == "requests" and error.limit == 2 and error.headers["Retry-After"] == "1"
    assert rejections("inflight_limit", "adm-model", "encode") == before + 1
    assert admission.in_flight == 2
    first.release()
    first.release()  # idempotent: frees one slot only
    assert admission.in_flight == 1
    assert admission.try_acquire().held and admission.in_flight == 2
    assert REGISTRY.get_sample_value("aeserve_inflight_requests") == 2


def test_slot_is_released_on_return_error_and_cancellation() -> None:
    async def scenario() -> list[int]:
        admission = Admission(1)
        seen = []
        async with admission.try_acquire() as slot:
            seen.append(admission.in_flight)
            assert slot.arrived <= asyncio.get_running_loop().time()
        seen.append(admission.in_flight)
        with pytest.raises(RuntimeError):
            async with admission.try_acquire():
                raise RuntimeError("the route failed")
        seen.append(admission.in_flight)

        entered = asyncio.Event()

        async def disconnected_client() -> None:
            async with admission.try_acquire():
                entered.set()
                await asyncio.sleep(10)  # waiting on the engine when the client leaves

        task = asyncio.create_task(disconnected_client())
        await entered.wait()
        seen.append(admission.in_flight)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        seen.append(admission.in_flight)
        return seen

    assert asyncio.run(scenario()) == [1, 0, 0, 1, 0]


def test_retry_after_follows_the_mean_time_a_slot_is_held() -> None:
    now = [0.0]
    admission = Admission(1, clock=lambda: now[0])
    slot = admission.try_acquire()
    now[0] = 4.2
    slot.release()
    assert admission.mean_hold_s == pytest.approx(4.2)
    admission.try_acquire()
    with pytest.raises(QueueFull) as info:
        admission.try_acquire()
    assert info.value.headers["Retry-After"] == "5"


def test_retry_after_is_whole_seconds_within_bounds() -> None:
    assert retry_after(0.0) == {"Retry-After": "1"}
    assert retry_after(2.01) == {"Retry-After": "3"}
    assert retry_after(1e9) == {"Retry-After": str(MAX_RETRY_AFTER_S)}
    assert retry_after(float("nan")) == {"Retry-After": "1"}


def test_items_budget_takes_any_size_when_empty_and_refuses_overflow() -> None:
    budget = ItemBudget(4)
    assert budget.reserve(10)  # an empty budget never refuses (a lone request always runs)
    assert not budget.reserve(1) and budget.held == 10
    budget.release(10)
    assert budget.reserve(3) and not budget.reserve(2) and budget.reserve(1) and budget.held == 4
    with pytest.raises(ValueError):
        ItemBudget(0)


def test_lifespan_creates_one_admission_and_one_shared_budget(tmp_path: Path) -> None:
    from app.main import create_app
    from tests.app.conftest import make_settings

    app = create_app(make_settings(tmp_path, max_inflight_requests=7, max_queued_items_total=33))

    async def scenario() -> tuple[int, int]:
        async with app.router.lifespan_context(app):
            return app.state.admission.limit, app.state.queue_budget.limit

    assert asyncio.run(scenario()) == (7, 33)


# ------------------------------------------------------------------------------------ deadlines


def test_deadline_defaults_to_the_server_limit_and_the_header_can_shorten_it() -> None:
    assert request_deadline(100.0, 30.0) == 130.0
    assert request_deadline(100.0, 30.0, timeout="2.5") == 102.5
    assert request_deadline(100.0, 30.0, timeout=" 3 ") == 103.0
    assert request_deadline(100.0, 30.0, timeout="600") == 130.0  # capped at request_timeout_s


@pytest.mark.parametrize("value", ["abc", "", "nan", "inf", "-inf", "1e999", "0", "-2", "1" * 40, "5s"])
def test_malformed_timeout_header_is_422_naming_header_and_limit(value: str) -> None:
    with pytest.raises(InvalidInput) as info:
        request_deadline(0.0, 30.0, timeout=value)
    error = info.value
    assert status_and_reason(error) == (422, "invalid_input")
    assert error.field == TIMEOUT_HEADER and "30" in str(error.limit)
    assert TIMEOUT_HEADER in error.message


def test_epoch_deadline_header() -> None:
    assert request_deadline(50.0, 30.0, deadline_epoch="1003.5", wall_now=1000.0) == 53.5
    assert request_deadline(50.0, 30.0, deadline_epoch="99999", wall_now=1000.0) == 80.0  # capped
    both = request_deadline(50.0, 30.0, timeout="1", deadline_epoch="1003", wall_now=1000.0)
    assert both == 51.0  # the earlier of the two
    with pytest.raises(DeadlineExceeded) as passed:
        request_deadline(50.0, 30.0, deadline_epoch="999", wall_now=1000.0)
    assert passed.value.field == DEADLINE_HEADER
    assert status_and_reason(passed.value) == (504, "deadline_exceeded")
    with pytest.raises(InvalidInput) as bad:
        request_deadline(50.0, 30.0, deadline_epoch="tomorrow", wall_now=1000.0)
    assert bad.value.field == DEADLINE_HEADER and "epoch" in str(bad.value.limit)


def test_deadline_helper_uses_the_wall_clock_by_default() -> None:
    import time

    deadline = request_deadline(0.0, 30.0, deadline_epoch=str(time.time() + 10))
    assert 9.0 < deadline <= 10.0
