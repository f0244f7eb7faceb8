"""Read the rule set in cards/ once at startup and check it (pure: no Flask, no requests).

Every problem found is collected and raised together in one RuleSetError, one line per problem naming
the file and the field, so that one start-up (or `d3k2 check-rules`) shows all of them. A shared file
(value sets, medications, facts, vocabulary, sources, profiles, products, named conditions, services) that
cannot be read stops before the cross-checks, which would all fail on it; a rule file that cannot be read
is left out of them.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from d3k2.core.age import AgeConfig
from d3k2.core.catalog import load_medication_catalog
from d3k2.core.errors import RuleSetError
from d3k2.core.facts import FactsConfig
from d3k2.core.labs import AlbuminCorrection, LabConfig, Plausible
from d3k2.core.quantities import LabBand, Mark, marks_of
from d3k2.core.record import STATES, StateConfig
from d3k2.core.rulecheck import (
    Parts,
    Problems,
    check_named_conditions,
    check_products,
    check_profiles,
    check_rules,
)
from d3k2.core.ruleset import (
    ConditionsDoc,
    PrefetchKey,
    ProductsDoc,
    Profile,
    ProfilesDoc,
    Rule,
    RuleSet,
    Service,
    ServicesDoc,
    SourcesDoc,
    Vocabulary,
)
from d3k2.core.terminology import Terminology, load_terminology
from d3k2.core.texts import load_texts

_M = TypeVar("_M", bound=BaseModel)
_T = TypeVar("_T")


def _read_toml(path: Path, problems: Problems) -> dict[str, Any] | None:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        problems.add(path, None, "file missing")
    except tomllib.TOMLDecodeError as exc:
        problems.add(path, None, f"not valid TOML: {exc}")
    return None


def _document(model: type[_M], path: Path, problems: Problems) -> _M | None:
    data = _read_toml(path, problems)
    if data is None:
        return None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "(document)"
            problems.add(path, where, error["msg"])
        return None


def _guard(read: Callable[[], _T], problems: Problems) -> _T | None:
    """What `read` makes, or None with its RuleSetError kept as a problem."""
    try:
        return read()
    except RuleSetError as exc:
        problems.add_error(exc)
        return None


def _age_config(data: Mapping[str, Any]) -> AgeConfig:
    bands = tuple((str(b["id"]), int(b["from_months"])) for b in data["bands"])
    starts = [months for _, months in bands]
    if not starts or starts[0] != 0 or starts != sorted(set(starts)):
        raise ValueError("age.bands must start at 0 months and ascend")
    return AgeConfig(bands=bands, max_years=int(data["max_years"]))


def _state_config(data: Mapping[str, Any]) -> StateConfig:
    return StateConfig(
        observation=tuple(data["observation"]),
        yes_answers=tuple(data["yes_answers"]),
        no_answers=tuple(data["no_answers"]),
        conditions=tuple(data["conditions"]),
        max_age_days=int(data["max_age_days"]),
    )


def _marks(lab: LabConfig, more: tuple[Mark, ...] = ()) -> dict[str, tuple[Mark, ...]]:
    """unit → the thresholds rules hold a value reported in it against, in the canonical unit: the lab's
    bands and grades, its default limits (as stated in that unit, converted as a result is), `more`."""
    marks = (*marks_of(lab.bands), *marks_of(lab.grades), *more)
    by_unit: dict[str, tuple[Mark, ...]] = {}
    for unit, factor in lab.units.items():
        limits = dict(lab.kind_limits)
        for stated_unit, stated in lab.limits_in.items():
            if lab.units.get(stated_unit) == factor:
                limits.update({kind: value * factor for kind, value in stated.items()})
        by_unit[unit] = tuple(sorted({*marks, *((limit, False) for limit in limits.values())}))
    return by_unit


def with_profile_marks(facts: FactsConfig, lab: str, profiles: Iterable[Profile]) -> FactsConfig:
    """The 25(OH)D thresholds of every profile among the marks of its lab."""
    if lab not in facts.labs:
        return facts
    more = tuple(mark for profile in profiles for mark in marks_of(profile.bands))
    labs = {**facts.labs, lab: replace(facts.labs[lab], marks=_marks(facts.labs[lab], more))}
    return replace(facts, labs=labs)


def cautious_direction(value: object) -> str:
    if value not in ("highest", "lowest"):
        raise ValueError(f"labs.*.cautious must be 'highest' or 'lowest', not {value!r}")
    return str(value)


def _facts_config(data: Mapping[str, Any], path: Path) -> FactsConfig:
    try:
        labs = {
            name: LabConfig(
                name=name,
                label=str(lab["label"]),
                canonical_unit=str(lab["canonical_unit"]),
                units={str(k): float(v) for k, v in lab["units"].items()},
                stale_days=int(lab["stale_days"]),
                primary=tuple(lab.get("primary", ())),
                fallback=tuple(lab.get("fallback", ())),
                total=tuple(lab.get("total", ())),
                d3_fraction=tuple(lab.get("d3_fraction", ())),
                d2_fraction=tuple(lab.get("d2_fraction", ())),
                exclude=tuple(lab.get("exclude", ())),
                race_coefficients={str(k): float(v) for k, v in lab.get("race_coefficients", {}).items()},
                race_coefficients_source=str(lab.get("race_coefficients_source", "")),
                default_unit_by_code=dict(lab.get("default_unit_by_code", {})),
                kinds={str(k): str(v) for k, v in lab.get("kinds", {}).items()},
                kind_limits={str(k): float(v) for k, v in lab.get("kind_limits", {}).items()},
                limits_in={
                    str(unit): {str(k): float(v) for k, v in limits.items()}
                    for unit, limits in lab.get("limits_in", {}).items()
                },
                grades=tuple(LabBand(**band) for band in lab.get("grades", ())),
                graded_kinds=tuple(lab.get("graded_kinds", ())),
                correction=AlbuminCorrection(**lab["correction"]) if "correction" in lab else None,
                plausible=Plausible(**lab["plausible"]),
                bands=tuple(LabBand(**band) for band in lab.get("bands", ())),
                same_specimen_lowest=bool(lab.get("same_specimen_lowest", False)),
                cautious=cautious_direction(lab.get("cautious", "highest")),
                source=str(lab.get("source", "")),
                decimals=int(lab.get("decimals", 2)),
            )
            for name, lab in data["labs"].items()
        }
        labs = {name: replace(lab, marks=_marks(lab)) for name, lab in labs.items()}
        conditions = data["conditions"]
        config = FactsConfig(
            accepted_status=tuple(data["observation"]["accepted_status"]),
            fallback_status=tuple(data["observation"]["fallback_status"]),
            labs=labs,
            active_clinical_status=tuple(conditions["active_clinical_status"]),
            ignored_verification_status=tuple(conditions["ignored_verification_status"]),
            condition_facts={
                k: tuple(v)
                for k, v in conditions.items()
                if k not in ("active_clinical_status", "ignored_verification_status")
            },
            statement_current=tuple(data["medications"]["statement_current"]),
            request_current=tuple(data["medications"]["request_current"]),
            statement_unknown=tuple(data["medications"]["statement_unknown"]),
            request_unknown=tuple(data["medications"]["request_unknown"]),
            notes={},  # texts.toml [notes], set by load_ruleset
            age=_age_config(data["age"]),
            future_days=int(data["observation"]["future_days"]),
            states={state: _state_config(data[state]) for state in STATES},
            evidence={str(k): tuple(str(c) for c in v) for k, v in data["evidence"].items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RuleSetError(f"{path.name}: {exc!s} is missing or malformed", file=str(path)) from exc
    for name, concepts in config.evidence.items():
        where = f"evidence.{name}"
        if name in STATES or not concepts:
            problem = "must list condition facts; {evidence.pregnancy} and {evidence.lactation} are reserved"
            raise RuleSetError(f"{path.name}: {where}: {problem}", file=str(path), field=where)
        for concept in concepts:
            if concept not in config.condition_facts:
                problem = f"unknown condition fact {concept!r}"
                raise RuleSetError(f"{path.name}: {where}: {problem}", file=str(path), field=where)
    return config


def _facts(path: Path, problems: Problems) -> FactsConfig | None:
    data = _read_toml(path, problems)
    return None if data is None else _guard(lambda: _facts_config(data, path), problems)


_CODES_TOKEN = re.compile(r"\{\{codes:([a-z0-9,\-]+)\}\}")


def _expand_codes(query: str, terminology: Terminology, where: tuple[Path, str], problems: Problems) -> str:
    def replace(match: re.Match[str]) -> str:
        pairs: list[str] = []
        for vs in match.group(1).split(","):
            if vs not in terminology.valuesets:
                problems.add(*where, f"unknown value set {vs!r}")
            pairs.extend(f"{system}|{code}" for system, code in terminology.codes_in(vs))
        return ",".join(dict.fromkeys(pairs))

    return _CODES_TOKEN.sub(replace, query)


def _services(
    doc: ServicesDoc, terminology: Terminology, path: Path, problems: Problems
) -> dict[str, Service]:
    expanded = {
        key: PrefetchKey(
            query=_expand_codes(p.query, terminology, (path, f"prefetch.{key}.query"), problems),
            required=p.required,
            label=p.label,
            unknown=p.unknown,
        )
        for key, p in doc.prefetch.items()
    }
    services: dict[str, Service] = {}
    for sid, svc in doc.services.items():
        for key in svc.keys:
            if key not in expanded:
                problems.add(path, f"services.{sid}.keys", f"unknown prefetch key {key!r}")
        prefetch = {k: expanded[k] for k in svc.keys if k in expanded}
        services[sid] = Service(sid, svc.hook, svc.title, svc.description, prefetch)
    return services


def _rules(cards: Path, problems: Problems) -> list[tuple[Path, Rule]]:
    rules: list[tuple[Path, Rule]] = []
    files = sorted((cards / "rules").glob("*.toml"))
    if not files:
        problems.add(cards / "rules", None, f"no rules in {cards / 'rules'}")
    for path in files:
        rule = _document(Rule, path, problems)
        if rule is None:
            continue
        if rule.id != path.stem:
            problems.add(path, "id", f"must equal the file name {path.stem!r}")
            continue
        rules.append((path, rule))
    return rules


def _check_evidence_fields(
    cards: Path, facts: FactsConfig, vocabulary: Vocabulary, problems: Problems
) -> None:
    """Each {evidence.<group>} field is one group of facts.toml [evidence] (pregnancy and lactation apart)."""
    declared = {f.removeprefix("evidence.") for f in vocabulary.fields.patient if f.startswith("evidence.")}
    declared.difference_update(STATES)
    for group in sorted(declared - set(facts.evidence)):
        problems.add(
            cards / "vocabulary.toml",
            "fields.patient",
            f"evidence.{group}: no such group in facts.toml [evidence]",
        )
    for group in sorted(set(facts.evidence) - declared):
        problems.add(cards / "facts.toml", f"evidence.{group}", "not declared as a field in vocabulary.toml")


def load_ruleset(cards: Path, fixtures: Path | None = None) -> RuleSet:
    """Read and check every file of the rule set; any problem stops startup, all of them named.

    `fixtures` (the repository's fixtures/, for `d3k2 check-rules` and the tests): also check that the
    golden fixtures each rule names exist there. The packaged service has no fixtures.
    """
    if not cards.is_dir():
        raise RuleSetError(f"rule set directory {cards} does not exist", file=str(cards))
    problems = Problems(cards)
    terminology = _guard(lambda: load_terminology(cards / "valuesets"), problems)
    catalog = _guard(lambda: load_medication_catalog(cards / "medications.toml"), problems)
    facts = _facts(cards / "facts.toml", problems)
    vocabulary = _document(Vocabulary, cards / "vocabulary.toml", problems)
    sources = _document(SourcesDoc, cards / "sources.toml", problems)
    profiles = _document(ProfilesDoc, cards / "profiles.toml", problems)
    products = _document(ProductsDoc, cards / "products.toml", problems)
    conditions = _document(ConditionsDoc, cards / "conditions.toml", problems)
    services_doc = _document(ServicesDoc, cards / "services.toml", problems)
    rules = _rules(cards, problems)
    texts = _guard(lambda: load_texts(cards / "texts.toml"), problems)
    if (
        texts is None
        or terminology is None
        or catalog is None
        or facts is None
        or vocabulary is None
        or sources is None
        or profiles is None
        or products is None
        or conditions is None
        or services_doc is None
    ):
        problems.stop()
    parts = Parts(
        vocabulary=vocabulary,
        sources=sources.sources,
        profiles=profiles.profiles,
        products=products.products,
        conditions=conditions.conditions,
        categories=frozenset(catalog.categories()),
    )
    services = _services(services_doc, terminology, cards / "services.toml", problems)
    facts = replace(facts, notes=texts.notes)
    for key in sorted(set(services_doc.prefetch) ^ set(texts.skipped)):
        problem = (
            "missing" if key in services_doc.prefetch else "unknown key: not a prefetch key of services.toml"
        )
        problems.add(cards / "texts.toml", f"skipped.{key}", problem)
    _check_evidence_fields(cards, facts, vocabulary, problems)
    for key, spec in services_doc.prefetch.items():
        declared = vocabulary.facts.get(spec.unknown) if spec.unknown is not None else None
        if spec.unknown is not None and (declared is None or declared.type != "bool"):
            where = f"prefetch.{key}.unknown"
            problems.add(
                cards / "services.toml", where, f"{spec.unknown!r} is not a bool fact in vocabulary.toml"
            )
    for name, category in catalog.by_category.items():
        if category.fact is not None and vocabulary.facts.get(category.fact, None) is None:
            where = f"categories.{name}.fact"
            problems.add(
                cards / "medications.toml", where, f"{category.fact!r} is not declared in vocabulary.toml"
            )
    check_profiles(cards / "profiles.toml", profiles.default, parts, problems)
    check_products(cards / "products.toml", parts, problems)
    drafts = check_named_conditions(cards / "conditions.toml", parts, problems)
    check_rules(rules, parts, drafts, fixtures, problems)
    problems.raise_any()
    return RuleSet(
        directory=cards,
        terminology=terminology,
        catalog=catalog,
        # The profiles' 25(OH)D bands are thresholds too: a converted 25(OH)D is never shown across one.
        facts=with_profile_marks(facts, "vitd", parts.profiles.values()),
        vocabulary=vocabulary,
        sources=parts.sources,
        profiles=parts.profiles,
        default_profile=profiles.default,
        products=parts.products,
        conditions=parts.conditions,
        services=services,
        rules=tuple(sorted((rule for _, rule in rules), key=lambda r: (r.priority, r.id))),
        texts=texts,
    )
