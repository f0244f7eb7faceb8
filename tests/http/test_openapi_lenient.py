"""Issue 24, item 9: the OpenAPI document describes what the service accepts, not only the spec's shapes. The
order hooks read draft orders leniently (the sandbox's Bundle without `type`, a list of resources or of Bundle
entries, one resource, null; `selections` as one string): each such request validates against the documented
request schema and is answered 200 with a documented response. The 412 is documented with the prefetch keys
it always names.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_openapi import _validate, check_response, document, operation, post, settings

from builders import close, ruleset, sandbox_request
from d3k2.http.app import create_app

SERVICE = "/cds-services/d3k2-order-select"


def order_select() -> dict[str, Any]:
    request = sandbox_request("order-select.request.json")
    request.pop("fhirServer", None)  # no fetching: the recorded prefetch is what there is
    return request


def draft(request: dict[str, Any]) -> dict[str, Any]:
    resource: dict[str, Any] = request["context"]["draftOrders"]["entry"][0]["resource"]
    return resource


SHAPES: dict[str, Callable[[dict[str, Any]], None]] = {
    "bundle without type (the sandbox)": lambda r: r["context"]["draftOrders"].pop("type", None),
    "a list of resources": lambda r: r["context"].update(draftOrders=[draft(r)]),
    "a list of bundle entries": lambda r: r["context"].update(
        draftOrders=r["context"]["draftOrders"]["entry"]
    ),
    "one resource": lambda r: r["context"].update(draftOrders=draft(r)),
    "null": lambda r: r["context"].update(draftOrders=None),
    "selections as one string": lambda r: r["context"].update(selections=r["context"]["selections"][0]),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_a_lenient_draft_shape_is_documented_and_answered(tmp_path: Path, shape: str) -> None:
    request = copy.deepcopy(order_select())
    SHAPES[shape](request)
    doc = document()
    _validate(
        operation(doc, "post", SERVICE)["requestBody"]["content"]["application/json"]["schema"], request, doc
    )
    app = create_app(settings(tmp_path), ruleset())
    try:
        with app.test_client() as client:
            response = post(client, SERVICE, request)
    finally:
        close(app)
    assert response.status_code == 200, response.get_json()
    check_response(doc, "post", SERVICE, response)


def test_the_412_is_documented_with_the_keys_it_names() -> None:
    doc = document()
    for path in ("/cds-services/d3k2-patient-view", SERVICE):
        schema = operation(doc, "post", path)["responses"]["412"]["content"]["application/json"]["schema"]
        assert {"required": ["keys"]} in schema["allOf"]
