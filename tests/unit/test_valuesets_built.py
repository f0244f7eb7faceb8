"""cards/valuesets/*.json are what tools/build_valuesets.py makes of the vendored code list."""

from __future__ import annotations

import importlib.util
import json

from builders import CARDS, REPO


def test_every_value_set_is_built_from_the_vendored_code_list() -> None:
    spec = importlib.util.spec_from_file_location("build_valuesets", REPO / "tools" / "build_valuesets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    concepts = json.loads((REPO / "tools" / "data" / "codes.json").read_text(encoding="utf-8"))["concepts"]
    built = {concept["id"]: module.build(concept) for concept in concepts}
    shipped = {
        path.stem: json.loads(path.read_text(encoding="utf-8"))
        for path in (CARDS / "valuesets").glob("*.json")
    }
    assert shipped == built
