"""Domain errors of the gateway (docs/spec/gateway-v1.md §3). Each class carries its HTTP status
and a stable code; one exception handler in ``app.py`` turns them into responses, and the CLI turns
them into exit codes. Nothing below the routes knows about HTTP.
"""

from __future__ import annotations

from ..errors import ModelSealError


class GatewayError(ModelSealError):
    """Root of the gateway's errors."""

    status: int = 500
    code: str = "internal"

    def __init__(self, message: str = "", *, retry_after: int | None = None) -> None:
        self.message = message or self.code.replace("-", " ")
        super().__init__(self.message)
        self.retry_after = retry_after  # seconds, for 429 and 503 (``Retry-After``)


class ConfigError(GatewayError):
    """The gateway's configuration is invalid (the CLI exits 2 naming the setting)."""

    code = "config-error"
    exit_code = 2


class MalformedRequest(GatewayError):
    """The body is not what the endpoint takes (bad JSON, wrong shape or dtype, NaN, empty batch)."""

    status, code = 400, "malformed-request"


class InvalidApiKey(GatewayError):
    """Missing, unknown, revoked or wrong API key: one answer for all, so no key's existence leaks."""

    status, code = 401, "invalid-api-key"


class Forbidden(GatewayError):
    """The key is valid but its scopes do not cover this endpoint."""

    status, code = 403, "forbidden"


class NotFound(GatewayError):
    status, code = 404, "not-found"


class MethodNotAllowed(GatewayError):
    status, code = 405, "method-not-allowed"


class NotAcceptable(GatewayError):
    status, code = 406, "not-acceptable"


class PayloadTooLarge(GatewayError):
    """The body or the batch is over the configured limit."""

    status, code = 413, "payload-too-large"


class UnsupportedMediaType(GatewayError):
    status, code = 415, "unsupported-media-type"


class ModelRejectedInput(GatewayError):
    """The input passed the gateway's checks but the runtime refused it."""

    status, code = 422, "model-rejected-input"


class QuotaExceeded(GatewayError):
    """A quota window of the key would be exceeded; the request is refused whole."""

    status, code = 429, "quota-exceeded"

    def __init__(self, message: str = "", *, retry_after: int | None = None, period: str = "") -> None:
        super().__init__(message, retry_after=retry_after)
        self.period = period  # "minute", "day" or "total"


class Unavailable(GatewayError):
    """A backing service (Redis, the key database) cannot be reached; the request may be retried."""

    status, code = 503, "unavailable"


class UnknownKey(GatewayError):
    """An admin command named an API key id that does not exist."""

    status, code = 404, "unknown-key"
    exit_code = 2
