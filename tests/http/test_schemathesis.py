"""schemathesis against the app in-process (WSGI), from the OpenAPI document it serves: valid and invalid
bodies for every operation; never a 5xx (503 for feedback only when its database is down, which it is not
here), and every answer, errors included, matches its documented status and schema.

Bounded for `make test`; `make fuzz` raises the number of examples with D3K2_FUZZ_EXAMPLES.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import HealthCheck
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from builders import CARDS, ruleset
from d3k2.config import Settings
from d3k2.http.app import create_app

MAX_EXAMPLES = int(os.environ.get("D3K2_FUZZ_EXAMPLES", "25"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _schema() -> schemathesis.BaseSchema:
    # fhir_allowed=(): any generated fhirServer is refused (403) instead of fetched, so no test waits on the
    # network; a request whose required keys are absent without a fhirServer is a documented 412.
    settings = Settings(env="test", cards_dir=CARDS, data_dir=Path(_DATA.name), auth="off", fhir_allowed=())
    loaded = schemathesis.openapi.from_wsgi("/openapi.json", create_app(settings, ruleset()))
    loaded.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
        max_examples=MAX_EXAMPLES,
        deterministic=True,
        database="none",
    )
    # Hypothesis fails a test whose first inputs took over 30 s to generate (deadline=None): the
    # medication-prescribe body did on a loaded CI machine (under PYTHONTRACEMALLOC). A speed check has
    # no place in a test of answers (bench/ measures speed).
    loaded.config.suppress_health_check = [HealthCheck.too_slow]

    @loaded.hook
    def filter_path_parameters(context, path_parameters) -> bool:
        # schemathesis' WSGI transport hands a non-string path value (negative mode) to Werkzeug unquoted,
        # which refuses a "?" in a path; over HTTP it would be percent-encoded. Only such values are dropped.
        return not any("?" in str(value) for value in (path_parameters or {}).values())

    return loaded


# The schema is loaded at collection (schemathesis parametrizes one test per operation); the feedback
# database lives in a directory removed when the test process exits.
_DATA = tempfile.TemporaryDirectory(prefix="d3k2-fuzz-")
schema = _schema()


@schema.parametrize()
def test_api_answers_as_documented(case) -> None:
    case.call_and_validate(checks=CHECKS)
