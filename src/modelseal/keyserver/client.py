"""Library side of the key server client (spec §10): device key and state, activation, grants,
and the container extension points :class:`KeyServerRecipient` and :class:`KeyServerUnwrapper`.

Imports only ``cryptography`` and the core library at module level (``import modelseal`` stays
light); httpx loads when something talks to a server. The command line is in
:mod:`modelseal.keyserver_client`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .._private.crypto import LABEL
from .._private.encoding import b64decode, b64encode
from ..errors import FormatError, ModelSealError
from ..keys import (
    _IDENTITY,
    _SIGNING,
    Identity,
    RandomBytes,
    Recipient,
    SigningKey,
    Stanza,
    Unwrapper,
    _read_secret,
    _write_secret,
)
from . import offline
from .crypto import LICENCE_PREFIX, b64url, decode_secret, escrow_wrap, make_id
from .errors import DomainError
from .grant import GrantInvalid, check_binding, unwrap_grant, verify_signed
from .offline import CLOCK_TOLERANCE_S, State, write_atomic
from .offline_files import make_request, parse_offline_response

GRANT_ROUTE = "/v1/grants"
REDEEM_ROUTE = "/v1/grant-tokens/redeem"
OFFLINE_ROUTE = "/v1/offline/requests"
ACTIVATION_ROUTE = "/v1/activations"
TIMEOUT_S = 10.0
# Authenticated denials (spec §10.3): cached grants are forgotten, of the whole licence for the first set.
_LICENCE_DENIALS = frozenset({"licence-revoked", "licence-expired", "device-revoked", "device-mismatch"})
_DENIALS = _LICENCE_DENIALS | {"model-not-licensed", "key-revoked"}
# Answers that mean "try later", handled like an unreachable server.
_OFFLINE_CODES = frozenset({"rate-limited", "busy", "usage-limit-reached"})


class LicenceError(ModelSealError):
    """The key server refused (exit 10); ``code`` is the server's error code (spec §16)."""

    exit_code = 10

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


class KeyServerUnreachable(ModelSealError):
    """No answer from the key server (exit 11)."""

    exit_code = 11


# --- device key (spec §6) ----------------------------------------------


def state_dir() -> Path:
    """``$MODELSEAL_HOME``, else ``$XDG_STATE_HOME/modelseal``, else ``~/.local/state/modelseal``."""
    if os.environ.get("MODELSEAL_HOME"):
        return Path(os.environ["MODELSEAL_HOME"])
    if os.environ.get("XDG_STATE_HOME"):
        return Path(os.environ["XDG_STATE_HOME"]) / "modelseal"
    return Path.home() / ".local" / "state" / "modelseal"


class DeviceKey:
    """A device's two key pairs (spec §6): X25519 for grants, Ed25519 for request signatures."""

    def __init__(self, identity: Identity, signing: SigningKey) -> None:
        self.identity, self.signing = identity, signing

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(Identity.generate(), SigningKey.generate())

    @classmethod
    def load(cls, path: Path) -> DeviceKey:
        identity = Identity.from_string(_read_secret(path, _IDENTITY, "device key"))
        signing = SigningKey.from_string(_read_secret(path, _SIGNING, "device key"))
        return cls(identity, signing)

    @classmethod
    def load_or_create(cls, path: Path) -> tuple[DeviceKey, bool]:
        """The key in ``path``, creating it (0600, never overwriting) if absent; ``(key, created)``."""
        if path.exists():
            return cls.load(path), False
        key = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        text = (
            "# modelseal device key (X25519 + Ed25519). Keep this file secret.\n"
            f"{key.identity.to_string()}\n{key.signing.to_string()}\n"
        )
        _write_secret(path, text, overwrite=False)
        return key, True

    @property
    def x25519_public(self) -> bytes:
        return self.identity.recipient.public_bytes

    @property
    def ed25519_public(self) -> bytes:
        return self.signing.verify_key.public_bytes

    def sign_request(self, route: str, body: bytes) -> str:
        """``Modelseal-Signature`` over the raw body (spec §6)."""
        message = (
            LABEL + b"keyserver-request\x00POST\x00" + route.encode("ascii") + b"\x00" + len(body).to_bytes(4, "big")
        )
        return b64encode(self.signing.sign(message + body))


def fingerprint(home: Path) -> bytes:
    """``SHA-256(L || "fingerprint\\0" || machine id)``; a random id kept in the state dir if none."""
    try:
        machine = Path("/etc/machine-id").read_bytes().strip()
    except OSError:
        machine = b""
    if not machine:
        path = home / "machine-id"
        if not path.exists():
            home.mkdir(parents=True, exist_ok=True, mode=0o700)
            _write_secret(path, os.urandom(16).hex() + "\n", overwrite=False)
        machine = path.read_bytes().strip()
    return hashlib.sha256(LABEL + b"fingerprint\x00" + machine).digest()


def activation_body(
    device: DeviceKey, aud: bytes, fp: bytes, *, label: str | None = None, ts: int | None = None
) -> bytes:
    body: dict[str, Any] = {
        "aud": b64encode(aud),
        "ts": ts if ts is not None else time.time_ns() // 1000,
        "x25519_public_key": b64encode(device.x25519_public),
        "ed25519_public_key": b64encode(device.ed25519_public),
        "fingerprint": b64encode(fp),
    }
    if label is not None:
        body["label"] = label
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


# --- HTTP ---------------------------------------------------------------------------------------


class Client:
    """A thin httpx client: errors become :class:`LicenceError` (server code) or :class:`KeyServerUnreachable`."""

    def __init__(self, url: str, credential: str) -> None:
        try:
            import httpx
        except ImportError:  # pragma: no cover - httpx is a dependency; a stripped install lacks it
            raise KeyServerUnreachable("talking to a key server needs httpx: pip install httpx") from None

        self._httpx = httpx
        self.url = url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.url, timeout=TIMEOUT_S, headers={"Authorization": f"Bearer {credential.strip()}"}
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        try:
            r = self.http.request(method, path, **kwargs)
        except self._httpx.HTTPError as exc:
            raise KeyServerUnreachable(f"cannot reach the key server at {self.url}: {exc}") from None
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code >= 500 or r.status_code == 429:
            code = data["error"]["code"] if isinstance(data, dict) and "error" in data else str(r.status_code)
            if r.status_code == 429:
                raise LicenceError(code, "rate limited; retry later")
            raise KeyServerUnreachable(f"the key server answered {r.status_code} ({code})")
        if r.status_code >= 400:
            err = data.get("error", {}) if isinstance(data, dict) else {}
            raise LicenceError(str(err.get("code", r.status_code)), str(err.get("message", "")))
        return r.status_code, data

    def items(self, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after = None
        while True:
            query = {**params, "limit": 500, **({"after": after} if after else {})}
            _, page = self.request("GET", path, params={k: v for k, v in query.items() if v is not None})
            out += page["items"]
            after = page["next"]
            if after is None:
                return out


def activate(
    server: str, licence: str, *, label: str | None = None, home: Path | None = None
) -> tuple[dict[str, Any], bool]:
    """Create the device key if absent, then register it under ``licence``; ``(response, created)``.

    Stores the activation record (device id, policy, the server URL and its signing keys, pinned
    here on first use, spec §10.1) and the licence key (0600) under ``activations/``.
    """
    home = home or state_dir()
    device, _ = DeviceKey.load_or_create(home / "device.key")
    with Client(server, licence) as client:
        _, info = client.request("GET", "/v1/server-info")
        current = [k for k in info["signing_keys"] if k["current"]]
        if not current:
            raise LicenceError("server-key-mismatch", "the server names no current signing key")
        aud = b64decode(current[0]["kid"], length=8)
        body = activation_body(device, aud, fingerprint(home), label=label, ts=next_ts(home))
        headers = {
            "Content-Type": "application/json",
            "Modelseal-Signature": device.sign_request(ACTIVATION_ROUTE, body),
        }
        status, result = client.request("POST", ACTIVATION_ROUTE, content=body, headers=headers)
    with _locked(home):
        _save_activation(home, server, licence, result, info["signing_keys"])
    return result, status == 201


def _save_activation(
    home: Path, server: str, licence: str, result: dict[str, Any], signing_keys: list[dict[str, Any]]
) -> None:
    """Write the activation record and the licence key (0600; call under :func:`_locked`)."""
    record = home / "activations" / f"{result['licence_id']}.json"
    record.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    saved = {k: result[k] for k in ("device_id", "licence_id", "activated_at", "policy")} | {
        "server": server.rstrip("/"),
        "signing_keys": [{"kid": k["kid"], "public_key": k["public_key"]} for k in signing_keys],
    }
    write_atomic(record.with_suffix(".key"), licence.strip() + "\n")
    write_atomic(record, json.dumps(saved, indent=2, sort_keys=True) + "\n")


# --- air-gapped activation and renewal (spec §11) ----------------------------------------------

_PENDING = "offline-pending.json"


def offline_request(
    server_info: dict[str, Any],
    licence: str,
    containers: list[Path],
    *,
    server: str | None = None,
    label: str | None = None,
    home: Path | None = None,
) -> dict[str, Any]:
    """A request file asking for activation (or renewal) and grants for ``containers``' models.

    Written on the air-gapped device from a server-info file (``GET /v1/server-info`` saved on
    a connected machine); holds no licence secret. The request is remembered in the state
    directory until its response is accepted.
    """
    home = home or state_dir()
    lic_id = licence_id_of(licence)
    if lic_id is None:
        raise LicenceError("invalid-licence", "not a licence key")
    try:
        keys = {b64decode(k["kid"], length=8): k for k in server_info["signing_keys"]}
        [aud] = [kid for kid, k in keys.items() if k["current"]]
    except (KeyError, TypeError, ValueError, FormatError):
        raise ValueError("not a key server's server-info file") from None
    models: list[dict[str, str]] = []
    from ..container import inspect

    for path in containers:
        for stanza in inspect(path).recipients:
            checked = _check_stanza(dict(stanza)) if stanza.get("type") == "keyserver" else None
            if checked and checked[2] in keys:
                models.append({"model_id": checked[0], "key_commitment": b64encode(checked[1])})
    if containers and not models:
        raise LicenceError("server-key-mismatch", "no container names this key server")
    device, _ = DeviceKey.load_or_create(home / "device.key")
    existing = [r.device_id for r in activations(home) if r.licence_id == lic_id]
    fields = {
        "aud": b64encode(aud),
        "ts": next_ts(home),
        "licence_id": lic_id,
        "device_id": existing[0] if existing else None,
        "x25519_public_key": b64encode(device.x25519_public),
        "ed25519_public_key": b64encode(device.ed25519_public),
        "fingerprint": b64encode(fingerprint(home)),
        "label": label,
        "models": models,
    }
    request_file = make_request(fields, device.signing._key)
    raw = b64decode(request_file["request"])
    pending = {
        "ts": fields["ts"],
        "max_age_s": int(server_info.get("offline_request_max_age_s", 604800)),
        "request_sha256": b64encode(hashlib.sha256(raw).digest()),
        "server": (server or server_info.get("public_url") or "").rstrip("/"),
        "signing_keys": server_info["signing_keys"],
        "licence_id": lic_id,
    }
    with _locked(home):
        write_atomic(home / _PENDING, json.dumps(pending, sort_keys=True) + "\n")
        write_atomic(home / "activations" / f"{lic_id}.pending-key", licence.strip() + "\n")
    return request_file


def submit_offline(server: str, licence: str, request_file: Any) -> Any:
    """On a connected machine: hand a device's request file to the server; its response file."""
    with Client(server, licence) as client:
        return client.request("POST", OFFLINE_ROUTE, json=request_file)[1]


def accept_offline(response_file: Any, *, home: Path | None = None) -> dict[str, Any]:
    """On the air-gapped device: verify a response file against the pending request, store the
    activation and cache its grants for offline use (spec §10.4). ``{"device_id", "licence_id",
    "grants", "denied"}``."""
    home = home or state_dir()
    try:
        pending = json.loads((home / _PENDING).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise LicenceError("no-pending-request", "this device has no pending offline request") from None
    keys = {b64decode(k["kid"], length=8): b64decode(k["public_key"], length=32) for k in pending["signing_keys"]}
    try:
        resp = parse_offline_response(response_file, keys)
    except DomainError as exc:
        raise LicenceError(exc.code, str(exc)) from None
    if resp.get("request_sha256") != pending["request_sha256"] or resp.get("licence_id") != pending["licence_id"]:
        raise LicenceError("offline-mismatch", "the response answers another request")
    # The response's time is the server's at processing, not now: it must fall between the request
    # and the request's maximum age, and it does not reset this device's clock offset.
    requested = pending["ts"] / 1_000_000
    if not requested - CLOCK_TOLERANCE_S <= resp["issued_at"] <= requested + pending["max_age_s"]:
        raise LicenceError("request-expired", "the response was issued too long after the request")
    device = DeviceKey.load(home / "device.key")
    secret = device.identity._key
    checked = []
    for signed in resp["grants"]:
        try:
            _, grant = verify_signed(signed, keys)
            kc = b64decode(grant["key_commitment"], length=32)
            check_binding(
                grant,
                model_id=grant["model_id"],
                key_commitment=kc,
                licence_id=resp["licence_id"],
                device_id=resp["device_id"],
            )
            unwrap_grant(grant, secret)  # a grant this device cannot open is refused now, not later
        except (GrantInvalid, FormatError) as exc:
            raise LicenceError("grant-invalid", str(exc)) from None
        checked.append((grant["model_id"], kc, signed))
    licence = (home / "activations" / f"{pending['licence_id']}.pending-key").read_text(encoding="ascii")
    result = {
        "device_id": resp["device_id"],
        "licence_id": resp["licence_id"],
        "activated_at": resp["issued_at"],
        "policy": resp["policy"],
    }
    with _locked(home):
        _save_activation(home, pending["server"], licence, result, pending["signing_keys"])
        state = State(home, secret.private_bytes_raw(), device.x25519_public)
        for model_id, kc, signed in checked:
            state.save_grant(resp["licence_id"], model_id, kc, signed)
        clock, _ = state.clock()
        state.note_use(clock)
        (home / _PENDING).unlink()
        (home / "activations" / f"{pending['licence_id']}.pending-key").unlink()
    return {**result, "grants": len(checked), "denied": resp["denied"]}


# --- state directory (spec §10.1) ---------------------------------------------------------------


@contextmanager
def _locked(home: Path) -> Iterator[None]:
    """An exclusive ``flock`` of ``<home>/lock``: one writer across processes."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(home / "lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def next_ts(home: Path) -> int:
    """A request timestamp (µs) strictly greater than any this device used before (spec §6)."""
    path = home / "device.state"
    with _locked(home):
        try:
            last = int(json.loads(path.read_text(encoding="utf-8"))["last_ts"])
        except (OSError, ValueError, KeyError, TypeError):
            last = 0
        ts = max(time.time_ns() // 1000, last + 1)
        write_atomic(path, json.dumps({"v": 1, "last_ts": ts}) + "\n")
    return ts


@dataclass(frozen=True)
class ActivationRecord:
    """One activation of this device (spec §10.1): the server it is pinned to and the licence."""

    server: str
    licence_id: str
    device_id: str
    licence_key: str
    signing_keys: dict[bytes, bytes]


def activations(home: Path) -> list[ActivationRecord]:
    """The activation records in ``home`` (unreadable or partial ones are skipped)."""
    out = []
    for path in sorted((home / "activations").glob("lic_*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            key = _read_secret(path.with_suffix(".key"), LICENCE_PREFIX, "licence key")
            keys = {b64decode(k["kid"], length=8): b64decode(k["public_key"], length=32) for k in data["signing_keys"]}
            out.append(ActivationRecord(data["server"], data["licence_id"], data["device_id"], key, keys))
        except (OSError, ValueError, KeyError, TypeError, FormatError, ModelSealError):
            continue
    return out


def licence_id_of(licence_key: str) -> str | None:
    parsed = decode_secret(LICENCE_PREFIX, licence_key.strip())
    return None if parsed is None else make_id("lic", parsed.id16)


def grant_body(aud: bytes, device_id: str, model_id: str, key_commitment: bytes, fp: bytes, *, ts: int) -> bytes:
    body = {
        "aud": b64encode(aud),
        "ts": ts,
        "device_id": device_id,
        "model_id": model_id,
        "key_commitment": b64encode(key_commitment),
        "fingerprint": b64encode(fp),
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


# --- container extension points (spec §4, §10.2) ---------------------------------------------------

_MODEL_ID = re.compile(r"^mdl_[A-Za-z0-9_-]{22}$")
_STANZA_MEMBERS = {"type", "url", "model_id", "key_commitment", "server_key_id"}


def _check_stanza(stanza: Stanza) -> tuple[str, bytes, bytes] | None:
    """``(model_id, key_commitment, server_key_id)`` of a well-formed keyserver stanza (spec §4), else None."""
    if set(stanza) != _STANZA_MEMBERS or not all(isinstance(v, str) for v in stanza.values()):
        return None
    url = stanza["url"]
    if len(url) > 2048 or not re.match(r"^https?://[^/?#@]+(/[^?#]*)?$", url) or url.endswith("/"):
        return None
    if not _MODEL_ID.match(stanza["model_id"]):
        return None
    try:
        return (
            stanza["model_id"],
            b64decode(stanza["key_commitment"], length=32),
            b64decode(stanza["server_key_id"], length=8),
        )
    except FormatError:
        return None


class KeyServerRecipient(Recipient):
    """Seal for a key server (spec §4): escrow the content key with the server, add a ``keyserver`` stanza.

    Args:
        url: The key server's base URL.
        admin_token: A publisher admin token (``MSEAL-ADMIN:…``).
        model: The model's id (``mdl_…``) or name.
    """

    def __init__(self, url: str, admin_token: str, model: str) -> None:
        self.url, self.admin_token, self.model = url.rstrip("/"), admin_token, model

    def __repr__(self) -> str:
        return f"KeyServerRecipient({self.url!r}, model={self.model!r})"

    def wrap(self, content_key: bytes, random_bytes: RandomBytes = os.urandom) -> Stanza:
        raise ValueError("a key server recipient needs the container's salt and commitment (wrap_for)")

    def wrap_for(
        self, content_key: bytes, *, salt: bytes, key_commitment: bytes, random_bytes: RandomBytes = os.urandom
    ) -> Stanza:
        """Register ``content_key`` with the server (spec §7.6) and return the stanza it names."""
        with Client(self.url, self.admin_token) as client:
            _, info = client.request("GET", "/v1/server-info")
            model_id = self.model
            if not _MODEL_ID.match(model_id):
                found = [m["id"] for m in client.items("/v1/admin/models", {}) if m["name"] == model_id]
                if not found:
                    raise ValueError(f"no model named {model_id!r} on {self.url}")
                model_id = found[0]
            escrow_pk = b64decode(info["escrow_key"]["public_key"], length=32)
            epk, body = escrow_wrap(content_key, escrow_pk, model_id, key_commitment, salt)
            request = {
                "key_commitment": b64encode(key_commitment),
                "salt": b64encode(salt),
                "escrow": {"epk": b64encode(epk), "body": b64encode(body)},
            }
            _, result = client.request("POST", f"/v1/admin/models/{model_id}/keys", json=request)
        stanza: Stanza = result["stanza"]
        if _check_stanza(stanza) is None or stanza["key_commitment"] != b64encode(key_commitment):
            raise LicenceError("server-key-mismatch", "the key server returned a malformed stanza")
        return stanza

    def matches(self, stanza: Stanza) -> bool:
        return stanza.get("type") == "keyserver" and stanza.get("url") == self.url


class KeyServerUnwrapper(Unwrapper):
    """Open containers through a key server (spec §10.2), as ``identity=`` to any opener or loader.

    Uses this device's activation (``modelseal activate``, or activates on first use when both
    ``keyserver`` and ``licence`` are given), requests a grant, verifies it (spec §8.4) and returns
    the content key. It contacts only a server it was given or one pinned by an activation, never a
    URL taken from a container. A refusal is recorded in :attr:`error` (a :class:`LicenceError` or
    :class:`KeyServerUnreachable`), which the opener raises if no stanza yields a key.

    Args:
        keyserver: The key server URL (default ``$MODELSEAL_KEYSERVER``).
        licence: The licence key (default ``$MODELSEAL_LICENCE``, then the activation records).
        grant_token: A one-time grant token (``MSEAL-GRANT-TOKEN:…``, spec §9) to redeem instead of
            a licence; needs ``keyserver``. The grant is wrapped to this device's key if it has one,
            else to a key that lives only in memory, and is not cached.
        home: The state directory (default :func:`state_dir`).
    """

    def __init__(
        self,
        keyserver: str | None = None,
        licence: str | None = None,
        *,
        grant_token: str | None = None,
        home: Path | None = None,
    ) -> None:
        url = keyserver or os.environ.get("MODELSEAL_KEYSERVER")
        self.url = url.rstrip("/") if url else None
        self.licence = licence or os.environ.get("MODELSEAL_LICENCE")
        self.grant_token = grant_token
        self.home = home
        self.error: ModelSealError | None = None

    def __repr__(self) -> str:
        return f"KeyServerUnwrapper({self.url!r})"

    def unwrap(self, stanza: Stanza) -> bytes | None:
        if stanza.get("type") != "keyserver":
            return None
        checked = _check_stanza(stanza)
        if checked is None:
            return None
        try:
            if self.grant_token is not None:
                return self._redeem(*checked)
            return self._unwrap(*checked)
        except (LicenceError, KeyServerUnreachable) as exc:
            if self.error is None:
                self.error = exc
            return None

    def _records(self, home: Path, kid: bytes) -> list[ActivationRecord]:
        lic = licence_id_of(self.licence) if self.licence else None
        return [
            r
            for r in activations(home)
            if kid in r.signing_keys
            and (lic is None or r.licence_id == lic)
            and (self.url is None or r.server == self.url)
        ]

    def _unwrap(self, model_id: str, key_commitment: bytes, kid: bytes) -> bytes:
        home = self.home or state_dir()
        records = self._records(home, kid)
        if not records and self.url and self.licence:
            activate(self.url, self.licence, home=home)
            records = self._records(home, kid)
            if not records:
                raise LicenceError("server-key-mismatch", "the key server does not hold this container's signing key")
        if not records:
            raise LicenceError("not-activated", "this device is not activated for this container's key server")
        record = records[0]
        device = DeviceKey.load(home / "device.key")
        secret = device.identity._key
        with _locked(home):
            state = State(home, secret.private_bytes_raw(), device.x25519_public)
            clock, rolled_back = state.clock()
            # A cached grant is only ever written together with clock.state: a missing one next to
            # cached grants was deleted, which is treated like a clock set back.
            rolled_back = rolled_back or (clock is None and state.has_grants())
            now = offline.local_time() + (clock.offset if clock else 0.0)
            cached = state.cached_grant(
                licence_id=record.licence_id,
                device_id=record.device_id,
                model_id=model_id,
                key_commitment=key_commitment,
                signing_keys=record.signing_keys,
            )
            if cached and not rolled_back and _valid(cached.grant, now, "recheck_after"):
                state.note_use(clock)  # spec §10.5: no contact needed yet
                return self._key(cached.grant, secret)
        try:
            signed = self._fetch(home, record, device, model_id, key_commitment, kid)
        except (KeyServerUnreachable, LicenceError) as exc:
            if isinstance(exc, LicenceError) and exc.code in _DENIALS:
                with _locked(home):
                    state.drop_grants(record.licence_id, None if exc.code in _LICENCE_DENIALS else model_id)
                raise
            if isinstance(exc, LicenceError) and exc.code not in _OFFLINE_CODES:
                raise
            if rolled_back:
                raise LicenceError(
                    "clock-rollback", "the clock was set back; the key server must be reached to open again"
                ) from None
            if cached is None:
                raise
            if not _valid(cached.grant, now, "offline_until"):
                raise LicenceError(
                    "offline-expired", f"the offline grace period is over and the key server is unreachable ({exc})"
                ) from None
            with _locked(home):
                state.note_use(clock)
            return self._key(cached.grant, secret)
        try:
            _, grant = verify_signed(signed, record.signing_keys)
            check_binding(
                grant,
                model_id=model_id,
                key_commitment=key_commitment,
                licence_id=record.licence_id,
                device_id=record.device_id,
            )
        except GrantInvalid as exc:
            raise LicenceError("grant-invalid", str(exc)) from None
        with _locked(home):
            state.save_grant(record.licence_id, model_id, key_commitment, signed)
            state.note_use(clock, server_time=grant["issued_at"])
        return self._key(grant, secret)

    def _redeem(self, model_id: str, key_commitment: bytes, kid: bytes) -> bytes:
        """Spec §9, client side: pin the server from server-info, redeem the token once, verify."""
        token, self.grant_token = self.grant_token, None  # one attempt, whatever the outcome
        if not self.url or not token:
            raise LicenceError("not-activated", "a grant token needs the key server's URL (keyserver=)")
        path = (self.home or state_dir()) / "device.key"
        secret = DeviceKey.load(path).identity._key if path.exists() else X25519PrivateKey.generate()
        public = secret.public_key().public_bytes_raw()
        with Client(self.url, token) as client:
            _, info = client.request("GET", "/v1/server-info")
            keys = {b64decode(k["kid"], length=8): b64decode(k["public_key"], length=32) for k in info["signing_keys"]}
            if kid not in keys:
                raise LicenceError("server-key-mismatch", "the key server does not hold this container's signing key")
            body = {
                "x25519_public_key": b64encode(public),
                "model_id": model_id,
                "key_commitment": b64encode(key_commitment),
            }
            _, signed = client.request("POST", REDEEM_ROUTE, json=body)
        try:
            _, grant = verify_signed(signed, {kid: keys[kid]})
            if grant["device_id"].startswith("pk_"):
                check_binding(
                    grant,
                    model_id=model_id,
                    key_commitment=key_commitment,
                    licence_id=grant["licence_id"],  # not checked for a token grant (spec §8.4)
                    device_id="pk_" + b64url(public),
                )
            elif grant["model_id"] != model_id or b64decode(grant["key_commitment"]) != key_commitment:
                raise GrantInvalid("the grant is for another model or container")
            if not _valid(grant, time.time(), "not_after"):
                raise GrantInvalid("the grant is not valid now")
        except GrantInvalid as exc:
            raise LicenceError("grant-invalid", str(exc)) from None
        return self._key(grant, secret)

    @staticmethod
    def _key(grant: dict[str, Any], secret: X25519PrivateKey) -> bytes:
        try:
            return unwrap_grant(grant, secret)
        except GrantInvalid as exc:
            raise LicenceError("grant-invalid", str(exc)) from None

    def _fetch(
        self, home: Path, record: ActivationRecord, device: DeviceKey, model_id: str, key_commitment: bytes, kid: bytes
    ) -> Any:
        fp = fingerprint(home)
        with Client(record.server, record.licence_key) as client:
            for attempt in range(2):
                body = grant_body(kid, record.device_id, model_id, key_commitment, fp, ts=next_ts(home))
                headers = {
                    "Content-Type": "application/json",
                    "Modelseal-Signature": device.sign_request(GRANT_ROUTE, body),
                }
                try:
                    return client.request("POST", GRANT_ROUTE, content=body, headers=headers)[1]
                except LicenceError as exc:
                    if exc.code != "replayed-request" or attempt:
                        raise
        raise AssertionError("unreachable")


def _valid(grant: dict[str, Any], now: float, until: str) -> bool:
    """Spec §10.5: ``issued_at - tolerance <= now < grant[until]``."""
    return bool(grant["issued_at"] - CLOCK_TOLERANCE_S <= now < grant[until])


KeyServer = KeyServerUnwrapper
