"""Values with comparators as intervals, so that `<5` or `>60` never becomes an exact number."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol, TypeVar


@dataclass(frozen=True, slots=True)
class Interval:
    """A set of possible true values; comparisons answer True, False or None (cannot tell)."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    @classmethod
    def exact(cls, value: float) -> Interval:
        return cls(value, value)

    @classmethod
    def from_comparator(cls, value: float, comparator: str | None) -> Interval:
        if comparator in (None, "", "="):
            return cls.exact(value)
        if comparator == "<":
            return cls(-math.inf, value, True, True)
        if comparator == "<=":
            return cls(-math.inf, value, True, False)
        if comparator == ">":
            return cls(value, math.inf, True, True)
        if comparator == ">=":
            return cls(value, math.inf, False, True)
        raise ValueError(f"unknown comparator {comparator!r}")

    @property
    def is_exact(self) -> bool:
        return self.lo == self.hi

    def scaled(self, factor: float) -> Interval:
        return Interval(self.lo * factor, self.hi * factor, self.lo_open, self.hi_open)

    def lt(self, x: float) -> bool | None:
        if self.hi < x or (self.hi == x and self.hi_open):
            return True
        if self.lo >= x:
            return False
        return None

    def le(self, x: float) -> bool | None:
        if self.hi <= x:
            return True
        if self.lo > x or (self.lo == x and self.lo_open):
            return False
        return None

    def gt(self, x: float) -> bool | None:
        result = self.le(x)
        return None if result is None else not result

    def ge(self, x: float) -> bool | None:
        result = self.lt(x)
        return None if result is None else not result

    def within(self, lower: float, upper: float, lower_open: bool, upper_open: bool) -> bool | None:
        """Whether every possible value lies in the band (lower, upper) with the given openness."""
        low_ok = self.gt(lower) if lower_open else self.ge(lower)
        high_ok = self.lt(upper) if upper_open else self.le(upper)
        if low_ok is False or high_ok is False:
            return False
        if low_ok is None or high_ok is None:
            return None
        return True


class Banded(Protocol):
    """A band of a value line (a profile's 25(OH)D band, a lab's category)."""

    @property
    def id(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def lower(self) -> float: ...
    @property
    def upper(self) -> float: ...
    @property
    def lower_open(self) -> bool: ...
    @property
    def upper_open(self) -> bool: ...


@dataclass(frozen=True)
class LabBand:
    id: str
    label: str
    lower: float
    upper: float
    lower_open: bool = False
    upper_open: bool = False


_B = TypeVar("_B", bound=Banded)


def possible_bands(value: Interval, bands: Sequence[_B]) -> list[_B]:
    """Every band the true value may lie in."""
    return [b for b in bands if value.within(b.lower, b.upper, b.lower_open, b.upper_open) is not False]


def certain_band(value: Interval, bands: Sequence[_B]) -> _B | None:
    """The band holding every possible value; for a value given with a comparator that straddles bands
    (`>100`), the highest band (of `bands`, ascending) whose lower bound it certainly reaches: `>100` is
    certainly above 80, `<35` certainly above nothing but minus infinity. A comparator thus always gets a
    band, and never one it may not have reached."""
    reached = None
    for band in bands:
        if value.within(band.lower, band.upper, band.lower_open, band.upper_open):
            return band
        if value.gt(band.lower) if band.lower_open else value.ge(band.lower):
            reached = band
    return reached


def format_number(value: float, decimals: int = 1) -> str:
    """Thousands separators; integers without a trailing .0."""
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.{decimals}f}".rstrip("0").rstrip(".")


def format_total(value: float) -> str:
    """A combined daily total: a weekly dose beside a daily one adds fractions of an IU ("9,142.9 IU/day"),
    which no clinician orders; shown as "about 9,143", rounded up, so that it stays on the same side of every
    whole-number ceiling it is judged against."""
    if float(value).is_integer():
        return format_number(value)
    return f"about {format_number(math.ceil(value))}"


def format_exact(value: float) -> str:
    """Every digit the number has (its shortest round-trip form), never rounded: 2.65 is "2.65", not
    "2.6", so a value is never shown on the other side of a threshold. Thousands separators; finite
    numbers only (an open bound is written with its comparator)."""
    if float(value).is_integer():
        return f"{int(value):,}"
    return format(Decimal(repr(float(value))), ",f")


Mark = tuple[float, bool]  # a threshold, and whether a value exactly on it counts as above it


def marks_of(bands: Sequence[Banded]) -> tuple[Mark, ...]:
    """The thresholds between bands: a value on a closed lower bound is in the band above it."""
    return tuple((b.lower, not b.lower_open) for b in bands if not math.isinf(b.lower))


def format_beside(value: float, decimals: int, marks: Sequence[Mark]) -> str:
    """A number the lab did not report (a converted or computed one), rounded to `decimals` unless that moves
    it to the other side of a mark (a threshold): then with as many more digits as it takes. 374.5 nmol/L is
    150.04 ng/mL, not "150.0" beside the toxicity threshold (> 150). So a number is never shown on the other
    side of a threshold from where the rules put it."""

    def sides(x: float) -> list[bool]:
        return [x > mark or (x == mark and on_is_above) for mark, on_is_above in marks]

    side = sides(value)
    for digits in range(decimals, 16):
        shown = round(value, digits)
        if sides(shown) == side:
            return format_exact(shown)
    return format_exact(value)


def format_interval(
    interval: Interval, unit: str, decimals: int | None = 1, marks: Sequence[Mark] | None = None
) -> str:
    """`decimals` None: the numbers as they are (`format_exact`); with `marks`: `format_beside` them."""

    def number(value: float) -> str:
        if decimals is None:
            return format_exact(value)
        return format_number(value, decimals) if marks is None else format_beside(value, decimals, marks)

    if interval.is_exact:
        return f"{number(interval.lo)} {unit}"
    if math.isinf(interval.lo):
        op = "<" if interval.hi_open else "≤"
        return f"{op}{number(interval.hi)} {unit}"
    if math.isinf(interval.hi):
        op = ">" if interval.lo_open else "≥"
        return f"{op}{number(interval.lo)} {unit}"
    return f"{number(interval.lo)}–{number(interval.hi)} {unit}"
