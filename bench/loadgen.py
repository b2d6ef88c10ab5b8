"""Closed-loop load at a fixed concurrency for a fixed window: wrk (C, one thread) when installed, else aiohttp.

Both send one fixed body to one URL from `concurrency` connections, each waiting for its answer before
sending again. A phase is an optional warm-up run (not counted: connections, JIT, batch sizes), then one
run of `lead_in + window` seconds in which only the answers that arrive inside the window are counted
(by a monotonic clock in wrk's Lua, through LuaJIT's ffi), so the pipeline is full for the whole window
and the requests still in flight at its end do not bias the rate. Only 2xx answers are served; every
other answer in the window, and every connect/read/write error and timeout of the run, is an error.
wrk's latency percentiles cover every answer of the run, lead-in included (it splits them neither by
status nor by time); aiohttp's cover the 2xx answers of the window. wrk costs far less CPU per request
than a Python client, which matters when client, server and engine share two cores.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# `response` counts the answers of each wrk thread that arrive inside its window; `done` prints the sums.
WRK_COUNTER = """
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } aeserve_timespec;
int clock_gettime(int clk_id, aeserve_timespec *tp);
]]
local clock = ffi.new("aeserve_timespec")
local function now()
  ffi.C.clock_gettime(1, clock)  -- CLOCK_MONOTONIC
  return tonumber(clock.tv_sec) + tonumber(clock.tv_nsec) * 1e-9
end
local lead_in = tonumber(os.getenv("AESERVE_BENCH_LEAD_IN") or "0")
local window = tonumber(os.getenv("AESERVE_BENCH_WINDOW") or "1e9")

local f = assert(io.open(os.getenv("AESERVE_BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

answered_2xx = 0
answered_other = 0
function init(args)
  opens_at = now() + lead_in
  closes_at = opens_at + window
end

function response(status, headers, body)
  local t = now()
  if t >= opens_at and t < closes_at then
    if status >= 200 and status < 300 then
      answered_2xx = answered_2xx + 1
    else
      answered_other = answered_other + 1
    end
  end
end

function done(summary, latency, requests)
  local ok, other = 0, 0
  for _, thread in ipairs(threads) do
    ok = ok + thread:get("answered_2xx")
    other = other + thread:get("answered_other")
  end
  io.write(string.format("2xx responses: %d\\n", ok))
  io.write(string.format("other responses in window: %d\\n", other))
  io.write(string.format("window: %.3f s\\n", window))
end
"""


@dataclass(frozen=True)
class LoadResult:
    answered_2xx: int
    seconds: float
    errors: int  # answers that were not 2xx, plus connect/read/write errors and timeouts
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.answered_2xx / self.seconds if self.seconds else 0.0


def wrk_script(headers: dict[str, str]) -> str:
    """The counting script with the request's headers (ASCII: a JSON string is a Lua string then)."""
    lines = [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    return WRK_COUNTER + "\n".join(lines) + "\n"


def parse_wrk(out: str) -> LoadResult:
    """Read wrk's `--latency` report and the lines of the counting script. With a `window:` line the
    counts are the window's; without one (a plain run) they are the whole run's."""
    requests = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", out)
    ok = re.search(r"^2xx responses: (\d+)$", out, re.M)
    if requests is None or ok is None:
        raise ValueError(f"unexpected wrk output:\n{out}")
    answered_2xx = int(ok.group(1))
    window = re.search(r"^window: ([\d.]+) s$", out, re.M)
    other = re.search(r"^other responses in window: (\d+)$", out, re.M)
    if window is not None and other is not None:
        seconds, errors = float(window.group(1)), int(other.group(1))
    else:
        seconds = float(requests.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[requests.group(3)]
        errors = int(requests.group(1)) - answered_2xx
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors += sum(map(int, socket_errors.groups())) if socket_errors else 0
    return LoadResult(answered_2xx, seconds, errors, _wrk_ms(out, "50%"), _wrk_ms(out, "99%"))


def _wrk_ms(out: str, label: str) -> float:
    match = re.search(rf"^\s+{re.escape(label)}\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    if not match:
        return float("nan")
    return float(match.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[match.group(2)]


def run_wrk(
    url: str, body: bytes, headers: dict[str, str], concurrency: int, window: int, lead_in: int = 0
) -> LoadResult:
    with tempfile.TemporaryDirectory() as tmp:
        body_path, script = Path(tmp) / "body", Path(tmp) / "post.lua"
        body_path.write_bytes(body)
        script.write_text(wrk_script(headers))
        env = {
            **os.environ,
            "AESERVE_BENCH_BODY": str(body_path),
            "AESERVE_BENCH_LEAD_IN": str(lead_in),
            "AESERVE_BENCH_WINDOW": str(window),
        }
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{concurrency}",
                f"-d{lead_in + window}s",
                "--latency",
                "--timeout",
                "30s",
                "-s",
                str(script),
                url,
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout
    return parse_wrk(out)


async def _aiohttp_load(
    url: str, body: bytes, headers: dict[str, str], concurrency: int, window: float, lead_in: float
) -> LoadResult:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    opens_at = time.perf_counter() + lead_in
    closes_at = opens_at + window
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def client() -> None:
            nonlocal errors
            while (start := time.perf_counter()) < closes_at:
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        ok = 200 <= response.status < 300
                except (TimeoutError, aiohttp.ClientError):
                    ok = False
                end = time.perf_counter()
                if not opens_at <= end < closes_at:
                    continue
                if ok:
                    latencies.append(end - start)
                else:
                    errors += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
    ms = sorted(1e3 * x for x in latencies) or [math.nan]
    return LoadResult(len(latencies), window, errors, ms[len(ms) // 2], ms[min(len(ms) - 1, int(0.99 * len(ms)))])


def pick_client(wanted: str = "auto") -> str:
    """wrk when installed (or asked for), else aiohttp (the `bench` extra)."""
    if wanted == "wrk" or (wanted == "auto" and shutil.which("wrk")):
        return "wrk"
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise SystemExit("no load generator: install wrk (apt-get install wrk) or the bench extra (aiohttp)") from None
    return "aiohttp"


def load(
    client: str,
    url: str,
    body: bytes,
    headers: dict[str, str],
    concurrency: int,
    window: int,
    lead_in: int = 1,
    warmup: int = 0,
) -> LoadResult:
    """A `warmup` run (not counted), then `lead_in` + `window` seconds of which the window is counted."""
    if client == "wrk":
        if warmup:
            run_wrk(url, body, headers, concurrency, warmup)
        return run_wrk(url, body, headers, concurrency, window, lead_in)
    if warmup:
        asyncio.run(_aiohttp_load(url, body, headers, concurrency, warmup, 0))
    return asyncio.run(_aiohttp_load(url, body, headers, concurrency, window, lead_in))
