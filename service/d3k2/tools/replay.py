"""`d3k2 replay`: run recorded CDS Hooks requests (fixtures, loose request files, plain FHIR Bundles)
through the service, in-process or over HTTP, and compare the cards with golden files (replay_diff compares,
replay_report reports).

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
from d3k2.tools.replay_diff import Difference, clip, compare, normalise, silent_violations
from d3k2.whatif import request_from_bundle

if TYPE_CHECKING:
    from d3k2.http.signing import TokenSigner

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
    return clip(text, 160)


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
    fhir_server: str | None = None  # replaces every recorded fhirServer


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
        case.payload = _with_fhir_server(data, options.fhir_server)
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


def _with_fhir_server(request: dict[str, Any], fhir_server: str | None) -> dict[str, Any]:
    """The request with ``fhir_server`` for the fhirServer it recorded (a copy; files are never changed).
    Its fhirAuthorization goes too: that token was issued for the recorded server, not for this one."""
    if fhir_server is None or request.get("fhirServer") is None:
        return request
    changed = {key: value for key, value in request.items() if key != "fhirAuthorization"}
    changed["fhirServer"] = fhir_server
    return changed


def _hook_of(service: Any, services: Mapping[str, tuple[str, list[str]]]) -> str | None:
    found = services.get(str(service))
    return found[0] if found else None


def _known(services: Mapping[str, tuple[str, list[str]]]) -> str:
    return ", ".join(sorted({hook for hook, _keys in services.values()}))


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
            result.message = f"HTTP {status}: {clip(json.dumps(response, ensure_ascii=False), 200)}"
        else:
            result.message = "no golden file: cards shown, nothing compared"
    else:
        # A running service keys its card uuids with its deployment's secret (d3k2.core.cards.card_uuid).
        differences = compare(case.expected, status, response, uuids=not options.remote)
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


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
