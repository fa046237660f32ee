"""API keys and traced answers in SQL (docs/spec/gateway-v1.md §4, §7): SQLite by default,
PostgreSQL by URL. The schema is created only by the Alembic migrations in ``migrations/``.

An API key reads ``msk_<id>_<secret>``. Only ``HMAC-SHA256(pepper, secret)`` is stored, so a copy of
the database does not let anyone call the gateway; checking a key compares in constant time, and an
unknown id costs the same HMAC as a wrong secret, so timing does not reveal which ids exist.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import io
import re
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

from .errors import ConfigError, UnknownKey

metadata = sa.MetaData()

keys_table = sa.Table(
    "gateway_keys",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("tier", sa.Text, nullable=False),
    sa.Column("scopes", sa.Text, nullable=False),
    sa.Column("secret_hash", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("revoked_at", sa.BigInteger, nullable=True),
)

traces_table = sa.Table(
    "gateway_traces",
    metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("key_id", sa.Text, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("input", sa.LargeBinary, nullable=False),
    sa.Column("served", sa.Integer, nullable=False),
    sa.Column("original", sa.Integer, nullable=False),
    sa.Index("gateway_traces_key", "key_id", "seq"),
)

meta_table = sa.Table(
    "gateway_meta",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

SCOPES = ("predict", "metrics")
_KEY_RE = re.compile(r"msk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._@:-]{0,99}")


@dataclass(frozen=True)
class ApiKey:
    """A key as the gateway sees it (never its secret)."""

    id: str
    name: str
    tier: str
    scopes: tuple[str, ...]
    created_at: int
    revoked_at: int | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "tier": self.tier,
            "scopes": list(self.scopes),
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }


@dataclass(frozen=True)
class TraceRecord:
    key_id: str
    input: np.ndarray
    served: int
    original: int


def parse_key(token: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed key, else None."""
    m = _KEY_RE.fullmatch(token)
    return (m.group(1), m.group(2)) if m else None


def _row_bytes(row: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(row, dtype="<f4"), allow_pickle=False)
    return buf.getvalue()


def _row_from(data: bytes) -> np.ndarray:
    arr: np.ndarray = np.load(io.BytesIO(data), allow_pickle=False)
    return arr


class KeyStore:
    """The gateway's database: API keys (with a cached view for the request path) and trace records."""

    def __init__(self, url: str, pepper: bytes, *, refresh_s: float = 2.0) -> None:
        if len(pepper) < 32:
            raise ValueError("the pepper must be at least 32 bytes")
        self._pepper = bytes(pepper)
        self.refresh_s = refresh_s
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            if not parsed.database or parsed.database == ":memory:":
                raise ConfigError("database_url: the gateway needs a SQLite file, not an in-memory database")
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url)

            @event.listens_for(self.engine, "connect")
            def _connect(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA busy_timeout=5000")
                cur.close()

        else:
            self.engine = create_engine(url, pool_pre_ping=True)
        self._cache: dict[str, tuple[bytes, ApiKey]] = {}
        self._cache_at = -1e300
        self._cache_lock = threading.Lock()
        self._dummy = hmac.new(self._pepper, b"dummy", hashlib.sha256).digest()
        self._since_trim = 0
        self._refresher: threading.Thread | None = None
        self._refresher_stop = threading.Event()

    # -- schema ---------------------------------------------------------------------------------
    def migrate(self, revision: str = "head") -> None:
        """Bring the schema to ``revision`` (the only way it is created)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
        if self.is_sqlite:  # it holds key hashes and the traced inputs: owner only
            path = Path(make_url(str(self.engine.url)).database or "")
            for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                if p.exists():
                    p.chmod(0o600)

    def set_meta(self, name: str, value: str) -> None:
        with self._tx() as conn:
            if conn.execute(meta_table.update().where(meta_table.c.name == name).values(value=value)).rowcount == 0:
                conn.execute(meta_table.insert().values(name=name, value=value))

    def meta(self, name: str) -> str | None:
        with self._tx() as conn:
            value = conn.execute(sa.select(meta_table.c.value).where(meta_table.c.name == name)).scalar()
        return None if value is None else str(value)

    def dispose(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # -- keys -----------------------------------------------------------------------------------
    def _hash(self, secret: str) -> bytes:
        return hmac.new(self._pepper, secret.encode("ascii"), hashlib.sha256).digest()

    def create(self, name: str, *, tier: str = "default", scopes: Sequence[str] = ("predict",)) -> tuple[ApiKey, str]:
        """A new key: its record and the full ``msk_…`` token (shown once, never stored)."""
        if not _NAME_RE.fullmatch(name):
            raise ValueError("a key name is 1-100 characters: letters, digits, space and ._@:-")
        _check_scopes(scopes)
        key_id = secrets.token_hex(8)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
        record = ApiKey(key_id, name, tier, tuple(scopes), int(time.time()), None)
        with self._tx() as conn:
            conn.execute(
                keys_table.insert().values(
                    id=key_id,
                    name=name,
                    tier=tier,
                    scopes=",".join(scopes),
                    secret_hash=self._hash(secret),
                    created_at=record.created_at,
                )
            )
        self._cache_at = -1e300
        return record, f"msk_{key_id}_{secret}"

    def all_keys(self) -> list[ApiKey]:
        with self._tx() as conn:
            rows = conn.execute(keys_table.select().order_by(keys_table.c.created_at, keys_table.c.id)).all()
        return [_key_from(r) for r in rows]

    def get(self, key_id: str) -> ApiKey:
        with self._tx() as conn:
            row = conn.execute(keys_table.select().where(keys_table.c.id == key_id)).first()
        if row is None:
            raise UnknownKey(f"no API key {key_id!r}")
        return _key_from(row)

    def revoke(self, key_id: str) -> ApiKey:
        with self._tx() as conn:
            done = conn.execute(
                keys_table.update()
                .where(keys_table.c.id == key_id, keys_table.c.revoked_at.is_(None))
                .values(revoked_at=int(time.time()))
            )
        if done.rowcount == 0:
            self.get(key_id)  # unknown id: UnknownKey; else it was already revoked
        self._cache_at = -1e300
        return self.get(key_id)

    def update(self, key_id: str, *, tier: str | None = None, scopes: Sequence[str] | None = None) -> ApiKey:
        values: dict[str, Any] = {}
        if tier is not None:
            values["tier"] = tier
        if scopes is not None:
            _check_scopes(scopes)
            values["scopes"] = ",".join(scopes)
        if values:
            with self._tx() as conn:
                done = conn.execute(keys_table.update().where(keys_table.c.id == key_id).values(**values))
            if done.rowcount == 0:
                raise UnknownKey(f"no API key {key_id!r}")
        self._cache_at = -1e300
        return self.get(key_id)

    def authenticate(self, token: str) -> ApiKey | None:
        """The active key ``token`` names, or None (malformed, unknown, wrong secret or revoked alike)."""
        parsed = parse_key(token)
        key_id, secret = parsed if parsed else ("", "x")
        now = time.monotonic()
        if now - self._cache_at > self.refresh_s:
            self._refresh(now)
        entry = self._cache.get(key_id)
        expected = entry[0] if entry else self._dummy
        ok = hmac.compare_digest(self._hash(secret), expected)  # the same work for an unknown id
        if not ok or entry is None or parsed is None:
            return None
        return entry[1] if entry[1].active else None

    def start_refresher(self) -> None:
        """Refresh the cached key table on a thread every ``refresh_s / 2``, so requests find it
        fresh instead of reading the whole table on the event loop. A request still refreshes it
        itself when the copy is older than ``refresh_s`` (the thread is behind or the database is
        unreachable), so revocation still reaches the worker within ``refresh_s``."""
        if self.refresh_s <= 0 or self._refresher is not None:
            return
        self._refresher_stop.clear()
        self._refresher = threading.Thread(target=self._refresh_loop, name="gateway-keys", daemon=True)
        self._refresher.start()

    def stop_refresher(self) -> None:
        self._refresher_stop.set()
        if self._refresher is not None:
            self._refresher.join(10)
        self._refresher = None

    def _refresh_loop(self) -> None:
        while not self._refresher_stop.wait(self.refresh_s / 2):
            # errors are left to the request path, which refreshes (and reports Unavailable) once
            # the copy is older than refresh_s
            with contextlib.suppress(Exception):
                self._refresh(time.monotonic(), force=True)

    def _refresh(self, now: float, *, force: bool = False) -> None:
        with self._cache_lock:
            if not force and now - self._cache_at <= self.refresh_s:
                return
            with self._tx() as conn:
                rows = conn.execute(keys_table.select()).all()
            self._cache = {r.id: (bytes(r.secret_hash), _key_from(r)) for r in rows}
            self._cache_at = now

    # -- traces ---------------------------------------------------------------------------------
    def add_traces(self, records: Sequence[TraceRecord], *, keep: int) -> None:
        """Store altered answers; each key keeps its newest ``keep`` (checked every 1,000 records, so
        a key may briefly hold up to ``keep + 1000``)."""
        if not records:
            return
        now = int(time.time())
        with self._tx() as conn:
            conn.execute(
                traces_table.insert(),
                [
                    {
                        "key_id": r.key_id,
                        "created_at": now,
                        "input": _row_bytes(r.input),
                        "served": int(r.served),
                        "original": int(r.original),
                    }
                    for r in records
                ],
            )
            self._since_trim += len(records)
            if self._since_trim < 1000:  # trimming scans a key's records: do it once per 1,000 inserts
                return
            self._since_trim = 0
            for key_id in self.traced_keys_in(conn):
                cutoff = conn.execute(
                    sa.select(traces_table.c.seq)
                    .where(traces_table.c.key_id == key_id)
                    .order_by(traces_table.c.seq.desc())
                    .offset(keep)
                    .limit(1)
                ).scalar()
                if cutoff is not None:
                    conn.execute(
                        traces_table.delete().where(traces_table.c.key_id == key_id, traces_table.c.seq <= cutoff)
                    )

    @staticmethod
    def traced_keys_in(conn: Connection) -> list[str]:
        return [str(k) for k in conn.execute(sa.select(traces_table.c.key_id).distinct()).scalars()]

    def traces(self, key_id: str, *, limit: int | None = None) -> list[TraceRecord]:
        q = traces_table.select().where(traces_table.c.key_id == key_id).order_by(traces_table.c.seq)
        if limit is not None:
            q = q.limit(limit)
        with self._tx() as conn:
            rows = conn.execute(q).all()
        return [TraceRecord(r.key_id, _row_from(r.input), r.served, r.original) for r in rows]

    def traced_keys(self) -> dict[str, int]:
        """Key id -> number of stored trace records."""
        with self._tx() as conn:
            rows = conn.execute(sa.select(traces_table.c.key_id, sa.func.count()).group_by(traces_table.c.key_id)).all()
        return {str(k): int(n) for k, n in rows}


def _check_scopes(scopes: Sequence[str]) -> None:
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise ValueError(f"scopes must be a non-empty subset of {', '.join(SCOPES)}")


def _key_from(row: Any) -> ApiKey:
    return ApiKey(
        row.id,
        row.name,
        row.tier,
        tuple(s for s in row.scopes.split(",") if s),
        int(row.created_at),
        None if row.revoked_at is None else int(row.revoked_at),
    )
