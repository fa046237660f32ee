"""Per-key quotas on input rows (docs/spec/gateway-v1.md §4), against both stores: in-process and a
real ``redis-server``. The clock is driven through ``now``; nothing sleeps."""

from __future__ import annotations

import multiprocessing
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from modelseal.gateway.errors import QuotaExceeded, Unavailable
from modelseal.gateway.quota import Limits, MemoryQuota, Quota, RedisQuota, open_quota

from .redisharness import RedisServer, redis_server_bin

DAY0 = 20_834 * 86_400.0  # 2027-01-15 00:00:00 UTC: the start of a day, so of a minute too


@pytest.fixture
def fresh_redis(redis_server: RedisServer) -> RedisServer:
    redis_server.flush()
    return redis_server


@pytest.fixture(params=["memory", "redis"])
def quota(request: pytest.FixtureRequest) -> Iterator[Quota]:
    q: Quota = MemoryQuota() if request.param == "memory" else RedisQuota(request.getfixturevalue("fresh_redis").url)
    yield q
    q.close()


def refused(q: Quota, key: str, rows: int, limits: Limits, now: float) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as info:
        q.charge(key, rows, limits, now=now)
    return info.value


def usage(minute: int, day: int, total: int) -> dict[str, int]:
    return {"minute": minute, "day": day, "total": total}


# -- behaviour shared by both stores -----------------------------------------------------------


def test_per_minute_limit(quota: Quota) -> None:
    limits = Limits(per_minute=10)
    quota.charge("k1", 4, limits, now=DAY0 + 5)
    quota.charge("k1", 6, limits, now=DAY0 + 6)
    err = refused(quota, "k1", 1, limits, DAY0 + 7)
    assert (err.period, err.retry_after, err.status, err.code) == ("minute", 53, 429, "quota-exceeded")
    assert "10" in err.message
    assert quota.usage("k1", now=DAY0 + 7) == usage(10, 10, 10)


def test_refusal_is_whole(quota: Quota) -> None:
    limits = Limits(per_minute=10, per_day=1000, total=5000)
    quota.charge("k1", 7, limits, now=DAY0)
    refused(quota, "k1", 5, limits, DAY0 + 1)  # 3 left: nothing of the 5 is charged
    assert quota.usage("k1", now=DAY0 + 1) == usage(7, 7, 7)
    quota.charge("k1", 3, limits, now=DAY0 + 2)  # the 3 that were left are still there
    assert quota.usage("k1", now=DAY0 + 2) == usage(10, 10, 10)


def test_per_day_limit(quota: Quota) -> None:
    limits = Limits(per_minute=100, per_day=150)
    quota.charge("k1", 100, limits, now=DAY0 + 10)
    quota.charge("k1", 50, limits, now=DAY0 + 70)  # next minute: the minute window is fresh
    err = refused(quota, "k1", 1, limits, DAY0 + 3600)
    assert (err.period, err.retry_after) == ("day", 86_400 - 3600)
    assert quota.usage("k1", now=DAY0 + 3600) == usage(0, 150, 150)
    quota.charge("k1", 100, limits, now=DAY0 + 86_400)  # the next UTC day
    assert quota.usage("k1", now=DAY0 + 86_400) == usage(100, 100, 250)


def test_total_limit_never_resets(quota: Quota) -> None:
    limits = Limits(per_minute=10, total=15)
    quota.charge("k1", 10, limits, now=DAY0)
    quota.charge("k1", 5, limits, now=DAY0 + 60)
    err = refused(quota, "k1", 1, limits, DAY0 + 30 * 86_400)
    assert (err.period, err.retry_after) == ("total", None)
    assert quota.usage("k1", now=DAY0 + 30 * 86_400) == usage(0, 0, 15)


def test_window_rolls_over(quota: Quota) -> None:
    limits = Limits(per_minute=3)
    quota.charge("k1", 3, limits, now=DAY0 + 59.5)
    err = refused(quota, "k1", 1, limits, DAY0 + 59.9)
    assert err.retry_after == 1  # 0.1 s rounds up: Retry-After is whole seconds, never 0
    quota.charge("k1", 3, limits, now=DAY0 + 60.0)  # exactly at the boundary: a new window
    assert quota.usage("k1", now=DAY0 + 60.0) == usage(3, 6, 6)
    assert quota.usage("k1", now=DAY0 + 120.0) == usage(0, 6, 6)


@pytest.mark.parametrize(
    ("offset", "expected"),
    [(0.0, 60), (0.5, 60), (30.0, 30), (59.0, 1), (59.99, 1), (61.0, 59)],
)
def test_retry_after_is_time_to_window_end(quota: Quota, offset: float, expected: int) -> None:
    limits = Limits(per_minute=1)
    quota.charge("k1", 1, limits, now=DAY0 + offset)
    assert refused(quota, "k1", 1, limits, DAY0 + offset).retry_after == expected


def test_retry_after_of_day_window(quota: Quota) -> None:
    limits = Limits(per_day=1)
    quota.charge("k1", 1, limits, now=DAY0 + 86_399.5)
    assert refused(quota, "k1", 1, limits, DAY0 + 86_399.5).retry_after == 1
    quota.charge("k1", 1, limits, now=DAY0 + 86_400)


def test_refusal_names_the_window_that_frees_up_last(quota: Quota) -> None:
    limits = Limits(per_minute=5, per_day=5)
    quota.charge("k1", 5, limits, now=DAY0)
    err = refused(quota, "k1", 1, limits, DAY0 + 1)  # both are full; waiting a minute would not help
    assert (err.period, err.retry_after) == ("day", 86_399)


def test_request_larger_than_the_limit_has_no_retry_after(quota: Quota) -> None:
    limits = Limits(per_minute=5)
    err = refused(quota, "k1", 6, limits, DAY0)
    assert (err.period, err.retry_after) == ("minute", None)  # no wait would ever let it through
    assert "larger than" in err.message
    assert quota.usage("k1", now=DAY0) == usage(0, 0, 0)


def test_zero_limit_refuses_everything(quota: Quota) -> None:
    err = refused(quota, "k1", 1, Limits(per_day=0), DAY0)
    assert err.period == "day"


def test_unlimited_still_counts(quota: Quota) -> None:
    quota.charge("k1", 10**9, Limits(), now=DAY0)
    quota.charge("k1", 1, Limits(), now=DAY0 + 60)
    assert quota.usage("k1", now=DAY0 + 60) == usage(1, 10**9 + 1, 10**9 + 1)


def test_keys_are_independent(quota: Quota) -> None:
    limits = Limits(per_minute=3, total=3)
    quota.charge("k1", 3, limits, now=DAY0)
    refused(quota, "k1", 1, limits, DAY0)
    assert quota.usage("k2", now=DAY0) == usage(0, 0, 0)
    quota.charge("k2", 3, limits, now=DAY0)
    assert quota.usage("k1", now=DAY0) == usage(3, 3, 3)
    assert quota.usage("k2", now=DAY0) == usage(3, 3, 3)


def test_reset_forgets_one_key_only(quota: Quota) -> None:
    limits = Limits(total=5)
    for key in ("k1", "k*", "k1x", "k["):  # glob characters must not widen a Redis SCAN pattern
        quota.charge(key, 5, limits, now=DAY0)
    quota.charge("k1", 1, Limits(), now=DAY0 + 86_400)  # counters in more than one window
    quota.reset("k*")
    quota.reset("k[")
    quota.reset("k1")
    assert quota.usage("k1", now=DAY0) == usage(0, 0, 0)
    assert quota.usage("k1", now=DAY0 + 86_400) == usage(0, 0, 0)
    assert quota.usage("k1x", now=DAY0) == usage(5, 5, 5)
    quota.charge("k1", 5, limits, now=DAY0)  # a key re-created with the same id starts from 0
    quota.reset("never-charged")


def test_scaled_limits_throttle(quota: Quota) -> None:
    limits = Limits(per_minute=10, per_day=100, total=None)
    throttled = limits.scaled(0.5)
    assert throttled == Limits(per_minute=5, per_day=50, total=None)
    quota.charge("k1", 5, limits, now=DAY0)
    assert refused(quota, "k1", 1, throttled, DAY0).period == "minute"
    quota.charge("k1", 1, limits, now=DAY0)  # the unthrottled tier still has room


@pytest.mark.parametrize("key", ["", "a b", "tab\tkey", "x" * 129, "new\nline", "nul\x00", "{tag}", "a}b"])
def test_invalid_key_ids(quota: Quota, key: str) -> None:
    with pytest.raises(ValueError, match="key id"):
        quota.charge(key, 1, Limits(), now=DAY0)
    with pytest.raises(ValueError, match="key id"):
        quota.usage(key, now=DAY0)
    with pytest.raises(ValueError, match="key id"):
        quota.reset(key)


@pytest.mark.parametrize("rows", [0, -1])
def test_rows_must_be_positive(quota: Quota, rows: int) -> None:
    with pytest.raises(ValueError, match="rows"):
        quota.charge("k1", rows, Limits(), now=DAY0)
    assert quota.usage("k1", now=DAY0) == usage(0, 0, 0)


def test_longest_key_id_is_accepted(quota: Quota) -> None:
    quota.charge("x" * 128, 1, Limits(), now=DAY0)
    assert quota.usage("x" * 128, now=DAY0) == usage(1, 1, 1)


def test_concurrent_threads_never_exceed(quota: Quota) -> None:
    limit, threads, tries = 3000, 16, 150
    limits = Limits(per_minute=limit)
    accepted = [0] * threads
    offered = [0] * threads
    start = threading.Barrier(threads)

    def worker(i: int) -> None:
        rng = random.Random(i)
        start.wait()
        for _ in range(tries):
            rows = rng.randint(1, 9)
            offered[i] += rows
            try:
                quota.charge("shared", rows, limits, now=DAY0 + 1)
            except QuotaExceeded:
                continue
            accepted[i] += rows

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert sum(offered) > limit
    used = quota.usage("shared", now=DAY0 + 1)
    assert used == usage(sum(accepted), sum(accepted), sum(accepted))
    # Never over; and since something was refused, less than the largest request (9) was left then.
    assert limit - 8 <= sum(accepted) <= limit


# -- Limits --------------------------------------------------------------------------------------


def test_limits_scaled() -> None:
    limits = Limits(per_minute=100, per_day=1000, total=None)
    assert limits.scaled(0.29) == Limits(per_minute=29, per_day=290, total=None)  # not 28 from float error
    assert limits.scaled(1.0) == limits
    assert Limits(per_minute=3, per_day=1, total=7).scaled(0.1) == Limits(per_minute=1, per_day=1, total=1)
    assert Limits(per_minute=0, per_day=9).scaled(0.5) == Limits(per_minute=0, per_day=4)  # 0 stays blocked
    assert Limits().scaled(0.5) == Limits()
    for bad in (0.0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="factor"):
            limits.scaled(bad)


@pytest.mark.parametrize("bad", [{"per_minute": -1}, {"per_day": 1.5}, {"total": True}])
def test_limits_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="limit"):
        Limits(**bad)


def test_open_quota(fresh_redis: RedisServer) -> None:
    assert isinstance(open_quota(None), MemoryQuota)
    assert isinstance(open_quota(""), MemoryQuota)
    q = open_quota(fresh_redis.url)
    assert isinstance(q, RedisQuota)
    q.close()


def test_importing_quota_does_not_import_redis() -> None:
    code = "import sys, modelseal.gateway.quota; assert 'redis' not in sys.modules, 'redis imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- Redis specifics ---------------------------------------------------------------------------


def test_redis_key_layout_and_expiry(fresh_redis: RedisServer) -> None:
    q = RedisQuota(fresh_redis.url, prefix="t:")
    q.charge("k1", 2, Limits(), now=DAY0 + 61)
    with fresh_redis.client() as client:
        minute, day = int((DAY0 + 61) // 60), int(DAY0 // 86_400)
        names = sorted(n.decode() for n in client.keys("*"))
        markers = [n for n in names if n.startswith("t:{k1}:c:")]
        assert len(markers) == 1 and 0 < client.ttl(markers[0]) <= 60  # this charge's resend marker
        names.remove(markers[0])
        assert names == sorted([f"t:{{k1}}:m:{minute}", f"t:{{k1}}:d:{day}", "t:{k1}:t"])
        assert 60 < client.ttl(f"t:{{k1}}:m:{minute}") <= 120  # the window plus a margin
        assert 86_400 < client.ttl(f"t:{{k1}}:d:{day}") <= 86_400 + 3600
        assert client.ttl("t:{k1}:t") == -1  # the lifetime total never expires
    q.close()


def test_redis_instances_share_counters_per_prefix(fresh_redis: RedisServer) -> None:
    a, b, other = (RedisQuota(fresh_redis.url, prefix=p) for p in ("p1:", "p1:", "p2:"))
    a.charge("k1", 4, Limits(per_minute=5), now=DAY0)
    assert refused(b, "k1", 2, Limits(per_minute=5), DAY0).period == "minute"
    assert other.usage("k1", now=DAY0) == usage(0, 0, 0)
    for q in (a, b, other):
        q.close()


def test_redis_resent_charge_counts_once(fresh_redis: RedisServer) -> None:
    """A charge resent under the same marker (the client's reconnect after the connection dropped
    between the script running and its reply) adds nothing; a new charge adds again."""
    q = RedisQuota(fresh_redis.url)
    limits = Limits(per_minute=10)
    q._run_charge("k1", 4, limits._values(), DAY0, "marker-1")
    q._run_charge("k1", 4, limits._values(), DAY0, "marker-1")
    assert q.usage("k1", now=DAY0) == usage(4, 4, 4)
    q._run_charge("k1", 4, limits._values(), DAY0, "marker-2")
    assert q.usage("k1", now=DAY0) == usage(8, 8, 8)
    # a refused charge leaves no marker: its resend is checked again (and refused again)
    assert int(q._run_charge("k1", 4, limits._values(), DAY0, "marker-3")[0]) == 1
    assert q.usage("k1", now=DAY0) == usage(8, 8, 8)
    q.close()


def test_redis_script_cache_flushed(fresh_redis: RedisServer) -> None:
    q = RedisQuota(fresh_redis.url)
    q.charge("k1", 1, Limits(), now=DAY0)
    with fresh_redis.client() as client:
        client.script_flush()  # as after a Redis restart or failover: EVALSHA answers NOSCRIPT
    q.charge("k1", 1, Limits(), now=DAY0)
    assert q.usage("k1", now=DAY0) == usage(2, 2, 2)
    q.close()


def test_redis_error_reply_is_unavailable(fresh_redis: RedisServer) -> None:
    q = RedisQuota(fresh_redis.url, prefix="t:")
    with fresh_redis.client() as client:
        client.hset("t:{k1}:t", "x", "1")  # a foreign value of the wrong type under our key
    with pytest.raises(Unavailable, match="quota store error") as info:
        q.charge("k1", 1, Limits(), now=DAY0)
    assert isinstance(info.value.__cause__, redis.ResponseError)
    assert info.value.status == 503
    q.close()


WINDOWS, TRIES = 10, 150  # per process: 10 minute windows, up to 150 requests of 1-9 rows in each


def _hammer(url: str, seed: int, limit: int, start: Any, results: Any) -> None:
    """One process's share of the load. Both processes fill the same minute window together (the
    barrier), ten windows in a row, so the race for a window's last rows is run ten times. A refused
    request is retried a row at a time until a single row is refused: then the window is known full."""
    q = RedisQuota(url)
    limits = Limits(per_minute=limit)
    rng = random.Random(seed)
    outcome = []
    for window in range(WINDOWS):
        now = DAY0 + 60 * window
        accepted = offered = 0
        start.wait()
        for _ in range(TRIES):
            rows = rng.randint(1, 9)
            offered += rows
            try:
                q.charge("shared", rows, limits, now=now)
                accepted += rows
                continue
            except QuotaExceeded:
                pass
            for _ in range(rows):
                try:
                    q.charge("shared", 1, limits, now=now)
                except QuotaExceeded:
                    break
                accepted += 1
        outcome.append((accepted, offered))
    q.close()
    results.put(outcome)


@pytest.mark.parametrize("limit", [1000, 5000])
def test_redis_two_processes_never_exceed(fresh_redis: RedisServer, limit: int) -> None:
    ctx = multiprocessing.get_context("spawn")  # each process builds its own client and pool
    start, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(fresh_redis.url, seed, limit, start, results)) for seed in (1, 2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    q = RedisQuota(fresh_redis.url)
    for window in range(WINDOWS):
        accepted = sum(o[window][0] for o in outcomes)
        offered = sum(o[window][1] for o in outcomes)
        assert accepted == min(limit, offered), f"window {window}"
        assert q.usage("shared", now=DAY0 + 60 * window)["minute"] == accepted
        if limit == 1000:
            assert offered > limit  # the processes really raced for the window's last rows
    assert q.usage("shared", now=DAY0)["day"] == sum(a for o in outcomes for a, _ in o)
    q.close()


# -- Redis down ------------------------------------------------------------------------------------


def _assert_unavailable(q: RedisQuota) -> None:
    with pytest.raises(Unavailable, match="quota store unreachable") as info:
        q.charge("k1", 1, Limits(), now=DAY0)
    assert isinstance(info.value.__cause__, redis.ConnectionError | redis.TimeoutError)
    with pytest.raises(Unavailable):
        q.usage("k1", now=DAY0)
    with pytest.raises(Unavailable):
        q.reset("k1")


def test_redis_refused_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound but not listening: the port is ours and connects are refused
        q = RedisQuota(f"redis://127.0.0.1:{sock.getsockname()[1]}/0", socket_timeout=0.5)
        began = time.monotonic()
        _assert_unavailable(q)
        assert time.monotonic() - began < 5  # refused at once, no redis-py backoff
        q.close()


def test_redis_silent_is_unavailable_after_timeout() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)  # the kernel completes connects, but nobody ever answers
        q = RedisQuota(f"redis://127.0.0.1:{sock.getsockname()[1]}/0", socket_timeout=0.2)
        began = time.monotonic()
        with pytest.raises(Unavailable, match="unreachable") as info:
            q.charge("k1", 1, Limits(), now=DAY0)
        assert isinstance(info.value.__cause__, redis.TimeoutError)
        assert time.monotonic() - began < 5  # bounded by the socket timeout, not retried
        q.close()


def test_redis_restart_recovers() -> None:
    binary = redis_server_bin()
    assert binary is not None, "redis-server not found: `make sysdeps` installs it"
    server = RedisServer(binary)
    try:
        server.start()
        q = RedisQuota(server.url)
        q.charge("k1", 3, Limits(), now=DAY0)
        server.stop()
        _assert_unavailable(q)  # the pooled connection is dead and the socket is gone
        server.start()
        q.charge("k1", 2, Limits(), now=DAY0)  # reconnects; the script is loaded again
        assert q.usage("k1", now=DAY0) == usage(2, 2, 2)  # nothing persisted (--save '')
        q.close()
    finally:
        server.cleanup()
