"""Bounds on what one request may make the service parse and evaluate (each gives a 4xx, never a 5xx)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# A JSON string with its escapes (unrolled loop: linear, no backtracking); brackets inside it do not nest.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_OPEN = frozenset(b"[{")
# Depth does not depend on the kind of bracket: objects are folded onto arrays for the pass count.
_ONE_KIND = bytes.maketrans(b"{}", b"[]")


def json_too_deep(raw: bytes, limit: int) -> bool:
    """Whether the JSON text nests arrays/objects deeper than ``limit``, read from the bytes before parsing.

    Malformed text may be misjudged here; the parser rejects it right after.
    Strings are dropped from a skeleton of quotes and brackets built with C-speed byte operations, not
    from the whole text: the regex alone took 110 ms on a 7 MB prefetch, longer than parsing it.
    """
    brackets = bracket_skeleton(raw)
    if _reduces_within(brackets.translate(_ONE_KIND), limit):
        return False
    return nests_deeper(brackets, limit)


def bracket_skeleton(raw: bytes) -> bytes:
    """The brackets of a JSON text outside its strings, in order."""
    if b"\\" in raw:
        # Escaped backslashes first, so that the quote after one still closes its string.
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    # A string without brackets leaves two adjacent quotes; dropping adjacent pairs keeps every bracket on
    # its side of every string boundary, and leaves only the few strings that hold brackets (UCUM units).
    skeleton = raw.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    return _STRING.sub(b"", skeleton)


def nests_deeper(brackets: bytes, limit: int) -> bool:
    """The exact count over a bracket skeleton: a closing bracket of either kind closes one level."""
    depth = 0
    for byte in brackets:
        if byte in _OPEN:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _reduces_within(brackets: bytes, passes: int) -> bool:
    """Whether dropping every innermost ``[]`` pair, ``passes`` times, leaves nothing.

    Each pass (C speed) removes exactly the empty containers, so a balanced sequence of nesting depth d
    empties in d passes: the usual answer costs a few passes over the skeleton instead of a Python loop
    over every bracket. Anything else (too deep, or malformed) is left to the exact count.
    """
    for _ in range(passes):
        if not brackets:
            return True
        reduced = brackets.replace(b"[]", b"")
        if len(reduced) == len(brackets):
            return False
        brackets = reduced
    return not brackets


def prefetch_entries(payload: Any) -> int:
    """Resources in ``prefetch``: a Bundle counts its entries, any other value counts one."""
    prefetch = payload.get("prefetch") if isinstance(payload, Mapping) else None
    if not isinstance(prefetch, Mapping):
        return 0
    total = 0
    for value in prefetch.values():
        if isinstance(value, Mapping):
            entries = value.get("entry")
            total += len(entries) if isinstance(entries, list) else 1
    return total
