"""SIGKILL durability (spec §5.3, §12, §17.3 / §17.1 row 24): a real ``keyserver serve --workers 2``
under concurrent load is killed with SIGKILL (the whole process group); afterwards, read straight
from the database, every acknowledged activation, grant and revocation is there with its audit
record, the device counters match the device rows, ``audit-verify`` exits 0, and the restarted
server serves normally. On SQLite (WAL, default settings) and on the real PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from modelseal._private.crypto import KeySchedule
from modelseal._private.encoding import b64decode, b64encode
from modelseal.keyserver.client import DeviceKey, activation_body, grant_body
from modelseal.keyserver.crypto import LocalKey, escrow_wrap
from modelseal.keyserver.grant import verify_signed

from .live import free_port

WORKERS = 2
THREADS = 16
LICENCES = 4
ROUNDS = 2
KILL_AFTER_ACTIVATIONS = 80  # acknowledged in this round before the kill
REVOKE_EVERY = 4  # each thread revokes every 4th device it activated
NO_LIMIT = "1000000/60"


@dataclass
class Acked:
    """What the server acknowledged (2xx) and what failed, recorded by the client threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    devices: dict[str, str] = field(default_factory=dict)  # device id -> licence id
    grants: set[str] = field(default_factory=set)
    revoked: set[str] = field(default_factory=set)
    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: list[tuple[float, str]] = field(default_factory=list)  # (request start, exception)
    failures: list[str] = field(default_factory=list)  # exceptions that ended a client thread
    round_activations: int = 0


class Server:
    """``modelseal keyserver serve`` in its own session, so SIGKILL reaches its uvicorn workers too."""

    def __init__(self, workdir: Path, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "modelseal", "keyserver", "serve"]
        cmd += ["--port", str(self.port), "--workers", str(WORKERS)]
        self.log = log
        with log.open("wb") as out:  # a file, not a pipe: a busy server must never block on its log
            self.proc = subprocess.Popen(
                cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.pgid = os.getpgid(self.proc.pid)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text(errors="replace")
            try:
                if httpx.get(self.base + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        pytest.fail("server did not become ready:\n" + log.read_text(errors="replace"))

    def kill(self) -> None:
        """SIGKILL the whole process group and wait until none of its processes is left."""
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(self.pgid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(self.pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        pytest.fail("processes of the killed server are still alive")

    def stop(self) -> str:
        """A graceful stop (SIGTERM to the supervisor); returns the log."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("server did not stop on SIGTERM")
        return self.log.read_text(errors="replace")


def _admin(base: str, token: str, method: str, path: str, **kw: Any) -> Any:
    r = httpx.request(method, base + path, headers={"Authorization": f"Bearer {token}"}, timeout=10, **kw)
    assert r.status_code in (200, 201), r.text
    return r.json()


def _setup(base: str, token: str) -> dict[str, Any]:
    """A model with a registered content key and licences with room for (practically) any number of devices."""
    info = _admin(base, token, "GET", "/v1/server-info")
    model_id = _admin(base, token, "POST", "/v1/admin/models", json={"name": "durable"})["id"]
    k, salt = os.urandom(32), os.urandom(32)
    kc = KeySchedule(k, salt).commitment
    epk, body = escrow_wrap(k, b64decode(info["escrow_key"]["public_key"]), model_id, kc, salt)
    escrow = {"epk": b64encode(epk), "body": b64encode(body)}
    key = {"key_commitment": b64encode(kc), "salt": b64encode(salt), "escrow": escrow}
    _admin(base, token, "POST", f"/v1/admin/models/{model_id}/keys", json=key)
    policy = {"models": [model_id], "max_devices": 1_000_000, "expires_at": None}
    licences = [
        _admin(base, token, "POST", "/v1/admin/licences", json={"policy": policy})["licence_key"]
        for _ in range(LICENCES)
    ]
    return {"model_id": model_id, "kc": kc, "licences": licences}


def _client(base: str, token: str, setup: dict[str, Any], acked: Acked, stop: threading.Event, n: int) -> None:
    try:
        _load(base, token, setup, acked, stop, n)
    except Exception as exc:  # reported by the test, not lost in a thread
        with acked.lock:
            acked.failures.append(f"client {n}: {exc!r}")


def _load(base: str, token: str, setup: dict[str, Any], acked: Acked, stop: threading.Event, n: int) -> None:
    """One client: activate a device, fetch a grant for it, now and then revoke it; record every 2xx."""
    with httpx.Client(base_url=base, timeout=15) as http:
        info = http.get("/v1/server-info", headers={"Authorization": f"Bearer {token}"}).json()
        [current] = [k for k in info["signing_keys"] if k["current"]]
        aud = b64decode(current["kid"], length=8)
        pinned = {b64decode(k["kid"]): b64decode(k["public_key"]) for k in info["signing_keys"]}
        i = 0
        while not stop.is_set():
            i += 1
            licence = setup["licences"][(n + i) % LICENCES]
            device, fp = DeviceKey.generate(), os.urandom(32)
            raw = activation_body(device, aud, fp, label=f"t{n}-{i}")
            headers = {
                "Authorization": f"Bearer {licence}",
                "Content-Type": "application/json",
                "Modelseal-Signature": device.sign_request("/v1/activations", raw),
            }
            r = _send(http, acked, "POST", "/v1/activations", content=raw, headers=headers)
            if r is None:
                return
            if r.status_code != 201:
                continue
            device_id = r.json()["device_id"]
            with acked.lock:
                acked.devices[device_id] = r.json()["licence_id"]
                acked.round_activations += 1
            raw = grant_body(aud, device_id, setup["model_id"], setup["kc"], fp, ts=time.time_ns() // 1000)
            headers["Modelseal-Signature"] = device.sign_request("/v1/grants", raw)
            r = _send(http, acked, "POST", "/v1/grants", content=raw, headers=headers)
            if r is None:
                return
            if r.status_code == 200:
                _, grant = verify_signed(r.json(), pinned)
                assert grant["device_id"] == device_id
                with acked.lock:
                    acked.grants.add(grant["grant_id"])
            if i % REVOKE_EVERY == 0:
                admin = {"Authorization": f"Bearer {token}"}
                path = f"/v1/admin/devices/{device_id}/revoke"
                r = _send(http, acked, "POST", path, json={"reason": "load"}, headers=admin)
                if r is None:
                    return
                if r.status_code == 200:
                    with acked.lock:
                        acked.revoked.add(device_id)


def _send(http: httpx.Client, acked: Acked, method: str, path: str, **kw: Any) -> httpx.Response | None:
    """The response (its status counted), or None after a transport error (the server is gone)."""
    started = time.monotonic()
    try:
        r = http.request(method, path, **kw)
    except httpx.TransportError as exc:
        with acked.lock:
            acked.transport_errors.append((started, type(exc).__name__))
        return None
    with acked.lock:
        acked.statuses[r.status_code] += 1
    return r


def _load_and_kill(server: Server, token: str, setup: dict[str, Any], acked: Acked) -> None:
    acked.round_activations, acked.transport_errors = 0, []
    stop = threading.Event()
    threads = [
        threading.Thread(target=_client, args=(server.base, token, setup, acked, stop, n)) for n in range(THREADS)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while acked.round_activations < KILL_AFTER_ACTIVATIONS and time.monotonic() < deadline:
        assert not acked.failures, acked.failures
        time.sleep(0.01)
    time.sleep(random.uniform(0, 0.3))  # vary the moment of the kill between rounds and runs
    killed_at = time.monotonic()
    server.kill()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert not acked.failures, acked.failures
    assert acked.round_activations >= KILL_AFTER_ACTIVATIONS, f"only {acked.round_activations} activations in 20 s"
    # The kill interrupted requests that were in flight (sent before it, no answer): not a clean stop.
    in_flight = [name for started, name in acked.transport_errors if started < killed_at]
    assert in_flight, acked.transport_errors
    # Nothing but success before the kill: no 500 (a bug), no 503 (busy), no denial.
    assert set(acked.statuses) <= {200, 201}, acked.statuses


def _check_database(database_url: str, acked: Acked) -> None:
    """Without the server: every acknowledged change is in the database, with its audit record."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            if database_url.startswith("sqlite"):
                assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
            devices = {r.id: r for r in conn.execute(text("SELECT id, licence_id, revoked_at FROM devices"))}
            audit = conn.execute(text("SELECT event, device_id, grant_id FROM audit_log")).all()
            licences = conn.execute(text("SELECT id, active_devices FROM licences")).all()
    finally:
        engine.dispose()
    activated = Counter(r.device_id for r in audit if r.event == "device.activated")
    revoked_audit = Counter(r.device_id for r in audit if r.event == "device.revoked")
    grants_audit = {r.grant_id for r in audit if r.event == "grant.issued"}

    lost = [d for d, lic in acked.devices.items() if d not in devices or devices[d].licence_id != lic]
    assert not lost, f"{len(lost)} of {len(acked.devices)} acknowledged activations lost"
    assert not [d for d in acked.devices if activated[d] != 1], "an acknowledged activation lacks its audit record"
    assert not [d for d in acked.revoked if devices[d].revoked_at is None], "an acknowledged revocation was lost"
    assert not [d for d in acked.revoked if revoked_audit[d] != 1], "a revocation lacks its audit record"
    assert acked.grants <= grants_audit, f"{len(acked.grants - grants_audit)} acknowledged grants not audited"
    # Atomicity the other way round too: no device row without its record, no record without its row.
    assert set(activated) == set(devices) and set(activated.values()) == {1}
    assert {d for d, row in devices.items() if row.revoked_at is not None} == set(revoked_audit)
    for lic in licences:
        active = sum(1 for row in devices.values() if row.licence_id == lic.id and row.revoked_at is None)
        assert lic.active_devices == active, (lic.id, lic.active_devices, active)


def _audit_verify(workdir: Path, env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "modelseal", "keyserver", "audit-verify"]
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "audit log: OK" in done.stderr


def _serves_normally(server: Server, token: str, setup: dict[str, Any], acked: Acked) -> None:
    """After a restart: the acknowledged devices are listed, a new activation and a grant work."""
    listed: set[str] = set()
    after = None
    while True:
        params = {"limit": 500, **({"after": after} if after else {})}
        page = _admin(server.base, token, "GET", "/v1/admin/devices", params=params)
        listed |= {d["id"] for d in page["items"]}
        if (after := page["next"]) is None:
            break
    assert set(acked.devices) <= listed
    page = _admin(server.base, token, "GET", "/v1/admin/audit", params={"limit": 500})
    assert page["items"] and page["items"][0]["seq"] == 1
    info = _admin(server.base, token, "GET", "/v1/server-info")
    aud = b64decode(next(k for k in info["signing_keys"] if k["current"])["kid"])
    device, fp = DeviceKey.generate(), os.urandom(32)
    raw = activation_body(device, aud, fp)
    headers = {
        "Authorization": f"Bearer {setup['licences'][0]}",
        "Content-Type": "application/json",
        "Modelseal-Signature": device.sign_request("/v1/activations", raw),
    }
    r = httpx.post(server.base + "/v1/activations", content=raw, headers=headers, timeout=10)
    assert r.status_code == 201, r.text
    acked.devices[r.json()["device_id"]] = r.json()["licence_id"]
    raw = grant_body(aud, r.json()["device_id"], setup["model_id"], setup["kc"], fp, ts=time.time_ns() // 1000)
    headers["Modelseal-Signature"] = device.sign_request("/v1/grants", raw)
    r = httpx.post(server.base + "/v1/grants", content=raw, headers=headers, timeout=10)
    assert r.status_code == 200, r.text


def server_env(tmp_path: Path, backend: str, database_url: str) -> tuple[Path, dict[str, str]]:
    """A working directory and a clean environment for a server on ``database_url``, with the
    rate limits out of the way (the load is all from one address)."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSEAL")}
    env |= {
        "MODELSEAL_KS_DATA_DIR": str(tmp_path / "data"),
        "MODELSEAL_KS_DATABASE_URL": database_url,
        "MODELSEAL_KS_RATE_ACTIVATE_IP": NO_LIMIT,
        "MODELSEAL_KS_RATE_ACTIVATE_LICENCE": NO_LIMIT,
        "MODELSEAL_KS_RATE_AUTH_FAIL_IP": NO_LIMIT,
    }
    if backend == "postgres":
        env["MODELSEAL_KS_MASTER_KEY"] = LocalKey.generate()[1]  # only a local SQLite file may generate one
    return workdir, env


def test_sigkill_under_load_loses_nothing_acknowledged(backend: str, database_url: str, tmp_path: Path) -> None:
    workdir, env = server_env(tmp_path, backend, database_url)

    server = Server(workdir, env, tmp_path / "serve-0.log")
    try:
        token = (tmp_path / "data" / "admin-token").read_text().strip()
        setup = _setup(server.base, token)
        acked = Acked()
        for n in range(ROUNDS):
            _load_and_kill(server, token, setup, acked)
            _check_database(database_url, acked)
            _audit_verify(workdir, env)
            server = Server(workdir, env, tmp_path / f"serve-{n + 1}.log")
            _serves_normally(server, token, setup, acked)
        log = server.stop()
    finally:
        server.kill()  # no-op once stopped; never leave a server behind after a failure
    assert "Traceback" not in log, log
    _check_database(database_url, acked)
    _audit_verify(workdir, env)
