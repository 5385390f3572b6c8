"""What reaches the console: xfer's own lines; Ray's and TensorFlow's go to a log file.

    console.set_verbose(args.verbose)      # the CLI, before anything starts
    console.quiet_ray_output()             # after ray.init, on the driver
    console.log_path()                     # where the full output went

Every Ray process's output (workers, Ray Train's controller, Ray Data's actors)
reaches the driver through Ray's log stream. Quiet (the default), the driver writes
all of it to a log file and shows on the console only the lines xfer itself prints
(``[xfer] ...``, including its warnings) and the raylet's and autoscaler's (a node
lost, workers killed for memory); ``--verbose`` (or ``XFER_VERBOSE=1``)
leaves Ray's own printing in place, so the console shows everything as Ray prints it.
The log file is kept with a run's outputs (``<run>/logs/console.log``).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import sys
import tempfile
import threading
import time
from typing import Any

VERBOSE_ENV = "XFER_VERBOSE"
LOG_ENV = "XFER_LOG_FILE"
PROGRESS_ENV = "XFER_PROGRESS_SECONDS"
TAG = "[xfer]"  # xfer's own lines: the console shows them
DETAIL_TAG = "[xfer-detail]"  # xfer's lines for the log file only (verbose: the console too)
OWN_LINE = re.compile(rf"^{re.escape(TAG)} ")
_lock = threading.Lock()


def tag(shown: bool = True) -> str:
    """The prefix of an xfer line a Ray process prints: :data:`TAG` reaches the console
    through the driver (quiet), :data:`DETAIL_TAG` only the log file."""
    return TAG if shown else DETAIL_TAG


def warn(message: str) -> None:
    """``[xfer] warning: <message>`` on stderr."""
    print(f"{TAG} warning: {message}", file=sys.stderr, flush=True)


def set_verbose(verbose: bool) -> None:
    """For this process and the processes it starts (workers read the variable)."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.setdefault(VERBOSE_ENV, "0")


def capture_native_output() -> None:
    """Quiet: file descriptor 2 goes to the log file; Python's ``sys.stderr`` stays.

    What C++ libraries write straight to the descriptor (TensorFlow's start-up lines,
    Ray core's warnings) and what child processes inherit (a local Ray instance)
    then lands in the log file, while xfer's own errors and Python tracebacks,
    written through ``sys.stderr``, still reach the console. For the command line
    only: it changes the whole process.
    """
    if verbose():
        return
    sys.stderr.flush()
    console_fd = os.dup(2)
    log_fd = os.open(log_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stderr = open(  # noqa: SIM115 - the process's stderr from now on
        console_fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace"
    )


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def percent(value: float | None, missing: str = "n/a") -> str:
    """A fraction as the console shows it: ``0.9134`` -> ``91.3%``; None -> ``missing``."""
    return missing if value is None else f"{100 * value:.1f}%"


def log_path() -> str:
    """This process's log file (created on first use; ``XFER_LOG_FILE`` to choose)."""
    path = os.environ.get(LOG_ENV)
    if not path:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        path = os.path.join(_private_folder(), f"{stamp}-{os.getpid()}.log")
        # Created here, private, never through a link someone else planted.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        os.environ[LOG_ENV] = path
    return path


def _private_folder() -> str:
    """``$TMPDIR/xfer-logs-<uid>``, mode 0700; a fresh folder if that one is not ours.

    The temporary directory is usually shared: a folder (or a link) another user made
    there must not receive our logs, which hold paths, run ids and data samples.
    """
    folder = os.path.join(tempfile.gettempdir(), f"xfer-logs-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():  # a link, or theirs
        return tempfile.mkdtemp(prefix="xfer-logs-")
    if info.st_mode & 0o077:
        os.chmod(folder, 0o700)
    return folder


def _source(data: dict[str, Any]) -> str:
    name = data.get("actor_name") or data.get("task_name") or ""
    pid = data.get("pid", "?")
    return f"({name} pid={pid})" if name else f"(pid={pid})"


def _handler(data: dict[str, Any]) -> None:
    """Ray's per-batch log record: everything to the file, xfer's lines to the console."""
    lines = [line for line in data.get("lines", []) if line.strip()]
    if not lines:
        return
    source = _source(data)
    if data.get("pid") == "raylet":  # nodes lost, workers killed for memory
        shown = [f"(raylet) {line}" for line in lines]
    elif data.get("pid") == "autoscaler":  # its events, not its periodic status tables
        shown = [f"(autoscaler) {line}" for line in _autoscaler_events(lines)]
    else:
        shown = [line for line in lines if OWN_LINE.match(line)]
    with _lock:
        with open(log_path(), "a", encoding="utf-8", errors="replace") as f:
            f.writelines(f"{source} {line}\n" for line in lines)
        sink = sys.stderr if data.get("is_err") else sys.stdout  # as the process wrote it
        for line in shown:
            print(line, file=sink, flush=True)


def _autoscaler_events(lines: list[str]) -> list[str]:
    try:
        from ray._private.worker import filter_autoscaler_events

        return list(filter_autoscaler_events(lines))
    except ImportError:
        return []


def quiet_ray_output() -> bool:
    """On a Ray driver: route the cluster's output as above (unless verbose).

    Returns whether Ray's printing was replaced. Uses Ray's log dispatcher (the same
    hook ``log_to_driver`` uses); if a Ray version lacks it, output stays as Ray
    prints it rather than being lost.
    """
    if verbose():
        return False
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        dispatcher.remove_handler("ray_print_logs")
    except (ImportError, AttributeError, KeyError, ValueError):
        return False
    dispatcher.add_handler("ray_print_logs", _handler)
    try:  # Ray Data's progress tables: the scoring job prints its own progress lines
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    except ImportError:
        pass
    _quiet_python_loggers()
    return True


_file_handler_added = False


def _quiet_python_loggers() -> None:
    """Ray's and Ray Data's Python loggers: errors on the console, the rest in the file."""
    import logging

    global _file_handler_added

    to_file = logging.FileHandler(log_path(), encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("ray", "ray.data", "ray.train"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            ):
                handler.setLevel(logging.ERROR)
        if (not logger.propagate or name == "ray") and not _file_handler_added:
            logger.addHandler(to_file)
    _file_handler_added = True


def log_size() -> int:
    """Where the log file ends now (a run keeps what was written after this)."""
    try:
        return os.path.getsize(log_path())
    except OSError:
        return 0


def keep_log(uri: str, since: int = 0) -> None:
    """Upload the log file from offset ``since`` to ``uri``; best effort, never raises."""
    from xfer.store import storage

    try:
        with open(log_path(), "rb") as f:
            f.seek(since)
            data = f.read()
        if data:
            storage.write_bytes(uri, data, "text/plain")
    except Exception as exc:  # the run's outcome matters more than its log copy
        print(f"{TAG} warning: could not keep the log at {uri}: {exc}", flush=True)


def detail(line: str) -> None:
    """A line for the log file (and the console when verbose)."""
    if verbose():
        print(line, flush=True)
        return
    with _lock, open(log_path(), "a", encoding="utf-8", errors="replace") as f:
        f.write(f"(driver) {line}\n")


class Progress:
    """A progress bar on a terminal; in job logs, a line every ``every_s`` seconds.

    tqdm draws nothing useful when output is not a terminal (a pod's log, a CI log),
    so there the stage reports itself: ``[xfer] <desc>: 40/120 tasks, 3.1/s, about 26s
    left``. ``XFER_PROGRESS_SECONDS`` changes the interval (default 30): a property of
    the job's log, not of the job.
    """

    def __init__(self, desc: str, total: int, unit: str = "task", every_s: float | None = None):
        from tqdm import tqdm

        self.desc, self.total, self.unit = desc, total, unit
        self.tty = sys.stderr.isatty()
        self.every_s = float(os.environ.get(PROGRESS_ENV, "30")) if every_s is None else every_s
        self.done = 0
        self.started = self.last = time.monotonic()
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not self.tty)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        now = time.monotonic()
        if self.tty or self.done >= self.total or now - self.last < self.every_s:
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        left = (self.total - self.done) / max(rate, 1e-9)
        print(
            f"{TAG} {self.desc}: {self.done}/{self.total} {self.unit}s, {rate:.1f}/s, "
            f"about {left:.0f}s left",
            flush=True,
        )

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
