"""The keyed, hash-chained audit log (spec §12.1-12.4; checkpoints arrive in S5).

Each record's hash is ``HMAC-SHA256(audit_key, L || "audit-record\\0" || C)`` over the canonical
JSON ``C`` of its columns and the previous hash, so a database writer without the master key
(which wraps ``audit_key``) cannot edit, drop, insert or reorder records unnoticed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from .._private.crypto import LABEL
from .._private.encoding import dumps_canonical
from . import repository as repo

ZERO = bytes(32)
MAX_DETAIL = 4096
EVENTS = frozenset(
    {
        "publisher.created",
        "admin-token.created",
        "admin-token.revoked",
        "model.created",
        "model-key.registered",
        "model-key.revoked",
        "licence.created",
        "licence.updated",
        "licence.revoked",
        "device.activated",
        "device.activation-denied",
        "device.revoked",
        "grant.issued",
        "grant.denied",
        "token.created",
        "token.redeemed",
        "token.denied",
        "offline.processed",
        "ratelimit.tripped",
    }
)
_REFS = ("code", "publisher_id", "actor", "licence_id", "device_id", "model_id", "grant_id")


@dataclass(frozen=True)
class AuditEvent:
    """What a service records; chain position and hashes are added when it is appended."""

    event: str
    actor: str
    outcome: str = "ok"
    code: str | None = None
    publisher_id: str | None = None
    licence_id: str | None = None
    device_id: str | None = None
    model_id: str | None = None
    grant_id: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


def record_hash(audit_key: bytes, row: Mapping[Any, Any]) -> bytes:
    """The keyed hash of one record, rebuilt from its stored columns (``detail`` as stored text)."""
    canonical = (
        b'{"actor":%s,"chain":%d,"code":%s,"detail":%s,"device_id":%s,"event":%s,"grant_id":%s,'
        b'"licence_id":%s,"model_id":%s,"outcome":%s,"prev":%s,"publisher_id":%s,"seq":%d,"ts":%d,"v":1}'
    ) % (
        dumps_canonical(row["actor"]),
        row["chain"],
        dumps_canonical(row["code"]),
        row["detail"].encode("utf-8"),
        dumps_canonical(row["device_id"]),
        dumps_canonical(row["event"]),
        dumps_canonical(row["grant_id"]),
        dumps_canonical(row["licence_id"]),
        dumps_canonical(row["model_id"]),
        dumps_canonical(row["outcome"]),
        dumps_canonical(base64.b64encode(row["prev_hash"]).decode("ascii")),
        dumps_canonical(row["publisher_id"]),
        row["seq"],
        row["ts_us"],
    )
    return hmac.new(audit_key, LABEL + b"audit-record\x00" + canonical, hashlib.sha256).digest()


def canonical_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """``C`` of spec §12.2 as an object (for documentation and tests; hashing uses the stored text)."""
    import json

    out = {k: row[k] for k in ("chain", "seq", "event", "outcome", *_REFS)}
    out.update(v=1, ts=row["ts_us"], detail=json.loads(row["detail"]), prev=base64.b64encode(row["prev_hash"]).decode())
    return out


def chain_for(event: AuditEvent, chains: int) -> int:
    if chains == 1:
        return 0
    ref = (event.licence_id or event.publisher_id or "").encode()
    return int.from_bytes(hashlib.sha256(ref).digest()[:4], "big") % chains


def append(conn: Connection, audit_key: bytes, event: AuditEvent, ts_us: int, chains: int = 1) -> int:
    """Append ``event`` as the last step of the caller's write unit; returns its ``seq``."""
    if event.event not in EVENTS:
        raise ValueError(f"unknown audit event {event.event!r}")
    detail = dumps_canonical(dict(event.detail)).decode("ascii")
    if len(detail) > MAX_DETAIL:
        raise ValueError("audit detail exceeds 4 KiB")
    chain = chain_for(event, chains)
    head = repo.lock_audit_head(conn, chain)
    row: dict[str, Any] = {
        "chain": chain,
        "seq": head.seq + 1,
        "ts_us": ts_us,
        "event": event.event,
        "outcome": event.outcome,
        "actor": event.actor,
        "detail": detail,
        "prev_hash": bytes(head.hash),
        **{k: getattr(event, k) for k in _REFS if k != "actor"},
    }
    row["hash"] = record_hash(audit_key, row)
    repo.append_audit(conn, row)
    return int(row["seq"])


@dataclass(frozen=True)
class Problem:
    chain: int
    seq: int
    problem: str

    def to_dict(self) -> dict[str, Any]:
        return {"chain": self.chain, "seq": self.seq, "problem": self.problem}


def verify(conn: Connection, audit_key: bytes, *, batch: int = 1000, max_problems: int = 100) -> list[Problem]:
    """Every problem found in every chain (first ``max_problems``), per spec §12.4."""
    problems: list[Problem] = []
    for found in _verify(conn, audit_key, batch):
        problems.append(found)
        if len(problems) >= max_problems:
            break
    return problems


def _verify(conn: Connection, audit_key: bytes, batch: int) -> Iterator[Problem]:
    for head in repo.audit_heads(conn):
        chain, expected_seq, prev = head.chain, 1, ZERO
        after = 0
        while rows := repo.audit_records(conn, chain, after, batch):
            for r in rows:
                data = r._mapping
                if r.seq != expected_seq:
                    yield Problem(chain, r.seq, f"sequence gap: expected seq {expected_seq}, found {r.seq}")
                if not hmac.compare_digest(bytes(r.prev_hash), prev):
                    yield Problem(chain, r.seq, "prev_hash does not match the preceding record's hash")
                try:
                    good = hmac.compare_digest(record_hash(audit_key, data), bytes(r.hash))
                except (TypeError, ValueError, AttributeError):  # a column edited to NULL or junk
                    good = False
                if not good:
                    yield Problem(chain, r.seq, "record hash does not verify (record edited)")
                prev, expected_seq, after = bytes(r.hash), r.seq + 1, r.seq
        last = expected_seq - 1
        if head.seq != last or not hmac.compare_digest(bytes(head.hash), prev):
            yield Problem(chain, head.seq, f"head row (seq {head.seq}) does not match the last record (seq {last})")


# --- anchors (spec §12.4): heads copied off the server ------------------------------------------

ANCHOR_TYPE = "modelseal-audit-anchor"


def anchor(conn: Connection) -> dict[str, Any]:
    """The current head of every chain, to keep somewhere the server's operator cannot rewrite."""
    heads = [
        {"chain": h.chain, "seq": h.seq, "hash": base64.b64encode(bytes(h.hash)).decode()}
        for h in repo.audit_heads(conn)
    ]
    return {"type": ANCHOR_TYPE, "v": 1, "heads": heads}


def check_anchor(conn: Connection, anchored: Any) -> list[Problem]:
    """Problems with the log against an anchor written earlier: every anchored record must still
    be there, unchanged, and no chain may end before it. This is what detects a deleted tail
    together with a rewritten head row, which the chain alone cannot (spec §12.4)."""
    if not isinstance(anchored, dict) or anchored.get("type") != ANCHOR_TYPE or anchored.get("v") != 1:
        raise ValueError("not an audit anchor file")
    if not isinstance(anchored.get("heads"), list) or not anchored["heads"]:
        raise ValueError("not an audit anchor file (no heads)")
    heads = {h.chain: h for h in repo.audit_heads(conn)}
    problems = []
    for item in anchored["heads"]:
        try:
            chain, seq, digest = int(item["chain"]), int(item["seq"]), base64.b64decode(item["hash"], validate=True)
        except (KeyError, TypeError, ValueError):
            raise ValueError("not an audit anchor file (malformed head)") from None
        if seq == 0:
            continue
        head = heads.get(chain)
        if head is None or head.seq < seq:
            end = head.seq if head is not None else 0
            problems.append(
                Problem(chain, seq, f"log ends at seq {end}, before the anchored seq {seq}: records deleted")
            )
            continue
        records = repo.audit_records(conn, chain, seq - 1, 1)
        record = records[0] if records else None
        if record is None or record.seq != seq or not hmac.compare_digest(bytes(record.hash), digest):
            problems.append(Problem(chain, seq, "the anchored record is missing or was changed"))
    return problems
