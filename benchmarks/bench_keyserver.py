#!/usr/bin/env python3
"""Key server load benchmark (spec §17.4, ``make bench-keyserver``): ``POST /v1/grants`` against a
real ``modelseal keyserver serve`` on loopback, side by side with the cheapest requests of the same
server, same generator, same concurrency.

For each (backend, workers) a fresh server is started in dev mode in a temp dir (SQLite: the
default file; PostgreSQL: a throwaway cluster started with initdb/pg_ctl as in the tests,
spec §17.2), then set up through its HTTP API: one model, one content key registered by sealing
a tiny file with ``KeyServerRecipient``, one licence (``max_devices`` = the device count,
``opens_per_day`` = 2^31-1 so the usage upsert stays on the path but never limits), and
``--devices`` activated devices. Each client owns its own devices and cycles through them, so
request timestamps are strictly increasing per device (the server rejects replays); grant
requests are pre-signed before the run (signed on the fly only if the pool runs out).

Phases, each with ``--clients`` keep-alive connections, ``--warmup`` s excluded, ``--seconds`` s
measured, latency per request from the client; closed-loop by default (each connection sends its
next request as soon as the last one is answered), open-loop with ``--rate``:

    healthz      GET /healthz             no auth, no database (framework and transport ceiling)
    server-info  GET /v1/server-info      licence auth: one row lookup, one HMAC, a key list
    grant        POST /v1/grants          the full grant route (the target)

Only 200 responses count; any other status or a connection error is reported (it is a bug: the
run is invalid). The generator runs in ``--gen-procs`` separate processes (asyncio, a minimal
HTTP/1.1 keep-alive client by default, ``--client httpx`` to cross-check). On a small machine
the generator shares the cores with the server (smoke mode): the CPU used by the server (with
PostgreSQL's processes), by the generator and by everything else is printed for every phase,
so the numbers can be judged. ``--server-cpus`` / ``--generator-cpus`` pin them with taskset
on a larger machine.

Open loop (``--rate R``, every phase): requests are due on a fixed schedule, R/s in total; the k-th
arrival (k = 0, 1, ...) is due at start + k/R and belongs to connection k mod ``--clients``, so
each connection has a constant inter-arrival time of clients/R and at most one request in flight.
Latency is measured from the *scheduled* time, not the send (no coordinated omission): when a
connection is still busy at its next due time, that request starts late and the wait counts in
its latency ("late" counts them). The measured requests are those *due* in the measured window;
after it, a connection still sends its overdue ones for up to 2 s (any left are
"unfinished" and fail the run's target). The achieved rate is 200 responses to measured requests
per measured second (equal to R when the server keeps up; the completions inside the window are
reported too as "throughput"). The generator's own start lag (send time minus due time, requests
not late) is shown: when it is large, the generator, not the server, is behind.

Target (issue "keyserver S5"): >= 1,000 grants/s with p99 <= 50 ms at 64 clients, SQLite,
server on 2 cores; checked on the grant phase, open-loop when ``--rate`` is given.

Usage::

    python benchmarks/bench_keyserver.py                          # sqlite+postgres, 1 and 2 workers, 10 s
    python benchmarks/bench_keyserver.py --backend sqlite --workers 1 --seconds 3
    python benchmarks/bench_keyserver.py --json out.json
    python benchmarks/bench_keyserver.py --backend sqlite --workers 2 --rate 1000   # open loop, 1000/s

Use ``--rate`` for the latency target: in a closed loop, Little's law ties latency to throughput
(clients = throughput x mean latency, so 64 clients at 1,000/s means a 64 ms mean latency), so a
closed loop can never show p99 <= 50 ms at 1,000/s with 64 clients, whereas an open loop offers a
fixed rate and measures the latency at that rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import modelseal
from modelseal.keyserver.client import KeyServerRecipient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' PostgreSQL harness
from tests.keyserver.pgharness import PostgresServer, pgbin

TARGET_GRANTS_S = 1000.0
TARGET_P99_MS = 50.0
GRANT_ROUTE = "/v1/grants"
UNLIMITED_OPENS = 2**31 - 1  # usage upsert on the path (spec §17.4), never the limit
PHASES = ("healthz", "server-info", "grant")
OPEN_DRAIN_S = 2.0  # open loop: how long after the window a connection still sends its overdue requests
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mono() -> float:
    """CLOCK_MONOTONIC: one clock for every process of the run (Linux)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


# --- CPU accounting (/proc) -------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds of the process plus its waited-for children)."""
    out: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                raw = fh.read()
        except OSError:
            continue
        fields = raw[raw.rindex(b")") + 2 :].split()
        # fields[0] is state (field 3); utime..cstime are fields 14..17
        ticks = sum(int(x) for x in fields[11:15])
        out[int(entry)] = (int(fields[1]), ticks / CLK_TCK)
    return out


def tree_cpu(roots: list[int]) -> float:
    """CPU seconds of the processes under ``roots`` (inclusive); exited children count via cutime."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo, seen = 0.0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in table:
            continue
        seen.add(pid)
        total += table[pid][1]
        todo += children.get(pid, [])
    return total


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all cores (/proc/stat)."""
    with open("/proc/stat") as fh:
        values = [int(x) for x in fh.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user
    return (total - idle) / CLK_TCK, total / CLK_TCK


# --- PostgreSQL (as tests/keyserver/conftest.py, spec §17.2) ------------------------------------


# --- the server under test ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(
    method: str, url: str, token: str | None = None, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    hdrs = {"Authorization": f"Bearer {token}"} if token else {}
    if data is not None:
        hdrs["Content-Type"] = "application/json"
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@dataclass
class Server:
    workdir: Path
    workers: int
    database_url: str | None
    extra_env: dict[str, str]
    cpus: str | None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSEAL")}
        env.update(
            MODELSEAL_KS_DEV="true",  # for audit-verify too (a dev database refuses non-dev tools)
            MODELSEAL_KS_MASTER_KEY="dev",
            MODELSEAL_KS_PUBLIC_URL=self.base,
            # Activating the devices is setup, not the measurement: the activation windows are raised.
            MODELSEAL_KS_RATE_ACTIVATE_IP="999999999/60",
            MODELSEAL_KS_RATE_ACTIVATE_LICENCE="999999999/3600",
        )
        if self.database_url:
            env["MODELSEAL_KS_DATABASE_URL"] = self.database_url
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "modelseal", "keyserver", "serve", "--dev"]
        cmd += ["--port", str(self.port), "--workers", str(self.workers)]
        if self.cpus:
            cmd = ["taskset", "-c", self.cpus, *cmd]
        # The log goes to a file: a pipe nobody reads would fill with access lines and stall the server.
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=self.workdir, env=self.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError, ValueError):
                if http_json("GET", self.base + "/readyz")[0] == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after 60 s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def admin_token(self) -> str:
        return (self.workdir / "modelseal-keyserver" / "admin-token").read_text().strip()

    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.workdir / 'modelseal-keyserver' / 'keyserver.db'}"


@dataclass
class Fixture:
    licence_key: str
    aud_b64: str
    model_id: str
    key_commitment_b64: str
    devices: list[tuple[str, str, str]]  # (key file, device_id, fingerprint b64)


class _CapturingRecipient(KeyServerRecipient):
    """``KeyServerRecipient`` that keeps the stanza it registered (its key commitment names the key)."""

    stanza: dict[str, str] | None = None

    def wrap_for(self, content_key: bytes, **kwargs: Any) -> Any:
        self.stanza = dict(super().wrap_for(content_key, **kwargs))
        return self.stanza


def provision(server: Server, n_devices: int) -> Fixture:
    """Model, content key (sealed through ``KeyServerRecipient``), licence, and activated devices."""
    from modelseal._private.encoding import b64decode, b64encode
    from modelseal.keyserver.client import ACTIVATION_ROUTE, DeviceKey, activation_body

    base, token = server.base, server.admin_token()
    status, model = http_json("POST", base + "/v1/admin/models", token, {"name": "bench"})
    assert status == 201, (status, model)
    plain, sealed = server.workdir / "tiny.bin", server.workdir / "tiny.mseal"
    plain.write_bytes(os.urandom(4096))
    recipient = _CapturingRecipient(base, token, model["id"])
    modelseal.seal(plain, sealed, recipients=[recipient])
    assert [r["type"] for r in modelseal.inspect(sealed).recipients] == ["keyserver"]
    stanza = recipient.stanza
    assert stanza is not None
    policy = {
        "models": [model["id"]],
        "max_devices": n_devices,
        "expires_at": None,
        "opens_per_day": UNLIMITED_OPENS,
    }
    status, lic = http_json("POST", base + "/v1/admin/licences", token, {"label": "bench", "policy": policy})
    assert status == 201, (status, lic)
    licence_key = lic["licence_key"]
    status, info = http_json("GET", base + "/v1/server-info", licence_key)
    assert status == 200, (status, info)
    aud_b64 = next(k["kid"] for k in info["signing_keys"] if k["current"])
    keydir = server.workdir / "devices"

    def activate(i: int) -> tuple[str, str, str]:
        path = keydir / f"{i}.key"
        device, _ = DeviceKey.load_or_create(path)
        fp = os.urandom(32)
        body = activation_body(device, b64decode(aud_b64, length=8), fp, label=f"bench-{i}")
        headers = {"Modelseal-Signature": device.sign_request(ACTIVATION_ROUTE, body)}
        status, out = http_json("POST", base + ACTIVATION_ROUTE, licence_key, body, headers)
        if status != 201:
            raise RuntimeError(f"activation {i} failed: {status} {out}")
        return str(path), out["device_id"], b64encode(fp)

    with ThreadPoolExecutor(8) as pool:
        devices = list(pool.map(activate, range(n_devices)))
    return Fixture(licence_key, aud_b64, model["id"], stanza["key_commitment"], devices)


# --- the load generator (runs in its own processes) ---------------------------------------------


@dataclass
class Job:
    phase: str
    host: str
    port: int
    client: str  # raw | httpx
    clients: list[list[tuple[str, str, str]]]  # per client: its devices
    licence_key: str
    aud_b64: str
    model_id: str
    key_commitment_b64: str
    presign_per_client: int
    # open loop (rate is None: closed loop): arrival k is due at start + k/rate, on connection k % n_total;
    # arrivals k_lo <= k < k_hi are measured, none is due from k_hi on
    rate: float | None = None
    client_ids: list[int] = field(default_factory=list)  # global connection index of each of clients
    n_total: int = 0
    k_lo: int = 0
    k_hi: int = 0


@dataclass
class WorkerResult:
    ok: int = 0  # closed loop: 200s completed in the window; open loop: 200s to requests due in it
    ok_total: int = 0  # warm-up and the requests in flight at the end too
    latencies: list[float] = field(default_factory=list)
    # open loop only
    due: int = 0  # requests due in the measured window
    in_window: int = 0  # 200s completed inside the window (throughput)
    late: int = 0  # measured requests whose connection was still busy when they were due
    unfinished: int = 0  # measured requests never sent (the drain time ran out)
    start_lags: list[float] = field(default_factory=list)  # send minus due time, measured requests not late
    bad: Counter[str] = field(default_factory=Counter)  # measured window
    bad_warmup: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)
    cpu_s: float = 0.0  # this process, measured window
    signed_live: int = 0
    presign_s: float = 0.0


class RequestSource:
    """One client's requests: pre-signed grant requests for its devices, cycled, ts strictly increasing."""

    def __init__(self, job: Job, devices: list[tuple[str, str, str]]) -> None:
        self.job = job
        self.fixed: tuple[str, str, dict[str, str], bytes] | None = None
        self.pool: list[tuple[bytes, str]] = []
        self.next = 0
        if job.phase != "grant":
            headers = {"Authorization": f"Bearer {job.licence_key}"} if job.phase == "server-info" else {}
            self.fixed = ("GET", "/healthz" if job.phase == "healthz" else "/v1/server-info", headers, b"")
            return
        from modelseal._private.encoding import b64decode
        from modelseal.keyserver.client import DeviceKey, grant_body

        self._grant_body, self._b64decode = grant_body, b64decode
        self.keys = [(DeviceKey.load(Path(p)), dev, b64decode(fp, length=32)) for p, dev, fp in devices]
        self.aud = b64decode(job.aud_b64, length=8)
        self.kc = b64decode(job.key_commitment_b64, length=32)
        self.ts = time.time_ns() // 1000  # after every activation: above each device's last_request_us
        self.pool = [self._sign() for _ in range(job.presign_per_client)]
        self.pool.reverse()  # taken with pop(): oldest ts first
        self.live = 0

    def _sign(self) -> tuple[bytes, str]:
        key, device_id, fp = self.keys[self.next % len(self.keys)]
        self.next += 1
        self.ts = max(self.ts + 1, time.time_ns() // 1000 - 60_000_000)
        body = self._grant_body(self.aud, device_id, self.job.model_id, self.kc, fp, ts=self.ts)
        return body, key.sign_request(GRANT_ROUTE, body)

    def take(self) -> tuple[str, str, dict[str, str], bytes]:
        if self.fixed is not None:
            return self.fixed
        if self.pool:
            body, sig = self.pool.pop()
        else:
            body, sig = self._sign()
            self.live += 1
        headers = {
            "Authorization": f"Bearer {self.job.licence_key}",
            "Content-Type": "application/json",
            "Modelseal-Signature": sig,
        }
        return "POST", GRANT_ROUTE, headers, body


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client: the cheapest Python generator, so the server is what is measured."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if body:
            head += f"Content-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
            status = int(raw[9:12])
            lower = raw.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at < 0:
                raise ConnectionError("response without content-length")
            length = int(lower[at + 17 : lower.index(b"\r\n", at + 2)])
            data = await self.reader.readexactly(length)
        except BaseException:
            self.close()
            raise
        if b"\r\nconnection: close" in lower:
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _drive(job: Job, sources: list[RequestSource], times: tuple[float, float, float]) -> WorkerResult:
    start_at, measure_at, end_at = times
    result = WorkerResult()
    cpu_marks: list[float] = []

    def cpu_now() -> None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        cpu_marks.append(r.ru_utime + r.ru_stime)

    async def mark_cpu() -> None:
        await asyncio.sleep(max(0.0, measure_at - mono()))
        cpu_now()
        await asyncio.sleep(max(0.0, end_at - mono()))
        cpu_now()

    httpx_client = None
    if job.client == "httpx":
        import httpx

        n = len(sources)
        httpx_client = httpx.AsyncClient(
            base_url=f"http://{job.host}:{job.port}",
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            timeout=60,
        )

    async def send(conn: RawConnection, req: tuple[str, str, dict[str, str], bytes]) -> tuple[int, bytes]:
        method, path, headers, body = req
        try:
            if httpx_client is not None:
                r = await httpx_client.request(method, path, headers=headers, content=body or None)
                return r.status_code, r.content
            return await conn.request(method, path, headers, body)
        except Exception as exc:  # OSError, IncompleteReadError, httpx errors: all reported
            return 0, f"{type(exc).__name__}: {exc}".encode()

    async def count_error(status: int, data: bytes, measured: bool) -> None:
        key = str(status) if status else "connection-error"
        with contextlib.suppress(ValueError, KeyError, TypeError):
            key += " " + json.loads(data)["error"]["code"]
        (result.bad if measured else result.bad_warmup)[key] += 1
        if len(result.samples) < 5:
            result.samples.append(f"{key}: {data[:300].decode(errors='replace')}")
        if status == 0:
            await asyncio.sleep(0.01)

    async def one_client(source: RequestSource) -> None:
        conn = RawConnection(job.host, job.port)
        await asyncio.sleep(max(0.0, start_at - mono()))
        while True:
            req = source.take()
            t0 = mono()
            if t0 >= end_at:
                break
            status, data = await send(conn, req)
            t1 = mono()
            measured = measure_at <= t1 <= end_at
            if status == 200:
                result.ok_total += 1
                if measured:
                    result.ok += 1
                    result.latencies.append(t1 - t0)
                continue
            await count_error(status, data, measured)
        conn.close()

    async def one_client_open(source: RequestSource, index: int) -> None:
        """Connection ``index``: arrivals index, index + n_total, ...; latency from the due time."""
        assert job.rate is not None
        conn = RawConnection(job.host, job.port)
        drain_until = end_at + OPEN_DRAIN_S
        last_done = -math.inf
        for k in range(index, job.k_hi, job.n_total):
            due = start_at + k / job.rate
            measured = k >= job.k_lo
            req = source.take()  # before the wait: a request signed on the fly is signed off the clock
            now = mono()
            if now < due:
                await asyncio.sleep(due - now)
            t0 = mono()
            if t0 >= drain_until:
                left = sum(1 for j in range(k, job.k_hi, job.n_total) if j >= job.k_lo)
                result.unfinished += left
                result.due += left
                break
            if measured:
                result.due += 1
                if last_done > due:  # the connection was busy when this one was due: it starts late
                    result.late += 1
                else:  # the connection was free: any delay is the generator's own
                    result.start_lags.append(t0 - due)
            status, data = await send(conn, req)
            t1 = last_done = mono()
            if status == 200:
                result.ok_total += 1
                if measure_at <= t1 <= end_at:
                    result.in_window += 1
                if measured:
                    result.ok += 1
                    result.latencies.append(t1 - due)
                continue
            await count_error(status, data, measured)
        conn.close()

    if job.rate is None:
        clients = [one_client(s) for s in sources]
    else:
        clients = [one_client_open(s, i) for s, i in zip(sources, job.client_ids, strict=True)]
    await asyncio.gather(mark_cpu(), *clients)
    if httpx_client is not None:
        await httpx_client.aclose()
    result.cpu_s = cpu_marks[1] - cpu_marks[0]
    return result


def worker_main(job: Job, pipe: Any) -> None:
    try:
        t0 = time.perf_counter()
        sources = [RequestSource(job, devices) for devices in job.clients]
        presign_s = time.perf_counter() - t0
        pipe.send("ready")
        times = pipe.recv()
        result = asyncio.run(_drive(job, sources, times))
        result.presign_s = presign_s
        result.signed_live = sum(getattr(s, "live", 0) for s in sources)
        pipe.send(result)
    except BaseException as exc:
        pipe.send(RuntimeError(f"generator failed: {type(exc).__name__}: {exc}"))
        raise


# --- one phase ----------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def run_phase(
    phase: str, args: argparse.Namespace, server: Server, fixture: Fixture, extra_roots: list[int]
) -> dict[str, Any]:
    n_clients, procs = args.clients, min(args.gen_procs, args.clients)
    per_client = [fixture.devices[i::n_clients] for i in range(n_clients)]
    rate: float | None = args.rate
    # open loop: arrivals k_lo <= k < k_hi are due in the measured window (k is due at start + k/rate)
    k_lo = math.ceil(args.warmup * rate - 1e-9) if rate else 0
    k_hi = math.ceil((args.warmup + args.seconds) * rate - 1e-9) if rate else 0
    presign = 0
    if phase == "grant":
        if rate:  # exactly the arrivals a connection is due: k_hi in all, one in n_clients each
            presign = math.ceil(k_hi / n_clients)
        else:
            presign = math.ceil(args.presign_rate * (args.warmup + args.seconds) / n_clients)
    ctx = mp.get_context("spawn")
    workers = []
    for w in range(procs):
        job = Job(
            phase,
            "127.0.0.1",
            server.port,
            args.client,
            per_client[w::procs],
            fixture.licence_key,
            fixture.aud_b64,
            fixture.model_id,
            fixture.key_commitment_b64,
            presign,
            rate,
            list(range(n_clients))[w::procs],
            n_clients,
            k_lo,
            k_hi,
        )
        parent, child = ctx.Pipe()
        p = ctx.Process(target=worker_main, args=(job, child), daemon=True)
        p.start()
        if args.generator_cpus and p.pid is not None:
            os.sched_setaffinity(p.pid, {int(c) for c in args.generator_cpus.split(",")})
        workers.append((p, parent))
    try:
        for _, pipe in workers:
            msg = pipe.recv()
            if isinstance(msg, Exception):
                raise msg
        start_at = mono() + 0.3
        measure_at = start_at + args.warmup
        end_at = measure_at + args.seconds
        for _, pipe in workers:
            pipe.send((start_at, measure_at, end_at))
        gen_pids = [p.pid for p, _ in workers if p.pid is not None]
        assert server.proc is not None
        roots = [server.proc.pid]

        def snapshot() -> tuple[float, float, float, tuple[float, float]]:
            return tree_cpu(roots), tree_cpu(extra_roots), tree_cpu(gen_pids), machine_cpu()

        time.sleep(max(0.0, measure_at - mono()))
        s0 = snapshot()
        time.sleep(max(0.0, end_at - mono()))
        s1 = snapshot()
        results: list[WorkerResult] = []
        for _, pipe in workers:
            msg = pipe.recv()
            if isinstance(msg, Exception):
                raise msg
            results.append(msg)
    finally:
        for p, _ in workers:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    lat = sorted(x for r in results for x in r.latencies)
    ok = sum(r.ok for r in results)
    bad: Counter[str] = sum((r.bad for r in results), Counter())
    bad_warm: Counter[str] = sum((r.bad_warmup for r in results), Counter())
    seconds = args.seconds
    server_cpu, db_cpu = s1[0] - s0[0], s1[1] - s0[1]
    gen_cpu = s1[2] - s0[2]
    busy, total = s1[3][0] - s0[3][0], s1[3][1] - s0[3][1]
    ms = 1000.0
    lags = sorted(x for r in results for x in r.start_lags)
    open_loop: dict[str, Any] = {}
    if rate:
        open_loop = {
            "offered_rate": (k_hi - k_lo) / seconds,
            "due": sum(r.due for r in results),
            "throughput": sum(r.in_window for r in results) / seconds,
            "late": sum(r.late for r in results),
            "unfinished": sum(r.unfinished for r in results),
            "start_lag_p50_ms": percentile(lags, 0.50) * ms,
            "start_lag_p99_ms": percentile(lags, 0.99) * ms,
            "start_lag_max_ms": (lags[-1] if lags else math.nan) * ms,
        }
    return {
        "phase": phase,
        "mode": "open" if rate else "closed",
        "ok": ok,
        "ok_total": sum(r.ok_total for r in results),
        "rate": ok / seconds,
        **open_loop,
        "p50_ms": percentile(lat, 0.50) * ms,
        "p90_ms": percentile(lat, 0.90) * ms,
        "p99_ms": percentile(lat, 0.99) * ms,
        "max_ms": (lat[-1] if lat else math.nan) * ms,
        "mean_ms": (sum(lat) / len(lat) if lat else math.nan) * ms,
        "errors": dict(bad),
        "errors_warmup": dict(bad_warm),
        "error_samples": [s for r in results for s in r.samples][:5],
        "server_cpu_s": server_cpu,
        "db_cpu_s": db_cpu,
        "server_cpu_ms_per_req": (server_cpu + db_cpu) / ok * ms if ok else math.nan,
        "generator_cpu_s": gen_cpu,
        "generator_cpu_s_self_reported": sum(r.cpu_s for r in results),
        "generator_cpu_ms_per_req": gen_cpu / ok * ms if ok else math.nan,
        "machine_busy_s": busy,
        "machine_total_s": total,
        "other_cpu_s": max(0.0, busy - server_cpu - db_cpu - gen_cpu),
        "presign_s": max((r.presign_s for r in results), default=0.0),
        "signed_live": sum(r.signed_live for r in results),
    }


# --- one configuration --------------------------------------------------------------------------


def count_grant_records(url: str) -> int | None:
    """``grant.issued`` audit records: every 200 must have one (a response is sent only after commit)."""
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                q = sa.text("SELECT count(*) FROM audit_log WHERE event = 'grant.issued'")
                return int(conn.execute(q).scalar_one())
        finally:
            engine.dispose()
    except Exception as exc:
        log(f"  (could not count audit records: {type(exc).__name__}: {exc})")
        return None


def audit_verify(server: Server) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "modelseal", "keyserver", "audit-verify"]
    done = subprocess.run(cmd, cwd=server.workdir, env=server.env(), capture_output=True, text=True, timeout=600)
    return done.returncode, (done.stderr.strip().splitlines() or [""])[-1]


def run_config(
    backend: str, workers: int, args: argparse.Namespace, pg: PostgresServer | None, index: int
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"modelseal-bench-ks-{backend}-{workers}-"))
    url = pg.fresh_database() if pg is not None else None
    extra_env = dict(kv.split("=", 1) for kv in args.server_env)
    server = Server(work, workers, url, extra_env, args.server_cpus)
    out: dict[str, Any] = {"backend": backend, "workers": workers, "workdir": str(work)}
    try:
        log(f"[{backend}, {workers} worker(s)] starting the server in {work}")
        server.start()
        t0 = time.perf_counter()
        fixture = provision(server, args.devices)
        log(f"  set up: model, key, licence, {args.devices} devices activated in {time.perf_counter() - t0:.1f} s")
        extra_roots = [pg.pid()] if pg is not None else []
        out["phases"] = {}
        for phase in args.phases:
            loop = f"open loop at {args.rate:g}/s over" if args.rate else "closed loop,"
            log(f"  {phase}: {loop} {args.clients} clients, {args.warmup:g} s warm-up + {args.seconds:g} s measured")
            res = run_phase(phase, args, server, fixture, extra_roots)
            out["phases"][phase] = res
            errs = sum(res["errors"].values()) + sum(res["errors_warmup"].values())
            line = f"    {res['rate']:.0f}/s  p50 {res['p50_ms']:.1f} ms  p99 {res['p99_ms']:.1f} ms  non-200 {errs}"
            if args.rate:
                line += f"  late {res['late']}/{res['due']}  unfinished {res['unfinished']}"
                line += f"  throughput {res['throughput']:.0f}/s"
            log(line)
            if errs:
                log("    first errors: " + " | ".join(res["error_samples"]))
    finally:
        server.stop()
    text = server.log_path.read_text(errors="replace") if server.log_path.exists() else ""
    out["server_tracebacks"] = text.count("Traceback")
    out["server_internal_errors"] = text.count("internal error")
    if "grant" in args.phases:
        out["audit_grant_records"] = count_grant_records(server.effective_database_url())
        if not args.no_audit_verify:
            t0 = time.perf_counter()
            code, line = audit_verify(server)
            out["audit_verify"] = {"exit": code, "message": line, "seconds": time.perf_counter() - t0}
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return out


# --- report -------------------------------------------------------------------------------------


def f1(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def report(results: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any]) -> None:
    print()
    smoke = not args.server_cpus
    loop = (
        f"open loop at {args.rate:g} req/s over {args.clients} connections (latency from the due time)"
        if args.rate
        else f"{args.clients} closed-loop clients"
    )
    print(
        f"Key server load, {loop}, {args.warmup:g} s warm-up + {args.seconds:g} s "
        f"measured, generator: {min(args.gen_procs, args.clients)} process(es), {args.client} HTTP/1.1 client"
    )
    print(f"machine: {info['nproc']} CPU(s) ({info['cpu_model']}), load average at start {info['loadavg_start']}")
    if smoke:
        print(
            f"SMOKE MODE: the server and the load generator share the same {info['nproc']} core(s) (spec §17.4);"
            " the generator's and everyone else's CPU is shown per phase."
        )
    else:
        print(f"server pinned to CPUs {args.server_cpus}, generator to {args.generator_cpus or 'any'}")
    print()
    head = (
        f"{'backend':<9}{'W':>2} {'request':<12}{'req/s':>8}{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}{'max ms':>8}"
        f"{'non-200':>8}{'srv ms/req':>11}{'gen ms/req':>11}{'srv CPU%':>9}{'gen CPU%':>9}{'other%':>8}"
    )
    if args.rate:
        head += f"{'late':>7}{'unfin':>6}{'lag p99':>8}"
    print(head)
    print("-" * len(head))
    for r in results:
        for phase, p in r.get("phases", {}).items():
            errs = sum(p["errors"].values())
            print(
                f"{r['backend']:<9}{r['workers']:>2} {phase:<12}{p['rate']:>8.0f}{f1(p['p50_ms']):>8}"
                f"{f1(p['p90_ms']):>8}{f1(p['p99_ms']):>8}{f1(p['max_ms']):>8}{errs:>8}"
                f"{p['server_cpu_ms_per_req']:>11.2f}{p['generator_cpu_ms_per_req']:>11.2f}"
                f"{(p['server_cpu_s'] + p['db_cpu_s']) / args.seconds * 100:>9.0f}"
                f"{p['generator_cpu_s'] / args.seconds * 100:>9.0f}{p['other_cpu_s'] / args.seconds * 100:>8.0f}"
                + (f"{p['late']:>7}{p['unfinished']:>6}{f1(p['start_lag_p99_ms']):>8}" if "late" in p else "")
            )
    print(
        "  srv ms/req: server CPU per request (uvicorn processes, plus PostgreSQL's for postgres);"
        " CPU% is of one core (200% = 2 cores busy); other% = machine busy minus server and generator."
    )
    if args.rate:
        print(
            "  open loop: req/s = 200 responses to the requests due in the window, per second; latency from the"
            " due time; late = due while its connection was still busy; unfin = never sent (drain ran out);"
            " lag p99 = send time minus due time of the requests not late (the generator's own delay), ms."
        )
    print()
    head = (
        f"{'backend':<9}{'W':>2} {'grants/s':>9}{'p99 ms':>8}{'errors':>7}"
        f"  {'healthz/s':>9}{'p99 ms':>8}{'ratio':>7}  {'info/s':>7}{'p99 ms':>8}{'ratio':>7}  target"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        ph = r.get("phases", {})
        g = ph.get("grant")
        if g is None:
            continue
        errors = sum(g["errors"].values()) + sum(g["errors_warmup"].values())
        cells = ""
        for base in ("healthz", "server-info"):
            b = ph.get(base)
            if b is None:
                cells += f"  {'-':>{9 if base == 'healthz' else 7}}{'-':>8}{'-':>7}"
                continue
            ratio = g["rate"] / b["rate"] if b["rate"] else math.nan
            cells += f"  {b['rate']:>{9 if base == 'healthz' else 7}.0f}{f1(b['p99_ms']):>8}{ratio:>7.2f}"
        if r["backend"] == "sqlite":
            met = g["rate"] >= TARGET_GRANTS_S and g["p99_ms"] <= TARGET_P99_MS and not errors
            met = met and not g.get("unfinished")
            verdict = ("meets" if met else "misses") + f" >={TARGET_GRANTS_S:.0f}/s & p99<={TARGET_P99_MS:.0f} ms"
            if g.get("mode") == "open":
                verdict += f" (open loop at {g['offered_rate']:.0f}/s"
            else:
                verdict += " (closed loop: Little's law bounds p99 from below, use --rate"
            verdict += ", smoke)" if smoke else ")"
        else:
            verdict = "reported, no target"
        print(f"{r['backend']:<9}{r['workers']:>2} {g['rate']:>9.0f}{f1(g['p99_ms']):>8}{errors:>7}{cells}  {verdict}")
    print("  ratio = grants/s divided by that request's req/s on the same server, clients and generator.")
    for r in results:
        if r.get("failed"):
            print(f"  {r['backend']}, {r['workers']} worker(s): FAILED: {r['failed'].strip().splitlines()[-1]}")
            continue
        notes = []
        g = r.get("phases", {}).get("grant")
        if g is not None:
            notes.append(f"{g['ok']} grants measured, pre-signing took {g['presign_s']:.1f} s")
            if g.get("mode") == "open":
                notes.append(
                    f"open loop: {g['due']} grants due in the window ({g['offered_rate']:.0f}/s offered),"
                    f" {g['late']} started late, {g['unfinished']} unfinished,"
                    f" {g['throughput']:.0f}/s completed inside the window,"
                    f" generator start lag p50 {f1(g['start_lag_p50_ms'])} / p99 {f1(g['start_lag_p99_ms'])}"
                    f" / max {f1(g['start_lag_max_ms'])} ms"
                )
            if g["signed_live"]:
                notes.append(f"{g['signed_live']} requests signed during the run (pool ran out)")
            if r.get("audit_grant_records") is not None:
                same = "=" if r["audit_grant_records"] == g["ok_total"] else "!= (BUG)"
                notes.append(f"{r['audit_grant_records']} grant.issued records {same} {g['ok_total']} grants sent")
        if "audit_verify" in r:
            av = r["audit_verify"]
            notes.append(f"audit-verify exit {av['exit']} ({av['message']}, {av['seconds']:.1f} s)")
        if r.get("server_tracebacks"):
            notes.append(f"SERVER LOG HAS {r['server_tracebacks']} TRACEBACK(S)")
        for phase, p in r.get("phases", {}).items():
            if p["errors"] or p["errors_warmup"]:
                notes.append(f"{phase} non-200: {p['errors']} (warm-up {p['errors_warmup']})")
        print(f"  {r['backend']}, {r['workers']} worker(s): " + "; ".join(notes))


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "modelseal": modelseal.__version__,
        "loadavg_start": tuple(round(x, 2) for x in os.getloadavg()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("sqlite", "postgres", "all"), default="all")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="server worker counts (default 1 2)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent keep-alive connections (default 64)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per phase (default 10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per phase, excluded (default 3)")
    parser.add_argument("--devices", type=int, help="activated devices, cycled by the clients (default = --clients)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument(
        "--rate",
        type=float,
        help="open loop: requests/s in total, on a fixed schedule, every phase (default: closed loop)",
    )
    parser.add_argument("--gen-procs", type=int, default=2, help="load generator processes (default 2)")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw", help="generator HTTP client")
    parser.add_argument(
        "--presign-rate",
        type=float,
        default=3000.0,
        help="closed loop: grant requests pre-signed per second of run (default 3000; open loop: --rate)",
    )
    parser.add_argument("--server-cpus", help="taskset -c list for the server, e.g. 0,1 (default: not pinned)")
    parser.add_argument("--generator-cpus", help="CPU list for the generator processes, e.g. 2-15 as 2,3,4")
    parser.add_argument("--server-env", action="append", default=[], help="extra MODELSEAL_KS_X=V for the server")
    parser.add_argument("--no-audit-verify", action="store_true", help="skip audit-verify after the grant phase")
    parser.add_argument("--keep", action="store_true", help="keep the server's temp dirs (logs, databases)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.devices = args.devices or args.clients
    if args.rate is not None and not (math.isfinite(args.rate) and args.rate > 0):
        parser.error("--rate must be a positive number of requests per second")
    if args.devices < args.clients:
        parser.error("--devices must be at least --clients (each client owns its devices)")
    if "grant" in args.phases and args.phases[-1] != "grant":
        args.phases = [p for p in args.phases if p != "grant"] + ["grant"]

    backends = ["sqlite", "postgres"] if args.backend == "all" else [args.backend]
    info = machine_info()
    results: list[dict[str, Any]] = []
    pg: PostgresServer | None = None
    try:
        for b_index, backend in enumerate(backends):
            if backend == "postgres":
                found = pgbin()
                if found is None:
                    if args.backend == "postgres":
                        log("error: PostgreSQL binaries not found (make sysdeps installs them)")
                        return 2
                    log("PostgreSQL binaries not found: postgres skipped (make sysdeps installs them)")
                    continue
                # Not under a 0700 root-owned tree: the postgres user must reach its directory.
                pg = PostgresServer(Path(tempfile.mkdtemp(prefix="modelseal-bench-pg-")), found)
                log(f"starting PostgreSQL from {found} in {pg.root}")
                pg.start()
            for workers in args.workers:
                try:
                    results.append(run_config(backend, workers, args, pg if backend == "postgres" else None, b_index))
                except Exception as exc:  # report what ran; this configuration is marked failed
                    log(f"[{backend}, {workers} worker(s)] FAILED: {type(exc).__name__}: {exc}")
                    results.append({"backend": backend, "workers": workers, "phases": {}, "failed": str(exc)})
    finally:
        if pg is not None:
            if (pg.data / "postmaster.pid").exists():
                pg.stop()
            shutil.rmtree(pg.root, ignore_errors=True)
    report(results, args, info)
    if args.json:
        args.json.write_text(
            json.dumps({"machine": info, "args": vars(args), "results": results}, indent=2, default=str)
        )
        log(f"wrote {args.json}")
    bad = any(
        sum(p["errors"].values()) + sum(p["errors_warmup"].values()) for r in results for p in r["phases"].values()
    ) or any(r.get("failed") or r.get("server_tracebacks") or r.get("audit_verify", {}).get("exit") for r in results)
    bad = bad or any(
        r.get("audit_grant_records") not in (None, r["phases"]["grant"]["ok_total"])
        for r in results
        if "grant" in r["phases"]
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
