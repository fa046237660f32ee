"""``modelseal activate``, ``licence …`` and ``device …`` against a real ``keyserver serve`` process."""

from __future__ import annotations

import json
import stat
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from modelseal.cli import app as cli_app

from .live import admin_token, free_port, serve


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[str, str]]:
    with serve(tmp_path) as base:
        yield base, admin_token(tmp_path)


def _cli(home: Path, base: str, token: str, *args: str) -> tuple[int, str, str]:
    env = {"MODELSEAL_HOME": str(home), "MODELSEAL_KEYSERVER": base, "MODELSEAL_ADMIN_TOKEN": token}
    r = CliRunner().invoke(cli_app, list(args), env=env)
    return r.exit_code, r.stdout, r.stderr


def test_publisher_and_device_commands(live: tuple[str, str], tmp_path: Path) -> None:
    base, token = live
    req = urllib.request.Request(
        base + "/v1/admin/models",
        data=b'{"name": "resnet"}',
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        model_id = json.loads(resp.read())["id"]
    home = tmp_path / "home"
    code, out, err = _cli(
        home, base, token, "licence", "create", "--model", "resnet", "--max-devices", "1",
        "--offline-grace", "3d", "--recheck", "1h", "--grant-ttl", "7d", "--expires", "2099-01-01",
    )  # fmt: skip
    assert code == 0, err
    key = out.strip()
    assert key.startswith("MSEAL-LICENCE:")
    code, out, _ = _cli(home, base, token, "licence", "list")
    [licence] = json.loads(out)
    assert licence["policy"]["models"] == [model_id] and licence["policy"]["offline_grace_s"] == 3 * 86400

    code, out, err = _cli(home, base, token, "activate", "--licence", key, "--label", "laptop")
    assert code == 0, err
    device_id = json.loads(out)["device_id"]
    assert stat.S_IMODE((home / "device.key").stat().st_mode) == 0o600
    text = (home / "device.key").read_text()
    assert "MSEAL-X25519-SECRET:" in text and "MSEAL-ED25519-SECRET:" in text
    code, out, err = _cli(home, base, token, "activate", "--licence", key)  # idempotent
    assert code == 0 and json.loads(out)["device_id"] == device_id and "already" in err
    code, _, err = _cli(tmp_path / "other", base, token, "activate", "--licence", key)
    assert code == 10 and "device-limit-reached" in err
    code, _, err = _cli(home, base, token, "activate", "--licence", "MSEAL-LICENCE:" + "A" * 70)
    assert code == 10 and "invalid" in err

    code, out, _ = _cli(home, base, token, "device", "list", "--licence", licence["id"])
    assert [d["id"] for d in json.loads(out)] == [device_id]
    assert _cli(home, base, token, "device", "revoke", device_id, "--reason", "lost")[0] == 0
    code, _, err = _cli(home, base, token, "activate", "--licence", key)
    assert code == 10 and "device-revoked" in err
    assert _cli(home, base, token, "licence", "revoke", licence["id"], "--reason", "ended")[0] == 0
    code, out, _ = _cli(home, base, token, "licence", "list", "--status", "revoked")
    assert [i["id"] for i in json.loads(out)] == [licence["id"]]
    code, _, err = _cli(home, base, "MSEAL-ADMIN:nope", "licence", "list")
    assert code == 10 and "invalid-credential" in err


def test_unreachable_server_is_exit_11(tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{free_port()}"
    code, _, err = _cli(tmp_path, base, "MSEAL-ADMIN:x", "licence", "list")
    assert code == 11, err
    code, _, _ = _cli(tmp_path, base, "x", "activate", "--licence", "MSEAL-LICENCE:" + "A" * 70)
    assert code == 11


def test_model_commands(live: tuple[str, str], tmp_path: Path) -> None:
    base, token = live
    code, out, err = _cli(tmp_path, base, token, "model", "create", "vision-v1")
    assert code == 0, err
    model_id = out.strip()
    assert model_id.startswith("mdl_")
    code, out, _ = _cli(tmp_path, base, token, "model", "list")
    assert [(m["id"], m["name"]) for m in json.loads(out)] == [(model_id, "vision-v1")]
    code, _, err = _cli(tmp_path, base, token, "model", "create", "vision-v1")
    assert code == 10 and "conflict" in err  # names are unique per publisher
    code, _, err = _cli(tmp_path, base, "MSEAL-ADMIN:nope", "model", "list")
    assert code == 10 and "invalid-credential" in err


def test_master_key_file(tmp_path: Path) -> None:
    from modelseal.keyserver.crypto import LocalKey

    path = tmp_path / "keys" / "master.key"
    r = CliRunner().invoke(cli_app, ["keyserver", "master-key", str(path)])
    assert r.exit_code == 0, r.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    LocalKey.parse(path.read_text().strip(), allow_dev=False)  # a usable key
    before = path.read_text()
    r = CliRunner().invoke(cli_app, ["keyserver", "master-key", str(path)])
    assert r.exit_code == 2 and "never overwritten" in r.stderr
    assert path.read_text() == before


def test_licence_update_command(live: tuple[str, str], tmp_path: Path) -> None:
    base, token = live
    assert _cli(tmp_path, base, token, "model", "create", "m")[0] == 0
    code, out, err = _cli(tmp_path, base, token, "licence", "create", "--model", "m", "--max-devices", "1",
                          "--expires", "2099-01-01", "--opens-per-day", "5")  # fmt: skip
    assert code == 0, err
    [listed] = json.loads(_cli(tmp_path, base, token, "licence", "list")[1])
    code, out, err = _cli(tmp_path, base, token, "licence", "update", listed["id"], "--max-devices", "3",
                          "--expires", "never", "--opens-per-day", "unlimited", "--recheck", "2h",
                          "--label", "site B")  # fmt: skip
    assert code == 0, err
    policy = json.loads(out)["policy"]
    assert (policy["max_devices"], policy["expires_at"], policy["opens_per_day"]) == (3, None, None)
    assert policy["recheck_interval_s"] == 7200 and json.loads(out)["label"] == "site B"
    code, _, err = _cli(tmp_path, base, token, "licence", "update", listed["id"], "--grant-ttl", "1h")
    assert code == 10 and "malformed-request" in err  # recheck 2h would exceed the grant lifetime
    r = httpx.patch(
        f"{base}/v1/admin/licences/{listed['id']}",
        json={"policy": {"max_devices": 2, "colour": "red"}},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed-request"
