"""Value sets from cards/valuesets, compiled once into code lookups (pure: no Flask, no requests)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d3k2.core.errors import RuleSetError

ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"

# Systems EHRs send under other spellings: normalised before lookup.
_SYSTEM_ALIASES = {
    "urn:oid:2.16.840.1.113883.6.88": RXNORM,
    "http://www.nlm.nih.gov/research/umls/rxnorm/": RXNORM,
    "urn:oid:2.16.840.1.113883.6.1": LOINC,
    "http://loinc.org/": LOINC,
    "urn:oid:2.16.840.1.113883.6.96": SNOMED,
    "http://snomed.info/sct/": SNOMED,
    "urn:oid:2.16.840.1.113883.6.90": ICD10CM,
    "http://hl7.org/fhir/sid/icd-10": ICD10CM,
}


def normalise_system(system: str) -> str:
    return _SYSTEM_ALIASES.get(system, system)


def spellings(system: str) -> frozenset[str]:
    """Every text `normalise_system` turns into `system`: `text in spellings(s)` is
    `normalise_system(text) == s` for any string, with one set lookup."""
    return frozenset(text for text in (system, *_SYSTEM_ALIASES) if normalise_system(text) == system)


def normalise_code(system: str, code: str) -> str:
    """ICD-10-CM is compared without its dot (codes.json: sources differ in dotting)."""
    code = code.strip()
    if system == ICD10CM:
        return code.replace(".", "").upper()
    return code


@dataclass(frozen=True)
class ValueSetInfo:
    id: str
    url: str
    title: str
    size: int


@dataclass
class Terminology:
    """(system, code) → ids of the value sets that contain it, plus ICD-10-CM is-a prefixes."""

    _codes: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)
    _prefixes: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    _displays: dict[tuple[str, str], str] = field(default_factory=dict)
    valuesets: dict[str, ValueSetInfo] = field(default_factory=dict)

    def concepts(self, system: str | None, code: str | None) -> frozenset[str]:
        if not system or not code or not isinstance(system, str) or not isinstance(code, str):
            return frozenset()
        system = normalise_system(system)
        key = (system, normalise_code(system, code))
        found = self._codes.get(key, frozenset())
        prefixes = self._prefixes.get(system)
        if prefixes:
            extra = {vs for prefix, vs in prefixes if key[1].startswith(prefix)}
            if extra:
                found = found | extra
        return found

    def concepts_of(self, codeable: Any) -> frozenset[str]:
        """All value-set ids any coding of a CodeableConcept-shaped dict belongs to."""
        if not isinstance(codeable, Mapping):
            return frozenset()
        codings = codeable.get("coding")
        if not isinstance(codings, list):
            return frozenset()
        result: set[str] = set()
        for coding in codings:
            if isinstance(coding, Mapping):
                result |= self.concepts(coding.get("system"), coding.get("code"))
        return frozenset(result)

    def codes_in(self, valueset_id: str) -> list[tuple[str, str]]:
        """(system, code) pairs of one value set, in file order (used to build prefetch queries)."""
        return sorted((k for k, v in self._codes.items() if valueset_id in v), key=lambda k: (k[0], k[1]))

    def display(self, system: str, code: str) -> str | None:
        return self._displays.get((normalise_system(system), code))


def _fail(path: Path, where: str, message: str) -> RuleSetError:
    return RuleSetError(f"{path.name}: {where}: {message}", file=str(path), field=where)


def load_terminology(directory: Path) -> Terminology:
    if not directory.is_dir():
        raise RuleSetError(f"value set directory {directory} does not exist", file=str(directory))
    codes: dict[tuple[str, str], set[str]] = {}
    prefixes: dict[str, list[tuple[str, str]]] = {}
    displays: dict[tuple[str, str], str] = {}
    infos: dict[str, ValueSetInfo] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise _fail(path, "(file)", f"not readable JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("resourceType") != "ValueSet":
            raise _fail(path, "resourceType", "must be ValueSet")
        vs_id = doc.get("id")
        if not isinstance(vs_id, str) or vs_id != path.stem:
            raise _fail(path, "id", f"must equal the file name {path.stem!r}")
        includes = (doc.get("compose") or {}).get("include")
        if not isinstance(includes, list):
            raise _fail(path, "compose.include", "must be a list")
        size = 0
        for i, include in enumerate(includes):
            system = include.get("system") if isinstance(include, dict) else None
            if not isinstance(system, str):
                raise _fail(path, f"compose.include[{i}].system", "missing")
            for j, concept in enumerate(include.get("concept", [])):
                code = concept.get("code") if isinstance(concept, dict) else None
                if not isinstance(code, str) or not code:
                    raise _fail(path, f"compose.include[{i}].concept[{j}].code", "missing")
                key = (system, normalise_code(system, code))
                codes.setdefault(key, set()).add(vs_id)
                if concept.get("display"):
                    displays.setdefault((system, code), concept["display"])
                size += 1
            for j, flt in enumerate(include.get("filter", [])):
                if not (
                    isinstance(flt, dict) and flt.get("op") == "is-a" and isinstance(flt.get("value"), str)
                ):
                    raise _fail(path, f"compose.include[{i}].filter[{j}]", "only is-a filters are supported")
                if system != ICD10CM:
                    raise _fail(
                        path, f"compose.include[{i}].filter[{j}]", "is-a is supported for ICD-10-CM only"
                    )
                prefixes.setdefault(system, []).append((normalise_code(system, flt["value"]), vs_id))
                size += 1
        infos[vs_id] = ValueSetInfo(vs_id, str(doc.get("url", "")), str(doc.get("title", vs_id)), size)
    if not infos:
        raise RuleSetError(f"no value sets in {directory}", file=str(directory))
    return Terminology(
        _codes={k: frozenset(v) for k, v in codes.items()},
        _prefixes=prefixes,
        _displays=displays,
        valuesets=infos,
    )


def any_in(concepts: Iterable[str], wanted: Iterable[str]) -> bool:
    wanted_set = set(wanted)
    return any(c in wanted_set for c in concepts)
