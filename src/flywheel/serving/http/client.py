"""The client side of our own servers: requests that honour 503 and 429 with `Retry-After`.

A Flywheel server answers 503 when its state database is busy (SQLite's write lock held by a
retrain, say) and 429 when it is full, each with `Retry-After` in seconds. A client that gives up at
once turns a moment of load into a failed job (the replay died at its 41st quarter that way on a
busy machine); one that retries forever hides an outage. So: retry those two statuses, waiting what
the server asks (at least `min_wait`, at most `max_wait` a time), until `budget` seconds have been
spent waiting; then the last answer goes back to the caller, who decides what a refusal means.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

RETRY_STATUSES = frozenset({429, 503})


def retry_after(response: httpx.Response, default: float = 1.0) -> float:
    """The seconds `Retry-After` asks for (delta-seconds; an HTTP date or nonsense gives `default`)."""
    value = response.headers.get("retry-after", "").strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        return default


def post_with_retry(client: httpx.Client, url: str, *, budget: float = 120.0, max_wait: float = 30.0,
                    min_wait: float = 0.1, sleep: Callable[[float], None] = time.sleep,
                    **kwargs: Any) -> httpx.Response:
    """`client.post(url, **kwargs)`, retried while the server answers 503 or 429, within `budget`
    seconds of waiting; the last response either way."""
    waited = 0.0
    while True:
        response = client.post(url, **kwargs)
        if response.status_code not in RETRY_STATUSES or waited >= budget:
            return response
        pause = min(max(retry_after(response), min_wait), max_wait, budget - waited)
        sleep(pause)
        waited += pause
