"""Domain errors of the key server (spec §16). Each class carries its HTTP status and stable code.

Services raise these; exactly one exception handler (``app.py``) turns them into responses, and
the ``keyserver`` CLI turns them into exit codes. No HTTP type appears below the routes.
"""

from __future__ import annotations

from ..errors import ModelSealError


class DomainError(ModelSealError):
    """Root of the key server's domain errors."""

    status: int = 500
    code: str = "internal"

    def __init__(self, message: str = "", *, fields: list[str] | None = None, retry_after: int | None = None) -> None:
        super().__init__(message or self.code.replace("-", " "))
        self.message = message or self.code.replace("-", " ")
        self.fields = fields
        self.retry_after = retry_after  # seconds, for 429 and 503 (``Retry-After``)


class MalformedRequest(DomainError):
    status, code = 400, "malformed-request"


class InvalidPublicKey(DomainError):
    status, code = 400, "invalid-public-key"


class EscrowInvalid(DomainError):
    status, code = 400, "escrow-invalid"


class CommitmentMismatch(DomainError):
    status, code = 400, "commitment-mismatch"


class InvalidCredential(DomainError):
    status, code = 401, "invalid-credential"


class InvalidLicence(DomainError):
    """Unknown licence id, wrong secret and malformed key alike: no oracle about which licences exist."""

    status, code = 401, "invalid-licence"


class InvalidSignature(DomainError):
    status, code = 401, "invalid-signature"


class StaleRequest(DomainError):
    status, code = 401, "stale-request"


class ReplayedRequest(DomainError):
    status, code = 401, "replayed-request"


class WrongAudience(DomainError):
    status, code = 401, "wrong-audience"


class InvalidToken(DomainError):
    """A grant token that is malformed, unknown or has the wrong secret (one answer for all)."""

    status, code = 401, "invalid-token"


class TokenExpired(DomainError):
    status, code = 403, "token-expired"


class TokenAlreadyRedeemed(DomainError):
    status, code = 409, "token-already-redeemed"


class RequestExpired(DomainError):
    status, code = 403, "request-expired"


class RequestAlreadyUsed(DomainError):
    status, code = 409, "request-already-used"


class LicenceRevoked(DomainError):
    status, code = 403, "licence-revoked"


class LicenceExpired(DomainError):
    status, code = 403, "licence-expired"


class DeviceRevoked(DomainError):
    status, code = 403, "device-revoked"


class DeviceMismatch(DomainError):
    status, code = 403, "device-mismatch"


class DeviceLimitReached(DomainError):
    status, code = 403, "device-limit-reached"


class ModelNotLicensed(DomainError):
    status, code = 403, "model-not-licensed"


class KeyRevoked(DomainError):
    status, code = 403, "key-revoked"


class KeyNotRegistered(DomainError):
    status, code = 404, "key-not-registered"


class NotFound(DomainError):
    status, code = 404, "not-found"


class MethodNotAllowed(DomainError):
    status, code = 405, "method-not-allowed"


class Conflict(DomainError):
    status, code = 409, "conflict"


class RequestTooLarge(DomainError):
    status, code = 413, "request-too-large"


class UnsupportedMediaType(DomainError):
    status, code = 415, "unsupported-media-type"


class RateLimited(DomainError):
    status, code = 429, "rate-limited"


class UsageLimitReached(DomainError):
    status, code = 429, "usage-limit-reached"


class Busy(DomainError):
    status, code = 503, "busy"


class KeyUnavailable(DomainError):
    """The master key cannot unwrap a value (wrong key, tampered row, KMS down)."""

    status, code = 503, "unavailable"


class SettingsError(ModelSealError):
    """A setting is missing, malformed or refused outside dev mode (spec §15); names the setting."""

    exit_code = 2

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"MODELSEAL_KS_{setting}: {message}")
        self.setting = setting
