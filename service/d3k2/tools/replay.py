"""`d3k2 replay`: run recorded CDS Hooks requests (fixtures, loose request files, plain FHIR Bundles)
through the service, in-process or over HTTP, and compare the cards with golden files.

A fixture is ``<dir>/request.json`` (never rewritten) plus ``<dir>/expected.json``::

    {"service": "d3k2-patient-view", "today": "2026-11-24", "profile": "seed",
     "description": "...", "silent": ["vitd-deficient"], "status": 200,
     "response": {"cards": [...], "systemActions": []}}

A loose file ``<name>.json`` (a request or a Bundle) has its golden, when there is one, in
``<name>.expected.json`` (``foo.request.json`` → ``foo.expected.json``).
"""

from __future__ import annotations

import json
import os
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import requests

from d3k2.core.errors import D3K2Error
from d3k2.core.ruleset import RuleSet
from d3k2.fhir.prefetch import Fetcher
from d3k2.http.api import TODAY_HEADER
from d3k2.service import call_service
from d3k2.whatif import request_from_bundle

if TYPE_CHECKING:
    from d3k2.http.signing import TokenSigner

_INDICATORS = {"critical": 0, "warning": 1, "info": 2}
_CLIP = 72
_EXPECTED_KEYS = ("service", "today", "profile", "patient", "description", "silent", "status", "response")


class ReplayError(Exception):
    """A file that cannot be replayed; the message is one line naming what is wrong."""


# ---------------------------------------------------------------- targets


class Target(Protocol):
    def services(self) -> Mapping[str, tuple[str, list[str]]]:
        """service id → (hook, prefetch keys)."""

    def call(self, service: str, payload: Any, *, today: date, profile: str) -> tuple[int, Any]: ...


@dataclass
class InProcess:
    ruleset: RuleSet
    fetcher: Fetcher | None

    def services(self) -> Mapping[str, tuple[str, list[str]]]:
        return {sid: (s.hook, list(s.prefetch)) for sid, s in self.ruleset.services.items()}

    def call(self, service: str, payload: Any, *, today: date, profile: str) -> tuple[int, Any]:
        if profile not in self.ruleset.profiles:
            raise ReplayError(
                f"unknown profile {profile!r} (known: {', '.join(sorted(self.ruleset.profiles))})"
            )
        try:
            outcome = call_service(
                self.ruleset, service, payload, today=today, profile=profile, fetcher=self.fetcher
            )
        except D3K2Error as exc:
            return exc.status, exc.body()
        return 200, outcome.response


@dataclass
class Remote:
    """A running d3k2 (D3K2_ENV dev or test: production ignores the today header)."""

    url: str
    session: requests.Session
    timeout: float = 30.0
    signer: TokenSigner | None = None  # a bearer token on every call, for a server that checks them
    _services: dict[str, tuple[str, list[str]]] | None = None

    def _auth(self, url: str) -> dict[str, str]:
        return {"Authorization": self.signer.authorization(url)} if self.signer else {}

    def services(self) -> Mapping[str, tuple[str, list[str]]]:
        if self._services is None:
            url = f"{self.url}/cds-services"
            try:
                answer = self.session.get(url, headers=self._auth(url), timeout=self.timeout)
                answer.raise_for_status()
                listed = answer.json()["services"]
                self._services = {s["id"]: (s["hook"], list(s.get("prefetch") or {})) for s in listed}
            except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
                raise ReplayError(
                    f"cannot read discovery from {self.url}/cds-services: {_short(exc)}"
                ) from exc
        return self._services

    def call(self, service: str, payload: Any, *, today: date, profile: str) -> tuple[int, Any]:
        url = f"{self.url}/cds-services/{service}"
        try:
            answer = self.session.post(
                url,
                json=payload,
                headers={TODAY_HEADER: today.isoformat(), **self._auth(url)},
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise ReplayError(f"POST {self.url}/cds-services/{service} failed: {_short(exc)}") from exc
        try:
            return answer.status_code, answer.json()
        except ValueError as exc:
            raise ReplayError(f"{service} answered HTTP {answer.status_code} without JSON") from exc


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return _clip(text, 160)


# ---------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    source: Path  # request.json, a loose request or a Bundle
    golden: Path
    fixture: bool  # <dir>/request.json: a golden is required
    bundle: bool = False  # a plain FHIR Bundle: the request is built from it
    payload: Any = None
    service: str = ""
    today: date | None = None
    profile: str = ""
    expected: dict[str, Any] | None = None


@dataclass(frozen=True)
class Difference:
    card: str | None  # topic code, None for the response itself
    path: str
    expected: Any = None
    actual: Any = None
    note: str = ""


@dataclass
class Result:
    name: str
    status: str  # passed | failed | skipped | error
    service: str = ""
    today: str = ""
    profile: str = ""
    differences: list[Difference] = field(default_factory=list)
    message: str = ""
    cards: list[dict[str, Any]] = field(default_factory=list)
    updated: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class Options:
    today: date | None = None
    profile: str | None = None
    hook: str | None = None
    patient: str | None = None
    update: bool = False
    remote: bool = False


def golden_for(path: Path) -> Path:
    if path.name == "request.json":
        return path.with_name("expected.json")
    stem = path.name.removesuffix(".json").removesuffix(".request")
    return path.with_name(f"{stem}.expected.json")


def discover(paths: Sequence[Path]) -> Iterator[Path | ReplayError]:
    """Every request.json under a directory (sorted), and each file as given."""
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("request.json") if p.is_file())
            if not found:
                yield ReplayError(f"{path}: no fixtures (<hook>/<case>/request.json) found")
            yield from found
        elif path.is_file():
            yield path
        else:
            yield ReplayError(f"{path}: no such file or directory")


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _display(path: Path) -> str:
    return _rel(path.parent if path.name == "request.json" else path)


def read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReplayError(f"{_rel(path)}: cannot read: {_short(exc)}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReplayError(
            f"{_rel(path)}: not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from exc


def read_expected(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise ReplayError(f"{_rel(path)}: must be a JSON object")
    response = data.get("response")
    if "response" in data and not (
        isinstance(response, dict)
        and (data.get("status", 200) != 200 or isinstance(response.get("cards"), list))
    ):
        raise ReplayError(f"{_rel(path)}: 'response' must be an object with a 'cards' list")
    silent = data.get("silent", [])
    if not isinstance(silent, list) or not all(isinstance(s, str) for s in silent):
        raise ReplayError(f"{_rel(path)}: 'silent' must be a list of rule ids")
    if not isinstance(data.get("status", 200), int):
        raise ReplayError(f"{_rel(path)}: 'status' must be an HTTP status code")
    return data


def _date(value: Any, where: str) -> date:
    try:
        return date.fromisoformat(str(value))
    except ValueError as exc:
        raise ReplayError(f"{where}: 'today' must be a date (YYYY-MM-DD), got {value!r}") from exc


def prepare(path: Path, target: Target, options: Options, default_profile: str) -> Case:
    """Read one input file into a Case ready to run; bad files raise ReplayError with one line."""
    case = Case(_display(path), path, golden_for(path), fixture=path.name == "request.json")
    data = read_json(path)
    if not isinstance(data, dict):
        raise ReplayError(f"{_rel(path)}: not a CDS Hooks request or FHIR Bundle (a JSON object is required)")
    expected = read_expected(case.golden)
    case.expected = expected
    services = target.services()
    if data.get("resourceType") == "Bundle":
        hook = options.hook or (_hook_of(expected.get("service"), services) if expected else None)
        if hook is None:
            raise ReplayError(
                f"{_rel(path)}: a plain FHIR Bundle needs --hook (and --patient) to build a request"
            )
        service = f"d3k2-{hook}" if not expected or not expected.get("service") else str(expected["service"])
        if service not in services:
            raise ReplayError(
                f"{_rel(path)}: unknown hook {hook!r} (no service {service!r}; known: {_known(services)})"
            )
        patient = options.patient or (
            str(expected["patient"]) if expected and expected.get("patient") else None
        )
        try:
            case.payload = request_from_bundle(
                data,
                hook=hook,
                patient_id=patient,
                prefetch_keys=services[service][1],
                content=path.read_bytes(),
            )
        except D3K2Error as exc:
            raise ReplayError(f"{_rel(path)}: {exc.detail}") from exc
        case.fixture, case.bundle = False, True
    elif isinstance(data.get("hook"), str):
        case.payload = data
        service = str(expected["service"]) if expected and expected.get("service") else f"d3k2-{data['hook']}"
        if service not in services:
            raise ReplayError(
                f"{_rel(path)}: unknown hook {data['hook']!r} "
                f"(no service {service!r}; known: {_known(services)})"
            )
    elif "resourceType" in data:
        raise ReplayError(
            f"{_rel(path)}: a FHIR {data['resourceType']} is neither a Bundle nor a CDS Hooks request"
        )
    else:
        raise ReplayError(f"{_rel(path)}: not a CDS Hooks request (no 'hook') and not a FHIR Bundle")
    case.service = service
    if expected and expected.get("today"):
        case.today = _date(expected["today"], _rel(case.golden))
    elif options.today:
        case.today = options.today
    else:
        raise ReplayError(f"{_rel(path)}: no 'today' in {case.golden.name}: pass --today YYYY-MM-DD")
    case.profile = str((expected or {}).get("profile") or options.profile or default_profile)
    return case


def _hook_of(service: Any, services: Mapping[str, tuple[str, list[str]]]) -> str | None:
    found = services.get(str(service))
    return found[0] if found else None


def _known(services: Mapping[str, tuple[str, list[str]]]) -> str:
    return ", ".join(sorted({hook for hook, _keys in services.values()}))


# ---------------------------------------------------------------- comparison


def _topic(card: Any) -> str:
    try:
        return str(card["source"]["topic"]["code"])
    except (KeyError, TypeError):
        return "(no topic)"


def _card_key(card: Any) -> tuple[int, str, str]:
    indicator = card.get("indicator") if isinstance(card, dict) else None
    uid = card.get("uuid") if isinstance(card, dict) else None
    return (_INDICATORS.get(str(indicator), 9), _topic(card), str(uid))


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
        match = next((a for a in left if _topic(a) == _topic(card)), None)
        if match is not None:
            left.remove(match)
        yield card, match
    for card in left:
        yield None, card


def compare(expected: Mapping[str, Any], status: int, actual: Any) -> list[Difference]:
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
            topic = _topic(exp_card if exp_card is not None else act_card)
            if act_card is None:
                differences.append(Difference(topic, "", note=f"card missing: {_summary(exp_card)}"))
            elif exp_card is None:
                differences.append(Difference(topic, "", note=f"unexpected card: {_summary(act_card)}"))
            else:
                differences.extend(
                    Difference(topic, p, e, a, n) for p, e, a, n in _walk(exp_card, act_card, "")
                )
        want = {k: v for k, v in want.items() if k != "cards"}
        got = {k: v for k, v in got.items() if k != "cards"}
    differences.extend(Difference(None, p or "response", e, a, n) for p, e, a, n in _walk(want, got, ""))
    return differences


def silent_violations(silent: Sequence[str], status: int, actual: Any) -> list[Difference]:
    if status != 200 or not isinstance(actual, dict):
        return []
    fired = {_topic(card): card for card in actual.get("cards") or []}
    return [
        Difference(rule, "", note=f"fired, but expected.json lists it as silent: {_summary(fired[rule])}")
        for rule in silent
        if rule in fired
    ]


def _summary(card: Any) -> str:
    indicator = card.get("indicator", "?") if isinstance(card, dict) else "?"
    summary = card.get("summary", "") if isinstance(card, dict) else ""
    return f"[{indicator}] {_clip(str(summary), _CLIP)}"


def _clip(text: str, width: int) -> str:
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
        _clip(json.dumps(exp, ensure_ascii=False, sort_keys=True), _CLIP * 2),
        _clip(json.dumps(act, ensure_ascii=False, sort_keys=True), _CLIP * 2),
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


# ---------------------------------------------------------------- running


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _golden(case: Case, status: int, response: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(case.expected or {})
    base.setdefault("service", case.service)
    base.setdefault("today", case.today.isoformat() if case.today else None)
    base.setdefault("profile", case.profile)
    if case.bundle:
        base.setdefault("patient", case.payload["context"]["patientId"])
    base.setdefault("description", "")
    base.setdefault("silent", [])
    base.pop("status", None)
    if status != 200:
        base["status"] = status
    base["response"] = normalise(response)
    ordered = {k: base[k] for k in _EXPECTED_KEYS if k in base}
    return {**ordered, **{k: v for k, v in base.items() if k not in ordered}}


def run_case(case: Case, target: Target, options: Options) -> Result:
    assert case.today is not None
    result = Result(case.name, "passed", case.service, case.today.isoformat(), case.profile)
    if options.remote and options.profile and case.profile != options.profile:
        result.status = "skipped"
        result.message = f"profile {case.profile} (the server runs {options.profile})"
        return result
    started = time.monotonic()
    try:
        status, response = target.call(case.service, case.payload, today=case.today, profile=case.profile)
    except ReplayError:
        raise
    except Exception as exc:  # a bug in the service: report it on this case, keep replaying the others
        status = 500
        where = traceback.extract_tb(exc.__traceback__)[-1]
        response = {
            "error": "internal-error",
            "detail": f"{type(exc).__name__}: {exc} ({Path(where.filename).name}:{where.lineno})",
        }
    result.seconds = time.monotonic() - started
    result.cards = response.get("cards", []) if isinstance(response, dict) and status == 200 else []
    silent = (case.expected or {}).get("silent", [])
    if case.expected is None or "response" not in case.expected:
        if options.update:
            write_json(case.golden, _golden(case, status, response))
            result.updated = True
        elif case.fixture:
            result.status = "failed"
            result.message = f"{case.golden.name} is missing (run with --update to create it)"
        elif status != 200:
            result.status = "failed"
            result.message = f"HTTP {status}: {_clip(json.dumps(response, ensure_ascii=False), 200)}"
        else:
            result.message = "no golden file: cards shown, nothing compared"
    else:
        differences = compare(case.expected, status, response)
        if differences and options.update:
            write_json(case.golden, _golden(case, status, response))
            result.updated = True
            differences = []
        result.differences = differences
    result.differences += silent_violations(silent, status, response)
    if result.differences:
        result.status = "failed"
    return result


def replay(
    paths: Sequence[Path],
    target: Target,
    options: Options,
    default_profile: str,
    progress: Callable[[Result], None] = lambda _r: None,
    started: Callable[[int], None] = lambda _n: None,
) -> list[Result]:
    inputs = list(discover(paths))
    started(len(inputs))
    results: list[Result] = []
    for item in inputs:
        if isinstance(item, ReplayError):
            result = Result(str(item).split(":", 1)[0], "error", message=str(item))
        else:
            try:
                result = run_case(prepare(item, target, options, default_profile), target, options)
            except ReplayError as exc:
                result = Result(_display(item), "error", message=str(exc))
        results.append(result)
        progress(result)
    return results


def count(results: Sequence[Result]) -> tuple[int, int, int]:
    passed = sum(r.status == "passed" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    return passed, len(results) - passed - skipped, skipped


def summary_line(results: Sequence[Result]) -> str:
    passed, failed, skipped = count(results)
    line = f"{passed} passed, {failed} failed"
    return line + (f", {skipped} skipped" if skipped else "")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# ---------------------------------------------------------------- reports


def text_report(result: Result) -> list[str]:
    """Lines for one fixture: a status line, then its diff, error or (without a golden) its cards."""
    if result.status == "error":
        return [f"error: {result.message}"]
    head = {"passed": "ok     ", "failed": "FAIL   ", "skipped": "skip   "}[result.status]
    detail = f" ({result.service}, today {result.today}, profile {result.profile})"
    lines = [head + result.name + detail + (" [golden updated]" if result.updated else "")]
    if result.message:
        lines.append(f"  {result.message}")
    for difference in result.differences:
        lines.extend("  " + line for line in describe(difference))
    if result.message.startswith("no golden"):
        lines.extend(f"  {_summary(card)} {_topic(card)}" for card in result.cards)
    return lines


def json_report(results: Sequence[Result]) -> dict[str, Any]:
    passed, failed, skipped = count(results)
    return {
        "fixtures": [
            {
                "name": r.name,
                "status": r.status,
                "service": r.service or None,
                "today": r.today or None,
                "profile": r.profile or None,
                "message": r.message or None,
                "updated": r.updated,
                "seconds": round(r.seconds, 4),
                "differences": [
                    {
                        "card": d.card,
                        "path": d.path,
                        "expected": d.expected,
                        "actual": d.actual,
                        "note": d.note,
                    }
                    for d in r.differences
                ],
                "cards": [
                    {"indicator": c.get("indicator"), "topic": _topic(c), "summary": c.get("summary")}
                    for c in r.cards
                ],
            }
            for r in results
        ],
        "summary": {"passed": passed, "failed": failed, "skipped": skipped},
    }


def junit_report(results: Sequence[Result]) -> str:
    failures = sum(r.status == "failed" for r in results)
    errors = sum(r.status == "error" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    suite = ET.Element(
        "testsuite",
        name="d3k2-replay",
        tests=str(len(results)),
        failures=str(failures),
        errors=str(errors),
        skipped=str(skipped),
        time=f"{sum(r.seconds for r in results):.3f}",
    )
    for r in results:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"replay.{r.service or 'input'}",
            name=r.name,
            time=f"{r.seconds:.3f}",
        )
        body = "\n".join(line for d in r.differences for line in describe(d))
        if r.status == "failed":
            ET.SubElement(
                case, "failure", message=r.message or f"{len(r.differences)} difference(s)"
            ).text = body
        elif r.status == "error":
            ET.SubElement(case, "error", message=r.message)
        elif r.status == "skipped":
            ET.SubElement(case, "skipped", message=r.message)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True)
