"""Air-gapped request and response files (spec §11), shared by the server and the client.

Both are JSON envelopes around canonical JSON bytes and an Ed25519 signature over
``L || "keyserver-offline-<kind>\\0" || u32be(len) || bytes``; imports only ``cryptography``.
"""

from __future__ import annotations

import re
import struct
from typing import Any

from cryptography.exceptions import InvalidSignature as InvalidSignatureError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .._private.crypto import LABEL
from .._private.encoding import b64decode, b64encode, dumps_canonical, loads_strict
from ..errors import FormatError
from .errors import InvalidSignature, MalformedRequest

REQUEST_TYPE = "modelseal-offline-request"
RESPONSE_TYPE = "modelseal-offline-response"
MAX_MODELS = 64
_ID = {p: re.compile(rf"^{p}_[A-Za-z0-9_-]{{22}}$") for p in ("lic", "dev", "mdl")}
_REQUEST_MEMBERS = {
    "aud", "ts", "licence_id", "device_id", "x25519_public_key", "ed25519_public_key", "fingerprint", "label", "models",
}  # fmt: skip


def offline_message(kind: str, body: bytes) -> bytes:
    return LABEL + f"keyserver-offline-{kind}\0".encode() + struct.pack(">I", len(body)) + body


def make_request(fields: dict[str, Any], signing_key: Ed25519PrivateKey) -> dict[str, Any]:
    """The request file for ``fields`` (the members of spec §11's ``R``), signed by the device."""
    body = dumps_canonical(fields)
    return {
        "type": REQUEST_TYPE,
        "v": 1,
        "request": b64encode(body),
        "signature": b64encode(signing_key.sign(offline_message("request", body))),
    }


def _envelope(obj: Any, kind: str, member: str) -> tuple[bytes, bytes]:
    if not isinstance(obj, dict) or set(obj) != {"type", "v", member, "signature"}:
        raise MalformedRequest(f"not an offline {kind} file")
    if obj["type"] != f"modelseal-offline-{kind}" or obj["v"] != 1:
        raise MalformedRequest(f"not an offline {kind} file (type or version)")
    try:
        return b64decode(obj[member]), b64decode(obj["signature"], length=64)
    except (FormatError, TypeError):
        raise MalformedRequest(f"the offline {kind} file is not well-formed base64") from None


def parse_offline_request(obj: Any) -> tuple[bytes, dict[str, Any]]:
    """``(R bytes, R)`` of a request file whose signature verifies with the key it names.

    Raises:
        MalformedRequest: not a well-formed request file. InvalidSignature: the signature fails.
    """
    raw, signature = _envelope(obj, "request", "request")
    try:
        req = loads_strict(raw, section="offline request")
    except FormatError:
        raise MalformedRequest("the request is not strict JSON") from None
    if not isinstance(req, dict) or set(req) != _REQUEST_MEMBERS or dumps_canonical(req) != raw:
        raise MalformedRequest("the request is not a canonical request object")
    try:
        ok = (
            isinstance(req["ts"], int)
            and not isinstance(req["ts"], bool)
            and bool(_ID["lic"].match(req["licence_id"]))
            and (req["device_id"] is None or bool(_ID["dev"].match(req["device_id"])))
            and (req["label"] is None or (isinstance(req["label"], str) and len(req["label"]) <= 128))
            and isinstance(req["models"], list)
            and len(req["models"]) <= MAX_MODELS
            and all(
                isinstance(m, dict) and set(m) == {"model_id", "key_commitment"} and _ID["mdl"].match(m["model_id"])
                for m in req["models"]
            )
        )
        b64decode(req["aud"], length=8)
        for name in ("x25519_public_key", "ed25519_public_key", "fingerprint"):
            b64decode(req[name], length=32)
        for m in req["models"]:
            b64decode(m["key_commitment"], length=32)
    except (FormatError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise MalformedRequest("the request's members have the wrong types")
    try:
        public = Ed25519PublicKey.from_public_bytes(b64decode(req["ed25519_public_key"], length=32))
        public.verify(signature, offline_message("request", raw))
    except (InvalidSignatureError, ValueError):
        raise InvalidSignature("the request file's signature does not verify") from None
    return raw, req


def parse_offline_response(obj: Any, signing_keys: dict[bytes, bytes]) -> dict[str, Any]:
    """The response ``S`` of a response file signed by one of ``signing_keys`` (kid → public key).

    Raises:
        MalformedRequest: not a response file. InvalidSignature: not signed by a pinned key.
    """
    raw, signature = _envelope(obj, "response", "response")
    try:
        resp = loads_strict(raw, section="offline response")
        kid = b64decode(resp["server_key_id"], length=8)
    except (FormatError, TypeError, KeyError):
        raise MalformedRequest("the response is not a response object") from None
    if not isinstance(resp, dict) or kid not in signing_keys:
        raise InvalidSignature("the response is not signed by a pinned server key")
    try:
        Ed25519PublicKey.from_public_bytes(signing_keys[kid]).verify(signature, offline_message("response", raw))
    except (InvalidSignatureError, ValueError):
        raise InvalidSignature("the response file's signature does not verify") from None
    return resp
