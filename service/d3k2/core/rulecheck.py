"""Checks of the parsed rule set against its vocabulary and against itself (pure): every fact a condition
tests, every operator and value, every template field, every reference to a band, product, source,
profile, category, named condition and fixture. Each problem names the file and the field path.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from d3k2.core.errors import RuleSetError
from d3k2.core.ruleset import (
    ORDER_HOOKS,
    AllOf,
    AnyOf,
    Condition,
    FactSpec,
    FactTest,
    NotOf,
    Product,
    Profile,
    Ref,
    Rule,
    Scope,
    Source,
    Vocabulary,
    template_fields,
)


@dataclass(frozen=True)
class Problem:
    text: str  # "<file>: <field>: <message>", one line
    file: str
    field: str | None = None


@dataclass
class Problems:
    """Every problem found while loading, raised together so that one start-up names all of them."""

    cards: Path
    found: list[Problem] = field(default_factory=list)

    def add(self, path: Path, where: str | None, message: str) -> None:
        name = path.relative_to(self.cards).as_posix()
        text = f"{name}: {where}: {message}" if where else f"{name}: {message}"
        self.found.append(Problem(text, str(path), where))

    def add_error(self, exc: RuleSetError) -> None:
        """A problem a reader of one file raised (it stops reading that file only)."""
        self.found.append(Problem(exc.detail, str(exc.extra.get("file", "")), exc.extra.get("field")))

    def raise_any(self) -> None:
        if self.found:
            self.stop()

    def stop(self) -> NoReturn:
        if len(self.found) == 1:
            (only,) = self.found
            extra = {"file": only.file} | ({"field": only.field} if only.field else {})
            raise RuleSetError(only.text, **extra)
        lines = [p.text for p in self.found]
        raise RuleSetError(
            f"{len(lines)} problems in the rule set {self.cards}:\n" + "\n".join(lines), problems=lines
        )


@dataclass(frozen=True)
class Parts:
    """The shared documents every rule is checked against."""

    vocabulary: Vocabulary
    sources: Mapping[str, Source]
    profiles: Mapping[str, Profile]
    products: Mapping[str, Product]
    conditions: Mapping[str, Condition]
    categories: frozenset[str]


# ---------------------------------------------------------------- conditions

_ORDERED = ("lt", "le", "gt", "ge")
_USE = {
    "bool": "eq or ne with true or false, or present",
    "number": "lt, le, gt, ge, eq with a number, or present",
    "enum": "eq, ne or in with its values, or present",
    "band": "eq, ne or in with its values, or present",
}


def leaves(condition: Condition, path: str) -> Iterator[tuple[str, FactTest | Ref]]:
    """Every fact test and reference of a condition, with its field path (`when.all[1].not`)."""
    if isinstance(condition, AllOf | AnyOf):
        key, children = ("all", condition.all) if isinstance(condition, AllOf) else ("any", condition.any)
        for i, child in enumerate(children):
            yield from leaves(child, f"{path}.{key}[{i}]")
    elif isinstance(condition, NotOf):
        yield from leaves(condition.not_, f"{path}.not")
    else:
        yield path, condition


def _operator_problem(test: FactTest, spec: FactSpec) -> tuple[str, str] | None:
    """(operator, message) when the test's operator or value cannot fit the fact's type."""
    (op,) = test.model_fields_set - {"fact"}
    name = op.rstrip("_")
    if op == "present":
        return None
    value = getattr(test, op)
    if spec.type in ("enum", "band") and op in ("eq", "ne", "in_"):
        wanted = value if isinstance(value, list) else [value]
        unknown = [v for v in wanted if v not in spec.values]
        if unknown:
            allowed = ", ".join(spec.values)
            return name, f"unknown value {unknown[0]!r} for {test.fact} (allowed: {allowed})"
        return None
    fits = {
        "bool": op in ("eq", "ne") and isinstance(value, bool),
        "number": op in _ORDERED or (op == "eq" and not isinstance(value, bool | str)),
    }.get(spec.type, False)
    if fits:
        return None
    return name, f"{name} = {value!r} does not fit {test.fact}, a {spec.type} (use {_USE[spec.type]})"


def check_condition(
    condition: Condition,
    where: tuple[Path, str],
    scope: Scope | None,
    parts: Parts,
    draft_conditions: frozenset[str],
    problems: Problems,
) -> None:
    """`scope` None: a named condition, which may serve either scope (its uses are checked instead)."""
    path, root = where
    facts = parts.vocabulary.facts
    for at, leaf in leaves(condition, root):
        if isinstance(leaf, Ref):
            if leaf.ref not in parts.conditions:
                known = ", ".join(sorted(parts.conditions))
                problems.add(path, f"{at}.ref", f"unknown named condition {leaf.ref!r} (known: {known})")
            elif scope == "patient" and leaf.ref in draft_conditions:
                problems.add(
                    path, f"{at}.ref", f"{leaf.ref!r} tests draft-order facts; this is a patient rule"
                )
            continue
        spec = facts.get(leaf.fact)
        if spec is None:
            problems.add(
                path, f"{at}.fact", f"unknown fact {leaf.fact!r} (known: {', '.join(sorted(facts))})"
            )
            continue
        if scope == "patient" and spec.scope == "draft":
            problems.add(
                path, f"{at}.fact", f"{leaf.fact} exists only for draft orders; this is a patient rule"
            )
        wrong = _operator_problem(leaf, spec)
        if wrong is not None:
            problems.add(path, f"{at}.{wrong[0]}", wrong[1])


# What an unknown fact counts as when deciding the scope of a named condition (it is reported anyway).
_PATIENT = FactSpec(type="bool")


def draft_conditions(conditions: Mapping[str, Condition], vocabulary: Vocabulary) -> frozenset[str]:
    """Named conditions that test a draft-order fact, directly or through another named condition."""
    found: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, condition in conditions.items():
            if name not in found and any(
                (leaf.ref in found)
                if isinstance(leaf, Ref)
                else (vocabulary.facts.get(leaf.fact, _PATIENT).scope == "draft")
                for _at, leaf in leaves(condition, "")
            ):
                found.add(name)
                changed = True
    return frozenset(found)


def check_named_conditions(path: Path, parts: Parts, problems: Problems) -> frozenset[str]:
    """Checks conditions.toml; returns the named conditions that test draft-order facts."""
    drafts = draft_conditions(parts.conditions, parts.vocabulary)
    refs = {
        name: {leaf.ref for _, leaf in leaves(c, "") if isinstance(leaf, Ref)}
        for name, c in parts.conditions.items()
    }
    for name, condition in parts.conditions.items():
        check_condition(condition, (path, f"conditions.{name}"), None, parts, drafts, problems)
        # A loop of references would recurse without end on the first call that reaches it.
        reached, todo = set(), list(refs[name])
        while todo:
            ref = todo.pop()
            if ref not in reached:
                reached.add(ref)
                todo.extend(refs.get(ref, ()))
        if name in reached:
            problems.add(path, f"conditions.{name}", "refers to itself through named conditions")
    return drafts


# ---------------------------------------------------------------- rules


def check_template(
    template: str, where: tuple[Path, str], scope: Scope, vocabulary: Vocabulary, problems: Problems
) -> None:
    path, at = where
    try:
        names = template_fields(template)
    except ValueError as exc:
        problems.add(path, at, f"not a valid template: {exc}")
        return
    for name in names:
        found = vocabulary.field_scope(name)
        if found is None:
            problems.add(path, at, f"unknown template field {{{name}}}")
        elif found == "draft" and scope == "patient":
            problems.add(
                path, at, f"template field {{{name}}} exists only for draft orders; this is a patient rule"
            )


def _check_references(rule: Rule, path: Path, parts: Parts, problems: Problems) -> None:
    for i, source in enumerate(rule.sources):
        if source not in parts.sources:
            problems.add(path, f"sources[{i}]", f"unknown source {source!r}")
    for i, category in enumerate(rule.blocks):
        if category not in parts.categories:
            problems.add(path, f"blocks[{i}]", f"unknown medication category {category!r}")
    for i, suggestion in enumerate(rule.suggestions):
        if suggestion.product is not None and suggestion.product not in parts.products:
            problems.add(path, f"suggestions[{i}].product", f"unknown product {suggestion.product!r}")
        if suggestion.delete_draft and rule.scope != "draft":
            problems.add(path, f"suggestions[{i}].delete_draft", "only a draft rule has a draft to delete")
        for profile in suggestion.profiles or []:
            if profile not in parts.profiles:
                problems.add(path, f"suggestions[{i}].profiles", f"unknown profile {profile!r}")


def _check_fixtures(rule: Rule, path: Path, fixtures: Path | None, problems: Problems) -> None:
    """`fixtures` None: the named fixtures are not looked for (a packaged service has none)."""
    for kind, names, missing in (
        ("fires", rule.tests.fires, "no fixture where it fires"),
        ("silent", rule.tests.silent, "no fixture where it stays silent"),
    ):
        if not names:
            problems.add(path, f"tests.{kind}", missing)
        if fixtures is None:
            continue
        for i, name in enumerate(names):
            hook = name.partition("/")[0]
            if not (fixtures / name / "expected.json").is_file():
                problems.add(path, f"tests.{kind}[{i}]", f"no fixture {name!r} in {fixtures}")
            elif hook not in rule.hooks:
                problems.add(
                    path,
                    f"tests.{kind}[{i}]",
                    f"fixture {name!r} is a {hook} call; the rule runs on {', '.join(rule.hooks)}",
                )


def check_rules(
    rules: Sequence[tuple[Path, Rule]],
    parts: Parts,
    drafts: frozenset[str],
    fixtures: Path | None,
    problems: Problems,
) -> None:
    topics: dict[str, str] = {}
    for path, rule in rules:
        if rule.topic.code in topics:
            problems.add(
                path, "topic.code", f"{rule.topic.code!r} already used by rule {topics[rule.topic.code]}"
            )
        topics.setdefault(rule.topic.code, rule.id)
        if rule.scope == "draft" and not set(rule.hooks) <= set(ORDER_HOOKS):
            problems.add(path, "scope", "draft rules apply to order hooks only")
        _check_references(rule, path, parts, problems)
        check_condition(rule.when, (path, "when"), rule.scope, parts, drafts, problems)
        for i, case in enumerate(rule.indicator_when):
            check_condition(
                case.when, (path, f"indicator_when[{i}].when"), rule.scope, parts, drafts, problems
            )
        for name, template in (("summary", rule.summary), ("detail", rule.detail)):
            check_template(template, (path, name), rule.scope, parts.vocabulary, problems)
        for i, suggestion in enumerate(rule.suggestions):
            check_template(
                suggestion.label, (path, f"suggestions[{i}].label"), rule.scope, parts.vocabulary, problems
            )
            if suggestion.when is not None:
                check_condition(
                    suggestion.when, (path, f"suggestions[{i}].when"), rule.scope, parts, drafts, problems
                )
        _check_fixtures(rule, path, fixtures, problems)


def check_profiles(path: Path, default: str, parts: Parts, problems: Problems) -> None:
    bands = parts.vocabulary.bands()
    for name, profile in parts.profiles.items():
        for i, source in enumerate(profile.sources):
            if source not in parts.sources:
                problems.add(path, f"profiles.{name}.sources[{i}]", f"unknown source {source!r}")
        for i, band in enumerate(profile.bands):
            if band.id not in bands:
                problems.add(
                    path,
                    f"profiles.{name}.bands[{i}].id",
                    f"unknown band {band.id!r} (known: {', '.join(sorted(bands))})",
                )
    if default not in parts.profiles:
        problems.add(path, "default", f"unknown profile {default!r}")


def check_products(path: Path, parts: Parts, problems: Problems) -> None:
    for name, product in parts.products.items():
        for i, category in enumerate(product.categories):
            if category not in parts.categories:
                problems.add(path, f"products.{name}.categories[{i}]", f"unknown category {category!r}")
