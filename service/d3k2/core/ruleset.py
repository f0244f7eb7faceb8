"""The rule set's model: conditions, rules, products, profiles, the vocabulary rules are written in, and
the loaded `RuleSet` (pure: no Flask, no requests). `d3k2.core.loader` reads and checks it from cards/.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from d3k2.core.catalog import MedicationCatalog
from d3k2.core.facts import FactsConfig
from d3k2.core.medication_reader import MedicationReader
from d3k2.core.terminology import Terminology
from d3k2.core.texts import Texts

Hook = Literal["patient-view", "order-select", "order-sign", "medication-prescribe"]
Indicator = Literal["info", "warning", "critical"]
ORDER_HOOKS: tuple[str, ...] = ("order-select", "order-sign", "medication-prescribe")


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

    # Found once per test (the rule set is loaded once), read by every evaluation.
    @cached_property
    def operator(self) -> str:
        """The one operator a validated test has (`in_` for `in`)."""
        for name in self.__pydantic_fields_set__:
            if name != "fact":
                return name
        raise ValueError("a fact test without an operator")

    @cached_property
    def operand(self) -> Any:
        """What the fact is tested against: the value of the operator's field."""
        return getattr(self, self.operator)


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
    id: str  # one of the vocabulary's band values (checked at load)
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
        # Both: a replacement, the draft deleted and the product created in one suggestion, so that
        # accepting it never leaves the old draft beside the new order.
        if self.product is None and not self.delete_draft:
            raise ValueError("a suggestion needs a product, delete_draft, or both")
        return self


class IndicatorCase(_Strict):
    """An indicator for the findings whose facts meet `when` (hypercalcemia graded: CLINICAL.md 5)."""

    when: Condition
    indicator: Indicator


class Topic(_Strict):
    code: str
    display: str


class RuleTests(_Strict):
    """Golden fixtures (`<hook>/<case>` under fixtures/) where the rule fires and where it stays silent."""

    fires: list[str] = []
    silent: list[str] = []


class Rule(_Strict):
    id: str
    title: str
    topic: Topic
    hooks: list[Hook]
    scope: Literal["patient", "draft"] = "patient"
    indicator: Indicator
    # The first case whose condition holds sets the indicator; otherwise indicator.
    indicator_when: list[IndicatorCase] = []
    priority: int = 50
    reads: list[str]
    when: Condition
    summary: str
    detail: str
    sources: list[str] = Field(min_length=1)
    suggestions: list[Suggestion] = []
    override_reasons: list[Coding] = []
    blocks: list[str] = []
    tests: RuleTests = RuleTests()


class PrefetchKey(_Strict):
    query: str
    required: bool = True
    label: str
    # A bool fact (declared in vocabulary.toml) that is true when the key cannot be had in full: what it
    # would have said is unknown, and the rules withhold what it could forbid.
    unknown: str | None = None


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


class SourcesDoc(_Strict):
    sources: dict[str, Source] = {}


class ProductsDoc(_Strict):
    products: dict[str, Product] = {}


class ConditionsDoc(_Strict):
    conditions: dict[str, Condition]


class ProfilesDoc(_Strict):
    default: str
    profiles: dict[str, Profile]


# ---------------------------------------------------------------- vocabulary

FactType = Literal["bool", "number", "enum", "band"]
Scope = Literal["patient", "draft"]


class FactSpec(_Strict):
    type: FactType
    # "draft": only in draft-scope rules (one ingredient of one draft order); "patient": in every rule.
    scope: Scope = "patient"
    values: list[str] = []

    @model_validator(mode="after")
    def _values_fit_type(self) -> FactSpec:
        if (self.type in ("enum", "band")) != bool(self.values):
            raise ValueError("enum and band facts list their values; bool and number facts have none")
        return self


class FieldsDoc(_Strict):
    patient: list[str]
    draft: list[str]


class Vocabulary(_Strict):
    """cards/vocabulary.toml: every fact a condition may test and every field a template may show."""

    facts: dict[str, FactSpec]
    fields: FieldsDoc

    def bands(self) -> frozenset[str]:
        return frozenset(v for spec in self.facts.values() if spec.type == "band" for v in spec.values)

    def field_scope(self, name: str) -> Scope | None:
        if name in self.fields.patient:
            return "patient"
        return "draft" if name in self.fields.draft else None


def template_fields(template: str) -> list[str]:
    return [name for _lit, name, _spec, _conv in string.Formatter().parse(template) if name is not None]


@dataclass(frozen=True)
class RuleSet:
    directory: Path
    terminology: Terminology
    catalog: MedicationCatalog
    facts: FactsConfig
    vocabulary: Vocabulary
    sources: Mapping[str, Source]
    profiles: Mapping[str, Profile]
    default_profile: str
    products: Mapping[str, Product]
    conditions: Mapping[str, Condition]
    services: Mapping[str, Service]
    rules: tuple[Rule, ...]
    texts: Texts
    # Made from the fields above, per instance: a rule set changed with dataclasses.replace starts afresh.
    medications: MedicationReader = field(init=False, repr=False, compare=False)
    # The rules of each hook, in rule set order: every call reads them.
    by_hook: Mapping[str, tuple[Rule, ...]] = field(init=False, repr=False, compare=False)
    # The facts of prefetch keys whose data could not be had in full (`PrefetchKey.unknown`), each once.
    unknown_facts: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "medications", MedicationReader(self.terminology, self.catalog, self.texts.dosage)
        )
        hooks = {hook for rule in self.rules for hook in rule.hooks}
        by_hook = {hook: tuple(r for r in self.rules if hook in r.hooks) for hook in hooks}
        object.__setattr__(self, "by_hook", by_hook)
        unknown = (spec.unknown for svc in self.services.values() for spec in svc.prefetch.values())
        object.__setattr__(self, "unknown_facts", tuple(dict.fromkeys(u for u in unknown if u is not None)))

    def rules_for(self, hook: str) -> tuple[Rule, ...]:
        return self.by_hook.get(hook, ())
