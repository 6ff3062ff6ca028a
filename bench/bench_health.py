"""Authenticated latency while 200 clients hammer the public /health.

    python bench/bench_health.py [seconds] [callers]

Starts `oma-api` (memory), logs in with the seed's appliance token, then times sequential
`GET /api/v1/vm-contexts?limit=10` requests, first with no other load, then while
`callers` (default 200) concurrent keep-alive connections ask `/health` back to back (a separate
process, raw asyncio streams). Prints the authenticated p50/p99 and the /health rate (target: p99
under 100 ms under the /health crowd: /health shares one service check per OMA_HEALTH_CACHE_TTL
and answers at most OMA_HEALTH_MAX_RATE a second).
"""
from __future__ import annotations

import asyncio
import multiprocessing
import re
import signal
import statistics
import sys
import time

import httpx
from common import TOKEN, start_oma_api

PATH = "/api/v1/vm-contexts?limit=10"


async def _health_caller(port: int, until: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET /health HTTP/1.1\r\nHost: oma\r\n\r\n"
    while time.monotonic() < until:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
        await reader.readexactly(length)
        counts[0 if head.startswith(b"HTTP/1.1 200") else 1] += 1
    writer.close()


def health_crowd(port: int, callers: int, seconds: float, result: multiprocessing.Queue) -> None:
    async def crowd() -> list[int]:
        counts = [0, 0]
        until = time.monotonic() + seconds
        await asyncio.gather(*(_health_caller(port, until, counts) for _ in range(callers)))
        return counts
    result.put(asyncio.run(crowd()))


def timed(client: httpx.Client, seconds: float) -> list[float]:
    took = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        r = client.get(PATH)
        took.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            raise SystemExit(f"authenticated request failed: {r.status_code} {r.text}")
        time.sleep(0.01)  # a client's pace, not a second load generator
    return took


def report(label: str, took: list[float], health_rps: str) -> None:
    q = statistics.quantiles(took, n=100, method="inclusive")
    print(f"{label}: authenticated GET p50 {q[49]:.1f} ms, p99 {q[98]:.1f} ms, max {max(took):.1f} ms "
          f"({len(took)} requests); /health {health_rps}")


def main() -> None:
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    callers = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    proc, base, _ = start_oma_api()
    try:
        token = httpx.post(f"{base}/api/v1/auth/login",
                           json={"appliance_id": "test-vma", "token": TOKEN}).json()["session_token"]
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
            timed(client, 1)  # warm up
            report("idle", timed(client, seconds), "not asked")
            result: multiprocessing.Queue = multiprocessing.Queue()
            crowd = multiprocessing.Process(target=health_crowd, args=(int(base.rsplit(":", 1)[1]), callers,
                                                                       seconds + 2, result))
            crowd.start()
            time.sleep(1)
            took = timed(client, seconds)
            ok, failed = result.get()
            crowd.join()
            health = f"{ok / (seconds + 2):.0f} answers/s to {callers} callers ({failed} not 200)"
            report(f"{callers} /health callers", took, health)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


if __name__ == "__main__":
    main()
