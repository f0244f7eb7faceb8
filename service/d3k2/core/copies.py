"""Copies of one record (CLINICAL.md 5, "Copies"): two resources with the same type and id are versions of one
record. The newer wins when versions say which; otherwise every copy is kept, so that a copy (a bare one, a
SUBSETTED one, one with another status) can never remove a caution another copy supports. Pure: no clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any


def canonical(resource: Mapping[str, Any]) -> str:
    """Orders otherwise equal resources the same way whatever their order in the Bundle."""
    return json.dumps(resource, sort_keys=True, default=str)


def _ref_key(rtype: object, rid: str) -> tuple[str, str]:
    """The "<type>/<id>" of a resource as (text before its first "/", text after it): "Observation/a" with id
    "b" and "Observation" with id "a/b" are one record."""
    head = rtype if isinstance(rtype, str) and rtype else "Resource"
    if "/" not in head:
        return head, rid
    head, _, tail = head.partition("/")
    return head, f"{tail}/{rid}"


def _meta(resource: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = resource.get("meta")
    return meta if isinstance(meta, Mapping) else {}


def _subsetted(resource: Mapping[str, Any]) -> bool:
    """A copy the server cut down on purpose (meta.tag SUBSETTED): what it lacks says nothing."""
    tags = _meta(resource).get("tag")
    return isinstance(tags, list) and any(
        isinstance(t, Mapping) and t.get("code") == "SUBSETTED" for t in tags
    )


def _version_number(resource: Mapping[str, Any]) -> int | None:
    value = _meta(resource).get("versionId")
    # versionId is opaque in FHIR: only numbers say which copy is newer.
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    return None


def _last_updated(resource: Mapping[str, Any]) -> datetime | None:
    """meta.lastUpdated in UTC (a time without an offset taken as UTC); None when it cannot be read."""
    value = _meta(resource).get("lastUpdated")
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def _newest_copies(copies: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Of different copies of one record: the newest when every full copy has a number versionId (else
    a lastUpdated) and one is the highest; otherwise all of them, so that no copy removes a caution.
    SUBSETTED copies are always kept: they can only add to what the full copies say."""
    full = [c for c in copies if not _subsetted(c)]
    partial = [c for c in copies if _subsetted(c)]
    numbers = [_version_number(c) for c in full]
    times = [_last_updated(c) for c in full]
    if full and None not in numbers:
        top_number = max(n for n in numbers if n is not None)
        full = [c for c, n in zip(full, numbers, strict=True) if n == top_number]
    elif full and None not in times:
        top_time = max(t for t in times if t is not None)
        full = [c for c, t in zip(full, times, strict=True) if t == top_time]
    return sorted(full + partial, key=canonical)


def unique_resources(resources: Iterable[object]) -> tuple[list[Mapping[str, Any]], list[str]]:
    """The resources (JSON objects), one per type/id (the same result sent under two prefetch keys
    counts once), and the records of which different copies were kept (`_newest_copies`). Resources
    without an id come first, then each type/id in the order first seen, its copies in a fixed order."""
    unique: list[Mapping[str, Any]] = []
    first: dict[tuple[str, str], Mapping[str, Any]] = {}
    repeated: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for resource in resources:
        if type(resource) is not dict and not isinstance(resource, Mapping):
            continue
        rid = resource.get("id")
        if not isinstance(rid, str) or not rid or rid.endswith("(no id)"):
            unique.append(resource)
            continue
        rtype = resource.get("resourceType")
        key = (rtype, rid) if type(rtype) is str and rtype and "/" not in rtype else _ref_key(rtype, rid)
        seen = first.setdefault(key, resource)
        if seen is not resource:
            repeated.setdefault(key, [seen]).append(resource)
    if not repeated:
        unique.extend(first.values())
        return unique, []
    conflicts: list[str] = []
    for key, resource in first.items():
        group = repeated.get(key)
        if group is None:
            unique.append(resource)
            continue
        distinct = list({canonical(c): c for c in group}.values())
        kept = _newest_copies(distinct) if len(distinct) > 1 else distinct
        if len(kept) > 1:
            conflicts.append("/".join(key))
        unique.extend(kept)
    return unique, conflicts
