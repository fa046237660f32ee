"""Building a ready :class:`~.services.KeyServer` from settings: master key, database, secrets."""

from __future__ import annotations

import logging
import os

from .crypto import LocalKey, write_master_key_file
from .errors import SettingsError
from .repository import Database
from .services import Clock, KeyServer, RandomSource, initialize
from .settings import Settings, check_settings, parse_rate

log = logging.getLogger("modelseal.keyserver")


def load_master_key(settings: Settings) -> LocalKey:
    """The master key from ``MASTER_KEY``, ``MASTER_KEY_FILE`` or, for local SQLite only, a generated file."""
    if settings.master_key is not None:
        return LocalKey.parse(settings.master_key.get_secret_value(), allow_dev=settings.dev)
    path = settings.effective_master_key_file
    if not path.exists():
        if settings.master_key_file is not None or not settings.is_sqlite:
            raise SettingsError("MASTER_KEY", "is required (or MASTER_KEY_FILE naming an existing file)")
        log.warning("generated a new master key at %s: back it up apart from the database", path)
        return write_master_key_file(path)
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError("MASTER_KEY_FILE", f"cannot read {path}: {exc}") from None
    return LocalKey.parse(text, allow_dev=settings.dev)


def database_for(settings: Settings) -> Database:
    return Database(
        settings.effective_database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        sqlite_synchronous=settings.sqlite_synchronous,
        busy_timeout_ms=settings.sqlite_busy_timeout_ms,
    )


def open_keyserver(
    settings: Settings,
    *,
    migrate: bool = True,
    bootstrap: bool = True,
    clock: Clock | None = None,
    rng: RandomSource | None = None,
) -> KeyServer:
    """Check settings, load the master key, migrate, create or unwrap server secrets.

    Raises:
        SettingsError: a setting is refused (names it).
        KeyUnavailable: the master key does not open this database's secrets.
    """
    check_settings(settings)
    if settings.is_sqlite or settings.master_key is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    kek = load_master_key(settings)
    if kek.is_dev and not settings.dev:
        raise SettingsError("MASTER_KEY", "the well-known dev master key is refused outside dev mode")
    db = database_for(settings)
    if migrate:
        db.migrate()
    from .services import OsRandom, SystemClock

    secrets = initialize(db, kek, dev=settings.dev, clock=clock or SystemClock(), rng=rng or OsRandom())
    server = KeyServer(
        db,
        kek,
        secrets,
        public_url=settings.public_url,
        clock=clock,
        rng=rng,
        clock_skew_s=settings.clock_skew_s,
        offline_request_max_age_s=settings.offline_request_max_age_s,
        rates={
            "activate-ip": parse_rate(settings.rate_activate_ip),
            "activate-licence": parse_rate(settings.rate_activate_licence),
            "auth-fail-ip": parse_rate(settings.rate_auth_fail_ip),
        },
    )
    if bootstrap:
        token = settings.dev_admin_token.get_secret_value() if settings.dev_admin_token else None
        path = server.bootstrap(settings.data_dir, token)
        if path is not None:
            log.warning("first start: wrote an admin token for publisher 'default' to %s", os.fspath(path))
    return server
