"""One run at a time per night: a lock in the night's staging folder.

    with NightLock(night_root(final), stale_seconds=600):
        ...  # plan, score, commit

Two runs of the same night (a retried job while the first still runs, two
schedulers) would share its staging: each could discard the other's plan, or commit
the other's half-written parts. The lock is ``<night root>/_lock.json`` (owner
token, host, pid, start and heartbeat times), created with a conditional PUT
(``If-None-Match: *``: only one creator wins; AWS S3 and SeaweedFS honour it) and
read back, for stores that ignore the condition. The holder rewrites the heartbeat
every quarter of ``stale_seconds`` (``If-Match`` its last ETag, so a holder that was
taken over notices). A lock whose heartbeat is older than ``stale_seconds``, or
whose holder ran on this host and is gone, was left by a run that died: it is
taken over (``If-Match`` its ETag: one taker wins).
Locally the file is linked into place only if there is none. Heartbeats compare the holder's clock
with the reader's: hosts are assumed to agree within a small part of the limit.

Which night a run is: :func:`partition_date` (``--date``, or today plus
``score.date_offset_days``) and :func:`input_for_date` (the ``{date}`` of ``--input``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import socket
import threading
import uuid
from typing import Any

from xfer.errors import NotFoundError, StorageError, XferError
from xfer.store import s3, storage

LOCK_FILE = "_lock.json"


class NightBusy(XferError):
    """Another run holds the night (the CLI exits 75: try again later)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _holder_gone(held: dict[str, Any]) -> bool:
    """A holder on this host whose process is gone (crashed, killed, or its store
    went away before it could remove the lock): no need to wait for staleness."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class NightLock:
    def __init__(self, root: str, stale_seconds: float):
        self.uri = storage.join(root, LOCK_FILE)
        self.stale = stale_seconds
        self.token = uuid.uuid4().hex
        self.started = _now().isoformat()
        self.lost = False
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeats, daemon=True)

    # ------------------------------------------------------------- contract

    def __enter__(self) -> NightLock:
        if not self._create():
            held, etag = self._read()
            if held is None:  # released between our attempt and the read: once more
                if not self._create():
                    raise NightBusy(f"the night at {self.uri} is being taken by another run")
            elif self._age(held) <= self.stale and not _holder_gone(held):
                raise NightBusy(f"{self.describe(held)}; try again later")
            elif not self._take_over(etag):
                raise NightBusy(f"another run took over the stale lock {self.uri} first")
            else:
                print(f"[xfer] warning: took over a stale lock: {self.describe(held)}", flush=True)
        self._beat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._beat.join()
        # A store that fails now must not hide why the night ended: a lock left behind
        # goes stale and is taken over.
        with contextlib.suppress(StorageError):
            held, _ = self._read()
            if held is not None and held.get("token") == self.token:
                storage.delete(self.uri)

    def check(self) -> None:
        """Raise if another run took the lock over (before committing anything)."""
        held, _ = self._read()
        if self.lost or (held is not None and held.get("token") != self.token):
            raise NightBusy(f"lost the night's lock to another run: {self.describe(held or {})}")

    def describe(self, held: dict[str, Any]) -> str:
        return (
            f"the night is held by {held.get('host')} pid {held.get('pid')} since "
            f"{held.get('started')} (heartbeat {self._age(held):.0f}s ago; lock {self.uri})"
        )

    # ------------------------------------------------------------- writing

    def _body(self) -> bytes:
        body = {
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started,
            "heartbeat": _now().isoformat(),
        }
        return json.dumps(body).encode()

    def _age(self, held: dict[str, Any]) -> float:
        try:
            beat = dt.datetime.fromisoformat(str(held.get("heartbeat")))
        except ValueError:
            return float("inf")
        return (_now() - beat).total_seconds()

    def _create(self) -> bool:
        """Create the lock if there is none; True if it is ours (read back)."""
        return self._claim({"IfNoneMatch": "*"})

    def _take_over(self, etag: str | None) -> bool:
        """Replace the stale lock we read (``etag``); True if it is ours now."""
        return self._claim({"IfMatch": etag} if etag else {})

    def _claim(self, condition: dict[str, str]) -> bool:
        # Read back: a store that ignores the condition lets the last writer win.
        if not self._put(self._body(), condition):
            return False
        held, _ = self._read()
        return held is not None and held.get("token") == self.token

    def _heartbeats(self) -> None:
        while not self._stop.wait(max(self.stale / 4, 0.5)):
            try:
                held, etag = self._read()
                if held is None or held.get("token") != self.token:
                    self.lost = held is not None
                    return
                self._put(self._body(), {"IfMatch": etag} if etag else {})
            except StorageError:  # a blip: the next beat tries again
                continue

    def _put(self, body: bytes, condition: dict[str, str]) -> bool:
        """One PUT under ``condition``; False when the condition did not hold."""
        from botocore.exceptions import ClientError

        if not s3.is_s3(self.uri):
            return self._put_local(body, exclusive="IfNoneMatch" in condition)
        bucket, key = s3.split_s3(self.uri)
        with s3.translate_errors(self.uri):
            try:
                s3.s3_client().put_object(Bucket=bucket, Key=key, Body=body, **condition)
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                    return False
                raise
        return True

    def _put_local(self, body: bytes, exclusive: bool) -> bool:
        path = s3.local_path(self.uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not exclusive:
            storage.write_bytes(self.uri, body)  # a rename: never seen half-written
            return True
        draft = f"{path}.{self.token}"
        with open(draft, "wb") as f:
            f.write(body)
        try:
            os.link(draft, path)  # whole, and only if there is none
        except FileExistsError:
            return False
        finally:
            os.remove(draft)
        return True

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """The lock's content and ETag, from one GET (None, None when there is none)."""
        try:
            if s3.is_s3(self.uri):
                bucket, key = s3.split_s3(self.uri)
                with s3.translate_errors(self.uri):
                    got = s3.s3_client().get_object(Bucket=bucket, Key=key)
                    return json.loads(got["Body"].read()), str(got["ETag"])
            return json.loads(storage.read_bytes(self.uri)), None
        except NotFoundError:
            return None, None
        except ValueError:  # not a lock xfer wrote: as good as stale
            return {"token": None, "heartbeat": ""}, None


# ------------------------------------------------------------------ which night


def input_for_date(input_uri: str, day: str) -> str:
    """``--input s3://b/incoming/{date}/`` -> the prefix of that night."""
    if "{" not in input_uri:
        return input_uri
    try:
        return input_uri.format(date=day)
    except (KeyError, IndexError, ValueError):
        raise XferError(
            f"--input {input_uri}: the only template field is {{date}} (YYYY-MM-DD)"
        ) from None


def partition_date(date: str | None, offset_days: int = 0) -> str:
    """``--date`` as YYYY-MM-DD (given so, or as YYYYMMDD); default: the UTC date now
    plus ``offset_days`` (``score.date_offset_days``; -1 at 02:00 UTC names the night
    just ended). An explicit ``--date`` wins over the offset.

    One spelling per day: ``20260105`` and ``2026-01-05`` are one partition, and
    ISO forms Python also accepts (``2026-W48-5``) are refused.
    """
    if date is None:
        today = dt.datetime.now(dt.timezone.utc).date()
        return (today + dt.timedelta(days=offset_days)).isoformat()
    match = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})|(\d{4})(\d{2})(\d{2})", date.strip())
    if match:
        try:
            return dt.date(*(int(g) for g in match.groups() if g)).isoformat()
        except ValueError:  # 2026-02-30
            pass
    raise XferError(f"--date {date!r} is not a date: give YYYY-MM-DD or YYYYMMDD")
