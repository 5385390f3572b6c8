"""Riding out a store that goes away for a while.

Object stores have bad minutes: a restarted gateway refuses connections, a
load balancer answers 503, S3 says SlowDown. The AWS SDKs retry a few times within
seconds; a nightly job should wait longer than that before it gives up the night.
:func:`ride_through` wraps each storage operation (one request, or one idempotent
step such as copying an object): a *transient* failure
(:class:`~xfer.errors.StoreUnavailable`: connection refused or reset, timeouts,
5xx, throttling) is retried with exponential backoff and jitter until the budget is
spent; anything else (missing object, bad credentials, access denied) fails at once.

The budget is ``XFER_STORE_RETRY_SECONDS`` (seconds, default 0: only the SDK's own
retries). ``xfer train``, ``xfer shard`` and ``xfer score`` set it from ``storage.outage_seconds`` and
forward it to every worker, so the driver and each actor ride out the same outage. Past the
budget the error says which endpoint, what was being done and for how long.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from xfer.errors import StoreUnavailable

ENV = "XFER_STORE_RETRY_SECONDS"
F = TypeVar("F", bound=Callable[..., Any])
_depth = threading.local()  # how deep in wrapped calls this thread is
_warned = {"at": -1e9}  # when this process last said it is riding out an outage
_warn_lock = threading.Lock()
WARN_EVERY = 30.0  # seconds: one line per process, not one per waiting call


def _warn(message: str) -> None:
    with _warn_lock:
        now = time.monotonic()
        if now - _warned["at"] < WARN_EVERY:
            return
        _warned["at"] = now
    print(f"[xfer] warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def budget(seconds: float) -> Iterator[None]:
    """Ride out outages for ``seconds`` within the block (this process)."""
    saved = os.environ.get(ENV)
    os.environ[ENV] = str(seconds)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved


def budget_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get(ENV, "0") or 0))
    except ValueError:
        return 0.0


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
