"""Database access: engine, units of work (spec §5.3), migrations and SQLAlchemy Core statements.

Database errors are mapped to domain errors here (unique violations → :class:`Conflict`, lock
contention after retries → :class:`Busy`); nothing above this module sees SQLAlchemy exceptions.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import threading
import time
from collections import namedtuple
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, Engine, Row, and_, bindparam, create_engine, event, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from . import schema as t
from .errors import Busy, Conflict

T = TypeVar("T")
if TYPE_CHECKING:
    from typing import TypeAlias

    from typing_extensions import Unpack

    DbRow: TypeAlias = Row[Unpack[tuple[Any, ...]]]
MIGRATIONS = Path(__file__).parent / "migrations"
RETRIES = 3
_PG_RETRY_STATES = {"40001", "40P01", "55P03"}  # serialization failure, deadlock, lock not available


log = logging.getLogger("modelseal.keyserver")


class Database:
    """An engine plus the ``read()`` and ``write()`` units of work of spec §5.3."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        max_overflow: int = 10,
        sqlite_synchronous: str = "NORMAL",
        busy_timeout_ms: int = 5000,
    ) -> None:
        self.url = url
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self._lock_path: Path | None = None
        self._thread_lock = threading.Lock()
        self._background_checkpoints = False
        self._checkpointer: threading.Thread | None = None
        self._stop_checkpoints = threading.Event()
        self._lock_fd: int | None = None
        self._lock_pid = 0
        if self.is_sqlite:
            if not parsed.database or parsed.database == ":memory:":
                raise ValueError("the key server needs a SQLite file, not an in-memory database")
            db_path = Path(parsed.database)
            db_path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_path = db_path.with_name(db_path.name + ".write-lock")
            self.engine: Engine = create_engine(url, pool_size=pool_size, max_overflow=max_overflow)
            sync = sqlite_synchronous

            @event.listens_for(self.engine, "connect")
            def _connect(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute(f"PRAGMA synchronous={sync}")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
                if self._background_checkpoints:
                    # The background thread checkpoints; the automatic one stays as a backstop at
                    # 16x its default size, should the thread fall behind or stop.
                    cur.execute("PRAGMA wal_autocheckpoint=16000")
                cur.close()

            @event.listens_for(self.engine, "begin")
            def _begin(conn: Connection) -> None:
                mode = conn.get_execution_options().get("sqlite_begin", "")
                conn.exec_driver_sql(f"BEGIN {mode}".strip())

        else:
            self.engine = create_engine(
                url,
                pool_size=pool_size,
                max_overflow=max_overflow,
                pool_pre_ping=True,
                isolation_level="READ COMMITTED",
            )

    def start_checkpoints(self, interval_s: float = 1.0) -> None:
        """SQLite: copy the write-ahead log into the database from a background thread (a
        ``PASSIVE`` checkpoint, which never blocks writers) instead of inside whichever commit
        crosses the auto-checkpoint size: that commit would hold the write lock through the
        copy and its fsync, and every grant queued behind it would wait. No-op on PostgreSQL."""
        if not self.is_sqlite or self._checkpointer is not None:
            return
        self._background_checkpoints = True
        self.engine.dispose()  # connections opened from now on get the larger backstop size

        stop = self._stop_checkpoints = threading.Event()

        def run() -> None:
            failures = 0
            while not stop.wait(interval_s):
                try:
                    raw = self.engine.raw_connection()  # autocommit: a checkpoint runs outside BEGIN
                    try:
                        raw.cursor().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    finally:
                        raw.close()
                    failures = 0
                except Exception as exc:  # a busy or closed database: try again next time
                    failures += 1
                    if failures in (10, 1000):  # persistent: say so (the autocheckpoint backstop holds)
                        log.warning("SQLite background checkpoint failing (%d times): %s", failures, exc)

        self._checkpointer = threading.Thread(target=run, name="sqlite-checkpoint", daemon=True)
        self._checkpointer.start()

    def stop_checkpoints(self) -> None:
        self._stop_checkpoints.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=5)
        self._checkpointer = None

    def dispose(self) -> None:
        self.stop_checkpoints()
        self.engine.dispose()
        if self._lock_fd is not None and self._lock_pid == os.getpid():
            os.close(self._lock_fd)
        self._lock_fd = None

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only unit: one snapshot (SQLite ``BEGIN``), rolled back at the end."""
        with self.engine.connect() as conn:
            conn.begin()
            try:
                yield conn
            finally:
                conn.rollback()

    @contextmanager
    def _writer(self) -> Iterator[Connection]:
        if self._lock_path is None:
            with self.engine.connect() as conn, conn.begin():
                yield conn
            return
        # Writers on one host queue on a kernel lock instead of SQLite's sleeping busy handler:
        # threads of this process first on a thread lock (an flock is per open file, so threads
        # sharing the descriptor would not exclude each other), then processes on the flock.
        with self.engine.connect() as conn, self._thread_lock:  # pool checkout outside the lock
            if self._lock_fd is None or self._lock_pid != os.getpid():
                self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._lock_pid = os.getpid()
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                conn.execution_options(sqlite_begin="IMMEDIATE")
                with conn.begin():
                    yield conn
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def write(self, unit: Callable[[Connection], T]) -> T:
        """Run ``unit`` in one write transaction, retrying lock contention (spec §5.3).

        Raises:
            Conflict: a unique constraint rejected the change.
            Busy: the database stayed locked through every retry.
        """
        for attempt in range(RETRIES + 1):
            try:
                with self._writer() as conn:
                    return unit(conn)
            except IntegrityError as exc:
                raise Conflict("the change conflicts with an existing object") from exc
            except (OperationalError, DBAPIError) as exc:
                if not self._retryable(exc):
                    raise
                if attempt == RETRIES:
                    raise Busy("the database is busy; retry shortly") from exc
                time.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    def _retryable(self, exc: DBAPIError) -> bool:
        if self.is_sqlite:
            return "locked" in str(exc.orig) or "busy" in str(exc.orig)
        return getattr(exc.orig, "sqlstate", None) in _PG_RETRY_STATES

    # --- migrations ---------------------------------------------------------------------

    def _alembic_config(self) -> Any:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        return cfg

    def migrate(self, revision: str = "head") -> None:
        """Bring the schema to ``revision`` with the Alembic migrations (the only way it is created)."""
        from alembic import command

        cfg = self._alembic_config()
        with self._writer() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)

    def head_revision(self) -> str | None:
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(self._alembic_config()).get_current_head()

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.read() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def is_ready(self) -> bool:
        """The database answers and its schema is at the newest migration."""
        try:
            return self.current_revision() == self.head_revision()
        except Exception:  # any driver error means "not ready"; /readyz answers 503
            return False


# --- the grant path's statements -----------------------------------------------------------------


class _Fast:
    """A Core statement compiled once per dialect (and insert column set) and run on the DBAPI
    cursor of the unit's connection, inside its transaction.

    A grant runs about ten statements; SQLAlchemy's per-execution machinery (execution context,
    result wrapping, events) cost more than SQLite took to run them (docs/benchmarks.md). The SQL
    is still SQLAlchemy's, rendered for the connection's dialect; driver errors are re-raised as
    SQLAlchemy's exception types, so ``Database.write`` retries and maps them as before.
    """

    def __init__(self, stmt: Any) -> None:
        self.stmt = stmt
        self._compiled: dict[tuple[Any, ...], tuple[str, dict[str, Any], tuple[str, ...] | None]] = {}
        self._rows: dict[tuple[str, ...], Any] = {}

    def _get(self, dialect: Any, keys: tuple[str, ...]) -> tuple[str, dict[str, Any], tuple[str, ...] | None]:
        cache_key = (dialect.name, dialect.driver, dialect.paramstyle, keys)  # drivers differ in paramstyle
        found = self._compiled.get(cache_key)
        if found is None:
            compiled = self.stmt.compile(dialect=dialect, column_keys=list(keys) or None)
            order = tuple(compiled.positiontup) if compiled.positional else None
            defaults = {name: bind.value for name, bind in compiled.binds.items() if not bind.required}
            found = self._compiled[cache_key] = (str(compiled), defaults, order)
        return found

    def execute(self, conn: Connection, params: dict[str, Any], *, columns: tuple[str, ...] = ()) -> Any:
        sql, defaults, order = self._get(conn.dialect, columns)
        merged = {**defaults, **params}
        args: Any = [merged[k] for k in order] if order is not None else merged
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        dbapi = conn.dialect.loaded_dbapi
        try:
            cursor.execute(sql, args)
        except dbapi.Error as exc:
            raise DBAPIError.instance(sql, args, exc, dbapi.Error) from exc
        return cursor

    def first(self, conn: Connection, params: dict[str, Any]) -> Any:
        """The first row (a named tuple: attribute access like SQLAlchemy's rows), or None."""
        cursor = self.execute(conn, params)
        row = cursor.fetchone()
        if row is None:
            return None
        names = tuple(d[0] for d in cursor.description)
        cls = self._rows.get(names)
        if cls is None:
            cls = self._rows[names] = namedtuple("Row", names)
        return cls(*row)

    def rowcount(self, conn: Connection, params: dict[str, Any], *, columns: tuple[str, ...] = ()) -> int:
        return int(self.execute(conn, params, columns=columns).rowcount)


# --- statements -----------------------------------------------------------------------------


def get_secrets(conn: Connection) -> dict[str, DbRow]:
    return {r.name: r for r in conn.execute(select(t.server_secrets))}


def insert_secret(conn: Connection, name: str, kek_id: str, wrapped: bytes, now: int) -> None:
    conn.execute(insert(t.server_secrets).values(name=name, kek_id=kek_id, wrapped=wrapped, created_at=now))


def insert_server_key(conn: Connection, kid: bytes, purpose: str, public_key: bytes, now: int) -> None:
    conn.execute(insert(t.server_keys).values(kid=kid, purpose=purpose, public_key=public_key, created_at=now))


def server_keys(conn: Connection) -> Sequence[DbRow]:
    return conn.execute(select(t.server_keys).order_by(t.server_keys.c.created_at)).all()


def insert_publisher(conn: Connection, pub_id: str, name: str, now: int) -> None:
    conn.execute(insert(t.publishers).values(id=pub_id, name=name, created_at=now))


def publisher_by_name_or_id(conn: Connection, ref: str) -> DbRow | None:
    p = t.publishers
    return conn.execute(select(p).where((p.c.id == ref) | (p.c.name == ref))).first()


def count_publishers(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(t.publishers)).scalar_one())


def insert_admin_token(
    conn: Connection, token_id: str, publisher_id: str, secret_hash: bytes, label: str | None, now: int
) -> None:
    conn.execute(
        insert(t.admin_tokens).values(
            id=token_id, publisher_id=publisher_id, secret_hash=secret_hash, label=label, created_at=now
        )
    )


def admin_token_with_publisher(conn: Connection, token_id: str) -> DbRow | None:
    a, p = t.admin_tokens, t.publishers
    stmt = (
        select(a.c.id, a.c.publisher_id, a.c.secret_hash, a.c.revoked_at, p.c.disabled_at)
        .join(p, p.c.id == a.c.publisher_id)
        .where(a.c.id == token_id)
    )
    return conn.execute(stmt).first()


def revoke_admin_token(conn: Connection, token_id: str, now: int) -> DbRow | None:
    a = t.admin_tokens
    conn.execute(update(a).where(a.c.id == token_id, a.c.revoked_at.is_(None)).values(revoked_at=now))
    return conn.execute(select(a).where(a.c.id == token_id)).first()


def insert_model(conn: Connection, model_id: str, publisher_id: str, name: str, now: int) -> None:
    conn.execute(insert(t.models).values(id=model_id, publisher_id=publisher_id, name=name, created_at=now))


def _model_select() -> Any:
    m, k = t.models, t.model_keys
    keys = select(func.count()).where(k.c.model_id == m.c.id).scalar_subquery().label("keys")
    return select(m.c.id, m.c.publisher_id, m.c.name, m.c.created_at, keys)


def get_model(conn: Connection, publisher_id: str, model_id: str) -> DbRow | None:
    m = t.models
    return conn.execute(_model_select().where(m.c.id == model_id, m.c.publisher_id == publisher_id)).first()


def list_models(conn: Connection, publisher_id: str, after: str | None, limit: int) -> Sequence[DbRow]:
    m = t.models
    stmt = _model_select().where(m.c.publisher_id == publisher_id)
    if after is not None:
        stmt = stmt.where(m.c.id > after)
    return conn.execute(stmt.order_by(m.c.id).limit(limit)).all()


_MODEL_KEY = _Fast(select(t.model_keys).where(t.model_keys.c.key_commitment == bindparam("kc_")))


def model_key_by_commitment(conn: Connection, key_commitment: bytes) -> Any:
    return _MODEL_KEY.first(conn, {"kc_": key_commitment})


def insert_model_key(
    conn: Connection, model_id: str, key_commitment: bytes, salt: bytes, kek_id: str, wrapped: bytes, now: int
) -> None:
    conn.execute(
        insert(t.model_keys).values(
            model_id=model_id,
            key_commitment=key_commitment,
            salt=salt,
            kek_id=kek_id,
            wrapped_key=wrapped,
            created_at=now,
        )
    )


def revoke_model_key(conn: Connection, key_commitment: bytes, reason: str, now: int) -> bool:
    k = t.model_keys
    stmt = (
        update(k)
        .where(k.c.key_commitment == key_commitment, k.c.revoked_at.is_(None))
        .values(revoked_at=now, revoke_reason=reason)
    )
    return conn.execute(stmt).rowcount == 1


# --- licences and devices (S2) ---------------------------------------------------------------


def insert_licence(conn: Connection, row: dict[str, Any], model_ids: Sequence[str]) -> None:
    conn.execute(insert(t.licences).values(**row))
    conn.execute(insert(t.licence_models), [{"licence_id": row["id"], "model_id": m} for m in model_ids])


def own_model_ids(conn: Connection, publisher_id: str, model_ids: Sequence[str]) -> set[str]:
    m = t.models
    stmt = select(m.c.id).where(m.c.publisher_id == publisher_id, m.c.id.in_(list(model_ids)))
    return {r.id for r in conn.execute(stmt)}


# Statements on the grant path are built once: SQLAlchemy then reuses their compiled form and
# cache key instead of rebuilding an expression tree per call (most of a grant's CPU otherwise).
_LICENCE_BY_ID = _Fast(select(t.licences).where(t.licences.c.id == bindparam("id_")))
_LICENCE_BY_ID_LOCKED = _Fast(_LICENCE_BY_ID.stmt.with_for_update())
_LICENCE_BY_ID_SHARED = _Fast(_LICENCE_BY_ID.stmt.with_for_update(read=True))


def licence_by_id(conn: Connection, licence_id: str, *, lock: bool = False, shared: bool = False) -> Any:
    """The licence row; ``lock`` takes its row lock until commit (PostgreSQL ``FOR UPDATE``, or
    ``FOR SHARE`` with ``shared``; SQLite already holds the database write lock in a write unit)."""
    stmt = _LICENCE_BY_ID
    if lock and conn.dialect.name != "sqlite":
        stmt = _LICENCE_BY_ID_SHARED if shared else _LICENCE_BY_ID_LOCKED
    return stmt.first(conn, {"id_": licence_id})


def licence_models(conn: Connection, licence_ids: Sequence[str]) -> dict[str, list[str]]:
    lm = t.licence_models
    out: dict[str, list[str]] = {i: [] for i in licence_ids}
    stmt = select(lm.c.licence_id, lm.c.model_id).where(lm.c.licence_id.in_(list(licence_ids)))
    for r in conn.execute(stmt.order_by(lm.c.licence_id, lm.c.model_id)):
        out[r.licence_id].append(r.model_id)
    return out


def list_licences(
    conn: Connection,
    publisher_id: str,
    *,
    status: str,
    model_id: str | None,
    now: int,
    after: str | None,
    limit: int,
) -> Sequence[DbRow]:
    lic = t.licences
    stmt = select(lic).where(lic.c.publisher_id == publisher_id)
    unexpired = or_(lic.c.expires_at.is_(None), lic.c.expires_at > now)
    if status == "active":
        stmt = stmt.where(lic.c.revoked_at.is_(None), unexpired)
    elif status == "revoked":
        stmt = stmt.where(lic.c.revoked_at.is_not(None))
    elif status == "expired":
        stmt = stmt.where(lic.c.revoked_at.is_(None), lic.c.expires_at <= now)
    if model_id is not None:
        lm = t.licence_models
        licensed = select(lm.c.licence_id).where(lm.c.licence_id == lic.c.id, lm.c.model_id == model_id)
        stmt = stmt.where(licensed.exists())
    if after is not None:
        stmt = stmt.where(lic.c.id > after)
    return conn.execute(stmt.order_by(lic.c.id).limit(limit)).all()


def update_licence(conn: Connection, licence_id: str, values: dict[str, Any], models: Sequence[str] | None) -> None:
    conn.execute(update(t.licences).where(t.licences.c.id == licence_id).values(**values))
    if models is not None:
        lm = t.licence_models
        conn.execute(lm.delete().where(lm.c.licence_id == licence_id))
        conn.execute(insert(lm), [{"licence_id": licence_id, "model_id": m} for m in models])


def revoke_licence(conn: Connection, licence_id: str, reason: str, now: int) -> bool:
    lic = t.licences
    stmt = (
        update(lic)
        .where(lic.c.id == licence_id, lic.c.revoked_at.is_(None))
        .values(revoked_at=now, revoke_reason=reason)
    )
    return conn.execute(stmt).rowcount == 1


def claim_device_slot(conn: Connection, licence_id: str) -> bool:
    """The device limit (spec §5.3): one conditional increment; False when the licence is full or revoked."""
    lic = t.licences
    stmt = (
        update(lic)
        .where(lic.c.id == licence_id, lic.c.active_devices < lic.c.max_devices, lic.c.revoked_at.is_(None))
        .values(active_devices=lic.c.active_devices + 1)
    )
    return conn.execute(stmt).rowcount == 1


def release_device_slot(conn: Connection, licence_id: str) -> None:
    lic = t.licences
    stmt = (
        update(lic)
        .where(lic.c.id == licence_id, lic.c.active_devices > 0)
        .values(active_devices=lic.c.active_devices - 1)
    )
    conn.execute(stmt)


def device_by_key(conn: Connection, licence_id: str, *, x25519_pk: bytes, ed25519_pk: bytes) -> Sequence[DbRow]:
    """Devices of the licence registered with either key (at most two rows)."""
    d = t.devices
    stmt = select(d).where(d.c.licence_id == licence_id, or_(d.c.x25519_pk == x25519_pk, d.c.ed25519_pk == ed25519_pk))
    return conn.execute(stmt).all()


def insert_device(conn: Connection, row: dict[str, Any]) -> None:
    conn.execute(insert(t.devices).values(**row))


def _device_select() -> Any:
    d, lic = t.devices, t.licences
    return select(d, lic.c.publisher_id).join(lic, lic.c.id == d.c.licence_id)


def get_device(conn: Connection, publisher_id: str, device_id: str) -> DbRow | None:
    d, lic = t.devices, t.licences
    return conn.execute(_device_select().where(d.c.id == device_id, lic.c.publisher_id == publisher_id)).first()


def list_devices(
    conn: Connection, publisher_id: str, *, licence_id: str | None, status: str, after: str | None, limit: int
) -> Sequence[DbRow]:
    d, lic = t.devices, t.licences
    stmt = _device_select().where(lic.c.publisher_id == publisher_id)
    if licence_id is not None:
        stmt = stmt.where(d.c.licence_id == licence_id)
    if status == "active":
        stmt = stmt.where(d.c.revoked_at.is_(None))
    elif status == "revoked":
        stmt = stmt.where(d.c.revoked_at.is_not(None))
    if after is not None:
        stmt = stmt.where(d.c.id > after)
    return conn.execute(stmt.order_by(d.c.id).limit(limit)).all()


def revoke_device(conn: Connection, device_id: str, reason: str, now: int) -> bool:
    d = t.devices
    stmt = update(d).where(d.c.id == device_id, d.c.revoked_at.is_(None)).values(revoked_at=now, revoke_reason=reason)
    return conn.execute(stmt).rowcount == 1


_DEVICE_BY_ID = _Fast(select(t.devices).where(t.devices.c.id == bindparam("id_")))
_LICENCE_HAS_MODEL = _Fast(
    select(t.licence_models.c.model_id).where(
        t.licence_models.c.licence_id == bindparam("licence_id_"),
        t.licence_models.c.model_id == bindparam("model_id_"),
    )
)
_LICENCE_LIVE = (
    select(t.licences.c.id)
    .where(t.licences.c.id == bindparam("licence_id_"), t.licences.c.revoked_at.is_(None))
    .exists()
)
_USE_DEVICE_REQUEST = _Fast(
    update(t.devices)
    .where(
        t.devices.c.id == bindparam("id_"),
        t.devices.c.last_request_us < bindparam("ts_"),
        t.devices.c.revoked_at.is_(None),
        _LICENCE_LIVE,
    )
    .values(last_request_us=bindparam("ts_"), last_seen_at=bindparam("now_"))
)
_TOUCH_DEVICE = _Fast(
    update(t.devices)
    .where(t.devices.c.id == bindparam("id_"), t.devices.c.revoked_at.is_(None), _LICENCE_LIVE)
    .values(last_seen_at=bindparam("now_"))
)


def _count_grant_statement(dialect: Any) -> Any:
    u = t.usage_days
    stmt = dialect.insert(u).values(licence_id=bindparam("licence_id_"), day=bindparam("day_"), grants=1)
    return stmt.on_conflict_do_update(
        index_elements=[u.c.licence_id, u.c.day],
        set_={"grants": u.c.grants + 1},
        where=u.c.grants < bindparam("limit_"),
    ).returning(u.c.grants)


_COUNT_GRANT = {
    "sqlite": _Fast(_count_grant_statement(sqlite)),
    "postgresql": _Fast(_count_grant_statement(postgresql)),
}


def device_by_id(conn: Connection, device_id: str) -> Any:
    return _DEVICE_BY_ID.first(conn, {"id_": device_id})


def licence_has_model(conn: Connection, licence_id: str, model_id: str) -> bool:
    return _LICENCE_HAS_MODEL.first(conn, {"licence_id_": licence_id, "model_id_": model_id}) is not None


def use_device_request(conn: Connection, device_id: str, licence_id: str, ts_us: int | None, now: int) -> bool:
    """The replay guard (spec §5.3): False if ``ts_us`` is not newer than the device's last request,
    or the device or its licence is revoked. ``ts_us=None`` checks revocation only."""
    params = {"id_": device_id, "licence_id_": licence_id, "now_": now}
    if ts_us is None:
        return _TOUCH_DEVICE.rowcount(conn, params) == 1
    return _USE_DEVICE_REQUEST.rowcount(conn, params | {"ts_": ts_us}) == 1


def count_grant(conn: Connection, licence_id: str, day: int, limit: int) -> bool:
    """The daily usage limit (spec §5.3): one conditional upsert; False when ``limit`` is reached."""
    params = {"licence_id_": licence_id, "day_": day, "limit_": limit}
    return _COUNT_GRANT[conn.dialect.name].first(conn, params) is not None


def count_active_devices(conn: Connection, licence_id: str) -> int:
    d = t.devices
    stmt = select(func.count()).where(and_(d.c.licence_id == licence_id, d.c.revoked_at.is_(None)))
    return int(conn.execute(stmt).scalar_one())


# --- rate limiting (spec §14) -----------------------------------------------------------------


def rate_hit(conn: Connection, scope: str, key: bytes, window_start: int, limit: int) -> int | None:
    """Count one hit in the window; the window's count after it, or None if it was already over.

    The count stops at ``limit + 1``: the hit that takes it there is the window's first excess
    (audited once); later hits match no row (rowcount 0) and change nothing.
    """
    rw = t.rate_windows
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(rw).values(scope=scope, key=key, window_start=window_start, count=1)
    stmt = stmt.on_conflict_do_update(
        index_elements=[rw.c.scope, rw.c.key, rw.c.window_start],
        set_={"count": rw.c.count + 1},
        where=rw.c.count <= limit,
    ).returning(rw.c.count)
    row = conn.execute(stmt).first()
    return None if row is None else int(row[0])


# --- audit ----------------------------------------------------------------------------------


_AUDIT_HEAD = _Fast(
    select(t.audit_heads.c.seq, t.audit_heads.c.hash).where(t.audit_heads.c.chain == bindparam("chain_"))
)
_AUDIT_HEAD_LOCKED = _Fast(_AUDIT_HEAD.stmt.with_for_update())
_AUDIT_INSERT = _Fast(insert(t.audit_log))
_AUDIT_ADVANCE = _Fast(
    update(t.audit_heads)
    .where(t.audit_heads.c.chain == bindparam("chain_"), t.audit_heads.c.seq == bindparam("prev_seq_"))
    .values(seq=bindparam("seq_"), hash=bindparam("hash_"))
)


def lock_audit_head(conn: Connection, chain: int) -> Any:
    """The chain's head, locked until commit (PostgreSQL ``FOR UPDATE``; SQLite holds the write lock)."""
    stmt = _AUDIT_HEAD if conn.dialect.name == "sqlite" else _AUDIT_HEAD_LOCKED
    head = stmt.first(conn, {"chain_": chain})
    if head is None:
        raise LookupError(f"audit chain {chain} has no head row")
    return head


def append_audit(conn: Connection, row: dict[str, Any]) -> None:
    """Insert one record and advance the head; the head update must match exactly one row."""
    _AUDIT_INSERT.rowcount(conn, row, columns=tuple(sorted(row)))
    params = {"chain_": row["chain"], "prev_seq_": row["seq"] - 1, "seq_": row["seq"], "hash_": row["hash"]}
    if _AUDIT_ADVANCE.rowcount(conn, params) != 1:
        raise Busy("the audit chain head moved; retry")


def audit_heads(conn: Connection) -> Sequence[DbRow]:
    return conn.execute(select(t.audit_heads).order_by(t.audit_heads.c.chain)).all()


def audit_records(
    conn: Connection, chain: int, after_seq: int, limit: int, publisher_id: str | None = None
) -> Sequence[DbRow]:
    a = t.audit_log
    stmt = select(a).where(a.c.chain == chain, a.c.seq > after_seq)
    if publisher_id is not None:
        stmt = stmt.where(a.c.publisher_id == publisher_id)
    return conn.execute(stmt.order_by(a.c.seq).limit(limit)).all()


# --- grant tokens (spec §9) ---------------------------------------------------------------------


def insert_grant_token(conn: Connection, row: dict[str, Any]) -> None:
    conn.execute(insert(t.grant_tokens).values(**row))


def grant_token_by_id(conn: Connection, token_id: str) -> DbRow | None:
    return conn.execute(select(t.grant_tokens).where(t.grant_tokens.c.id == token_id)).first()


def redeem_grant_token(conn: Connection, token_id: str, grant_id: str, now: int) -> bool:
    """The one-time redemption (spec §5.3): true for exactly one caller, while unexpired."""
    c = t.grant_tokens.c
    result = conn.execute(
        update(t.grant_tokens)
        .where(c.id == token_id, c.redeemed_at.is_(None), c.expires_at > now)
        .values(redeemed_at=now, redeemed_grant_id=grant_id)
    )
    return result.rowcount == 1


def claim_offline_request(conn: Connection, request_hash: bytes, now: int) -> bool:
    """Record an offline request by its hash; false if it was processed before (spec §5.3)."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(t.offline_requests).values(request_hash=request_hash, processed_at=now)
    stmt = stmt.on_conflict_do_nothing(index_elements=["request_hash"]).returning(t.offline_requests.c.request_hash)
    return conn.execute(stmt).first() is not None  # (psycopg reports no rowcount for DO NOTHING)


def release_offline_request(conn: Connection, request_hash: bytes) -> None:
    """Forget a claimed offline request whose processing failed for a reason of the server's own."""
    conn.execute(t.offline_requests.delete().where(t.offline_requests.c.request_hash == request_hash))
