"""Audit log (spec §12): keyed hash chain, append-only triggers, tamper detection by audit-verify."""

from __future__ import annotations

import base64
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from modelseal.cli import app as cli_app
from modelseal.keyserver import audit
from modelseal.keyserver.services import Admin, KeyServer
from modelseal.keyserver.settings import Settings


def _env(settings: Settings) -> dict[str, str]:
    assert settings.master_key is not None
    return {
        "MODELSEAL_KS_DATA_DIR": str(settings.data_dir),
        "MODELSEAL_KS_DATABASE_URL": settings.effective_database_url,
        "MODELSEAL_KS_MASTER_KEY": settings.master_key.get_secret_value(),
        "MODELSEAL_KS_PUBLIC_URL": settings.public_url,
    }


def audit_verify(settings: Settings) -> tuple[int, list[dict[str, Any]]]:
    result = CliRunner().invoke(cli_app, ["keyserver", "audit-verify"], env=_env(settings))
    problems = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result.exit_code, problems


def _sql(server: KeyServer, *statements: str, params: dict[str, Any] | None = None) -> None:
    """Act as a database owner: drop the append-only triggers, then edit the log directly."""
    with server.db.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.execute(text("DROP TRIGGER IF EXISTS audit_log_no_update"))
            conn.execute(text("DROP TRIGGER IF EXISTS audit_log_no_delete"))
        else:
            conn.execute(text("DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log"))
        for stmt in statements:
            conn.execute(text(stmt), params or {})


@pytest.fixture
def logged(keyserver: KeyServer, admin: Admin) -> KeyServer:
    """A log of 2 bootstrap records plus 6 model.created records."""
    for i in range(6):
        keyserver.create_model(admin, f"model-{i}")
    return keyserver


def _seqs(problems: list[dict[str, Any]]) -> set[int]:
    return {p["seq"] for p in problems}


def test_records_chain_and_verify(logged: KeyServer, settings: Settings, admin: Admin) -> None:
    with logged.db.read() as conn:
        rows = conn.execute(text("SELECT * FROM audit_log ORDER BY seq")).mappings().all()
        head = conn.execute(text("SELECT seq, hash FROM audit_heads")).one()
    assert [r["seq"] for r in rows] == list(range(1, 9))
    assert [r["event"] for r in rows[:2]] == ["publisher.created", "admin-token.created"]
    assert {r["event"] for r in rows[2:]} == {"model.created"}
    assert bytes(rows[0]["prev_hash"]) == bytes(32)
    for prev, row in itertools.pairwise(rows):
        assert bytes(row["prev_hash"]) == bytes(prev["hash"])
    for row in rows:
        assert audit.record_hash(logged.secrets.audit_key, row) == bytes(row["hash"])
    assert (head.seq, bytes(head.hash)) == (8, bytes(rows[-1]["hash"]))
    assert rows[2]["actor"] == admin.token_id and rows[2]["publisher_id"] == admin.publisher_id
    assert audit_verify(settings) == (0, [])


def test_the_hash_is_keyed(logged: KeyServer) -> None:
    with logged.db.read() as conn:
        row = conn.execute(text("SELECT * FROM audit_log WHERE seq = 3")).mappings().one()
    assert audit.record_hash(bytes(32), row) != bytes(row["hash"])


def test_canonical_record_matches_spec_shape(logged: KeyServer) -> None:
    with logged.db.read() as conn:
        row = conn.execute(text("SELECT * FROM audit_log WHERE seq = 3")).mappings().one()
    c = audit.canonical_record(row)
    assert set(c) == {"v", "chain", "seq", "ts", "event", "outcome", "code", "publisher_id", "actor"} | {
        "licence_id",
        "device_id",
        "model_id",
        "grant_id",
        "detail",
        "prev",
    }
    import hashlib
    import hmac

    from modelseal._private.crypto import LABEL
    from modelseal._private.encoding import dumps_canonical

    expected = hmac.new(logged.secrets.audit_key, LABEL + b"audit-record\x00" + dumps_canonical(c), hashlib.sha256)
    assert expected.digest() == bytes(row["hash"])


@pytest.mark.parametrize(
    "verb", ["UPDATE audit_log SET event = 'x' WHERE seq = 1", "DELETE FROM audit_log WHERE seq = 1"]
)
def test_triggers_make_the_log_append_only(logged: KeyServer, verb: str) -> None:
    with pytest.raises(DBAPIError, match="append-only"), logged.db.engine.begin() as conn:
        conn.execute(text(verb))


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("detail", '\'{"name":"evil"}\''),
        ("detail", '\'{"name": "model-2"}\''),  # same meaning, not the canonical text
        ("event", "'model-key.revoked'"),
        ("actor", "'cli'"),
        ("publisher_id", "NULL"),
        ("code", "'x'"),
        ("licence_id", "'lic_x'"),
        ("device_id", "'dev_x'"),
        ("model_id", "NULL"),
        ("grant_id", "'grt_x'"),
        ("ts_us", "ts_us + 1"),
        ("outcome", "'denied'"),
        ("chain", "1"),
    ],
)
def test_edited_record_detected(logged: KeyServer, settings: Settings, column: str, value: str) -> None:
    _sql(logged, f"UPDATE audit_log SET {column} = {value} WHERE seq = 4")
    code, problems = audit_verify(settings)
    assert code == 1
    if column == "chain":  # the record left chain 0: a gap there
        assert {p["chain"] for p in problems} == {0} and 5 in _seqs(problems)
    else:
        assert _seqs(problems) == {4}
        assert "edited" in problems[0]["problem"]


@pytest.mark.parametrize("column", ["hash", "prev_hash"])
def test_edited_hash_columns_detected(logged: KeyServer, settings: Settings, column: str) -> None:
    _sql(logged, f"UPDATE audit_log SET {column} = :v WHERE seq = 4", params={"v": bytes(range(32))})
    code, problems = audit_verify(settings)
    assert code == 1 and 4 in _seqs(problems)


def test_deleted_record_detected(logged: KeyServer, settings: Settings) -> None:
    _sql(logged, "DELETE FROM audit_log WHERE seq = 5")
    code, problems = audit_verify(settings)
    assert code == 1
    assert 6 in _seqs(problems)
    assert any("gap" in p["problem"] for p in problems)


def test_reordered_records_detected(logged: KeyServer, settings: Settings) -> None:
    _sql(
        logged,
        "UPDATE audit_log SET seq = 1000 WHERE seq = 4",
        "UPDATE audit_log SET seq = 4 WHERE seq = 5",
        "UPDATE audit_log SET seq = 5 WHERE seq = 1000",
    )
    code, problems = audit_verify(settings)
    assert code == 1
    assert {4, 5} <= _seqs(problems)


def test_inserted_record_detected(logged: KeyServer, settings: Settings) -> None:
    _sql(
        logged,
        "UPDATE audit_log SET seq = 9 WHERE seq = 8",  # make room at 7
        "UPDATE audit_log SET seq = 8 WHERE seq = 7",
    )
    with logged.db.read() as conn:
        donor = dict(conn.execute(text("SELECT * FROM audit_log WHERE seq = 6")).mappings().one())
    donor.update(seq=7, hash=bytes(range(32)), prev_hash=donor["hash"])
    cols = ", ".join(donor)
    with logged.db.engine.begin() as conn:
        conn.execute(text(f"INSERT INTO audit_log ({cols}) VALUES ({', '.join(':' + c for c in donor)})"), donor)
    code, problems = audit_verify(settings)
    assert code == 1
    assert 7 in _seqs(problems)


def test_deleted_tail_without_head_update_detected(logged: KeyServer, settings: Settings) -> None:
    _sql(logged, "DELETE FROM audit_log WHERE seq = 8")
    code, problems = audit_verify(settings)
    assert code == 1
    assert any("head" in p["problem"] for p in problems)


def test_wrong_master_key_cannot_verify(logged: KeyServer, settings: Settings) -> None:
    from modelseal.keyserver.crypto import LocalKey

    env = _env(settings) | {"MODELSEAL_KS_MASTER_KEY": LocalKey.generate()[1]}
    result = CliRunner().invoke(cli_app, ["keyserver", "audit-verify"], env=env)
    assert result.exit_code == 1
    assert "KeyUnavailable" in result.stderr


def test_audit_route_lists_only_own_records(logged: KeyServer, client: Any, admin: Admin) -> None:
    other = logged.create_publisher("other")
    _, token = logged.create_admin_token(other)
    r = client.get("/v1/admin/audit", params={"limit": 3})
    assert r.status_code == 200
    page = r.json()
    assert [i["seq"] for i in page["items"]] == [1, 2, 3] and page["next_seq"] == 3
    r = client.get("/v1/admin/audit", params={"after_seq": 3, "limit": 500})
    events = [i["event"] for i in r.json()["items"]]
    assert events == ["model.created"] * 5 and r.json()["next_seq"] is None
    theirs = client.get("/v1/admin/audit", headers={"Authorization": f"Bearer {token}"}).json()["items"]
    assert [i["event"] for i in theirs] == ["publisher.created", "admin-token.created"]
    assert all(i["publisher_id"] == other for i in theirs)


def test_deleted_tail_with_rewritten_head_needs_an_anchor(
    logged: KeyServer, settings: Settings, admin: Admin, tmp_path: Path
) -> None:
    """The chain alone cannot show the newest records deleted together with a head row rewritten
    to the record before them; an anchor written earlier (and kept off the server) does."""
    anchor = tmp_path / "anchor.json"
    result = CliRunner().invoke(
        cli_app, ["keyserver", "audit-verify", "--write-anchor", str(anchor)], env=_env(settings)
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(anchor.read_text())["heads"][0]["seq"] == 8
    logged.create_model(admin, "after-the-anchor")  # seq 9
    _sql(
        logged,
        "DELETE FROM audit_log WHERE seq >= 8",
        "UPDATE audit_heads SET seq = 7, hash = (SELECT hash FROM audit_log WHERE seq = 7)",
    )
    assert audit_verify(settings) == (0, [])  # the chain alone: consistent
    result = CliRunner().invoke(cli_app, ["keyserver", "audit-verify", "--anchor", str(anchor)], env=_env(settings))
    assert result.exit_code == 1
    [problem] = [json.loads(line) for line in result.stdout.splitlines()]
    assert problem["seq"] == 8 and "records deleted" in problem["problem"]


def test_anchor_detects_a_changed_anchored_record_and_rejects_junk(
    logged: KeyServer, settings: Settings, tmp_path: Path
) -> None:
    anchor = tmp_path / "anchor.json"
    assert (
        CliRunner()
        .invoke(cli_app, ["keyserver", "audit-verify", "--write-anchor", str(anchor)], env=_env(settings))
        .exit_code
        == 0
    )
    good = logged.verify_audit([json.loads(anchor.read_text())])
    assert good == []
    forged = json.loads(anchor.read_text())
    forged["heads"][0]["hash"] = base64.b64encode(bytes(32)).decode()
    [problem] = logged.verify_audit([forged])
    assert "missing or was changed" in problem.problem
    junk = tmp_path / "junk.json"
    for text_ in ('{"type": "something-else"}', '{"type": "modelseal-audit-anchor", "v": 1, "heads": []}'):
        junk.write_text(text_)
        result = CliRunner().invoke(cli_app, ["keyserver", "audit-verify", "--anchor", str(junk)], env=_env(settings))
        assert result.exit_code == 2 and "anchor" in result.stderr


def test_driver_errors_on_the_fast_path_keep_their_meaning(logged: KeyServer) -> None:
    """Statements run on the DBAPI cursor (repository._Fast) still raise SQLAlchemy's exception
    types, so a unique violation becomes ``Conflict`` and the log is unchanged."""
    from modelseal.keyserver import repository as repo
    from modelseal.keyserver.errors import Conflict

    with logged.db.read() as conn:
        head = repo.lock_audit_head(conn, 0)
        [last] = repo.audit_records(conn, 0, head.seq - 1, 1)
    duplicate = dict(last._mapping)
    with pytest.raises(Conflict):
        logged.db.write(lambda conn: repo.append_audit(conn, duplicate))
    assert logged.verify_audit() == []
    with logged.db.read() as conn:
        assert repo.lock_audit_head(conn, 0).seq == head.seq
