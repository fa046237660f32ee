"""Per-key quotas on input rows (docs/spec/gateway-v1.md §4).

Each key has three counters: a fixed minute window, a fixed UTC day window and a lifetime total.
A charge either fits in every window and is added to all three, or is refused whole: a partly
charged refusal would eat the quota of a request that never ran. Rows are counted, not requests,
because extraction cost grows with the number of inputs answered, not with how they are batched.

Two stores share that contract: :class:`MemoryQuota` for a single worker and :class:`RedisQuota`
for several workers or replicas, where one Lua script makes check-and-add atomic across processes.
Windows are computed in Python from ``now`` (overridable), so both stores agree on boundaries and
tests drive the clock instead of sleeping.
"""

from __future__ import annotations

import math
import operator
import secrets
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .errors import QuotaExceeded, Unavailable

if TYPE_CHECKING:
    import redis

__all__ = ["Limits", "MemoryQuota", "Quota", "RedisQuota", "open_quota"]

MINUTE = 60
DAY = 86_400
PERIODS = ("minute", "day", "total")
_MAX_KEY_ID = 128


@dataclass(frozen=True)
class Limits:
    """A tier's limits in input rows; ``None`` means unlimited, 0 means nothing is allowed."""

    per_minute: int | None = None
    per_day: int | None = None
    total: int | None = None  # lifetime of the key

    def __post_init__(self) -> None:
        for period, value in zip(PERIODS, self._values(), strict=True):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{period} limit must be a non-negative integer or None, not {value!r}")

    def _values(self) -> tuple[int | None, int | None, int | None]:
        return (self.per_minute, self.per_day, self.total)

    def scaled(self, factor: float) -> Limits:
        """Each finite, non-zero limit times ``factor``, rounded down but at least 1 (the monitor's
        "throttle" slows a key down, it never blocks it outright; 0 stays 0). The factor is taken as
        written in decimal, so ``100 * 0.29`` is 29, not the binary float's 28."""
        if isinstance(factor, bool) or not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"scale factor must be a positive finite number, not {factor!r}")
        exact = Decimal(repr(float(factor)))

        def scale(value: int | None) -> int | None:
            if not value:
                return value
            return max(1, int(value * exact))  # int() truncates, i.e. floors, a positive Decimal

        return replace(self, per_minute=scale(self.per_minute), per_day=scale(self.per_day), total=scale(self.total))


class Quota(ABC):
    """Counts a key's input rows and refuses a charge that would exceed any of its limits."""

    @abstractmethod
    def charge(self, key_id: str, rows: int, limits: Limits, *, now: float | None = None) -> None:
        """Atomically add ``rows`` to all of the key's windows, or raise :class:`QuotaExceeded`
        (charging nothing) if any window would go over its limit."""

    @abstractmethod
    def usage(self, key_id: str, *, now: float | None = None) -> dict[str, int]:
        """Rows counted in the current windows: ``{"minute": n, "day": n, "total": n}``."""

    @abstractmethod
    def reset(self, key_id: str) -> None:
        """Forget every counter of the key (the key was deleted; a new key with the same id starts at 0)."""

    #: True when a charge waits on the network (the app then charges off its event loop, so a slow
    #: or unreachable store delays predictions but never health checks or other routes)
    remote = False

    def close(self) -> None:  # noqa: B027 - optional hook: the memory store holds nothing to release
        """Release connections; the object is not used afterwards."""


def open_quota(redis_url: str | None) -> Quota:
    """The store the settings ask for: Redis when a URL is given, else in-process."""
    return RedisQuota(redis_url) if redis_url else MemoryQuota()


# -- shared rules ------------------------------------------------------------------------------


def _check_key_id(key_id: str) -> str:
    # Key ids become part of Redis key names and log lines: keep them short and unambiguous. Braces
    # are refused because they would end the Redis hash tag early, and then resetting key "a" would
    # also match the counters of a key "a}:x".
    if (
        not isinstance(key_id, str)
        or not key_id
        or len(key_id) > _MAX_KEY_ID
        or not key_id.isprintable()
        or any(c.isspace() or c in "{}" for c in key_id)
    ):
        raise ValueError(f"invalid key id {key_id!r}: 1-{_MAX_KEY_ID} printable characters, no whitespace or braces")
    return key_id


def _check_rows(rows: int) -> int:
    rows = operator.index(rows)
    if rows < 1:
        raise ValueError(f"rows must be >= 1, not {rows}")
    return rows


def _windows(now: float) -> tuple[int, int]:
    """The fixed minute and UTC day windows that contain ``now`` (Unix time is UTC by definition)."""
    return math.floor(now / MINUTE), math.floor(now / DAY)


def _refusal(period: str, rows: int, limit: int, used: int, window: int, now: float) -> QuotaExceeded:
    """The error for a charge that does not fit. ``retry_after`` is the time until the window
    resets, or None when waiting cannot help: the lifetime total never resets, and a request
    larger than the limit itself would be refused in every window."""
    label = {"minute": "per-minute", "day": "per-day", "total": "total"}[period]
    if period == "total" or rows > limit:
        retry_after = None
    else:
        length = MINUTE if period == "minute" else DAY
        retry_after = max(1, math.ceil((window + 1) * length - now))
    if rows > limit:
        message = f"a request of {rows} rows is larger than the {label} limit of {limit} rows"
    else:
        message = f"{label} quota exceeded: {used} of {limit} rows used, request of {rows} rows refused"
    return QuotaExceeded(message, retry_after=retry_after, period=period)


# -- in-process ------------------------------------------------------------------------------


class _Counters:
    __slots__ = ("day", "day_rows", "minute", "minute_rows", "total")

    def __init__(self) -> None:
        self.minute = self.minute_rows = self.day = self.day_rows = self.total = 0


class MemoryQuota(Quota):
    """Quotas for one worker process: one record per key, holding only its current windows, so
    memory is bounded by the number of keys. Counters live as long as the process (a restart
    forgets them, lifetime totals included); use :class:`RedisQuota` to share or keep them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, _Counters] = {}

    def _current(self, key_id: str, now: float) -> tuple[_Counters, int, int]:
        """The key's record with stale windows zeroed (caller holds the lock). Windows never move
        backwards, so a clock stepping back cannot hand out a window's rows a second time."""
        c = self._keys.get(key_id) or _Counters()
        minute, day = _windows(now)
        if minute > c.minute:
            c.minute, c.minute_rows = minute, 0
        if day > c.day:
            c.day, c.day_rows = day, 0
        return c, c.minute, c.day

    def charge(self, key_id: str, rows: int, limits: Limits, *, now: float | None = None) -> None:
        _check_key_id(key_id)
        rows = _check_rows(rows)
        now = time.time() if now is None else now
        with self._lock:
            c, minute, day = self._current(key_id, now)
            # Longest period first: if several windows are full, name the one that frees up last.
            for period, limit, used, window in (
                ("total", limits.total, c.total, 0),
                ("day", limits.per_day, c.day_rows, day),
                ("minute", limits.per_minute, c.minute_rows, minute),
            ):
                if limit is not None and used + rows > limit:
                    raise _refusal(period, rows, limit, used, window, now)
            c.minute_rows += rows
            c.day_rows += rows
            c.total += rows
            self._keys[key_id] = c

    def usage(self, key_id: str, *, now: float | None = None) -> dict[str, int]:
        _check_key_id(key_id)
        now = time.time() if now is None else now
        with self._lock:
            if key_id not in self._keys:
                return {"minute": 0, "day": 0, "total": 0}
            c, _, _ = self._current(key_id, now)
            return {"minute": c.minute_rows, "day": c.day_rows, "total": c.total}

    def reset(self, key_id: str) -> None:
        _check_key_id(key_id)
        with self._lock:
            self._keys.pop(key_id, None)


# -- Redis -----------------------------------------------------------------------------------

# KEYS: the minute, day and total counters of one key, and this charge's marker (one hash tag,
# so one cluster slot).
# ARGV: rows; the minute, day and total limits (-1 = unlimited); the minute and day TTLs; the
# marker's TTL.
# Returns {0, minute, day, total} after charging, or {i, used} for the first window i (3 = total,
# 2 = day, 1 = minute: longest first) that the charge would overflow, having charged nothing.
# Scripts run atomically in Redis, so no other charge can interleave between the check and INCRBY.
# The marker (a random name per charge) makes a resend harmless: if the connection drops after the
# script ran but before its reply arrived, the client's one reconnect-and-resend finds the marker
# and returns {0, -1, -1, -1} instead of charging a second time.
_CHARGE_LUA = """
if redis.call('EXISTS', KEYS[4]) == 1 then
  return {0, -1, -1, -1}
end
local rows = tonumber(ARGV[1])
local used = {}
for i = 1, 3 do
  used[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
end
for i = 3, 1, -1 do
  local limit = tonumber(ARGV[i + 1])
  if limit >= 0 and used[i] + rows > limit then
    return {i, used[i]}
  end
end
for i = 1, 3 do
  used[i] = redis.call('INCRBY', KEYS[i], rows)
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('SET', KEYS[4], '1', 'EX', ARGV[7])
return {0, used[1], used[2], used[3]}
"""

# A window's key outlives the window by a margin, so workers whose clocks differ slightly still
# find it; after that nobody reads it again and Redis drops it.
_MINUTE_TTL = MINUTE + 60
_DAY_TTL = DAY + 3600
_MARKER_TTL = 60  # far longer than one reconnect-and-resend takes


class RedisQuota(Quota):
    """Quotas shared by every worker and replica that points at the same Redis.

    Keys are ``{prefix}{{key_id}}:m:{window}``, ``...:d:{window}`` and ``...:t``, plus a marker
    ``...:c:{random}`` per successful charge that lives 60 s (it makes a resent charge a no-op). The
    lifetime total has no expiry, so it is only as durable as the Redis persistence behind it. Every Redis failure
    (down, timeout, error reply) becomes :class:`Unavailable`: the gateway answers 503 rather than
    serving unmetered, and no redis-py exception reaches the caller.
    """

    remote = True

    def __init__(self, url: str, *, prefix: str = "mseal:quota:", socket_timeout: float = 1.0) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._errors: tuple[type[Exception], ...] = (redis.RedisError,)
        self._connection_errors: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)
        self.prefix = prefix
        # One immediate reconnect on a dropped connection (Redis restarted, pooled socket gone
        # stale); the charge's marker makes that resend harmless if the script had already run. No
        # retry on timeouts: a resend would double the wait, and redis-py's default backoff would
        # stall a request for seconds.
        self._client: redis.Redis = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
        self._charge = self._client.register_script(_CHARGE_LUA)  # EVALSHA, loaded on first use

    def _keys(self, key_id: str, now: float) -> list[str]:
        minute, day = _windows(now)
        base = f"{self.prefix}{{{key_id}}}"
        return [f"{base}:m:{minute}", f"{base}:d:{day}", f"{base}:t"]

    def _unavailable(self, exc: Exception) -> Unavailable:
        if isinstance(exc, self._connection_errors):
            return Unavailable("quota store unreachable")
        return Unavailable(f"quota store error: {type(exc).__name__}")

    def charge(self, key_id: str, rows: int, limits: Limits, *, now: float | None = None) -> None:
        _check_key_id(key_id)
        rows = _check_rows(rows)
        now = time.time() if now is None else now
        values = limits._values()
        result = self._run_charge(key_id, rows, values, now, secrets.token_hex(8))
        failed = int(result[0])
        if failed:
            period = PERIODS[failed - 1]
            limit = values[failed - 1]
            assert limit is not None  # the script only refuses on a finite limit
            window = _windows(now)[failed - 1] if failed < 3 else 0
            raise _refusal(period, rows, limit, int(result[1]), window, now)

    def _run_charge(self, key_id: str, rows: int, values: tuple[int | None, ...], now: float, marker: str) -> Any:
        """Run the charge script once under ``marker`` (a resend under the same marker is a no-op)."""
        keys = [*self._keys(key_id, now), f"{self.prefix}{{{key_id}}}:c:{marker}"]
        args = [rows, *(-1 if v is None else v for v in values), _MINUTE_TTL, _DAY_TTL, _MARKER_TTL]
        try:
            return self._charge(keys=keys, args=args)
        except self._errors as exc:
            raise self._unavailable(exc) from exc

    def usage(self, key_id: str, *, now: float | None = None) -> dict[str, int]:
        _check_key_id(key_id)
        now = time.time() if now is None else now
        try:
            found = self._client.mget(self._keys(key_id, now))
        except self._errors as exc:
            raise self._unavailable(exc) from exc
        return {period: int(v or 0) for period, v in zip(PERIODS, found, strict=True)}

    def reset(self, key_id: str) -> None:
        # Windows of any time, not just the current one, so a clock that later reads an older or
        # newer window still finds nothing. SCAN walks the keyspace, which is fine for a rare admin
        # action; the glob characters a key id may contain are escaped.
        _check_key_id(key_id)
        pattern = "".join("\\" + c if c in "\\*?[]" else c for c in f"{self.prefix}{{{key_id}}}:") + "*"
        try:
            batch: list[Any] = []
            for name in self._client.scan_iter(match=pattern, count=1000):
                batch.append(name)
                if len(batch) >= 500:
                    self._client.unlink(*batch)
                    batch.clear()
            if batch:
                self._client.unlink(*batch)
        except self._errors as exc:
            raise self._unavailable(exc) from exc

    def close(self) -> None:
        self._client.close()

    @property
    def client(self) -> redis.Redis:
        """The underlying client (for health checks and tests)."""
        return self._client
