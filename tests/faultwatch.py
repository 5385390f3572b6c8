"""Watch for a worker stopped at its fault point, then act on it (SIGKILL it, or its node).

    with FaultWatcher(root, lambda info: os.kill(info["pid"], signal.SIGKILL)) as watch:
        train(...)       # a config with fault.action=hang: the worker writes its pid and waits
    assert watch.fired

The worker writes ``<run>/_fault_injected`` (pid, rank, point) and then waits; the
watcher acts ``delay`` seconds later, by which time Ray Train has registered the
checkpoint the workers reported before the fault point.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from xfer.errors import NotFoundError
from xfer.store import storage

KILL_DELAY_S = 3.0


class FaultWatcher(threading.Thread):
    def __init__(
        self, root: str, action: Callable[[dict[str, Any]], None], delay: float = KILL_DELAY_S
    ):
        super().__init__(daemon=True)
        self.root, self.action, self.delay = root, action, delay
        self.before = set(self._markers())
        self.stopping = threading.Event()
        self.fired: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def _markers(self) -> list[str]:
        try:
            files = storage.list_files(f"{self.root}/runs")
        except NotFoundError:
            return []
        return [f.uri for f in files if f.uri.endswith("/_fault_injected")]

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                new = set(self._markers()) - self.before
                if new:
                    info = storage.read_json(new.pop())
                    time.sleep(self.delay)
                    self.action(info)
                    self.fired = info
                    return
                time.sleep(0.3)
        except BaseException as exc:  # reported by __exit__, in the test's thread
            self.error = exc

    def __enter__(self) -> FaultWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.join(timeout=60)
        if self.error is not None:
            raise self.error
