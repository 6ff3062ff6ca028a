"""The one retry policy: exponential backoff with jitter, bounded by attempts and a deadline.

Loops whose exit needs more than "retryable or not" (NATS refusing credentials, MariaDB denying
access, a cloud step that must first look at what the cloud already did) keep their own loop and
take only `backoff_delay` from here, so every retry in OMA waits by the same formula.
"""
from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("oma.retry")


def backoff_delay(attempt: int, base: float, cap: float = 30.0) -> float:
    """Seconds to wait before retry `attempt` (1, 2, ...): base * 2^(attempt-1), capped, with
    "equal jitter" (half fixed, half random) so copies that failed together do not retry together."""
    full = min(cap, base * 2 ** max(0, attempt - 1))
    return full / 2 + random.uniform(0, full / 2)


async def retry(fn: Callable[[], Awaitable[T]], *, retry_if: Callable[[BaseException], bool],
                attempts: int, base: float, cap: float = 30.0, deadline: float | None = None,
                what: str = "call") -> T:
    """`await fn()`, retried while `retry_if(exc)`, at most `attempts` tries in all, never sleeping
    past `deadline` (loop time); the last error is raised as it is."""
    loop = asyncio.get_running_loop()
    attempt = 0
    while True:
        try:
            return await fn()
        except Exception as exc:
            attempt += 1
            delay = backoff_delay(attempt, base, cap)
            if (not retry_if(exc) or attempt >= attempts
                    or (deadline is not None and loop.time() + delay >= deadline)):
                raise
            log.debug("%s failed (%s), retry %d in %.2fs", what, type(exc).__name__, attempt, delay)
            await asyncio.sleep(delay)
