"""Request bodies of the HTTP API (spec §7.1 types): strict, unknown members rejected."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from .._private.encoding import b64decode
from ..errors import FormatError

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _text(n: int) -> AfterValidator:
    def check(value: str) -> str:
        if not 1 <= len(value) <= n:
            raise ValueError(f"must be 1 to {n} characters")
        if _CONTROL.search(value):
            raise ValueError("must not contain control characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape
            raise ValueError("must be valid Unicode") from None
        return value

    return AfterValidator(check)


def _b64(n: int) -> AfterValidator:
    def check(value: str) -> str:
        try:
            b64decode(value, length=n)
        except FormatError:
            raise ValueError(f"must be canonical base64 of {n} bytes") from None
        return value

    return AfterValidator(check)


Text128 = Annotated[str, _text(128)]
Text256 = Annotated[str, _text(256)]
B64_32 = Annotated[str, _b64(32)]
B64_48 = Annotated[str, _b64(48)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ModelCreate(Strict):
    name: Text128


class Escrow(Strict):
    epk: B64_32
    body: B64_48


class KeyRegister(Strict):
    key_commitment: B64_32
    salt: B64_32
    escrow: Escrow


class Revoke(Strict):
    reason: Text256
