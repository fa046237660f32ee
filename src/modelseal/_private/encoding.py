"""Strict encodings shared by the format: canonical base64, strict JSON, key strings."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from typing import Any

from ..errors import FormatError


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: object, *, length: int | None = None, field: str = "value") -> bytes:
    """Decode canonical, padded standard base64; anything else is a FormatError."""
    if not isinstance(text, str):
        raise FormatError("schema", f"{field} must be a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise FormatError("base64", f"{field} is not valid base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise FormatError("base64", f"{field} is not canonical base64")
    if length is not None and len(raw) != length:
        raise FormatError("schema", f"{field} must decode to {length} bytes, not {len(raw)}")
    return raw


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise FormatError("json", f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise FormatError("json", f"JSON constant {name} is not allowed")


def _no_float(text: str) -> Any:
    raise FormatError("json", f"JSON number {text} is not an integer")


def loads_strict(data: bytes, *, section: str) -> Any:
    """Parse UTF-8 JSON with no duplicate keys, no floats and no NaN/Infinity."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("json", f"{section} section is not valid UTF-8") from None
    try:
        return json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_float=_no_float,
        )
    except json.JSONDecodeError as exc:
        raise FormatError("json", f"{section} section is not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise FormatError("json", f"{section} section is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        raise FormatError("json", f"{section} section is not acceptable JSON: {exc}") from None


def dumps_canonical(obj: Any) -> bytes:
    """Compact, key-sorted, ASCII JSON: what modelseal writes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


_KEY_BODY = re.compile(r"[A-Za-z0-9_-]+")


# Key strings: "<prefix><base64url(key || checksum4)>", checksum = SHA-256(prefix || key)[:4],
# so a mistyped or truncated key string fails loudly instead of naming another key.
def encode_key(prefix: str, key: bytes) -> str:
    check = hashlib.sha256(prefix.encode("ascii") + key).digest()[:4]
    return prefix + base64.urlsafe_b64encode(key + check).decode("ascii").rstrip("=")


def decode_key(prefix: str, text: str, *, length: int, what: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, not {type(text).__name__}")
    text = text.strip()
    if not text.startswith(prefix):
        raise ValueError(f"not a {what}: expected a string starting with {prefix!r}")
    body = text[len(prefix) :]
    if not _KEY_BODY.fullmatch(body):
        raise ValueError(f"malformed {what}: bad base64")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise ValueError(f"malformed {what}: bad base64") from None
    if len(raw) != length + 4:
        raise ValueError(f"malformed {what}: wrong length")
    key, check = raw[:length], raw[length:]
    if hashlib.sha256(prefix.encode("ascii") + key).digest()[:4] != check:
        raise ValueError(f"malformed {what}: checksum mismatch (a typo?)")
    return key
