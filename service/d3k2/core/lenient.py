"""Small lenient readers of JSON-shaped FHIR values, shared by the medication and draft-order readers.

Pure. The CDS Hooks sandbox and real EHRs send invalid FHIR (see shared/sandbox/README.md, "Quirks"): each
reader accepts any value and answers None or an empty list for what it cannot use, never raising.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, TypeGuard


def positive_number(value: object) -> Decimal | None:
    """A finite positive number; numeric strings are accepted because some EHRs quote numbers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            return None
        result = Decimal(repr(value))
    elif isinstance(value, str) and len(value) <= 30 and re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):
        result = Decimal(value.strip())
    else:
        return None
    return result if result > 0 else None


def is_map(value: object) -> TypeGuard[Mapping[str, Any]]:
    # The exact-dict test first: JSON objects are dicts, and an ABC check costs several times more.
    return type(value) is dict or isinstance(value, Mapping)


def as_list(value: object) -> list[object]:
    """FHIR arrays sent as a single object (the sandbox does this for category and reasonCode)."""
    if isinstance(value, list):
        return value
    if value is None:
        return []
    return [value]


def dicts(value: object) -> list[Mapping[str, Any]]:
    return [item for item in as_list(value) if is_map(item)]


def nonblank(value: object) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def quote(value: object) -> str:
    """A short, quoted echo of a rejected value (units, dates, codes: never free text)."""
    text = value if isinstance(value, str) else type(value).__name__
    return repr(text[:30] + "…" if len(text) > 30 else text)


def fmt(value: Decimal) -> str:
    """A dose with its own digits when it has at most three decimals (0.25 mcg, 1.25 mg, 0.125 mcg: never
    "0.2" or "0.12"); a quotient such as 50,000 / 7 IU to two decimals."""
    if value == value.to_integral_value():
        return f"{value:,.0f}"
    if abs(value) < Decimal("0.01"):
        return f"{value:.2g}"
    if value == value.quantize(Decimal("0.001")):
        return f"{value.normalize():,f}"
    return f"{value:,.2f}".rstrip("0").rstrip(".")
