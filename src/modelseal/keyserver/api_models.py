"""Request bodies of the HTTP API (spec §7.1 types): strict, unknown members rejected."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

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
B64_8 = Annotated[str, _b64(8)]
ModelId = Annotated[str, Field(pattern=r"^mdl_[A-Za-z0-9_-]{22}$")]
Time = Annotated[int, Field(ge=0, le=2**40)]
TsUs = Annotated[int, Field(ge=0, le=2**52)]


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


class PolicyIn(Strict):
    """``Policy`` of spec §7.7; ranges as the ``CHECK`` constraints of §5.2."""

    models: Annotated[list[ModelId], Field(min_length=1, max_length=1000)]
    max_devices: Annotated[int, Field(ge=1, le=1_000_000)]
    expires_at: Time | None
    opens_per_day: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    offline_grace_s: Annotated[int, Field(ge=0, le=31_536_000)] = 0
    recheck_interval_s: Annotated[int, Field(ge=60, le=2_592_000)] = 3600
    grant_ttl_s: Annotated[int, Field(ge=60, le=31_536_000)] = 86400


class LicenceCreate(Strict):
    label: Text128 | None = None
    policy: PolicyIn


class Activate(Strict):
    """``POST /v1/activations`` (spec §7.3)."""

    aud: B64_8
    ts: TsUs
    x25519_public_key: B64_32
    ed25519_public_key: B64_32
    fingerprint: B64_32
    label: Text128 | None = None


class GrantIn(Strict):
    """``POST /v1/grants`` (spec §7.4)."""

    aud: B64_8
    ts: TsUs
    device_id: Annotated[str, Field(pattern=r"^dev_[A-Za-z0-9_-]{22}$")]
    model_id: ModelId
    key_commitment: B64_32
    fingerprint: B64_32


class GrantTokenCreate(Strict):
    """``POST /v1/admin/grant-tokens`` (spec §7.7)."""

    licence_id: Annotated[str, Field(pattern=r"^lic_[A-Za-z0-9_-]{22}$")]
    model_id: ModelId
    key_commitment: B64_32 | None = None
    device_id: Annotated[str, Field(pattern=r"^dev_[A-Za-z0-9_-]{22}$")] | None = None
    expires_in_s: Annotated[int, Field(ge=60, le=2_592_000)] = 86400
    grant_ttl_s: Annotated[int, Field(ge=60, le=2_592_000)] = 3600


class GrantTokenRedeem(Strict):
    """``POST /v1/grant-tokens/redeem`` (spec §7.5); the token is the bearer credential, never in a URL."""

    x25519_public_key: B64_32
    model_id: ModelId
    key_commitment: B64_32


class PolicyPatch(Strict):
    """A partial ``Policy`` for ``PATCH /v1/admin/licences/{id}`` (spec §7.7): fields left out keep
    their value; ``expires_at: null`` removes the expiry."""

    models: Annotated[list[ModelId], Field(min_length=1, max_length=1000)] | None = None
    max_devices: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    expires_at: Time | None = None
    opens_per_day: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    offline_grace_s: Annotated[int, Field(ge=0, le=31_536_000)] | None = None
    recheck_interval_s: Annotated[int, Field(ge=60, le=2_592_000)] | None = None
    grant_ttl_s: Annotated[int, Field(ge=60, le=31_536_000)] | None = None


class LicencePatch(Strict):
    label: Text128 | None = None
    policy: PolicyPatch = PolicyPatch()
