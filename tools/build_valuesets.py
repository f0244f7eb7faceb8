"""Regenerate cards/valuesets/*.json (FHIR R4 ValueSets) from tools/data/codes.json (vendored).

Run by hand when codes.json changes (`python tools/build_valuesets.py`); the service reads only the
generated files. Unverified codes are left out: codes.json says not to match them until verified.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tools" / "data" / "codes.json"
TARGET = ROOT / "cards" / "valuesets"
BASE_URL = "https://d3k2.dev/fhir/ValueSet/"


def build(concept: dict) -> dict:
    by_system: dict[str, list[dict]] = {}
    left_out = []
    for code in concept["codes"]:
        if code["verified"] != "verified":
            left_out.append(f"{code['system']}|{code['code']}")
            continue
        entry = {"code": code["code"]}
        if code.get("display"):
            entry["display"] = code["display"]
        by_system.setdefault(code["system"], []).append(entry)
    filters: dict[str, list[dict]] = {}
    for rng in concept.get("ranges", []):
        if rng["verified"] != "verified":
            continue
        for pattern in rng["pattern"].split("|"):
            prefix = pattern.strip().removesuffix(".*")
            filters.setdefault(rng["system"], []).append(
                {"property": "concept", "op": "is-a", "value": prefix}
            )
    description = concept["meaning"]
    if left_out:
        description += " Left out until verified: " + ", ".join(left_out) + "."
    name = "".join(part.capitalize() for part in concept["id"].replace("-", " ").split())
    return {
        "resourceType": "ValueSet",
        "id": concept["id"],
        "url": BASE_URL + concept["id"],
        "version": "2026-11-24",
        "name": name,
        "title": concept["id"],
        "status": "active",
        "description": description,
        "useContext": [
            {
                "code": {
                    "system": "http://terminology.hl7.org/CodeSystem/usage-context-type",
                    "code": "focus",
                },
                "valueCodeableConcept": {"text": concept.get("use", "include")},
            }
        ],
        "compose": {
            "include": [{"system": system, "concept": codes} for system, codes in sorted(by_system.items())]
            + [
                {"system": system, "filter": [flt]}
                for system, flts in sorted(filters.items())
                for flt in flts
            ]
        },
    }


def main() -> int:
    data = json.loads(SOURCE.read_text(encoding="utf-8"))
    TARGET.mkdir(parents=True, exist_ok=True)
    for concept in data["concepts"]:
        path = TARGET / f"{concept['id']}.json"
        path.write_text(json.dumps(build(concept), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(data['concepts'])} value sets to {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
