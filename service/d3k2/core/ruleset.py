"""Load and validate the rule set in cards/ once at startup (pure: no Flask, no requests).

A broken file stops startup with a RuleSetError naming the file and the field.
"""

from __future__ import annotations

import re
import string
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from d3k2.core.age import AgeConfig
from d3k2.core.errors import RuleSetError
from d3k2.core.facts import AlbuminCorrection, FactsConfig, LabConfig, Plausible
from d3k2.core.orders import MedicationCatalog, MedicationReader, load_medication_catalog
from d3k2.core.quantities import LabBand
from d3k2.core.terminology import Terminology, load_terminology

Hook = Literal["patient-view", "order-select", "order-sign", "medication-prescribe"]
Indicator = Literal["info", "warning", "critical"]
ORDER_HOOKS: tuple[str, ...] = ("order-select", "order-sign", "medication-prescribe")
_M = TypeVar("_M", bound=BaseModel)
_T = TypeVar("_T")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- conditions


class FactTest(_Strict):
    fact: str
    eq: str | bool | float | None = None
    ne: str | bool | float | None = None
    in_: list[str] | None = Field(default=None, alias="in")
    lt: float | None = None
    le: float | None = None
    gt: float | None = None
    ge: float | None = None
    present: bool | None = None

    @model_validator(mode="after")
    def _one_operator(self) -> FactTest:
        ops = [
            n for n in ("eq", "ne", "in_", "lt", "le", "gt", "ge", "present") if n in self.model_fields_set
        ]
        if len(ops) != 1:
            raise ValueError(
                f"a fact test needs exactly one operator (eq, ne, in, lt, le, gt, ge, present), got {ops}"
            )
        return self


class AllOf(_Strict):
    all: list[Condition]


class AnyOf(_Strict):
    any: list[Condition]


class NotOf(_Strict):
    not_: Condition = Field(alias="not")


class Ref(_Strict):
    ref: str


def _condition_kind(value: Any) -> str | None:
    """Which condition a TOML table is, from its keys, so that errors name the right field."""
    if isinstance(value, BaseModel):
        return type(value).__name__
    if isinstance(value, dict):
        for key, kind in (
            ("fact", "FactTest"),
            ("all", "AllOf"),
            ("any", "AnyOf"),
            ("not", "NotOf"),
            ("ref", "Ref"),
        ):
            if key in value:
                return kind
    return None


Condition = Annotated[
    Annotated[FactTest, Tag("FactTest")]
    | Annotated[AllOf, Tag("AllOf")]
    | Annotated[AnyOf, Tag("AnyOf")]
    | Annotated[NotOf, Tag("NotOf")]
    | Annotated[Ref, Tag("Ref")],
    Discriminator(
        _condition_kind,
        custom_error_type="condition",
        custom_error_message="a condition needs one of: fact, all, any, not, ref",
    ),
]
for _model in (AllOf, AnyOf, NotOf):
    _model.model_rebuild()


# ---------------------------------------------------------------- rule set documents


class Source(_Strict):
    label: str
    url: str
    citation: str


class Band(_Strict):
    id: Literal["deficient", "insufficient", "target", "high", "very-high", "toxicity"]
    label: str
    lower: float
    upper: float
    lower_open: bool = False
    upper_open: bool = False


class Profile(_Strict):
    title: str
    sources: list[str]
    bands: list[Band]


class Coding(_Strict):
    system: str
    code: str
    display: str


class Dosage(_Strict):
    dose_value: float
    dose_unit: str
    frequency: int = 1
    period: float = 1
    period_unit: Literal["d", "wk"] = "d"
    duration_weeks: int | None = None


class Product(_Strict):
    kind: Literal["medication", "test"]
    code: Coding
    text: str
    categories: list[str] = []
    dose_text: str = ""
    dosage: Dosage | None = None
    patient_instruction: str | None = None
    occurrence_weeks: int | None = None
    note: str | None = None


class Suggestion(_Strict):
    label: str
    product: str | None = None
    delete_draft: bool = False
    profiles: list[str] | None = None
    recommended: bool = False
    when: Condition | None = None

    @model_validator(mode="after")
    def _one_action(self) -> Suggestion:
        if (self.product is None) == (not self.delete_draft):
            raise ValueError("a suggestion needs exactly one of product or delete_draft")
        return self


class Topic(_Strict):
    code: str
    display: str


class Rule(_Strict):
    id: str
    title: str
    topic: Topic
    hooks: list[Hook]
    scope: Literal["patient", "draft"] = "patient"
    indicator: Indicator
    indicator_by_hook: dict[Hook, Indicator] = {}
    priority: int = 50
    reads: list[str]
    when: Condition
    summary: str
    detail: str
    sources: list[str] = Field(min_length=1)
    suggestions: list[Suggestion] = []
    override_reasons: list[Coding] = []
    blocks: list[str] = []

    def indicator_for(self, hook: str) -> Indicator:
        for name, indicator in self.indicator_by_hook.items():
            if name == hook:
                return indicator
        return self.indicator


class PrefetchKey(_Strict):
    query: str
    required: bool = True
    label: str


class ServiceDoc(_Strict):
    hook: Hook
    title: str
    description: str
    keys: list[str]


class ServicesDoc(_Strict):
    prefetch: dict[str, PrefetchKey]
    services: dict[str, ServiceDoc]


@dataclass(frozen=True)
class Service:
    id: str
    hook: str
    title: str
    description: str
    prefetch: Mapping[str, PrefetchKey]  # queries with {{codes:...}} already expanded


_CODES_TOKEN = re.compile(r"\{\{codes:([a-z0-9,\-]+)\}\}")


def _expand_codes(query: str, terminology: Terminology, path: Path, key: str) -> str:
    def replace(match: re.Match[str]) -> str:
        pairs: list[str] = []
        for vs in match.group(1).split(","):
            if vs not in terminology.valuesets:
                raise RuleSetError(
                    f"{path.name}: prefetch.{key}.query: unknown value set {vs!r}", file=str(path)
                )
            pairs.extend(f"{system}|{code}" for system, code in terminology.codes_in(vs))
        return ",".join(dict.fromkeys(pairs))

    return _CODES_TOKEN.sub(replace, query)


def _services(doc: ServicesDoc, terminology: Terminology, path: Path) -> dict[str, Service]:
    expanded = {
        key: PrefetchKey(
            query=_expand_codes(p.query, terminology, path, key), required=p.required, label=p.label
        )
        for key, p in doc.prefetch.items()
    }
    services: dict[str, Service] = {}
    for sid, svc in doc.services.items():
        for key in svc.keys:
            if key not in expanded:
                raise RuleSetError(
                    f"{path.name}: services.{sid}.keys: unknown prefetch key {key!r}", file=str(path)
                )
        services[sid] = Service(sid, svc.hook, svc.title, svc.description, {k: expanded[k] for k in svc.keys})
    return services


class ConditionsDoc(_Strict):
    conditions: dict[str, Condition]


class ProfilesDoc(_Strict):
    default: str
    profiles: dict[str, Profile]


# ---------------------------------------------------------------- template fields

# Every field a summary or detail may use; checked at load so a typo stops startup.
TEMPLATE_FIELDS: frozenset[str] = frozenset(
    {
        "profile.name",
        "profile.title",
        "vitd.shown",
        "vitd.date",
        "vitd.band",
        "vitd.age",
        "vitd.notes",
        "vitd.status",
        "egfr.shown",
        "egfr.date",
        "egfr.stale",
        "egfr.notes",
        "calcium.shown",
        "calcium.date",
        "calcium.limit",
        "calcium.notes",
        "calcium.grade",
        "vka.names",
        "vka.sources",
        "k2.names",
        "doac.names",
        "evidence.ckd",
        "evidence.granulomatous",
        "evidence.pregnancy",
        "evidence.hypercalcemia",
        "data.issues",
        "draft.name",
        "draft.arithmetic",
        "draft.daily",
        "draft.basis",
    }
)


def template_fields(template: str) -> list[str]:
    return [name for _lit, name, _spec, _conv in string.Formatter().parse(template) if name is not None]


@dataclass(frozen=True)
class RuleSet:
    directory: Path
    terminology: Terminology
    catalog: MedicationCatalog
    facts: FactsConfig
    sources: Mapping[str, Source]
    profiles: Mapping[str, Profile]
    default_profile: str
    products: Mapping[str, Product]
    conditions: Mapping[str, Condition]
    services: Mapping[str, Service]
    rules: tuple[Rule, ...]
    # Made from the fields above, per instance: a rule set changed with dataclasses.replace starts afresh.
    medications: MedicationReader = field(init=False, repr=False, compare=False)
    _derived: dict[object, object] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "medications", MedicationReader(self.terminology, self.catalog))

    def rules_for(self, hook: str) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if hook in r.hooks)

    def derived(self, build: Callable[[RuleSet], _T]) -> _T:
        """What `build` makes of this rule set (compiled conditions, fixed parts of cards), made once.

        `build` must depend on nothing but the rule set; it is the key, so pass a module-level function.
        Two threads may both build it the first time; either result is kept, and both are equal.
        """
        try:
            return cast(_T, self._derived[build])
        except KeyError:
            made = build(self)
            self._derived[build] = made
            return made


# ---------------------------------------------------------------- loading


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise RuleSetError(f"{path.name}: file missing", file=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise RuleSetError(f"{path.name}: not valid TOML: {exc}", file=str(path)) from exc


def _validate(model: type[_M], data: Any, path: Path) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(document)"
        raise RuleSetError(f"{path.name}: {where}: {first['msg']}", file=str(path), field=where) from exc


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
                never=tuple(lab.get("never", ())),
                default_unit_by_code=dict(lab.get("default_unit_by_code", {})),
                kinds={str(k): str(v) for k, v in lab.get("kinds", {}).items()},
                kind_limits={str(k): float(v) for k, v in lab.get("kind_limits", {}).items()},
                grades=tuple(LabBand(**band) for band in lab.get("grades", ())),
                graded_kinds=tuple(lab.get("graded_kinds", ())),
                correction=AlbuminCorrection(**lab["correction"]) if "correction" in lab else None,
                plausible=Plausible(**lab["plausible"]),
                source=str(lab.get("source", "")),
                decimals=int(lab.get("decimals", 2)),
                bands=tuple(LabBand(**band) for band in lab.get("bands", ())),
                same_specimen_lowest=bool(lab.get("same_specimen_lowest", False)),
            )
            for name, lab in data["labs"].items()
        }
        conditions = data["conditions"]
        return FactsConfig(
            accepted_status=tuple(data["observation"]["accepted_status"]),
            fallback_status=tuple(data["observation"]["fallback_status"]),
            labs=labs,
            pregnancy_observation=tuple(data["pregnancy"]["observation"]),
            pregnant_answers=tuple(data["pregnancy"]["pregnant_answers"]),
            pregnancy_conditions=tuple(data["pregnancy"]["conditions"]),
            active_clinical_status=tuple(conditions["active_clinical_status"]),
            ignored_verification_status=tuple(conditions["ignored_verification_status"]),
            condition_facts={
                k: tuple(v)
                for k, v in conditions.items()
                if k not in ("active_clinical_status", "ignored_verification_status")
            },
            statement_current=tuple(data["medications"]["statement_current"]),
            request_current=tuple(data["medications"]["request_current"]),
            notes={
                key: str(data["notes"][key])
                for key in ("preliminary", "d3_only", "d3_plus_d2", "legacy_equation", "same_specimen_lowest")
            },
            age=_age_config(data["age"]),
            future_days=int(data["observation"]["future_days"]),
            pregnancy_days=int(data["pregnancy"]["max_age_days"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RuleSetError(f"{path.name}: {exc!s} is missing or malformed", file=str(path)) from exc


def _age_config(data: Mapping[str, Any]) -> AgeConfig:
    bands = tuple((str(b["id"]), int(b["from_months"])) for b in data["bands"])
    starts = [months for _, months in bands]
    if not starts or starts[0] != 0 or starts != sorted(set(starts)):
        raise ValueError("age.bands must start at 0 months and ascend")
    return AgeConfig(bands=bands, max_years=int(data["max_years"]))


def _check_refs(rules: list[Rule], ruleset_parts: dict[str, Any], cards: Path) -> None:
    sources, products, conditions, profiles, valuesets = (
        ruleset_parts["sources"],
        ruleset_parts["products"],
        ruleset_parts["conditions"],
        ruleset_parts["profiles"],
        ruleset_parts["valuesets"],
    )
    seen: dict[str, str] = {}
    for rule in rules:
        path = cards / "rules" / f"{rule.id}.toml"
        if rule.topic.code in seen:
            raise RuleSetError(
                f"{path.name}: topic.code {rule.topic.code!r} already used by rule {seen[rule.topic.code]}",
                file=str(path),
                field="topic.code",
            )
        seen[rule.topic.code] = rule.id
        for i, source in enumerate(rule.sources):
            if source not in sources:
                raise RuleSetError(f"{path.name}: sources[{i}]: unknown source {source!r}", file=str(path))
        for i, suggestion in enumerate(rule.suggestions):
            if suggestion.when is not None:
                _check_condition(suggestion.when, conditions, path)
            if suggestion.product is not None and suggestion.product not in products:
                raise RuleSetError(
                    f"{path.name}: suggestions[{i}].product: unknown product {suggestion.product!r}",
                    file=str(path),
                )
            for profile in suggestion.profiles or []:
                if profile not in profiles:
                    raise RuleSetError(
                        f"{path.name}: suggestions[{i}].profiles: unknown profile {profile!r}", file=str(path)
                    )
        for name, template in (("summary", rule.summary), ("detail", rule.detail)):
            for fld in template_fields(template):
                if fld not in TEMPLATE_FIELDS:
                    raise RuleSetError(
                        f"{path.name}: {name}: unknown template field {{{fld}}}", file=str(path)
                    )
        _check_condition(rule.when, conditions, path)
        if rule.scope == "draft" and not set(rule.hooks) <= set(ORDER_HOOKS):
            raise RuleSetError(f"{path.name}: scope: draft rules apply to order hooks only", file=str(path))
    for name, product in products.items():
        for category in product.categories:
            if category not in valuesets:
                raise RuleSetError(f"products.toml: {name}.categories: unknown category {category!r}")


def _check_condition(condition: Condition, named: Mapping[str, Condition], path: Path) -> None:
    if isinstance(condition, Ref):
        if condition.ref not in named:
            raise RuleSetError(
                f"{path.name}: when: unknown named condition {condition.ref!r}", file=str(path)
            )
    elif isinstance(condition, AllOf):
        for c in condition.all:
            _check_condition(c, named, path)
    elif isinstance(condition, AnyOf):
        for c in condition.any:
            _check_condition(c, named, path)
    elif isinstance(condition, NotOf):
        _check_condition(condition.not_, named, path)


def load_ruleset(cards: Path) -> RuleSet:
    """Read every file of the rule set; the first problem found stops startup."""
    if not cards.is_dir():
        raise RuleSetError(f"rule set directory {cards} does not exist", file=str(cards))
    terminology = load_terminology(cards / "valuesets")
    catalog = load_medication_catalog(cards / "medications.toml")
    facts = _facts_config(_read_toml(cards / "facts.toml"), cards / "facts.toml")
    sources_path = cards / "sources.toml"
    sources = {
        k: _validate(Source, v, sources_path) for k, v in _read_toml(sources_path).get("sources", {}).items()
    }
    profiles_path = cards / "profiles.toml"
    profiles_doc = _validate(ProfilesDoc, _read_toml(profiles_path), profiles_path)
    for name, profile in profiles_doc.profiles.items():
        for source in profile.sources:
            if source not in sources:
                raise RuleSetError(f"profiles.toml: profiles.{name}.sources: unknown source {source!r}")
    if profiles_doc.default not in profiles_doc.profiles:
        raise RuleSetError(f"profiles.toml: default: unknown profile {profiles_doc.default!r}")
    products_path = cards / "products.toml"
    products = {
        k: _validate(Product, v, products_path)
        for k, v in _read_toml(products_path).get("products", {}).items()
    }
    conditions_path = cards / "conditions.toml"
    conditions = _validate(ConditionsDoc, _read_toml(conditions_path), conditions_path).conditions
    services_path = cards / "services.toml"
    services = _services(
        _validate(ServicesDoc, _read_toml(services_path), services_path), terminology, services_path
    )
    rules: list[Rule] = []
    for path in sorted((cards / "rules").glob("*.toml")):
        rule = _validate(Rule, _read_toml(path), path)
        if rule.id != path.stem:
            raise RuleSetError(
                f"{path.name}: id: must equal the file name {path.stem!r}", file=str(path), field="id"
            )
        rules.append(rule)
    if not rules:
        raise RuleSetError(f"no rules in {cards / 'rules'}")
    parts = {
        "sources": sources,
        "products": products,
        "conditions": conditions,
        "profiles": profiles_doc.profiles,
        "valuesets": set(catalog.categories()),
    }
    _check_refs(rules, parts, cards)
    return RuleSet(
        directory=cards,
        terminology=terminology,
        catalog=catalog,
        facts=facts,
        sources=sources,
        profiles=profiles_doc.profiles,
        default_profile=profiles_doc.default,
        products=products,
        conditions=conditions,
        services=services,
        rules=tuple(sorted(rules, key=lambda r: (r.priority, r.id))),
    )
