"""Races through HTTP against a real ``keyserver serve --workers 2`` (spec §17.2), on SQLite and on
the real PostgreSQL: 200 clients, each with its own connection and device key, activate at once
on a licence for 5 devices; 200 clients redeem one grant token at once. Exactly 5 activations and
exactly one redemption win, every loser gets its typed 4xx (never a 5xx), the device counter
matches the rows, and the audit chain verifies."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import create_engine, text

from modelseal._private.encoding import b64decode, b64encode
from modelseal.keyserver.client import ACTIVATION_ROUTE, DeviceKey, activation_body

from .test_durability import Server, _admin, _audit_verify, _setup, server_env

CLIENTS = 200


def _race(requests: list[dict[str, Any]]) -> list[tuple[int, str | None]]:
    """Send every request from its own thread and connection, released together."""
    barrier = threading.Barrier(len(requests))
    results: list[tuple[int, str | None]] = []
    lock = threading.Lock()

    def run(req: dict[str, Any]) -> None:
        with httpx.Client(timeout=120) as http:
            barrier.wait()
            r = http.request(**req)
        code = r.json().get("error", {}).get("code") if r.status_code >= 400 else None
        with lock:
            results.append((r.status_code, code))

    threads = [threading.Thread(target=run, args=(req,)) for req in requests]
    for th in threads:
        th.start()
    for th in threads:
        th.join(180)
    assert len(results) == len(requests)
    return results


def test_200_http_clients_race_on_a_real_two_worker_server(backend: str, database_url: str, tmp_path: Path) -> None:
    workdir, env = server_env(tmp_path, backend, database_url)
    server = Server(workdir, env, tmp_path / "serve.log")
    try:
        base = server.base
        token = (tmp_path / "data" / "admin-token").read_text().strip()
        setup = _setup(base, token)
        policy = {"models": [setup["model_id"]], "max_devices": 5, "expires_at": None}
        created = _admin(base, token, "POST", "/v1/admin/licences", json={"policy": policy})
        licence_id, licence_key = created["licence"]["id"], created["licence_key"]
        info = _admin(base, token, "GET", "/v1/server-info")
        [aud] = [b64decode(k["kid"]) for k in info["signing_keys"] if k["current"]]

        # 200 devices activate at once on max_devices = 5.
        now_us = time.time_ns() // 1000
        requests = []
        for i in range(CLIENTS):
            device = DeviceKey.generate()
            body = activation_body(device, aud, os.urandom(32), ts=now_us + i)
            headers = {
                "Authorization": f"Bearer {licence_key}",
                "Content-Type": "application/json",
                "Modelseal-Signature": device.sign_request(ACTIVATION_ROUTE, body),
            }
            requests.append({"method": "POST", "url": base + ACTIVATION_ROUTE, "content": body, "headers": headers})
        outcomes = _race(requests)
        assert outcomes.count((201, None)) == 5, sorted(set(outcomes))
        assert outcomes.count((403, "device-limit-reached")) == CLIENTS - 5, sorted(set(outcomes))

        # 200 clients redeem one token at once.
        body = {"licence_id": licence_id, "model_id": setup["model_id"]}
        grant_token = _admin(base, token, "POST", "/v1/admin/grant-tokens", json=body)["token"]
        redeem = {
            "model_id": setup["model_id"],
            "key_commitment": b64encode(setup["kc"]),
        }
        requests = [
            {
                "method": "POST",
                "url": base + "/v1/grant-tokens/redeem",
                "json": redeem
                | {"x25519_public_key": b64encode(X25519PrivateKey.generate().public_key().public_bytes_raw())},
                "headers": {"Authorization": f"Bearer {grant_token}"},
            }
            for _ in range(CLIENTS)
        ]
        outcomes = _race(requests)
        assert outcomes.count((200, None)) == 1, sorted(set(outcomes))
        assert outcomes.count((409, "token-already-redeemed")) == CLIENTS - 1, sorted(set(outcomes))
        log = server.stop()
    finally:
        server.kill()
    assert "Traceback" not in log, log

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            active = conn.execute(text("SELECT active_devices FROM licences WHERE id = :i"), {"i": licence_id})
            rows = conn.execute(
                text("SELECT COUNT(*) FROM devices WHERE licence_id = :i AND revoked_at IS NULL"), {"i": licence_id}
            )
            assert (active.scalar_one(), rows.scalar_one()) == (5, 5)
            events = dict(
                conn.execute(
                    text("SELECT event, COUNT(*) FROM audit_log WHERE licence_id = :i GROUP BY event"),
                    {"i": licence_id},
                ).all()
            )
            redeemed = conn.execute(text("SELECT COUNT(*) FROM grant_tokens WHERE redeemed_at IS NOT NULL"))
            assert redeemed.scalar_one() == 1
    finally:
        engine.dispose()
    assert events["device.activated"] == 5
    assert events["device.activation-denied"] == CLIENTS - 5
    assert events["token.redeemed"] == 1 and events["token.denied"] == CLIENTS - 1
    _audit_verify(workdir, env)
