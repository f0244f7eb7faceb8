"""The SMART app's charts draw what the facts use: a result dated after today (beyond the clock skew the
facts allow) or one no body can have is listed with why, never drawn, and never stretches the time axis;
a product that starts after today is listed, not drawn (a bar at today would read as taken now)."""

from __future__ import annotations

from datetime import date
from typing import Any

from builders import ruleset
from d3k2.http.smart_view import Axis, Span, lab_points, lanes

TODAY = date(2026, 11, 24)


def vitd(oid: str, day: str, value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "62292-8"}]},
        "effectiveDateTime": day,
        "valueQuantity": {
            "value": value,
            "unit": "ng/mL",
            "system": "http://unitsofmeasure.org",
            "code": "ng/mL",
        },
    }


def test_a_future_result_is_listed_with_why_and_not_drawn() -> None:
    points = lab_points(
        [
            vitd("old", "2026-03-01", 18),
            vitd("skew", "2026-11-25", 22),  # one day ahead: clock skew, used as the facts use it
            vitd("future", "2027-06-01", 35),
            vitd("impossible", "2026-10-01", 9000),
        ],
        ruleset(),
        "vitd",
        TODAY,
    )
    by_id = {p.source.split("/")[-1]: p for p in points}
    assert (by_id["old"].used, by_id["old"].plotted) == (True, True)
    assert (by_id["skew"].used, by_id["skew"].plotted) == (True, True)
    assert (by_id["future"].unused, by_id["future"].plotted) == ("not used: dated after today", False)
    assert (by_id["impossible"].unused, by_id["impossible"].plotted) == (
        "not used: no body can have it",
        False,
    )


def test_a_product_starting_after_today_is_listed_not_drawn() -> None:
    axis = Axis(date(2026, 1, 1), TODAY)
    later = Span(
        "Vitamin D3 1000 UNT", date(2027, 1, 1), None, "active", "1,000 IU/day", "MedicationStatement/m"
    )
    taken = Span(
        "Vitamin D3 2000 UNT", date(2026, 3, 1), None, "active", "2,000 IU/day", "MedicationStatement/n"
    )
    (lane,) = lanes([later, taken], axis)
    assert lane["text"] == "Vitamin D3 2000 UNT 2,000 IU/day"
    assert lane["x"] + lane["w"] == axis.x(TODAY)
