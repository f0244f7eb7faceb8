"""The OpenAPI 3.1 document of the service, built from the rule set so that every service id and hook
in cards/services.toml is enumerated (one path per service, its request schema fixed to its hook).

Schemas are JSON Schema 2020-12 (the OpenAPI 3.1 dialect); tests validate live and golden responses
against them, and schemathesis fuzzes the app from this document.
"""

from __future__ import annotations

from typing import Any

from d3k2 import __version__
from d3k2.core.hooks import (
    B64TOKEN,
    FHIR_ID,
    MAX_CODE_LENGTH,
    MAX_FEEDBACK_ITEMS,
    MAX_ID_LENGTH,
    MAX_SUGGESTIONS,
    MAX_TEXT_LENGTH,
    MAX_TOKEN_LENGTH,
)
from d3k2.core.ruleset import ORDER_HOOKS, RuleSet

SPEC_VERSION = "3.1.0"
JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref("Error")}}}


# Every error status the edge answers, with what it means (errors.py: one class per status).
ERRORS: dict[str, str] = {
    "400": "malformed JSON, a body that is not the documented shape, or a hook the service does not answer",
    "401": "the bearer token (JWT) is missing (D3K2_AUTH=required) or does not verify",
    "403": "fhirServer is not on the configured allow-list; nothing was fetched",
    "404": "no CDS service with this id",
    "405": "method not allowed on this path",
    "412": "data the rules need was neither prefetched nor fetchable, and nothing the rules read arrived"
    " under any other key; `keys` names the prefetch keys",
    "413": "the body, the number of prefetched resources or the number of feedback items is over the limit",
    "415": "Content-Type is not application/json (or application/fhir+json)",
    "503": "the feedback database is unreachable (feedback only; hook calls keep answering)",
}


def _errors(*statuses: str) -> dict[str, Any]:
    answers = {status: _error(ERRORS[status]) for status in statuses}
    if "412" in answers:
        # The 412 always names the prefetch keys the EHR should send (CDS Hooks 2.0.1 "Prefetch").
        schema = {"allOf": [_ref("Error"), {"required": ["keys"]}]}
        answers["412"] = {"description": ERRORS["412"], "content": {JSON: {"schema": schema}}}
    return answers


def _coding() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "system": {"type": "string", "maxLength": MAX_CODE_LENGTH},
            "code": {"type": "string", "maxLength": MAX_CODE_LENGTH},
            "display": {"type": "string", "maxLength": MAX_TEXT_LENGTH},
        },
    }


def _resource() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "a FHIR R4 resource (read leniently: unreadable resources are skipped and named)",
        "required": ["resourceType"],
        "properties": {"resourceType": {"type": "string"}, "id": {"type": "string"}},
    }


def _bundle() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["resourceType"],
        "properties": {
            "resourceType": {"const": "Bundle"},
            "type": {"type": "string"},
            "entry": {
                "type": "array",
                "items": {"type": "object", "properties": {"resource": _ref("Resource")}},
            },
        },
    }


def _context(hook: str | None) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "patientId": {"type": "string", "pattern": FHIR_ID.pattern},
        "userId": {"type": "string"},
        "encounterId": {"type": "string"},
    }
    if hook is None or hook in ORDER_HOOKS:
        # d3k2.core.drafts reads what EHRs and the sandbox send: what it cannot use is named, never a 400.
        properties["draftOrders"] = {
            "description": (
                "read leniently: a Bundle (spec), a list of resources or of Bundle entries, or one resource; "
                "unreadable orders are skipped and named in the card"
            ),
            "anyOf": [
                _ref("Bundle"),
                {"type": "array", "items": {"type": "object"}},
                _ref("Resource"),
                {"type": "null"},
            ],
        }
        properties["selections"] = {
            "description": "references of the selected draft orders; one string is read as a list of one",
            "anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}],
        }
    if hook is None or hook == "medication-prescribe":
        properties["medications"] = {"anyOf": [_ref("Bundle"), {"type": "array", "items": _ref("Resource")}]}
    return {"type": "object", "required": ["patientId"], "properties": properties}


def _cds_request(hook: str | None, prefetch_keys: list[str]) -> dict[str, Any]:
    prefetch: dict[str, Any] = {
        "type": "object",
        "description": (
            "per key: absent (fetched from fhirServer), null (the EHR has no data: not fetched), "
            "an OperationOutcome (failed at the EHR: fetched again) or the data"
        ),
        "additionalProperties": {"anyOf": [_ref("Resource"), {"type": "null"}]},
    }
    if prefetch_keys:
        prefetch["properties"] = {
            key: {"anyOf": [_ref("Bundle"), _ref("Resource"), {"type": "null"}]} for key in prefetch_keys
        }
    return {
        "type": "object",
        "required": ["hook", "hookInstance", "context"],
        "properties": {
            "hook": {"const": hook} if hook else {"type": "string"},
            "hookInstance": {"type": "string", "minLength": 1, "maxLength": 200},
            "fhirServer": {"type": "string", "pattern": "^https?://"},
            "fhirAuthorization": {
                "type": "object",
                "required": ["access_token"],
                "properties": {
                    "access_token": {
                        "type": "string",
                        "pattern": B64TOKEN.pattern.replace("\\A", "^").replace("\\Z", "$"),
                        "maxLength": MAX_TOKEN_LENGTH,
                    },
                    "token_type": {"type": "string"},
                    "expires_in": {"type": "integer"},
                    "scope": {"type": "string"},
                    "subject": {"type": "string"},
                },
            },
            "context": _context(hook),
            "prefetch": prefetch,
        },
    }


def _example_request(hook: str, prefetch_keys: list[str]) -> dict[str, Any]:
    """A request that answers 200 without a FHIR server: every key sent as "no data"."""
    context: dict[str, Any] = {"userId": "Practitioner/example", "patientId": "example"}
    if hook in ORDER_HOOKS:
        context["draftOrders"] = {"resourceType": "Bundle", "type": "collection", "entry": []}
    return {
        "hook": hook,
        "hookInstance": "d8f1c5a4-0f8e-4c0e-9c7e-5c2b7a0e4e11",
        "context": context,
        "prefetch": dict.fromkeys(prefetch_keys),
    }


_STRICT = {"additionalProperties": False}
# A token is verified when sent; whether one is required is configuration (D3K2_AUTH).
SECURITY: list[dict[str, list[str]]] = [{}, {"cdsClientJwt": []}]


def _schemas() -> dict[str, Any]:
    action = {
        "type": "object",
        "required": ["type", "description"],
        "properties": {
            "type": {"enum": ["create", "update", "delete"]},
            "description": {"type": "string"},
            "resource": _ref("Resource"),
            "resourceId": {"type": "string"},
        },
        **_STRICT,
    }
    return {
        "Coding": _coding(),
        "Resource": _resource(),
        "Bundle": _bundle(),
        "Error": {
            "type": "object",
            "description": "every error body: a code, what was wrong, and fields particular to the error",
            "required": ["error", "detail"],
            "properties": {
                "error": {"type": "string", "pattern": "^[a-z0-9-]+$"},
                "detail": {"type": "string", "minLength": 1},
                "keys": {"type": "array", "items": {"type": "string"}},
                "service": {"type": "string"},
            },
        },
        "Discovery": {
            "type": "object",
            "required": ["services"],
            "properties": {"services": {"type": "array", "minItems": 1, "items": _ref("ServiceDefinition")}},
            **_STRICT,
        },
        "ServiceDefinition": {
            "type": "object",
            "required": ["hook", "id", "title", "description"],
            "properties": {
                "hook": {"type": "string"},
                "id": {"type": "string"},
                "title": {"type": "string"},
                "description": {"type": "string"},
                "prefetch": {"type": "object", "additionalProperties": {"type": "string"}},
                "usageRequirements": {"type": "string"},
            },
            **_STRICT,
        },
        "CdsRequest": _cds_request(None, []),
        "CdsResponse": {
            "type": "object",
            "required": ["cards", "systemActions"],
            "properties": {
                "cards": {"type": "array", "items": _ref("Card")},
                "systemActions": {"type": "array", "items": _ref("Action")},
            },
            **_STRICT,
        },
        "Card": {
            "type": "object",
            "required": ["uuid", "summary", "indicator", "source"],
            "properties": {
                "uuid": {"type": "string", "format": "uuid"},
                "summary": {"type": "string", "minLength": 1, "maxLength": 139},
                "detail": {"type": "string"},
                "indicator": {"enum": ["info", "warning", "critical"]},
                "source": {
                    "type": "object",
                    "required": ["label"],
                    "properties": {
                        "label": {"type": "string"},
                        "url": {"type": "string", "format": "uri"},
                        "icon": {"type": "string", "format": "uri"},
                        "topic": {**_ref("Coding"), "required": ["system", "code"]},
                    },
                    **_STRICT,
                },
                "suggestions": {"type": "array", "items": _ref("Suggestion")},
                "selectionBehavior": {"enum": ["at-most-one", "any"]},
                "overrideReasons": {"type": "array", "items": _ref("Coding")},
                "links": {"type": "array", "items": _ref("Link")},
            },
            "dependentRequired": {"suggestions": ["selectionBehavior"]},
            **_STRICT,
        },
        "Suggestion": {
            "type": "object",
            "required": ["label", "uuid", "actions"],
            "properties": {
                "label": {"type": "string", "minLength": 1},
                "uuid": {"type": "string", "format": "uuid"},
                "isRecommended": {"type": "boolean"},
                "actions": {"type": "array", "minItems": 1, "items": _ref("Action")},
            },
            **_STRICT,
        },
        "Action": action,
        "Link": {
            "type": "object",
            "required": ["label", "url", "type"],
            "properties": {
                "label": {"type": "string"},
                "url": {"type": "string", "format": "uri"},
                "type": {"enum": ["absolute", "smart"]},
                "appContext": {"type": "string"},
            },
            **_STRICT,
        },
        "Feedback": {
            "type": "object",
            "required": ["feedback"],
            "description": (
                "spec 2.0 shape; older shapes (overrideReason as a bare Coding, an overrideReasons list, "
                "acceptedSuggestions as strings, a single item without the list) are accepted too"
            ),
            "properties": {
                "feedback": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_FEEDBACK_ITEMS,
                    "items": _ref("FeedbackItem"),
                }
            },
        },
        "FeedbackItem": {
            "type": "object",
            "required": ["card", "outcome"],
            "properties": {
                "card": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH},
                "outcome": {"enum": ["accepted", "overridden"]},
                "acceptedSuggestions": {
                    "type": "array",
                    "maxItems": MAX_SUGGESTIONS,
                    "items": {
                        "type": "object",
                        "required": ["id"],
                        "properties": {"id": {"type": "string", "maxLength": MAX_ID_LENGTH}},
                    },
                },
                "overrideReason": {
                    "type": "object",
                    "properties": {
                        "reason": _ref("Coding"),
                        "userComment": {"type": "string", "maxLength": MAX_TEXT_LENGTH},
                    },
                },
                "outcomeTimestamp": {
                    "type": "string",
                    "maxLength": 64,
                    "description": "an ISO 8601 instant; one outside years 1-9999 in UTC is a 400",
                },
            },
        },
        "FeedbackReceipt": {
            "type": "object",
            "required": ["received", "stored", "duplicates", "persisted"],
            "properties": {
                "received": {"type": "integer", "minimum": 1},
                "stored": {"type": "integer", "minimum": 0},
                "duplicates": {"type": "integer", "minimum": 0},
                "persisted": {"type": "boolean"},
            },
            **_STRICT,
        },
    }


def _json_body(schema: dict[str, Any], example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"required": True, "content": {JSON: media}}


def _ok(description: str, schema: dict[str, Any], media_type: str = JSON) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": schema}}}


def build_openapi(ruleset: RuleSet) -> dict[str, Any]:
    services = list(ruleset.services.values())
    ids = [svc.id for svc in services]
    paths: dict[str, Any] = {
        "/cds-services": {
            "get": {
                "operationId": "discovery",
                "security": SECURITY,
                "summary": "CDS Hooks discovery: one service per hook, with prefetch templates",
                "responses": {"200": _ok("the services", _ref("Discovery")), **_errors("401")},
            }
        }
    }
    for svc in services:
        keys = list(svc.prefetch)
        paths[f"/cds-services/{svc.id}"] = {
            "post": {
                "operationId": f"call-{svc.id}",
                "security": SECURITY,
                "summary": f"{svc.hook}: {svc.title}",
                "description": svc.description,
                "requestBody": _json_body(_cds_request(svc.hook, keys), _example_request(svc.hook, keys)),
                "responses": {
                    "200": _ok(
                        "cards (possibly none) and systemActions, both always present", _ref("CdsResponse")
                    ),
                    **_errors("400", "401", "403", "412", "413", "415"),
                },
            }
        }
    paths["/cds-services/{service_id}"] = {
        "post": {
            "operationId": "call-service",
            "security": SECURITY,
            "summary": "any service id: 404 unless discovery lists it",
            "parameters": [
                {
                    "name": "service_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "minLength": 1},
                }
            ],
            "requestBody": _json_body(_ref("CdsRequest")),
            "responses": {
                "200": _ok(
                    "as for the service's own path when the id is one discovery lists", _ref("CdsResponse")
                ),
                **_errors("400", "401", "403", "404", "412", "413", "415"),
            },
        }
    }
    paths["/cds-services/{service_id}/feedback"] = {
        "post": {
            "operationId": "feedback",
            "security": SECURITY,
            "summary": "card feedback (accepted / overridden)",
            "parameters": [
                {
                    "name": "service_id",
                    "in": "path",
                    "required": True,
                    "schema": {"anyOf": [{"enum": ids}, {"type": "string", "minLength": 1}]},
                }
            ],
            "requestBody": _json_body(
                _ref("Feedback"),
                {"feedback": [{"card": "d3k2-card-uuid", "outcome": "accepted", "acceptedSuggestions": []}]},
            ),
            "responses": {
                "200": _ok(
                    "what was received and stored (a repeated item is a duplicate)", _ref("FeedbackReceipt")
                ),
                **_errors("400", "401", "404", "413", "415", "503"),
            },
        }
    }
    paths["/healthz"] = {
        "get": {
            "operationId": "healthz",
            "summary": "liveness: the process answers",
            "responses": {
                "200": _ok(
                    "up",
                    {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
                )
            },
        }
    }
    readiness = {
        "type": "object",
        "required": ["status", "checks"],
        "properties": {
            "status": {"enum": ["ready", "not-ready"]},
            "checks": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    paths["/readyz"] = {
        "get": {
            "operationId": "readyz",
            "summary": "readiness: rules loaded and the feedback database reachable",
            "responses": {
                "200": _ok("ready", readiness),
                "503": _ok("not ready: the failing check", readiness),
            },
        }
    }
    paths["/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "this document",
            "responses": {"200": _ok("the OpenAPI 3.1 document", {"type": "object"})},
        }
    }
    return {
        "openapi": SPEC_VERSION,
        "info": {
            "title": "d3k2 CDS Hooks service",
            "version": __version__,
            "summary": "CDS Hooks 2.0.1 service for vitamin D3 / K2 (MK-7) decision support on FHIR R4",
            "description": (
                'Every error is JSON `{"error": <code>, "detail": <what was wrong>, ...}`; never 500 for '
                "bad input. Calls under /cds-services may carry `Authorization: Bearer <JWT>` signed by the "
                "EHR (CDS Hooks 2.0 'Trusting CDS Clients'); whether it is required is configuration."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"cdsClientJwt": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }
