"""Key server settings (spec §15): environment variables ``MODELSEAL_KS_*`` or an env file.

:func:`check_settings` refuses, outside dev mode, every default or weak secret the spec lists;
:class:`~.errors.SettingsError` names the offending setting (the CLI exits 2 with it).
"""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import SettingsError

WEAK_DB_PASSWORDS = frozenset({"", "postgres", "password", "modelseal", "changeme"})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELSEAL_KS_", extra="ignore")

    dev: bool = False
    data_dir: Path = Path("./modelseal-keyserver")
    database_url: str | None = None
    master_key: SecretStr | None = None
    master_key_file: Path | None = None
    public_url: str = "http://127.0.0.1:8750"
    host: str = "127.0.0.1"
    port: int = Field(8750, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=256)
    threads: int = Field(4, ge=1, le=1000)  # per worker, running the synchronous services
    db_pool_size: int = Field(10, ge=1)
    db_max_overflow: int = Field(10, ge=0)
    sqlite_synchronous: str = Field("NORMAL", pattern="^(NORMAL|FULL)$")
    sqlite_busy_timeout_ms: int = Field(5000, ge=0)
    clock_skew_s: int = Field(300, ge=1)
    offline_request_max_age_s: int = Field(604800, ge=60)
    max_body_bytes: int = Field(65536, ge=1024)
    trusted_proxies: list[str] = []
    rate_activate_ip: str = Field("30/60", pattern=r"^[1-9][0-9]{0,8}/[1-9][0-9]{0,8}$")
    rate_activate_licence: str = Field("60/3600", pattern=r"^[1-9][0-9]{0,8}/[1-9][0-9]{0,8}$")
    rate_auth_fail_ip: str = Field("60/60", pattern=r"^[1-9][0-9]{0,8}/[1-9][0-9]{0,8}$")
    audit_chains: int = Field(1, ge=1, le=1)  # several chains arrive in S5
    docs: bool = True
    access_log: bool = False  # uvicorn's line per request; every decision is in the audit log
    dev_admin_token: SecretStr | None = None

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'keyserver.db'}"

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")

    @property
    def effective_master_key_file(self) -> Path:
        return self.master_key_file or self.data_dir / "master.key"


def parse_rate(value: str) -> tuple[int, int]:
    """``"count/seconds"`` (spec §15) as ``(count, seconds)``."""
    count, _, seconds = value.partition("/")
    return int(count), int(seconds)


def load_settings(env_file: Path | None = None, **overrides: object) -> Settings:
    """Settings from the environment (and ``env_file``), with command-line ``overrides`` on top."""
    given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    return Settings(_env_file=env_file, **given)  # type: ignore[call-arg]


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_settings(settings: Settings) -> None:
    """Refuse settings that are only acceptable in dev mode (spec §15).

    Raises:
        SettingsError: naming the first offending setting.
    """
    url = urlsplit(settings.public_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise SettingsError("PUBLIC_URL", "must be an http(s) URL with a host")
    if url.username or url.password or url.query or url.fragment or settings.public_url.endswith("/"):
        raise SettingsError("PUBLIC_URL", "must have no userinfo, query, fragment or trailing '/'")
    if settings.master_key is not None and settings.master_key_file is not None:
        raise SettingsError("MASTER_KEY", "set MASTER_KEY or MASTER_KEY_FILE, not both")
    if settings.dev:
        return
    if settings.master_key is not None and settings.master_key.get_secret_value() == "dev":
        raise SettingsError("MASTER_KEY", "the well-known dev master key is refused outside dev mode")
    if settings.dev_admin_token is not None:
        raise SettingsError("DEV_ADMIN_TOKEN", "is only allowed in dev mode")
    if url.scheme != "https" and not _is_loopback(url.hostname):
        raise SettingsError("PUBLIC_URL", "must be https:// unless its host is loopback")
    if not settings.is_sqlite:
        from sqlalchemy.engine import make_url

        try:
            password = make_url(settings.effective_database_url).password
        except Exception as exc:  # sqlalchemy raises ArgumentError and friends
            raise SettingsError("DATABASE_URL", f"not a database URL ({type(exc).__name__})") from None
        if str(password or "") in WEAK_DB_PASSWORDS:
            raise SettingsError("DATABASE_URL", "the database password is empty or a well-known default")
    if settings.master_key is None:
        path = settings.effective_master_key_file
        if path.exists() and stat.S_IMODE(os.stat(path).st_mode) & 0o077:
            raise SettingsError("MASTER_KEY_FILE", f"{path} must not be group- or world-accessible (chmod 600)")
