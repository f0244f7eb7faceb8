"""CDS Hooks 2.0.1 conformance report: each service-side MUST / SHOULD that applies to d3k2, with the tests
that prove it. Fails (exit 1) when a listed test does not exist, so the report cannot outlive its proof.

    .venv/bin/python tools/conformance.py            # table (markdown), after checking every test id
    .venv/bin/python tools/conformance.py --format json

Only what a test asserts is claimed; statements no test proves are listed under "not proven" instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Statement:
    section: str
    level: str  # MUST | SHOULD
    text: str
    tests: tuple[str, ...]


API = "tests/http/test_api.py"
AUTH = "tests/http/test_auth.py"
GOLDEN = "tests/golden/test_golden.py"
OPENAPI = "tests/http/test_openapi.py"
FUZZ = "tests/http/test_schemathesis.py"
PROPS = "tests/unit/test_properties.py"
LIMITS = "tests/unit/test_limits.py"
ORDERS = "tests/golden/test_order_hooks.py"
STORE = "tests/integration/test_feedback_store.py"

STATEMENTS: tuple[Statement, ...] = (
    Statement(
        "Discovery",
        "MUST",
        "GET {baseUrl}/cds-services answers a JSON object with a `services` array; each service has hook, "
        "id, title (SHOULD), description and prefetch templates",
        (
            f"{API}::test_discovery_lists_unique_services_with_sandbox_prefetch_keys",
            f"{OPENAPI}::test_discovery_health_readiness_and_document_match",
        ),
    ),
    Statement(
        "Discovery",
        "MUST",
        "service ids are unique (the id is the path segment that identifies the service)",
        (f"{API}::test_discovery_lists_unique_services_with_sandbox_prefetch_keys",),
    ),
    Statement(
        "Calling a service",
        "MUST",
        "a hook call is POST {baseUrl}/cds-services/{id} with a JSON body (hook, hookInstance, context, "
        "fhirServer?, fhirAuthorization?, prefetch?); malformed input is a 4xx, never a 5xx",
        (
            f"{API}::test_bad_requests_get_json_errors",
            f"{OPENAPI}::test_error_statuses_of_a_service_call_match",
            f"{FUZZ}::test_api_answers_as_documented",
        ),
    ),
    Statement(
        "Calling a service",
        "MUST",
        "an unknown service id is answered 404",
        (f"{API}::test_unknown_service_is_404", f"{OPENAPI}::test_unknown_service_404_matches"),
    ),
    Statement(
        "CDS Service response",
        "MUST",
        "the response holds `cards` (an array, possibly empty) and `systemActions`: d3k2 always sends both",
        (
            f"{API}::test_sandbox_patient_view_answers_cards",
            f"{OPENAPI}::test_golden_response_matches_the_document",
            f"{FUZZ}::test_api_answers_as_documented",
        ),
    ),
    Statement(
        "Card attributes",
        "MUST",
        "card `summary` is under 140 characters, `indicator` is info | warning | critical, `source` has a "
        "label (and topic Coding)",
        (
            f"{GOLDEN}::test_cards_follow_the_spec_shape",
            f"{OPENAPI}::test_golden_response_matches_the_document",
            f"{PROPS}::test_any_fhir_like_input_gives_facts_and_cards_without_exceptions",
        ),
    ),
    Statement(
        "Card attributes",
        "SHOULD",
        "a card has a `uuid` (needed for feedback); d3k2's is stable across replays of the same request",
        (f"{GOLDEN}::test_same_input_same_answer", f"{OPENAPI}::test_golden_response_matches_the_document"),
    ),
    Statement(
        "Suggestion",
        "MUST",
        "each suggestion has a `label`; d3k2 also gives each a `uuid`, and `selectionBehavior` whenever a "
        "card has suggestions",
        (
            f"{GOLDEN}::test_cards_follow_the_spec_shape",
            f"{OPENAPI}::test_golden_response_matches_the_document",
        ),
    ),
    Statement(
        "Action",
        "MUST",
        "action `type` is create | update | delete with a `description`; a create carries a FHIR `resource` "
        "(valid R4), a delete a `resourceId`",
        (
            f"{GOLDEN}::test_suggested_resource_is_valid_r4",
            f"{PROPS}::test_every_suggested_resource_is_valid_r4",
            f"{OPENAPI}::test_golden_response_matches_the_document",
        ),
    ),
    Statement(
        "Link",
        "MUST",
        "links have label, url and type absolute | smart",
        (f"{OPENAPI}::test_golden_response_matches_the_document",),
    ),
    Statement(
        "Prefetch",
        "MUST",
        "prefetch templates use the defined tokens ({{context.patientId}}); a key absent from the request is "
        "fetched from fhirServer with the fhirAuthorization bearer token",
        (
            f"{API}::test_absent_keys_are_fetched_from_the_fhir_server",
            f"{API}::test_bearer_token_is_sent_and_paging_is_followed",
        ),
    ),
    Statement(
        "Prefetch",
        "MUST",
        "a key sent as null means the EHR has no data: it is not fetched again",
        (f"{API}::test_null_key_means_no_data_and_is_not_refetched",),
    ),
    Statement(
        "Prefetch",
        "SHOULD",
        "a key holding an OperationOutcome (alone or in a Bundle) failed at the EHR: fetch it if possible",
        (f"{API}::test_operation_outcome_key_is_fetched_again",),
    ),
    Statement(
        "Prefetch",
        "MUST",
        "data the service needs that is neither prefetched nor fetchable is answered 412 when nothing the"
        " rules read arrived (otherwise 200: the cards the arrived data supports, the gap named, no dosing)",
        (
            f"{API}::test_required_prefetch_without_fhir_server_is_412_naming_keys",
            f"{API}::test_required_prefetch_missing_beside_data_answers_what_the_data_supports",
            f"{OPENAPI}::test_error_statuses_of_a_service_call_match",
        ),
    ),
    Statement(
        "Feedback",
        "MUST",
        "POST {baseUrl}/cds-services/{id}/feedback accepts `feedback` items (card, outcome accepted | "
        "overridden, acceptedSuggestions, overrideReason, outcomeTimestamp) and answers 200",
        (
            f"{API}::test_recorded_sandbox_feedback_is_accepted",
            f"{API}::test_older_and_full_feedback_shapes_are_accepted",
            f"{STORE}::test_http_feedback_round_trip",
            f"{OPENAPI}::test_feedback_200_400_415_and_503_match",
        ),
    ),
    Statement(
        "Trusting CDS Clients",
        "MUST",
        "the JWT in Authorization: Bearer is verified (signature by a trusted iss, aud = the URL called, "
        "exp, iat, unique jti); a refused token is 401",
        (
            f"{AUTH}::test_valid_token_is_accepted",
            f"{AUTH}::test_rejected_token_is_401",
            f"{AUTH}::test_aud_is_the_endpoint_called",
            f"{AUTH}::test_replayed_jti_is_401",
            f"{AUTH}::test_all_recorded_sandbox_tokens_verify",
            f"{OPENAPI}::test_401_matches_with_auth_required",
        ),
    ),
    Statement(
        "Trusting CDS Clients",
        "MUST",
        "every CDS route (discovery, hooks, feedback) is authenticated; preflights are not",
        (f"{AUTH}::test_every_cds_route_is_authenticated", f"{AUTH}::test_preflight_is_not_authenticated"),
    ),
    Statement(
        "Trusting CDS Clients",
        "MUST",
        "the service fetches FHIR data only from the fhirServer it is allowed to use (allow-list: 403)",
        (
            f"{API}::test_fhir_server_off_the_allow_list_is_refused",
            f"{LIMITS}::test_fhir_server_off_the_allow_list_is_refused_and_never_contacted",
        ),
    ),
    Statement(
        "Cross-origin resource sharing",
        "SHOULD",
        "CORS: preflights are answered, allowing the Authorization and Content-Type headers from any origin",
        (f"{API}::test_cors_preflight_allows_the_sandbox_headers",),
    ),
    Statement(
        "Order hooks",
        "MUST",
        "order-select judges only the draft orders in `selections`; order-sign judges every draft",
        (
            f"{ORDERS}::test_unselected_risky_draft_is_not_judged",
            f"{ORDERS}::test_order_sign_k2_with_warfarin_is_critical_and_kidney_and_sarcoidosis_warn",
        ),
    ),
    Statement(
        "Errors (d3k2, per the HTTP edge)",
        "MUST",
        "every error is JSON {error, detail, ...} matching the documented schema, for every documented "
        "status",
        (
            f"{OPENAPI}::test_every_documented_error_status_was_seen_live",
            f"{FUZZ}::test_api_answers_as_documented",
        ),
    ),
)

# Service-side statements of the spec that no test here proves (honest gaps, not claims).
NOT_PROVEN: tuple[tuple[str, str, str], ...] = (
    (
        "Security",
        "MUST",
        "TLS on the wire: left to the proxy in front of the service (README: Run in production)",
    ),
    (
        "Calling a service",
        "SHOULD",
        "answer within about 500 ms: measured by `make bench`, not asserted by a test",
    ),
)


def collected() -> set[str]:
    """Node ids pytest collects (parameters stripped), without running anything."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-2000:] + result.stderr[-2000:])
        raise SystemExit("conformance: pytest could not collect the tests")
    return {line.split("[", 1)[0] for line in result.stdout.splitlines() if "::" in line}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=("markdown", "json"), default="markdown")
    args = parser.parse_args(argv)
    known = collected()
    missing = sorted({t for s in STATEMENTS for t in s.tests if t not in known})
    if args.format == "json":
        print(
            json.dumps(
                {
                    "spec": "CDS Hooks 2.0.1",
                    "statements": [s.__dict__ | {"tests": list(s.tests)} for s in STATEMENTS],
                    "not_proven": [
                        dict(zip(("section", "level", "text"), n, strict=True)) for n in NOT_PROVEN
                    ],
                    "missing_tests": missing,
                },
                indent=2,
            )
        )
    else:
        print("# CDS Hooks 2.0.1 conformance (service side)\n")
        print("| # | section | level | statement | proven by |")
        print("| --- | --- | --- | --- | --- |")
        for i, s in enumerate(STATEMENTS, 1):
            tests = "<br>".join(f"`{t}`" for t in s.tests)
            print(f"| {i} | {s.section} | {s.level} | {s.text} | {tests} |")
        print("\n## Not proven by a test\n")
        for section, level, text in NOT_PROVEN:
            print(f"- {section} ({level}): {text}")
        total = sum(len(s.tests) for s in STATEMENTS)
        print(f"\n{len(STATEMENTS)} statements, {total} test references, {len(missing)} missing")
    for test in missing:
        print(f"error: listed test does not exist: {test}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
