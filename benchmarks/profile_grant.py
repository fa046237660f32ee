#!/usr/bin/env python3
"""In-process cost of one ``POST /v1/grants`` through the ASGI app (no network, no uvicorn), for
profiling the grant path (docs/benchmarks.md, "How the grant path got from 212 to 1,454").

Sets up a key server on a temporary SQLite file, pre-signs N grant requests from one device, and
calls the FastAPI app directly. Prints the mean time per grant; ``--profile`` adds a cProfile
table of the second half of the requests.

    .venv/bin/python benchmarks/profile_grant.py [-n 1000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' helpers

from modelseal.keyserver.app import create_app
from modelseal.keyserver.bootstrap import open_keyserver
from modelseal.keyserver.client import DeviceKey, grant_body
from modelseal.keyserver.crypto import LocalKey
from modelseal.keyserver.services import Policy
from modelseal.keyserver.settings import Settings
from tests.keyserver.test_grants import _escrow
from tests.keyserver.test_licences import FP, _activate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1000, help="grant requests (default 1000)")
    parser.add_argument("--profile", action="store_true", help="cProfile the second half")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="modelseal-profile-grant-"))
    settings = Settings(
        data_dir=root / "data",
        database_url=f"sqlite:///{root}/ks.db",
        master_key=LocalKey.generate()[1],  # type: ignore[arg-type]
        public_url="https://keys.example.com",
    )
    server = open_keyserver(settings)
    admin = server.authenticate_admin((root / "data" / "admin-token").read_text().strip())
    model_id = server.create_model(admin, "m").id
    _, kc = _escrow(server, admin, model_id)
    _, key = server.create_licence(admin, Policy(models=(model_id,), max_devices=10, opens_per_day=2**31 - 1))
    device = DeviceKey.generate()
    device_id = _activate(server, server.authenticate_licence(key), device).device_id
    app = create_app(settings, keyserver=server)

    t0 = time.time_ns() // 1000
    bodies = []
    for i in range(args.n):
        raw = grant_body(server.secrets.signing_kid, device_id, model_id, kc, FP, ts=t0 + 10 + i)
        bodies.append((raw, device.sign_request("/v1/grants", raw)))

    async def call(raw: bytes, signature: str) -> None:
        headers = [
            (b"host", b"x"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
            (b"authorization", b"Bearer " + key.encode()),
            (b"modelseal-signature", signature.encode()),
        ]
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/v1/grants", "raw_path": b"/v1/grants", "query_string": b"",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
            "state": {},
        }  # fmt: skip
        messages = [{"type": "http.request", "body": raw, "more_body": False}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        if sent[0]["status"] != 200:
            raise SystemExit(f"grant failed: {sent}")

    async def run() -> None:
        async with app.router.lifespan_context(app):
            half = args.n // 2
            start = time.perf_counter()
            for raw, sig in bodies[:half]:
                await call(raw, sig)
            print(f"in-process grant: {(time.perf_counter() - start) / half * 1e3:.3f} ms (mean of {half})")
            if args.profile:
                profile = cProfile.Profile()
                profile.enable()
                for raw, sig in bodies[half:]:
                    await call(raw, sig)
                profile.disable()
                pstats.Stats(profile).sort_stats("tottime").print_stats(30)

    asyncio.run(run())
    server.db.dispose()


if __name__ == "__main__":
    main()
