"""A real ``modelseal keyserver serve`` process for CLI and end-to-end tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, token: str | None = None) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@contextmanager
def serve(workdir: Path, *, workers: int = 1, public_url: bool = False) -> Iterator[str]:
    """Start the server in ``workdir`` with a clean environment; yields its base URL once ready.

    With ``public_url`` the server advertises the address it listens on (stanzas carry it).
    The process must exit without a traceback.
    """
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSEAL")}
    if public_url:
        env["MODELSEAL_KS_PUBLIC_URL"] = base
    cmd = [sys.executable, "-m", "modelseal", "keyserver", "serve", "--port", str(port), "--workers", str(workers)]
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            try:
                if get(base + "/readyz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("server did not become ready")
        yield base
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert "Traceback" not in out, out


def admin_token(workdir: Path) -> str:
    return (workdir / "modelseal-keyserver" / "admin-token").read_text().strip()
