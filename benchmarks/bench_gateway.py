#!/usr/bin/env python3
"""Gateway overhead (docs/spec/gateway-v1.md §9, ``make bench-gateway``): ``modelseal serve`` against a
bare FastAPI + ONNX Runtime endpoint serving the same model, in the same run, same load generator.

Target (issue 6): added p50 latency <= 1 ms and throughput >= 0.8x the bare endpoint, with the
monitor and the output policies on; the monitor's cost per query must not grow with the number of
past queries.

Set-up, in a temp dir (removed at the end):

- the digits MLP of ``modelseal.lab`` (trained for ``--epochs``, seed 0), exported to ONNX with a
  dynamic batch axis; the gateway serves it sealed to a passphrase, the bare endpoint the plaintext
  ``.onnx``;
- **bare**: a FastAPI app written the idiomatic way (a pydantic ``Req`` with ``inputs: list[...]``,
  ``session.run`` inline in an ``async def`` route, softmax, a dict returned as JSON), on uvicorn with
  the options ``modelseal serve`` uses: 1 worker, uvloop, httptools, no access log (with
  ``--workers N``, the same worker layout as ``modelseal serve``: a listening socket per worker with
  ``SO_REUSEPORT``; ``--bare-shared-socket`` gives it uvicorn's own ``--workers`` instead);
- **gateway**: ``modelseal serve`` with 1 worker, the monitor on (a ``Reference`` fitted on the
  training split, thresholds calibrated on 100 simulated benign clients drawn from the test split),
  tracing at 1%, and a tier with the policy chain ``top_k:3, round:3, noise:0.01, coverage`` and
  quotas too large to refuse anything (they are still counted); API keys made with
  ``modelseal gateway key create``.

Load: a closed loop in a separate process (so it does not share the servers' GIL) with raw asyncio
HTTP/1.1 keep-alive connections, ``--concurrency`` of them, each sending its next request as soon as
the last one is answered; ``--warmup`` s excluded, ``--duration`` s measured; latency per request
from the client. Request bodies are JSON ``{"inputs": [...]}`` of ``--batches`` rows each, cut from
simulated benign clients' streams over the test split (256 distinct bodies per batch size, cycled),
the same bytes for both sides. Bare and gateway runs alternate, ``--rounds`` rounds with the order
reversed every round, so drift on a noisy machine hits both; each round gives one ratio
(gateway / bare), and the medians over rounds are reported.

Two loads per batch size: ``--concurrency`` (throughput at saturation) and concurrency 1 (latency at
low load). At saturation a closed loop's latency is queueing (concurrency / throughput), so the
added p50 there mostly restates the throughput ratio; the low-load added p50 is the gateway's own
added time per request, and it is what the latency target is judged on. Both are printed.

Growth check: a second, fresh API key is measured (batch 1, ``--concurrency``), then sent
``--prior-rows`` rows (256 per request), then measured again, each time next to a bare run. Equal
numbers before and after (within noise) mean the per-key cost does not grow with history; the
monitor's worst-case work per query (``Monitor.work_per_query()``) is printed too.

Every non-200 answer in a measured window is counted and printed (there should be none). Each run
also prints the server's CPU time per request (from /proc; ONNX Runtime's spinning intra-op threads
included, on both sides), the generator's share of the machine's CPU, and "others": the share used by
everything else on the machine (other people's work on a shared machine): a run where it exceeds 10%
is marked "(busy machine)" and a warning is printed, since its numbers measure the contention. The
gateway's own counters (``/metrics``) are printed at the end. The exit status is 1 when a target is
missed or any answer was not 200.

Usage::

    .venv/bin/python benchmarks/bench_gateway.py                # about 6 minutes on 2 cores
    .venv/bin/python benchmarks/bench_gateway.py --quick        # smoke check, about 1 minute
    .venv/bin/python benchmarks/bench_gateway.py --concurrency 16 --batches 1 8 32 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

TARGET_ADDED_P50_MS = 1.0
TARGET_THROUGHPUT_RATIO = 0.8
POLICY = ("top_k:3", "round:3", "noise:0.01", "coverage")
TRACE_RATE = 0.01
PASSPHRASE_ENV = "MODELSEAL_BENCH_GATEWAY_PASSPHRASE"
GENEROUS = 10**15  # quota windows that never refuse (rows are still counted)
BODIES_PER_BATCH = 256
PRIOR_BATCH = 256  # rows per request when sending the growth check's prior queries
CALIBRATION_STREAMS = 100
BUSY_MACHINE = 0.10  # a run where other work used more than this share of the machine's CPU is flagged
CLK_TCK = os.sysconf("SC_CLK_TCK")
MS = 1000.0

BARE_APP = '''"""Bare FastAPI + ONNX Runtime endpoint: the baseline of benchmarks/bench_gateway.py (generated)."""

import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel

session = ort.InferenceSession(os.environ["BENCH_BARE_MODEL"])
input_name = session.get_inputs()[0].name
app = FastAPI()


class Req(BaseModel):
    inputs: {input_type}


@app.post("/predict")
async def predict(req: Req):
    x = np.asarray(req.inputs, dtype=np.float32)
    logits = session.run(None, {{input_name: x}})[0]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)
    return {{"labels": probs.argmax(axis=1).tolist(), "scores": probs.tolist()}}


@app.get("/healthz")
async def healthz():
    return {{"status": "ok"}}


def make_app():
    return app
'''

# --workers N > 1: the bare side gets the same worker layout as `modelseal serve` (a listening socket
# per worker, SO_REUSEPORT), so both sides spread their connections over their workers alike
BARE_WORKERS = """import sys

from modelseal.gateway.workers import serve_workers

if __name__ == "__main__":  # the workers are spawned: they import this file again
    serve_workers("bare_app:make_app", host="127.0.0.1", port=int(sys.argv[1]), workers=int(sys.argv[2]),
                  options={{"loop": "uvloop", "http": "httptools", "access_log": False, "log_level": "info"}})
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mono() -> float:
    """CLOCK_MONOTONIC: one clock for every process of the run (Linux)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


# --- CPU accounting (/proc) -------------------------------------------------------------------


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and its descendants (exited children count through cutime)."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                raw = fh.read()
        except OSError:
            continue
        fields = raw[raw.rindex(b")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / CLK_TCK)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo, seen = 0.0, [root], set()
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
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / CLK_TCK, sum(values[:8]) / CLK_TCK


# --- the load generator (its own process) -------------------------------------------------------


@dataclass
class Job:
    port: int
    requests: list[bytes]  # whole HTTP requests (head and body), cycled
    concurrency: int


@dataclass
class GenResult:
    ok: int = 0  # 200s completed inside the measured window
    latencies: list[float] = field(default_factory=list)
    bad: Counter[str] = field(default_factory=Counter)  # non-200 or connection errors, measured window
    bad_warmup: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)
    cpu_s: float = 0.0  # the generator's CPU in the measured window


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    raw = await reader.readuntil(b"\r\n\r\n")
    status = int(raw[9:12])
    lower = raw.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        raise ConnectionError("response without content-length")
    length = int(lower[at + 17 : lower.index(b"\r\n", at + 2)])
    body = await reader.readexactly(length)
    return status, body, b"\r\nconnection: close" in lower


async def _drive(job: Job, times: tuple[float, float, float]) -> GenResult:
    start_at, measure_at, end_at = times
    result = GenResult()
    cpu_marks: list[float] = []

    def cpu_now() -> None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        cpu_marks.append(r.ru_utime + r.ru_stime)

    async def mark_cpu() -> None:
        await asyncio.sleep(max(0.0, measure_at - mono()))
        cpu_now()
        await asyncio.sleep(max(0.0, end_at - mono()))
        cpu_now()

    def count_error(key: str, data: bytes, measured: bool) -> None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            key += " " + json.loads(data)["error"]["code"]
        (result.bad if measured else result.bad_warmup)[key] += 1
        if len(result.samples) < 5:
            result.samples.append(f"{key}: {data[:300].decode(errors='replace')}")

    async def one_client(index: int) -> None:
        n = len(job.requests)
        i = index * n // job.concurrency  # connections start at different bodies
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        await asyncio.sleep(max(0.0, start_at - mono()))
        while True:
            t0 = mono()
            if t0 >= end_at:
                break
            request = job.requests[i % n]
            i += 1
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", job.port)
                assert reader is not None
                writer.write(request)
                status, data, close = await _read_response(reader)
            except Exception as exc:  # OSError, IncompleteReadError...: reported, then reconnect
                t1 = mono()
                if writer is not None:
                    writer.close()
                reader = writer = None
                count_error("connection-error", f"{type(exc).__name__}: {exc}".encode(), measure_at <= t1 <= end_at)
                await asyncio.sleep(0.01)
                continue
            t1 = mono()
            if close and writer is not None:
                writer.close()
                reader = writer = None
            measured = measure_at <= t1 <= end_at
            if status == 200:
                if measured:
                    result.ok += 1
                    result.latencies.append(t1 - t0)
            else:
                count_error(str(status), data, measured)
        if writer is not None:
            writer.close()

    await asyncio.gather(mark_cpu(), *(one_client(c) for c in range(job.concurrency)))
    result.cpu_s = cpu_marks[1] - cpu_marks[0]
    return result


def generator_main(job: Job, pipe: Any) -> None:
    try:
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        pipe.send("ready")
        times = pipe.recv()
        pipe.send(asyncio.run(_drive(job, times)))
    except BaseException as exc:
        pipe.send(RuntimeError(f"generator failed: {type(exc).__name__}: {exc}"))
        raise


# --- the servers --------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    cmd: list[str]
    cwd: Path
    env: dict[str, str]
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.cwd / f"{self.name}.log"

    def start(self) -> None:
        # The log goes to a file: a pipe nobody reads would fill and stall the server.
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.cmd, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.log_tail()}")
            with (
                contextlib.suppress(OSError, ValueError),
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after 120 s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def http_request(port: int, path: str, body: bytes | None = None, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# --- set-up -------------------------------------------------------------------------------------


@dataclass
class Fixture:
    workdir: Path
    onnx_path: Path
    sealed_path: Path
    config_path: Path
    input_shape: tuple[int, ...]
    accuracy: float
    thresholds: dict[str, float]
    work_per_query: int | None
    bodies: dict[int, list[bytes]]  # batch size -> JSON bodies
    prior_rows: np.ndarray  # source rows for the growth check's prior queries
    timings: dict[str, float]


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "inf" if value == math.inf else "-inf" if value == -math.inf else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _body(rows: np.ndarray) -> bytes:
    # 4 decimals: the digits pixels are multiples of 1/16; the simulated noise needs no more
    return json.dumps({"inputs": np.round(rows.astype(np.float64), 4).tolist()}, separators=(",", ":")).encode()


def build_fixture(workdir: Path, args: argparse.Namespace) -> Fixture:
    import warnings

    import torch

    import modelseal
    from modelseal.gateway import monitor as gm
    from modelseal.lab import data, models

    timings: dict[str, float] = {}
    t = time.perf_counter()
    torch.manual_seed(0)
    ds = data.load_dataset("digits")
    model = models.train(
        models.build("mlp", ds.input_shape, ds.num_classes, seed=0), ds.x_train, ds.y_train, epochs=args.epochs
    )
    accuracy = float((models.predict(model, ds.x_test) == ds.y_test).mean())
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    onnx_path, sealed_path = workdir / "digits.onnx", workdir / "digits.mseal"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, *ds.input_shape),),
            str(onnx_path),
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    passphrase = os.environ[PASSPHRASE_ENV]
    modelseal.seal(onnx_path, sealed_path, recipients=[modelseal.PassphraseRecipient(passphrase)])
    timings["export+seal"] = time.perf_counter() - t

    # The monitor: a reference fitted on the owner's training split, thresholds calibrated on benign
    # clients of the test split (as benchmarks/monitor_calibration.py does).
    t = time.perf_counter()
    reference = gm.Reference.fit(ds.x_train, seed=0)
    reference_path = workdir / "monitor-reference.npz"
    reference.save(reference_path)
    streams = [
        gm.simulate_benign(
            ds.x_test, ds.y_test, seed=1000 + i, feature_low=ds.feature_low, feature_high=ds.feature_high
        )
        for i in range(CALIBRATION_STREAMS)
    ]
    thresholds = gm.calibrate(reference, streams).to_dict()
    mon = gm.Monitor(reference, thresholds=gm.Thresholds.from_dict(thresholds))
    work = getattr(mon, "work_per_query", None)
    work_per_query = int(work()) if callable(work) else None
    timings["monitor fit+calibrate"] = time.perf_counter() - t

    config = {
        "data_dir": "gateway-data",
        "workers": args.workers,
        "trace_rate": TRACE_RATE,
        "metrics_public": True,  # the counters are read at the end
    }
    lines = [f"{k} = {_toml_value(v)}" for k, v in config.items()]
    lines += [
        "",
        "[model]",
        f"path = {_toml_value(sealed_path.name)}",
        f"passphrase_env = {_toml_value(PASSPHRASE_ENV)}",
    ]
    lines += ["", "[monitor]", 'reference = "monitor-reference.npz"', f"thresholds = {_toml_value(thresholds)}"]
    lines += ["", "[tiers.default]"]
    lines += [f"{k} = {GENEROUS}" for k in ("per_minute", "per_day", "total")]
    lines += [f"policy = {_toml_value(list(POLICY))}", 'on_alert = "alert"', ""]
    config_path = workdir / "gateway.toml"
    config_path.write_text("\n".join(lines), encoding="utf-8")

    # Request bodies: benign clients' streams over the test split, cut into batches.
    bodies: dict[int, list[bytes]] = {}
    for b in args.batches:
        rows = np.concatenate(
            [
                gm.simulate_benign(
                    ds.x_test,
                    ds.y_test,
                    seed=5000 + 97 * b + s,
                    queries=b * BODIES_PER_BATCH // 8,
                    feature_low=ds.feature_low,
                    feature_high=ds.feature_high,
                )
                for s in range(8)
            ]
        )
        bodies[b] = [_body(rows[i * b : (i + 1) * b]) for i in range(BODIES_PER_BATCH)]
    return Fixture(
        workdir=workdir,
        onnx_path=onnx_path,
        sealed_path=sealed_path,
        config_path=config_path,
        input_shape=tuple(ds.input_shape),
        accuracy=accuracy,
        thresholds=thresholds,
        work_per_query=work_per_query,
        bodies=bodies,
        prior_rows=np.concatenate([ds.x_train, ds.x_pool]),
        timings=timings,
    )


def modelseal_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "modelseal"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "modelseal"]


def create_key(fx: Fixture, name: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [*modelseal_cmd(), "gateway", "key", "create", name, "--config", str(fx.config_path)],
        cwd=fx.workdir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"key create failed ({out.returncode}): {out.stderr}")
    token = out.stdout.strip().splitlines()[-1]
    if not token.startswith("msk_"):
        raise RuntimeError(f"unexpected key create output: {out.stdout!r}")
    return token


def request_bytes(port: int, path: str, body: bytes, token: str | None) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


# --- one measured run ---------------------------------------------------------------------------


@dataclass
class Run:
    side: str
    batch: int
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    ok: int
    errors: dict[str, int]
    errors_warmup: dict[str, int]
    samples: list[str]
    server_cpu_ms: float  # server CPU per request
    gen_cpu_share: float  # generator CPU / machine CPU in the window
    machine_busy: float  # share of all cores busy in the window
    others_share: float  # CPU of everything else on the machine (other sessions' work) / machine CPU


def measure(
    server: Server, requests: list[bytes], side: str, batch: int, concurrency: int, args: argparse.Namespace
) -> Run:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=generator_main, args=(Job(server.port, requests, concurrency), child), daemon=True)
    proc.start()
    assert server.proc is not None
    try:
        msg = parent.recv()
        if isinstance(msg, Exception):
            raise msg
        start_at = mono() + 0.2
        measure_at, end_at = start_at + args.warmup, start_at + args.warmup + args.duration
        parent.send((start_at, measure_at, end_at))
        time.sleep(max(0.0, measure_at - mono()))
        cpu0, m0 = tree_cpu(server.proc.pid), machine_cpu()
        time.sleep(max(0.0, end_at - mono()))
        cpu1, m1 = tree_cpu(server.proc.pid), machine_cpu()
        result = parent.recv()
        if isinstance(result, Exception):
            raise result
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    lat = sorted(result.latencies)
    busy, total = m1[0] - m0[0], m1[1] - m0[1]
    ok = result.ok
    return Run(
        side=side,
        batch=batch,
        concurrency=concurrency,
        rps=ok / args.duration,
        p50_ms=percentile(lat, 0.50) * MS,
        p99_ms=percentile(lat, 0.99) * MS,
        mean_ms=(sum(lat) / len(lat) if lat else math.nan) * MS,
        ok=ok,
        errors=dict(result.bad),
        errors_warmup=dict(result.bad_warmup),
        samples=result.samples,
        server_cpu_ms=(cpu1 - cpu0) / ok * MS if ok else math.nan,
        gen_cpu_share=result.cpu_s / total if total > 0 else math.nan,
        machine_busy=busy / total if total > 0 else math.nan,
        others_share=max(0.0, busy - (cpu1 - cpu0) - result.cpu_s) / total if total > 0 else math.nan,
    )


def fmt_run(r: Run) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "0"
    return (
        f"  {r.side:<8} b={r.batch:<3} c={r.concurrency:<3} {r.rps:8.1f} req/s  p50 {r.p50_ms:7.3f} ms  "
        f"p99 {r.p99_ms:7.3f} ms  server CPU {r.server_cpu_ms:6.3f} ms/req  "
        f"generator {r.gen_cpu_share:4.0%}  others {r.others_share:4.0%}  non-200 {errors}"
        + ("  (busy machine)" if r.others_share > BUSY_MACHINE else "")
    )


@dataclass
class Condition:
    batch: int
    concurrency: int
    bare: list[Run] = field(default_factory=list)
    gateway: list[Run] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        pairs = list(zip(self.bare, self.gateway, strict=True))
        return {
            "bare_rps": statistics.median(r.rps for r in self.bare),
            "gateway_rps": statistics.median(r.rps for r in self.gateway),
            "bare_p50": statistics.median(r.p50_ms for r in self.bare),
            "gateway_p50": statistics.median(r.p50_ms for r in self.gateway),
            "bare_p99": statistics.median(r.p99_ms for r in self.bare),
            "gateway_p99": statistics.median(r.p99_ms for r in self.gateway),
            "bare_cpu": statistics.median(r.server_cpu_ms for r in self.bare),
            "gateway_cpu": statistics.median(r.server_cpu_ms for r in self.gateway),
            "added_p50": statistics.median(g.p50_ms - b.p50_ms for b, g in pairs),
            "added_p50_min": min(g.p50_ms - b.p50_ms for b, g in pairs),
            "added_p50_max": max(g.p50_ms - b.p50_ms for b, g in pairs),
            "ratio": statistics.median(g.rps / b.rps for b, g in pairs),
            "ratio_min": min(g.rps / b.rps for b, g in pairs),
            "ratio_max": max(g.rps / b.rps for b, g in pairs),
            "errors": sum(sum(r.errors.values()) for r in self.bare + self.gateway),
        }


def send_prior(port: int, token: str, rows: np.ndarray, total: int, seed: int) -> tuple[int, float, Counter[str]]:
    """``total`` rows in requests of PRIOR_BATCH, one keep-alive connection; (rows answered, seconds, errors)."""
    rng = np.random.default_rng(seed)
    low, high = rows.min(axis=0), rows.max(axis=0)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    done, errors = 0, Counter[str]()
    t0 = time.perf_counter()
    try:
        while done < total:
            n = min(PRIOR_BATCH, total - done)
            picked = rows[rng.integers(0, len(rows), n)]
            noisy = np.clip(picked + rng.normal(0, 0.03, picked.shape) * (high - low), low, high)
            conn.request("POST", "/v1/predict", body=_body(noisy), headers=headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors[str(resp.status)] += 1
            done += n
    finally:
        conn.close()
    return done, time.perf_counter() - t0, errors


def gateway_counters(port: int) -> dict[str, float]:
    status, body = http_request(port, "/metrics")
    if status != 200:
        return {}
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line.startswith("modelseal_gateway_") and not line.startswith("modelseal_gateway_request_seconds"):
            name, _, value = line.rpartition(" ")
            if "_created" not in name:
                out[name] = float(value)
    return out


# --- the run ------------------------------------------------------------------------------------


def machine_lines(args: argparse.Namespace) -> list[str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "-"

    commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        root = Path(__file__).resolve().parents[1]
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    pkgs = ("modelseal", "onnxruntime", "fastapi", "starlette", "uvicorn", "uvloop", "httptools", "pydantic", "numpy")
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    with contextlib.suppress(ValueError):
        argv[0] = os.path.relpath(argv[0]) if not os.path.relpath(argv[0]).startswith("..") else argv[0]
    return [
        f"command: {shlex.join(argv)}",
        f"machine: {os.cpu_count()} CPUs ({model}), {platform.platform()}",
        f"python {platform.python_version()}; " + ", ".join(f"{p} {version(p)}" for p in pkgs),
        f"commit {commit}; load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"settings: concurrency {args.concurrency} (and 1 for low-load latency), batches {args.batches}, "
        f"{args.rounds} rounds, {args.warmup:g} s warm-up + {args.duration:g} s measured per run, "
        f"prior rows {args.prior_rows}",
    ]


def run(args: argparse.Namespace) -> int:
    args.head = machine_lines(args)
    for line in args.head:
        print(line)
    print(flush=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSEAL")}
    env[PASSPHRASE_ENV] = os.urandom(16).hex()
    os.environ[PASSPHRASE_ENV] = env[PASSPHRASE_ENV]
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        workdir = Path(tmp)
        try:
            return _run(args, workdir, env, servers)
        finally:
            for s in servers:
                s.stop()


def _run(args: argparse.Namespace, workdir: Path, env: dict[str, str], servers: list[Server]) -> int:
    log("training, exporting and sealing the digits MLP; fitting and calibrating the monitor...")
    fx = build_fixture(workdir, args)
    rank = len(fx.input_shape)
    (workdir / "bare_app.py").write_text(
        BARE_APP.format(input_type="list[" * (rank + 1) + "float" + "]" * (rank + 1)), encoding="utf-8"
    )
    token = create_key(fx, "bench", env)
    # --keys N: the gateway's requests go through N keys in turn (one client per key when N equals
    # the concurrency), so coalesced requests belong to different keys, as from different customers
    tokens = [token] + [create_key(fx, f"bench-{i}", env) for i in range(1, args.keys)]
    growth_token = create_key(fx, "growth", env)

    bare_port, gw_port = free_port(), free_port()
    bare_cmd = [sys.executable, "-m", "uvicorn", "bare_app:app", "--app-dir", str(workdir), "--host", "127.0.0.1"]
    uvicorn_opts = ["--workers", str(args.workers), "--loop", "uvloop", "--http", "httptools", "--no-access-log"]
    bare_env = {**env, "BENCH_BARE_MODEL": str(fx.onnx_path)}
    if args.workers > 1 and not args.bare_shared_socket:
        (workdir / "bare_workers.py").write_text(BARE_WORKERS.format(), encoding="utf-8")
        bare_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(workdir), env.get("PYTHONPATH")]))
        bare_argv = [sys.executable, str(workdir / "bare_workers.py"), str(bare_port), str(args.workers)]
    else:
        bare_argv = [*bare_cmd, "--port", str(bare_port), *uvicorn_opts, "--log-level", "info"]
    bare = Server("bare", bare_argv, workdir, bare_env, bare_port)
    serve_cmd = [*modelseal_cmd(), "serve", str(fx.sealed_path), "--config", str(fx.config_path)]
    gateway = Server(
        "gateway",
        [*serve_cmd, "--port", str(gw_port), "--passphrase-env", PASSPHRASE_ENV],
        workdir,
        env,
        gw_port,
    )
    for s in (bare, gateway):
        servers.append(s)
        t = time.perf_counter()
        s.start()
        fx.timings[f"{s.name} start"] = time.perf_counter() - t

    print(f"model: digits MLP (modelseal.lab, hidden 128-128), input {list(fx.input_shape)} per row, 10 classes; "
          f"test accuracy {fx.accuracy:.3f}")  # fmt: skip
    if args.workers == 1:
        layout = "1 worker"
    elif args.bare_shared_socket:
        layout = "uvicorn --workers: one socket shared by the workers"
    else:
        layout = "a listening socket per worker, as modelseal serve"
    print(f"bare:    {shlex.join(bare.cmd)}")
    print(f"         (cwd: temp dir; app: pydantic Req, session.run inline, dict -> JSON; {layout})")
    print(f"gateway: {shlex.join(gateway.cmd)}")
    print(f"gateway config: {fx.config_path.name}")
    for line in fx.config_path.read_text().splitlines():
        print(f"    {line}")
    wpq = "n/a" if fx.work_per_query is None else f"{fx.work_per_query:,} multiply-adds (worst case, constant)"
    print(f"monitor: work per query {wpq}")
    print(f"API keys: {len(tokens)} (the gateway's requests go through them in turn)")
    print("set-up: " + ", ".join(f"{k} {v:.1f} s" for k, v in fx.timings.items()))

    # Sanity: both sides answer the same body, labels agree except for traced answers.
    b0 = max(fx.bodies)
    s_bare, a_bare = http_request(bare.port, "/predict", fx.bodies[b0][0])
    s_gw, a_gw = http_request(gateway.port, "/v1/predict", fx.bodies[b0][0], token)
    if s_bare != 200 or s_gw != 200:
        raise RuntimeError(f"sanity request failed: bare {s_bare} {a_bare[:300]!r}, gateway {s_gw} {a_gw[:300]!r}")
    ans_bare, ans_gw = json.loads(a_bare), json.loads(a_gw)
    agree = np.mean(np.array(ans_bare["labels"]) == np.array(ans_gw["labels"]))
    print(f"sanity: one {b0}-row body, labels agree on {agree:.0%} of rows; gateway policy {ans_gw['policy']!r}")
    print(flush=True)

    requests = {
        (side, b): [
            request_bytes(srv.port, path, body, None if side == "bare" else tokens[j % len(tokens)])
            for j, body in enumerate(fx.bodies[b])
        ]
        for side, srv, path in (("bare", bare, "/predict"), ("gateway", gateway, "/v1/predict"))
        for b in args.batches
    }  # fmt: skip
    sides = {"bare": bare, "gateway": gateway}
    conditions = [Condition(b, c) for c in dict.fromkeys((args.concurrency, 1)) for b in args.batches]
    print("runs (alternating; each: warm-up excluded, then the measured window):")
    for cond in conditions:
        for rnd in range(args.rounds):
            order = ("bare", "gateway") if rnd % 2 == 0 else ("gateway", "bare")
            for side in order:
                r = measure(sides[side], requests[(side, cond.batch)], side, cond.batch, cond.concurrency, args)
                getattr(cond, side).append(r)
                print(fmt_run(r), flush=True)
                for sample in r.samples:
                    print(f"      {sample}")

    # Growth check: a fresh key, measured, then PRIOR_ROWS more rows, then measured again.
    gb = 1 if 1 in args.batches else min(args.batches)
    growth_req = [request_bytes(gateway.port, "/v1/predict", body, growth_token) for body in fx.bodies[gb]]
    print(f"\ngrowth check (key 'growth', batch {gb}, concurrency {args.concurrency}):", flush=True)
    before = [measure(bare, requests[("bare", gb)], "bare", gb, args.concurrency, args)]
    before.append(measure(gateway, growth_req, "gateway", gb, args.concurrency, args))
    for r in before:
        print(fmt_run(r), flush=True)
    done, seconds, prior_errors = send_prior(gateway.port, growth_token, fx.prior_rows, args.prior_rows, seed=7)
    errs = ", ".join(f"{k}: {v}" for k, v in prior_errors.items()) or "none"
    print(
        f"  sent {done:,} prior rows with the same key ({PRIOR_BATCH} per request) in {seconds:.1f} s; non-200 {errs}"
    )
    after = [measure(gateway, growth_req, "gateway", gb, args.concurrency, args)]
    after.append(measure(bare, requests[("bare", gb)], "bare", gb, args.concurrency, args))
    for r in after:
        print(fmt_run(r), flush=True)

    counters = gateway_counters(gateway.port)

    # --- report ---
    print("\nresults (medians over rounds; added p50 and ratio are per-round gateway - bare / gateway / bare):")
    header = (
        f"{'batch':>5} {'conc':>4} | {'bare req/s':>10} {'gw req/s':>9} {'ratio':>5} {'(range)':>13} | "
        f"{'bare p50':>8} {'gw p50':>7} {'added p50':>9} {'(range)':>15} | {'bare p99':>8} {'gw p99':>7} | "
        f"{'CPU ms/req bare':>15} {'gw':>6} | non-200"
    )
    print(header)
    print("-" * len(header))
    summaries = {}
    for cond in conditions:
        s = cond.summary()
        summaries[(cond.batch, cond.concurrency)] = s
        ratio_range = f"{s['ratio_min']:.2f}-{s['ratio_max']:.2f}"
        added_range = f"{s['added_p50_min']:+.3f}..{s['added_p50_max']:+.3f}"
        print(
            f"{cond.batch:>5} {cond.concurrency:>4} | {s['bare_rps']:>10.1f} {s['gateway_rps']:>9.1f} "
            f"{s['ratio']:>5.2f} {ratio_range:>13} | "
            f"{s['bare_p50']:>8.3f} {s['gateway_p50']:>7.3f} {s['added_p50']:>+9.3f} {added_range:>15} | "
            f"{s['bare_p99']:>8.3f} {s['gateway_p99']:>7.3f} | {s['bare_cpu']:>15.3f} {s['gateway_cpu']:>6.3f} | "
            f"{s['errors']}"
        )

    print("\ntargets:")
    all_ok = True
    for b in args.batches:
        sat = summaries[(b, args.concurrency)]
        low = summaries[(b, 1)]
        ok_tp = sat["ratio"] >= TARGET_THROUGHPUT_RATIO
        ok_lat = low["added_p50"] <= TARGET_ADDED_P50_MS
        all_ok &= ok_tp and ok_lat
        print(
            f"  batch {b:>3}: throughput ratio {sat['ratio']:.2f} at concurrency {args.concurrency} "
            f"(target >= {TARGET_THROUGHPUT_RATIO}): {'met' if ok_tp else 'MISSED'}; "
            f"added p50 {low['added_p50']:+.3f} ms at concurrency 1 (target <= {TARGET_ADDED_P50_MS:g} ms): "
            f"{'met' if ok_lat else 'MISSED'}"
        )
        if args.concurrency != 1:
            sat_ok = sat["added_p50"] <= TARGET_ADDED_P50_MS
            print(
                f"             (at concurrency {args.concurrency} the added p50 is {sat['added_p50']:+.3f} ms: "
                f"{'within' if sat_ok else 'over'} 1 ms; mostly queueing, see the docstring)"
            )
    g_before, g_after = before[1], after[0]
    r_before, r_after = g_before.rps / before[0].rps, g_after.rps / after[1].rps
    grow_p50 = g_after.p50_ms - g_before.p50_ms
    print(
        f"  growth: gateway p50 {g_before.p50_ms:.3f} -> {g_after.p50_ms:.3f} ms ({grow_p50:+.3f}), "
        f"{g_before.rps:.1f} -> {g_after.rps:.1f} req/s; ratio to bare {r_before:.2f} -> {r_after:.2f}; "
        f"server CPU {g_before.server_cpu_ms:.3f} -> {g_after.server_cpu_ms:.3f} ms/req "
        f"(after {done:,} prior rows; equal within noise means no growth)"
    )
    errors = sum(sum(r.errors.values()) for c in conditions for r in c.bare + c.gateway)
    errors += sum(sum(r.errors.values()) for r in before + after) + sum(prior_errors.values())
    print(f"  non-200 answers in measured runs: {errors}")
    runs = [r for c in conditions for r in c.bare + c.gateway] + before + after
    busy = sum(r.others_share > BUSY_MACHINE for r in runs)
    if busy:
        print(
            f"\nWARNING: in {busy} of {len(runs)} runs, other work used more than {BUSY_MACHINE:.0%} of the machine's "
            "CPU (column 'others'); those numbers measure the contention, not the servers: rerun on a quiet machine."
        )
    if counters:
        print("\ngateway counters (/metrics, whole run):")
        for name, value in counters.items():
            if value:
                print(f"  {name} {value:g}")
    print(f"\nload average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        doc = {
            "machine": args.head,
            "runs": [r.__dict__ for c in conditions for r in c.bare + c.gateway],
            "summaries": {f"b{b}_c{c}": s for (b, c), s in summaries.items()},
            "growth": {"before": [r.__dict__ for r in before], "after": [r.__dict__ for r in after], "prior": done},
            "counters": counters,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0 if all_ok and errors == 0 else 1


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: stop the servers, remove the temp dir


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=8, help="connections at saturation (default 8)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per run, excluded (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of bare/gateway runs (default 3)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="rows per request (default 1 32)")
    parser.add_argument("--prior-rows", type=int, default=100_000, help="growth check's prior rows (default 10^5)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers on each side (default 1)")
    parser.add_argument(
        "--bare-shared-socket",
        action="store_true",
        help="with --workers N: run the bare side with uvicorn's own --workers (one listening socket shared by "
        "its workers) instead of the gateway's socket per worker",
    )
    parser.add_argument("--keys", type=int, default=1, help="API keys the gateway's requests go through in turn")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs of the MLP (default 30)")
    parser.add_argument("--quick", action="store_true", help="smoke check: 1 round, 0.5 s warm-up, 2 s runs")
    parser.add_argument("--json", metavar="PATH", help="also write every run as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warmup, args.duration = 1, 0.5, 2.0
    if args.concurrency < 1 or args.rounds < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--concurrency and --rounds must be >= 1, --duration > 0, --warmup >= 0")
    if args.keys < 1 or args.workers < 1:
        parser.error("--keys and --workers must be >= 1")
    if any(b < 1 or b > 256 for b in args.batches):
        parser.error("--batches must be in 1..256 (the gateway's max_batch)")
    args.batches = list(dict.fromkeys(args.batches))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
