"""``modelseal serve`` as a user runs it: a real uvicorn process, several workers sharing quotas in a
real Redis, keys made with the CLI, concurrent clients; and the CLI's answers to bad settings."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from modelseal.cli import app as cli_app

from ..keyserver.live import free_port
from .conftest import PASSPHRASE, PASSPHRASE_ENV
from .redisharness import RedisServer

CONFIG = """
data_dir = "gw"
key_refresh_s = 0.2

[model]
path = "{model}"
passphrase_env = "{env}"

[tiers.default]
per_minute = 100
policy = ["round:3"]

[tiers.metrics]
"""


def _write_config(tmp_path: Path, sealed: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG.format(model=sealed, env=PASSPHRASE_ENV), encoding="utf-8")
    return path


@contextmanager
def serving(config: Path, *args: str) -> Iterator[str]:
    with serving_process(config, *args) as (base, _):
        yield base


@contextmanager
def serving_process(config: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSEAL")}
    env[PASSPHRASE_ENV] = PASSPHRASE
    cmd = [sys.executable, "-m", "modelseal", "serve", "--config", str(config), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, cwd=config.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
            if proc.poll() is not None:
                pytest.fail(f"serve exited: {proc.stdout.read().decode() if proc.stdout else ''}")
        else:
            pytest.fail("the gateway did not come up")
        yield base, proc
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        assert b"Traceback" not in out, out.decode()


def _cli(*args: str) -> str:
    result = CliRunner().invoke(cli_app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_two_workers_share_one_quota_in_redis(tmp_path: Path, sealed_model: Path, redis_server: RedisServer) -> None:
    redis_server.flush()
    config = _write_config(tmp_path, sealed_model)
    token = _cli("gateway", "key", "create", "load", "--config", str(config)).strip().splitlines()[-1]
    metrics_token = _cli("gateway", "key", "create", "ops", "--scope", "metrics", "--config", str(config)).split()[-1]
    row = np.zeros((1, 32), np.float32).tolist()
    with serving(config, "--workers", "2", "--redis-url", redis_server.url) as base:

        def one(_: int) -> int:
            with httpx.Client(timeout=30) as client:
                r = client.post(
                    f"{base}/v1/predict", json={"inputs": row}, headers={"Authorization": f"Bearer {token}"}
                )
                return r.status_code

        if time.time() % 60 > 45:  # keep the burst inside one minute window
            time.sleep(61 - time.time() % 60)
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(one, range(160)))
        # one minute window: exactly the limit is answered, whatever worker took each request
        assert statuses.count(200) == 100, statuses
        assert set(statuses) <= {200, 429}
        metrics = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {metrics_token}"}).text
        key_id = token.split("_")[1]
        rows = [
            line for line in metrics.splitlines() if line.startswith(f'modelseal_gateway_rows_total{{key="{key_id}"}}')
        ]
        assert rows and float(rows[0].split()[-1]) == statuses.count(200)  # summed over both workers
        # revocation reaches every worker within key_refresh_s
        _cli("gateway", "key", "revoke", key_id, "--config", str(config))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            r = httpx.post(f"{base}/v1/predict", json={"inputs": row}, headers={"Authorization": f"Bearer {token}"})
            if r.status_code == 401:
                break
            time.sleep(0.1)
        time.sleep(0.5)  # one worker refused it; the other's cache is at most key_refresh_s (0.2 s) older
        for _ in range(20):  # every worker now refuses it (20 requests reach both with near certainty)
            r = httpx.post(f"{base}/v1/predict", json={"inputs": row}, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401


def test_key_admin_commands(tmp_path: Path, sealed_model: Path) -> None:
    config = _write_config(tmp_path, sealed_model)
    token = _cli("gateway", "key", "create", "alice", "--config", str(config)).split()[-1]
    key_id = token.split("_")[1]
    listing = _cli("gateway", "key", "list", "--config", str(config))
    assert key_id in listing and token.split("_", 2)[2] not in listing  # the secret is never shown again
    assert '"tier": "metrics"' in _cli("gateway", "key", "update", key_id, "--tier", "metrics", "--config", str(config))
    runner = CliRunner()
    assert (
        runner.invoke(
            cli_app, ["gateway", "key", "update", key_id, "--tier", "gold", "--config", str(config)]
        ).exit_code
        == 2
    )
    assert runner.invoke(cli_app, ["gateway", "key", "revoke", "0" * 16, "--config", str(config)]).exit_code == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[model]\npath = 'm.mseal'\n[tiers.gold]\n", "a tier named 'default' is required"),
        ("[model]\npath = 'm.mseal'\n[tiers.default]\npolicy = ['blur:3']\n", "unknown policy"),
        ("[model]\npath = 'm.mseal'\ntrace_rate = 2\n", "model.trace_rate"),
        ("port = 'x'\n[model]\npath = 'm.mseal'\n", "port"),
        ("[model\n", "not valid TOML"),
        ("[model]\npath = 'm.mseal'\n[tiers.default]\non_alert = 'misinform'\nmisinform_rate = 0\n", "misinform_rate"),
    ],
)
def test_bad_config_exits_2_naming_the_setting(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(cli_app, ["serve", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())  # the console wraps long lines at any space


def test_wrong_key_for_the_model_fails_before_serving(tmp_path: Path, sealed_model: Path) -> None:
    config = _write_config(tmp_path, sealed_model)
    env = {**os.environ, PASSPHRASE_ENV: "not the passphrase"}
    done = subprocess.run(
        [sys.executable, "-m", "modelseal", "serve", "--config", str(config), "--port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 6 and "WrongKeyError" in done.stderr and "Traceback" not in done.stderr


def test_monitor_calibrate_writes_a_config_the_gateway_loads(tmp_path: Path, sealed_model: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.normal(size=(2000, 32)).astype(np.float32), y=rng.integers(0, 10, 2000))
    result = CliRunner().invoke(
        cli_app,
        [
            "gateway",
            "monitor",
            "calibrate",
            str(tmp_path / "train.npz"),
            "--out",
            str(tmp_path / "ref.npz"),
            "--users",
            "40",
        ],
    )
    assert result.exit_code == 0, result.output
    table = result.stdout
    assert table.startswith("[monitor]\n") and "thresholds = { coverage = " in table
    config = _write_config(tmp_path, sealed_model)
    config.write_text(config.read_text().replace("[model]", table + "\n[model]"), encoding="utf-8")
    from modelseal.gateway.service import Gateway
    from modelseal.gateway.settings import load_config

    os.environ[PASSPHRASE_ENV] = PASSPHRASE
    try:
        gateway = Gateway(load_config(config))
    finally:
        del os.environ[PASSPHRASE_ENV]
    try:
        assert gateway.monitor is not None and gateway.monitor.thresholds.coverage < float("inf")
    finally:
        gateway.close()
    # a reference fitted on rows of another width is refused, naming the setting
    np.savez(tmp_path / "wide.npz", x=rng.normal(size=(500, 64)).astype(np.float32), y=rng.integers(0, 10, 500))
    assert (
        CliRunner()
        .invoke(
            cli_app,
            [
                "gateway",
                "monitor",
                "calibrate",
                str(tmp_path / "wide.npz"),
                "--out",
                str(tmp_path / "ref.npz"),
                "--users",
                "10",
            ],
        )
        .exit_code
        == 0
    )
    result = CliRunner().invoke(cli_app, ["serve", "--config", str(config)], env={PASSPHRASE_ENV: PASSPHRASE})
    assert result.exit_code == 2 and "monitor.reference" in result.output


def test_the_config_reaches_workers_intact_with_infinite_thresholds(tmp_path: Path, sealed_model: Path) -> None:
    """``serve --workers N`` hands the config to its workers as JSON; an infinite threshold (a
    statistic switched off, as ``monitor calibrate`` prints it) must come back as itself."""
    import math

    from modelseal.gateway.settings import GatewayConfig

    from .conftest import make_config

    thresholds = {"coverage": 1.2, "ood": math.inf, "normality": -math.inf}
    config = make_config(
        tmp_path, sealed_model, monitor={"reference": str(tmp_path / "r.npz"), "thresholds": thresholds}
    )
    again = GatewayConfig.model_validate_json(config.model_dump_json())
    assert again == config and again.monitor.thresholds == thresholds


# --- serve --workers N: a listening socket per worker ---------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in (entry / "cmdline").read_bytes():
                out.append(int(entry.name))  # a worker (not multiprocessing's resource tracker)
    return out


def _tcp_sockets(port: int, state: str) -> set[str]:
    """Socket inodes of the local TCP sockets on ``port`` in ``state`` (01 established, 0A listen)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                    inodes.add(fields[9])
    return inodes


def _owned(pid: int, inodes: set[str]) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            count += 1
    return count


def test_workers_each_listen_and_connections_spread_over_them(tmp_path: Path, sealed_model: Path) -> None:
    """A burst of keep-alive connections lands on every worker (uvicorn's shared socket often gave
    all of them to one worker while the other idled), and SIGTERM stops the workers with the parent."""
    config = _write_config(tmp_path, sealed_model)
    token = _cli("gateway", "key", "create", "load", "--config", str(config)).strip().splitlines()[-1]
    row = np.zeros((1, 32), np.float32).tolist()
    with serving_process(config, "--workers", "2") as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        deadline = time.monotonic() + 60
        while True:  # both workers up: each holds its own listening socket on the port
            workers = _children(proc.pid)
            listening = _tcp_sockets(port, "0A")
            if len(workers) >= 2 and all(_owned(w, listening) == 1 for w in workers):
                break
            assert time.monotonic() < deadline, "the workers did not both listen"
            time.sleep(0.1)
        assert len(workers) == 2 and _owned(proc.pid, listening) == 0  # the parent listens on nothing
        for _ in range(3):  # three bursts of 16 connections: all on one worker has odds of 3 in 100,000
            clients = [httpx.Client(base_url=base, timeout=30) for _ in range(16)]
            try:
                with concurrent.futures.ThreadPoolExecutor(16) as pool:
                    statuses = list(
                        pool.map(
                            lambda c: (
                                c.post(
                                    "/v1/predict", json={"inputs": row}, headers={"Authorization": f"Bearer {token}"}
                                ).status_code
                            ),
                            clients,
                        )
                    )
                assert statuses == [200] * 16
                established = _tcp_sockets(port, "01")
                per_worker = [_owned(w, established) for w in workers]
                assert sum(per_worker) == 16 and min(per_worker) >= 1, per_worker
            finally:
                for c in clients:
                    c.close()
    assert proc.returncode == 0
    time.sleep(0.2)
    assert not [w for w in workers if Path(f"/proc/{w}").exists() and "zombie" not in _state(w)]


def _state(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]).lower()
    except (OSError, IndexError):
        return "gone"


def test_a_worker_that_dies_is_replaced(tmp_path: Path, sealed_model: Path) -> None:
    import signal

    config = _write_config(tmp_path, sealed_model)
    token = _cli("gateway", "key", "create", "load", "--config", str(config)).strip().splitlines()[-1]
    with serving_process(config, "--workers", "2") as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        deadline = time.monotonic() + 60
        while len(workers := _children(proc.pid)) < 2 or not all(_owned(w, _tcp_sockets(port, "0A")) for w in workers):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            now = _children(proc.pid)
            fresh = [w for w in now if w not in workers]
            if fresh and all(_owned(w, _tcp_sockets(port, "0A")) for w in now if "zombie" not in _state(w)):
                break
            assert time.monotonic() < deadline, "no replacement worker"
            time.sleep(0.1)
        for _ in range(10):  # new connections, spread over both: every one answered
            r = httpx.post(
                f"{base}/v1/predict",
                json={"inputs": np.zeros((1, 32)).tolist()},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 200


def test_workers_refuse_a_port_already_in_use(tmp_path: Path, sealed_model: Path) -> None:
    """A second gateway on a taken port fails with exit 2 (SO_REUSEPORT alone would let it share the
    first one's traffic)."""
    import socket

    config = _write_config(tmp_path, sealed_model)
    taken = socket.create_server(("127.0.0.1", 0), reuse_port=True)
    try:
        env = {**os.environ, PASSPHRASE_ENV: PASSPHRASE}
        done = subprocess.run(
            [sys.executable, "-m", "modelseal", "serve", "--config", str(config),
             "--port", str(taken.getsockname()[1]), "--workers", "2"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        taken.close()
    assert done.returncode == 2, done.stderr
    assert "cannot listen on 127.0.0.1" in done.stderr and "Traceback" not in done.stderr
