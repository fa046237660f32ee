"""Settings (spec §15): refusals outside dev mode name the setting and exit 2; dev mode allows them."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelseal.cli import app as cli_app
from modelseal.keyserver.bootstrap import open_keyserver
from modelseal.keyserver.crypto import LocalKey
from modelseal.keyserver.errors import SettingsError
from modelseal.keyserver.settings import Settings, check_settings, load_settings

GOOD_PG = "postgresql+psycopg://ks:long-random-pw@db.internal/ks"


def _settings(tmp_path: Path, **kw: object) -> Settings:
    base: dict[str, object] = {"data_dir": tmp_path / "data", "public_url": "https://keys.example.com"}
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


REFUSALS: list[tuple[dict[str, object], str]] = [
    ({"master_key": "dev"}, "MASTER_KEY"),
    ({"dev_admin_token": "MSEAL-ADMIN:x"}, "DEV_ADMIN_TOKEN"),
    ({"public_url": "http://keys.example.com"}, "PUBLIC_URL"),
    ({"database_url": "postgresql+psycopg://ks@db.internal/ks"}, "DATABASE_URL"),
    ({"database_url": "postgresql+psycopg://ks:postgres@db.internal/ks"}, "DATABASE_URL"),
    ({"database_url": "postgresql+psycopg://ks:changeme@db.internal/ks"}, "DATABASE_URL"),
    ({"database_url": "postgresql+psycopg://ks:modelseal@db.internal/ks"}, "DATABASE_URL"),
    ({"database_url": "postgresql+psycopg://ks:password@db.internal/ks"}, "DATABASE_URL"),
]


@pytest.mark.parametrize(("kw", "setting"), REFUSALS)
def test_refused_outside_dev_mode(tmp_path: Path, kw: dict[str, object], setting: str) -> None:
    with pytest.raises(SettingsError, match=f"MODELSEAL_KS_{setting}") as info:
        check_settings(_settings(tmp_path, **kw))
    assert info.value.setting == setting and info.value.exit_code == 2
    check_settings(_settings(tmp_path, dev=True, **kw))  # the same settings are fine in dev mode


def test_acceptable_production_settings(tmp_path: Path) -> None:
    check_settings(_settings(tmp_path, database_url=GOOD_PG))
    check_settings(_settings(tmp_path, public_url="http://127.0.0.1:8750"))
    check_settings(_settings(tmp_path, public_url="http://[::1]:8750"))


@pytest.mark.parametrize("url", ["ftp://x", "https://u:p@x", "https://x/", "https://x?q=1", "https://x#f", "nonsense"])
def test_malformed_public_url(tmp_path: Path, url: str) -> None:
    with pytest.raises(SettingsError, match="PUBLIC_URL"):
        check_settings(_settings(tmp_path, dev=True, public_url=url))


def test_master_key_file_must_be_private(tmp_path: Path) -> None:
    key_file = tmp_path / "master.key"
    key_file.write_text(LocalKey.generate()[1])
    key_file.chmod(0o640)
    with pytest.raises(SettingsError, match="MASTER_KEY_FILE"):
        check_settings(_settings(tmp_path, master_key_file=key_file))
    key_file.chmod(0o600)
    check_settings(_settings(tmp_path, master_key_file=key_file))


def test_both_key_sources_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="MASTER_KEY"):
        check_settings(_settings(tmp_path, master_key=LocalKey.generate()[1], master_key_file=tmp_path / "k"))


def test_master_key_required_for_postgres(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="MASTER_KEY"):
        open_keyserver(_settings(tmp_path, database_url=GOOD_PG))


def test_first_start_on_sqlite_generates_key_and_token(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    server = open_keyserver(settings)
    key_file, token_file = tmp_path / "data" / "master.key", tmp_path / "data" / "admin-token"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    token = token_file.read_text().strip()
    assert server.authenticate_admin(token).publisher_id
    server.db.dispose()
    # a second start reuses both and writes no new token
    token_file.unlink()
    again = open_keyserver(settings)
    assert not token_file.exists()
    assert again.authenticate_admin(token).publisher_id
    with again.db.read() as conn:
        from sqlalchemy import text

        assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
    again.db.dispose()


def test_dev_database_refused_outside_dev_mode(tmp_path: Path) -> None:
    key = LocalKey.generate()[1]
    open_keyserver(_settings(tmp_path, dev=True, master_key=key)).db.dispose()
    with pytest.raises(SettingsError, match="MODELSEAL_KS_DEV: the database was initialised in dev mode"):
        open_keyserver(_settings(tmp_path, master_key=key))


def test_dev_mode_server_and_fixed_admin_token(tmp_path: Path) -> None:
    from modelseal.keyserver.crypto import ADMIN_PREFIX, encode_secret

    token = encode_secret(ADMIN_PREFIX, bytes(range(16)), bytes(range(32)))
    dev = _settings(tmp_path, dev=True, master_key="dev", dev_admin_token=token)
    server = open_keyserver(dev)
    admin = server.authenticate_admin(token)
    with server.db.read() as conn:
        from modelseal.keyserver import repository as repo

        assert repo.publisher_by_name_or_id(conn, admin.publisher_id).name == "dev"  # type: ignore[union-attr]
    assert server.secrets.mode == "dev"
    server.db.dispose()
    open_keyserver(dev).db.dispose()  # restart: token provisioned once


def test_environment_and_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / "ks.env"
    env_file.write_text("MODELSEAL_KS_PORT=9000\nMODELSEAL_KS_PUBLIC_URL=https://from-file.example\n")
    monkeypatch.setenv("MODELSEAL_KS_PUBLIC_URL", "https://from-env.example")
    s = load_settings(env_file, host="0.0.0.0", port=None)
    assert (s.port, s.public_url, s.host) == (9000, "https://from-env.example", "0.0.0.0")
    assert s.effective_database_url.endswith("modelseal-keyserver/keyserver.db")


def test_cli_exits_2_naming_the_setting(tmp_path: Path) -> None:
    env = {"MODELSEAL_KS_DATA_DIR": str(tmp_path), "MODELSEAL_KS_MASTER_KEY": "dev"}
    result = CliRunner().invoke(cli_app, ["keyserver", "migrate"], env=env)
    assert result.exit_code == 2
    assert "MODELSEAL_KS_MASTER_KEY" in result.stderr
