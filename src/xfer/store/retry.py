"""Riding out a store that goes away for a while.

Object stores have bad minutes: a restarted gateway refuses connections, a
load balancer answers 503, S3 says SlowDown. The AWS SDKs retry a few times within
seconds; a nightly job should wait longer than that before it gives up the night.
:func:`ride_through` wraps each storage operation (one request, or one idempotent
step such as copying an object): a *transient* failure
(:class:`~xfer.errors.StoreUnavailable`: connection refused or reset, timeouts,
5xx, throttling) is retried with exponential backoff and jitter until the budget is
spent; anything else (missing object, bad credentials, access denied) fails at once.

The budget is this process's (seconds, default 0: only the SDK's own retries), set for a
block by :func:`budget`. ``xfer train``, ``xfer shard``, ``xfer score`` and ``xfer audit`` set
it from ``storage.outage_seconds``; their workers, tasks and actors get that value as part of
their job (the config, or :func:`xfer.raycluster.run_tasks`'s argument) and set it the same
way, so the driver and each worker ride out the same outage. Past the budget the error says
which endpoint, what was being done and for how long.
"""

from __future__ import annotations

import contextlib
import functools
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from xfer import console
from xfer.errors import StoreUnavailable

F = TypeVar("F", bound=Callable[..., Any])
_depth = threading.local()  # how deep in wrapped calls this thread is
_warned = {"at": -1e9}  # when this process last said it is riding out an outage
_warn_lock = threading.Lock()
WARN_EVERY = 30.0  # seconds: one line per process, not one per waiting call
# The budget in effect, for every thread of this process (a worker's threads read and
# write for the same job); set only by budget().
_budget = {"seconds": 0.0}


def _warn(message: str) -> None:
    with _warn_lock:
        now = time.monotonic()
        if now - _warned["at"] < WARN_EVERY:
            return
        _warned["at"] = now
    console.warn(message)


@contextlib.contextmanager
def budget(seconds: float) -> Iterator[None]:
    """Ride out outages for ``seconds`` within the block (this process, every thread)."""
    saved = _budget["seconds"]
    _budget["seconds"] = max(0.0, float(seconds))
    try:
        yield
    finally:
        _budget["seconds"] = saved


def budget_seconds() -> float:
    """The budget in effect in this process (0 outside any :func:`budget` block)."""
    return _budget["seconds"]


def ride_through(doing: str) -> Callable[[F], F]:
    """Retry the wrapped storage call on :class:`StoreUnavailable` within the budget.

    ``doing`` says what the call does ("reading", "listing", ...); with the URI (the
    call's first argument) it makes the one line a person reads when the budget runs
    out. Nested calls do not multiply the budget: only the outermost call retries.
    """

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if getattr(_depth, "n", 0) > 0:
                return fn(*args, **kwargs)
            budget = budget_seconds()
            start = time.monotonic()
            delay = 0.5
            while True:
                _depth.n = getattr(_depth, "n", 0) + 1
                try:
                    return fn(*args, **kwargs)
                except StoreUnavailable as exc:
                    waited = time.monotonic() - start
                    if waited + delay > budget:
                        if budget <= 0:
                            raise
                        uri = args[0] if args else ""
                        raise StoreUnavailable(
                            f"{exc.endpoint or 'the object store'} unavailable for "
                            f"{waited:.0f}s (budget {budget:.0f}s) while {doing} {uri}: "
                            f"{exc.reason}",
                            endpoint=exc.endpoint,
                            reason=exc.reason,
                        ) from None
                    _warn(f"{exc.reason} while {doing}; retrying for up to {budget:.0f}s")
                    time.sleep(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, 10.0)
                finally:
                    _depth.n -= 1

        return call  # type: ignore[return-value]

    return wrap
