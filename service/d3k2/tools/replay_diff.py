"""Replay's comparison of an answer with its golden: cards paired by uuid, then by topic; every difference
named by card and JSON path; long strings shown around their first difference."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_INDICATORS = {"critical": 0, "warning": 1, "info": 2}
_CLIP = 72


@dataclass(frozen=True)
class Difference:
    card: str | None  # topic code, None for the response itself
    path: str
    expected: Any = None
    actual: Any = None
    note: str = ""


def topic(card: Any) -> str:
    try:
        return str(card["source"]["topic"]["code"])
    except (KeyError, TypeError):
        return "(no topic)"


def _card_key(card: Any) -> tuple[int, str, str]:
    indicator = card.get("indicator") if isinstance(card, dict) else None
    uid = card.get("uuid") if isinstance(card, dict) else None
    return (_INDICATORS.get(str(indicator), 9), topic(card), str(uid))


def _sorted_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted_keys(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(v) for v in value]
    return value


def normalise(response: Any) -> Any:
    """Sort cards by (indicator, topic code, uuid) and every object's keys: what may differ between
    equivalent answers. List order inside a card (suggestions, links) is meaningful and kept."""
    if isinstance(response, dict) and isinstance(response.get("cards"), list):
        response = {**response, "cards": sorted(response["cards"], key=_card_key)}
    return _sorted_keys(response)


def _walk(expected: Any, actual: Any, path: str) -> Iterator[tuple[str, Any, Any, str]]:
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in sorted(set(expected) | set(actual)):
            sub = f"{path}.{key}" if path else key
            if key not in actual:
                yield sub, expected[key], None, "missing"
            elif key not in expected:
                yield sub, None, actual[key], "unexpected"
            else:
                yield from _walk(expected[key], actual[key], sub)
    elif isinstance(expected, list) and isinstance(actual, list):
        for i in range(max(len(expected), len(actual))):
            sub = f"{path}[{i}]"
            if i >= len(actual):
                yield sub, expected[i], None, "missing"
            elif i >= len(expected):
                yield sub, None, actual[i], "unexpected"
            else:
                yield from _walk(expected[i], actual[i], sub)
    elif expected != actual or type(expected) is not type(actual):
        yield path, expected, actual, ""


def _pair_cards(expected: list[Any], actual: list[Any]) -> Iterator[tuple[Any, Any]]:
    """Cards matched by uuid first, then by topic code in order; leftovers are missing or unexpected."""
    left = list(actual)
    pending = []
    for card in expected:
        uid = card.get("uuid") if isinstance(card, dict) else None
        match = next(
            (a for a in left if isinstance(a, dict) and uid is not None and a.get("uuid") == uid), None
        )
        if match is None:
            pending.append(card)
        else:
            left.remove(match)
            yield card, match
    for card in pending:
        match = next((a for a in left if topic(a) == topic(card)), None)
        if match is not None:
            left.remove(match)
        yield card, match
    for card in left:
        yield None, card


def _is_uuid(path: str) -> bool:
    return path == "uuid" or path.endswith(".uuid")


def compare(expected: Mapping[str, Any], status: int, actual: Any, *, uuids: bool = True) -> list[Difference]:
    """``uuids=False``: card and suggestion uuids are not compared (a running service keys them with its
    own secret; cards are then paired by topic)."""
    differences: list[Difference] = []
    want_status = int(expected.get("status", 200))
    if status != want_status:
        differences.append(Difference(None, "status", want_status, status))
    want = normalise(expected.get("response"))
    got = normalise(actual)
    if (
        isinstance(want, dict)
        and isinstance(got, dict)
        and isinstance(want.get("cards"), list)
        and isinstance(got.get("cards"), list)
    ):
        for exp_card, act_card in _pair_cards(want["cards"], got["cards"]):
            code = topic(exp_card if exp_card is not None else act_card)
            if act_card is None:
                differences.append(Difference(code, "", note=f"card missing: {card_summary(exp_card)}"))
            elif exp_card is None:
                differences.append(Difference(code, "", note=f"unexpected card: {card_summary(act_card)}"))
            else:
                differences.extend(
                    Difference(code, p, e, a, n)
                    for p, e, a, n in _walk(exp_card, act_card, "")
                    if uuids or not _is_uuid(p)
                )
        want = {k: v for k, v in want.items() if k != "cards"}
        got = {k: v for k, v in got.items() if k != "cards"}
    differences.extend(Difference(None, p or "response", e, a, n) for p, e, a, n in _walk(want, got, ""))
    return differences


def silent_violations(silent: Sequence[str], status: int, actual: Any) -> list[Difference]:
    if status != 200 or not isinstance(actual, dict):
        return []
    fired = {topic(card): card for card in actual.get("cards") or []}
    return [
        Difference(rule, "", note=f"fired, but expected.json lists it as silent: {card_summary(fired[rule])}")
        for rule in silent
        if rule in fired
    ]


def card_summary(card: Any) -> str:
    indicator = card.get("indicator", "?") if isinstance(card, dict) else "?"
    summary = card.get("summary", "") if isinstance(card, dict) else ""
    return f"[{indicator}] {clip(str(summary), _CLIP)}"


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _clip_pair(expected: str, actual: str) -> tuple[str, str]:
    """Long strings: show the window around the first difference, so the change is visible."""
    if len(expected) <= _CLIP and len(actual) <= _CLIP:
        return expected, actual
    common = 0
    for a, b in zip(expected, actual, strict=False):
        if a != b:
            break
        common += 1
    start = max(0, common - 24)

    def window(text: str) -> str:
        part = text[start : start + _CLIP]
        return ("…" if start else "") + part + ("…" if start + _CLIP < len(text) else "")

    return window(expected), window(actual)


def shown_values(difference: Difference) -> tuple[str, str]:
    exp, act = difference.expected, difference.actual
    if isinstance(exp, str) and isinstance(act, str):
        exp, act = _clip_pair(exp, act)
        return json.dumps(exp, ensure_ascii=False), json.dumps(act, ensure_ascii=False)
    return (
        clip(json.dumps(exp, ensure_ascii=False, sort_keys=True), _CLIP * 2),
        clip(json.dumps(act, ensure_ascii=False, sort_keys=True), _CLIP * 2),
    )


def describe(difference: Difference) -> list[str]:
    where = f"card {difference.card}" if difference.card else "response"
    if difference.path:
        where += f": {difference.path}"
    if difference.note and not difference.path:
        return [f"{where}: {difference.note}"]
    exp, act = shown_values(difference)
    label = f" ({difference.note})" if difference.note else ""
    return [f"{where}{label}", f"    expected: {exp}", f"    actual:   {act}"]
