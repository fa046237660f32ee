"""``modelseal keyserver …`` commands, in process (CliRunner) and as a real server process."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelseal.cli import app as cli_app
from modelseal.keyserver.crypto import LocalKey
from modelseal.keyserver.settings import Settings

from .live import get, serve


def _env(settings: Settings) -> dict[str, str]:
    assert settings.master_key is not None
    return {
        "MODELSEAL_KS_DATA_DIR": str(settings.data_dir),
        "MODELSEAL_KS_DATABASE_URL": settings.effective_database_url,
        "MODELSEAL_KS_MASTER_KEY": settings.master_key.get_secret_value(),
        "MODELSEAL_KS_PUBLIC_URL": settings.public_url,
    }


def _ks(settings: Settings, *args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli_app, ["keyserver", *args], env=_env(settings))
    return r.exit_code, r.stdout, r.stderr


def test_migrate_admin_and_verify(settings: Settings) -> None:
    code, _, err = _ks(settings, "migrate")
    assert code == 0 and "0003" in err
    assert (settings.data_dir / "admin-token").exists()
    code, out, _ = _ks(settings, "admin", "create-publisher", "acme")
    assert code == 0 and out.strip().startswith("pub_")
    assert _ks(settings, "admin", "create-publisher", "acme")[0] == 1  # conflict
    code, out, err = _ks(settings, "admin", "create-token", "acme", "--label", "ci")
    token = out.strip()
    assert code == 0 and token.startswith("MSEAL-ADMIN:")
    token_id = err.split()[2]
    assert token_id.startswith("adm_")
    assert _ks(settings, "admin", "create-token", "nobody")[0] == 1
    assert _ks(settings, "admin", "revoke-token", token_id)[0] == 0
    code, out, err = _ks(settings, "audit-verify")
    assert code == 0 and out == "" and "OK" in err

    from modelseal.keyserver.bootstrap import open_keyserver

    server = open_keyserver(settings)
    events = [
        i["event"]
        for i in server.list_audit(server.authenticate_admin(_admin(settings)), chain=0, after_seq=0, limit=50)[0]
    ]
    server.db.dispose()
    assert events == ["publisher.created", "admin-token.created"]


def _admin(settings: Settings) -> str:
    return (settings.data_dir / "admin-token").read_text().strip()


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_with_no_setup(tmp_path: Path, workers: int) -> None:
    """`modelseal keyserver serve` in an empty directory with a clean environment just works (§17.1 row 1)."""
    with serve(tmp_path, workers=workers) as base:
        data = tmp_path / "modelseal-keyserver"
        assert stat.S_IMODE((data / "master.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((data / "admin-token").stat().st_mode) == 0o600
        token = (data / "admin-token").read_text().strip()
        status, info = get(base + "/v1/server-info", token)
        assert status == 200 and info["public_url"] == "http://127.0.0.1:8750"
        status, err = get(base + "/v1/server-info")
        assert status == 401 and err["error"]["code"] == "invalid-credential"  # type: ignore[index]


def test_serve_refuses_bad_settings(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSEAL")}
    env["MODELSEAL_KS_PUBLIC_URL"] = "http://keys.example.com"
    r = subprocess.run(
        [sys.executable, "-m", "modelseal", "keyserver", "serve"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert r.returncode == 2 and "MODELSEAL_KS_PUBLIC_URL" in r.stderr
    assert not (tmp_path / "modelseal-keyserver").exists()


def test_wrong_key_for_audit_verify(settings: Settings) -> None:
    assert _ks(settings, "migrate")[0] == 0
    bad = settings.model_copy()
    env = _env(bad) | {"MODELSEAL_KS_MASTER_KEY": LocalKey.generate()[1]}
    r = CliRunner().invoke(cli_app, ["keyserver", "audit-verify"], env=env)
    assert r.exit_code == 1 and "KeyUnavailable" in r.stderr
