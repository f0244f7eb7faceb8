"""CDS Hooks request and feedback models (pydantic). Lenient where real EHRs deviate, strict where
the service would otherwise guess: a request without hook, hookInstance or context.patientId is 400.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from d3k2.core.errors import BadRequest, PayloadTooLarge

# FHIR R4 id: also what makes a patient id safe to put in a query template.
FHIR_ID = re.compile(r"\A[A-Za-z0-9\-.]{1,64}\Z")
# RFC 6750 b64token: what may follow "Bearer " in the Authorization header sent to the FHIR server.
# Anything else (a non-Latin-1 character) cannot be put in an HTTP header at all.
B64TOKEN = re.compile(r"\A[A-Za-z0-9\-._~+/]+=*\Z")
MAX_TOKEN_LENGTH = 16 * 1024

# Feedback is stored as it comes: bounded so that one POST cannot fill the database or hold a worker.
MAX_FEEDBACK_ITEMS = 100
MAX_ID_LENGTH = 128  # a card's uuid, a suggestion's id (the store's card_uuid column has this width)
MAX_CODE_LENGTH = 256  # a reason's system, code
MAX_TEXT_LENGTH = 4000  # a clinician's comment, a reason's display
MAX_SUGGESTIONS = 20


class FhirAuthorization(BaseModel):
    model_config = ConfigDict(extra="allow")

    access_token: str = Field(max_length=MAX_TOKEN_LENGTH)
    token_type: str = "Bearer"  # noqa: S105 (the token type, not a secret)
    expires_in: int | None = None
    scope: str | None = None
    subject: str | None = None

    @field_validator("access_token")
    @classmethod
    def _b64token(cls, value: str) -> str:
        # The message never repeats the token.
        if not B64TOKEN.match(value):
            raise ValueError("must be an RFC 6750 bearer token (letters, digits and -._~+/ only)")
        return value


class HookContext(BaseModel):
    model_config = ConfigDict(extra="allow")

    patientId: str
    userId: str | None = None
    encounterId: str | None = None
    selections: list[str] | None = None
    draftOrders: Any = None
    medications: Any = None  # medication-prescribe (CDS Hooks 1.0)

    @field_validator("patientId")
    @classmethod
    def _fhir_id(cls, value: str) -> str:
        if not FHIR_ID.match(value):
            raise ValueError("must be a FHIR id ([A-Za-z0-9-.], at most 64 characters)")
        return value

    @field_validator("selections", mode="before")
    @classmethod
    def _selections(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        return value


class CdsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    hook: str
    hookInstance: str = Field(min_length=1, max_length=200)
    fhirServer: str | None = None
    fhirAuthorization: FhirAuthorization | None = None
    context: HookContext
    prefetch: dict[str, Any] | None = None

    @field_validator("fhirServer")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/") if value else value


def _explain(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "(body)"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def parse_request(payload: Any) -> CdsRequest:
    if not isinstance(payload, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        return CdsRequest.model_validate(payload)
    except ValidationError as exc:
        raise BadRequest(f"invalid CDS Hooks request: {_explain(exc)}") from exc


class Coding(BaseModel):
    model_config = ConfigDict(extra="allow")

    system: str | None = Field(default=None, max_length=MAX_CODE_LENGTH)
    code: str | None = Field(default=None, max_length=MAX_CODE_LENGTH)
    display: str | None = Field(default=None, max_length=MAX_TEXT_LENGTH)


class OverrideReason(BaseModel):
    model_config = ConfigDict(extra="allow")

    reason: Coding | None = None
    userComment: str | None = Field(default=None, max_length=MAX_TEXT_LENGTH)


class AcceptedSuggestion(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = Field(max_length=MAX_ID_LENGTH)


class FeedbackItem(BaseModel):
    """Spec 2.0 shape; older shapes (overrideReason as a bare Coding, overrideReasons list) accepted."""

    model_config = ConfigDict(extra="allow")

    card: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    outcome: Literal["accepted", "overridden"]
    acceptedSuggestions: list[AcceptedSuggestion] = Field(default=[], max_length=MAX_SUGGESTIONS)
    overrideReason: OverrideReason | None = None
    outcomeTimestamp: str | None = Field(default=None, max_length=64)

    @field_validator("outcomeTimestamp")
    @classmethod
    def _instant(cls, value: str | None) -> str | None:
        """Lenient: a text that is no ISO instant is kept as text. One that is, but lies outside the
        years 1 to 9999 once moved to UTC ("0001-01-01T00:00:00+14:00"), cannot be stored as an instant."""
        if not value:
            return value
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return value
        try:
            # A time without an offset is read as UTC (d3k2.store.feedback): nothing to move.
            if parsed.tzinfo is not None:
                parsed.astimezone(UTC)
        except OverflowError:
            raise ValueError("must be an instant between the years 1 and 9999 in UTC") from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _older_shapes(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        reason = data.get("overrideReason")
        if isinstance(reason, dict) and "reason" not in reason and ("code" in reason or "system" in reason):
            data["overrideReason"] = {"reason": reason}
        reasons = data.pop("overrideReasons", None)
        if data.get("overrideReason") is None and isinstance(reasons, list) and reasons:
            first = reasons[0]
            data["overrideReason"] = (
                first if isinstance(first, dict) and "reason" in first else {"reason": first}
            )
        accepted = data.get("acceptedSuggestions")
        if isinstance(accepted, list):
            data["acceptedSuggestions"] = [{"id": a} if isinstance(a, str) else a for a in accepted]
        return data


def _holds_nul(value: Any) -> bool:
    """Whether a NUL character is in any string of ``value``, keys included (JSON's nesting)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(key) or _holds_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return False


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    feedback: list[FeedbackItem] = Field(min_length=1)

    # PostgreSQL refuses NUL in text: a comment, card id or reason code holding one must be the sender's
    # error (400), never the database's (a 500 whose error would carry the clinician's text).
    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        if _holds_nul(data):
            raise ValueError("text must not contain the NUL character (U+0000)")
        return data


def parse_feedback(payload: Any) -> FeedbackRequest:
    if isinstance(payload, dict) and "feedback" not in payload and "card" in payload:
        payload = {"feedback": [payload]}
    if not isinstance(payload, dict):
        raise BadRequest("the body must be a JSON object with a feedback list")
    items = payload.get("feedback")
    if isinstance(items, list) and len(items) > MAX_FEEDBACK_ITEMS:
        raise PayloadTooLarge(f"the feedback list has {len(items)} items; at most {MAX_FEEDBACK_ITEMS}")
    try:
        return FeedbackRequest.model_validate(payload)
    except ValidationError as exc:
        raise BadRequest(f"invalid feedback: {_explain(exc)}") from exc
