"""One exception tree for the package; the HTTP edge maps each class to one status."""

from __future__ import annotations

from typing import Any


class D3K2Error(Exception):
    """Base of every error d3k2 raises on purpose."""

    status = 500
    code = "internal-error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.detail, **self.extra}


class BadRequest(D3K2Error):
    status = 400
    code = "bad-request"


class Unauthorized(D3K2Error):
    """The caller's JWT is missing or does not verify; the detail says why without quoting the token."""

    status = 401
    code = "unauthorized"


class UnknownService(D3K2Error):
    status = 404
    code = "unknown-service"


class NotFound(D3K2Error):
    status = 404
    code = "not-found"


class MethodNotAllowed(D3K2Error):
    status = 405
    code = "method-not-allowed"


class PayloadTooLarge(D3K2Error):
    status = 413
    code = "payload-too-large"


class UnsupportedMediaType(D3K2Error):
    status = 415
    code = "unsupported-media-type"


class PrefetchUnavailable(D3K2Error):
    """Data the rules need was neither prefetched nor obtainable from the FHIR server."""

    status = 412
    code = "prefetch-unavailable"


class FhirServerNotAllowed(D3K2Error):
    """The request names a fhirServer outside the configured allow-list; nothing is fetched."""

    status = 403
    code = "fhir-server-not-allowed"


class RuleSetError(D3K2Error):
    """The rule set in cards/ is broken: startup stops with the file and field named."""

    code = "rule-set-invalid"
