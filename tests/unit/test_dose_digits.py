"""Dose numbers keep their own digits (CLINICAL.md 6a: active analogs in mcg with their own digits)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from d3k2.core.lenient import fmt


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("0.25", "0.25"),
        ("0.125", "0.125"),
        ("1.25", "1.25"),
        ("0.5", "0.5"),
        ("5000", "5,000"),
        ("1234.125", "1,234.125"),
        # A quotient is not a reported digit: 50,000 IU every other week is 3,571.43 IU/day.
        (str(Decimal(50000) / Decimal(14)), "3,571.43"),
        ("0.004", "0.004"),
    ],
)
def test_fmt_keeps_up_to_three_decimals(value: str, shown: str) -> None:
    assert fmt(Decimal(value)) == shown
