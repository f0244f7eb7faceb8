"""The `d3k2` command: serve, check-rules, replay, explain."""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from d3k2.config import Settings, from_env
from d3k2.core.errors import D3K2Error, RuleSetError


def _setup_logging(level: str) -> None:
    from d3k2.http.logs import configure_logging

    configure_logging(level, sys.stderr)


@click.group()
@click.version_option(package_name="d3k2")
def main() -> None:
    """d3k2: CDS Hooks service for vitamin D3 / K2 decision support."""


@main.command()
@click.option("--host", default=None, help="Address to bind (D3K2_HOST, default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (D3K2_PORT, default 8080).")
@click.option(
    "--profile", default=None, help="Threshold profile: seed, endocrine-2011, iom-2011 (D3K2_PROFILE)."
)
def serve(host: str | None, port: int | None, profile: str | None) -> None:
    """Start the service with Flask's server (for production use gunicorn, see docker/)."""
    from d3k2.http.app import create_app

    try:
        settings = from_env().with_overrides(host=host, port=port, profile=profile)
        _setup_logging(settings.log_level)
        app = create_app(settings)
    except D3K2Error as exc:
        raise click.ClickException(exc.detail) from exc
    base = f"http://{settings.host}:{settings.port}"
    click.echo(f"d3k2: serving {base}/cds-services (profile {settings.profile}, auth {settings.auth_mode})")
    if settings.preview_enabled:
        click.echo(f"d3k2: card preview at {base}/preview")
    # SIGTERM (docker stop, systemd, kill) stops like Ctrl-C instead of killing the process outright:
    # the cards served still queued for the feedback database are written before it exits.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        app.run(host=settings.host, port=settings.port, debug=False, use_reloader=False, threaded=True)
    finally:
        app.extensions["d3k2.store"].close()


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


# ---------------------------------------------------------------- check-rules


@main.command("check-rules")
@click.argument("directory", required=False, type=click.Path(path_type=Path))
@click.option(
    "--fixtures",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Golden fixtures the rules' [tests] name (default: fixtures/ next to DIR, when there is one).",
)
def check_rules(directory: Path | None, fixtures: Path | None) -> None:
    """Load and check the rule set in DIRECTORY (default: the configured cards/, D3K2_CARDS_DIR): print
    one line per problem and exit 1, or one OK line."""
    from d3k2.core.loader import load_ruleset

    cards = directory if directory is not None else _settings().cards_dir
    if fixtures is None and (cards.parent / "fixtures").is_dir():
        fixtures = cards.parent / "fixtures"
    try:
        ruleset = load_ruleset(cards, fixtures)
    except RuleSetError as exc:
        for line in exc.extra.get("problems", [exc.detail]):
            click.echo(line)
        sys.exit(1)
    vocabulary = ruleset.vocabulary
    counts = {
        "rules": len(ruleset.rules),
        "named conditions": len(ruleset.conditions),
        "facts": len(vocabulary.facts),
        "template fields": len(vocabulary.fields.patient) + len(vocabulary.fields.draft),
        "products": len(ruleset.products),
        "sources": len(ruleset.sources),
        "profiles": len(ruleset.profiles),
        "services": len(ruleset.services),
    }
    checked = (
        f"fixtures checked in {fixtures}" if fixtures is not None else "fixtures not checked (none found)"
    )
    click.echo(f"OK {cards}: " + ", ".join(f"{n} {what}" for what, n in counts.items()) + f"; {checked}")


# ---------------------------------------------------------------- replay and explain


def _settings() -> Settings:
    try:
        return from_env()
    except D3K2Error as exc:
        raise click.ClickException(exc.detail) from exc


def _date_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"must be a date (YYYY-MM-DD), got {value!r}") from exc


def _url_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(f"must be an http(s) URL, got {value!r}")
    return value


@contextmanager
def _quiet_logs(verbose: bool) -> Iterator[None]:
    """Failed fallback fetches are expected in recorded fixtures (their fhirServer is gone): the cards
    already say so, so the warning logs stay hidden unless --verbose."""
    logger = logging.getLogger("d3k2")
    before = logger.level
    logger.setLevel(logging.DEBUG if verbose else logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


_HOOKS = click.Choice(["patient-view", "order-select", "order-sign", "medication-prescribe"])


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--url", default=None, help="Replay against a running d3k2 (D3K2_ENV dev or test) at this base URL."
)
@click.option(
    "--fhir-server",
    callback=_url_option,
    default=None,
    help="Replace the fhirServer of every request that records one with this FHIR base URL (the keys the "
    "request lacks are fetched there; its recorded fhirAuthorization is not sent).",
)
@click.option("--update", is_flag=True, help="Rewrite the goldens' 'response' (refused when CI is set).")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json", "junit"]), default="text", show_default=True
)
@click.option("--today", callback=_date_option, help="Today for inputs whose golden names none (YYYY-MM-DD).")
@click.option(
    "--profile",
    default=None,
    help="Profile for inputs whose golden names none; with --url, the server's profile "
    "(default D3K2_PROFILE or seed).",
)
@click.option("--hook", type=_HOOKS, default=None, help="Hook to build for a plain FHIR Bundle.")
@click.option(
    "--patient", default=None, help="Patient id for a plain FHIR Bundle (default: its only Patient)."
)
@click.option(
    "--jwt-key",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="With --url: sign a bearer token for every call with this PEM private key (P-384: ES384; "
    "RSA: RS384), as an EHR does, for a server with D3K2_AUTH on. Needs --jwt-iss and --jwt-kid.",
)
@click.option(
    "--jwt-iss", default=None, help="With --jwt-key: the issuer (iss) the server's trust file names."
)
@click.option("--jwt-kid", default=None, help="With --jwt-key: the key id (kid) of its public key there.")
@click.option("-v", "--verbose", is_flag=True, help="Show the service's logs (fetch failures and the like).")
def replay(
    paths: tuple[Path, ...],
    url: str | None,
    fhir_server: str | None,
    update: bool,
    fmt: str,
    today: date | None,
    profile: str | None,
    hook: str | None,
    patient: str | None,
    jwt_key: Path | None,
    jwt_iss: str | None,
    jwt_kid: str | None,
    verbose: bool,
) -> None:
    """Replay fixtures (<hook>/<case>/request.json + expected.json), CDS Hooks requests or FHIR Bundles
    and compare the cards with the golden files. Exits 1 when any input fails."""
    import requests

    from d3k2.config import ConfigError
    from d3k2.core.loader import load_ruleset
    from d3k2.fhir.client import FhirClient
    from d3k2.http.signing import TokenSigner
    from d3k2.tools import replay as engine
    from d3k2.tools import replay_report as reports

    if update and engine.in_ci():
        raise click.ClickException("--update rewrites golden files and is refused when CI is set")
    signer = None
    if jwt_key is None and (jwt_iss or jwt_kid):
        raise click.UsageError("--jwt-iss and --jwt-kid go with --jwt-key")
    if jwt_key is not None:
        if url is None:
            raise click.UsageError("--jwt-key signs calls to a server: it needs --url")
        if not jwt_iss or not jwt_kid:
            raise click.UsageError("--jwt-key needs --jwt-iss and --jwt-kid")
        try:
            signer = TokenSigner.from_pem(jwt_key, jwt_iss, jwt_kid)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from exc
    settings = _settings()
    options = engine.Options(
        today, profile or settings.profile, hook, patient, update, url is not None, fhir_server
    )
    with _quiet_logs(verbose), _Progress(fmt) as progress:
        try:
            if url is not None:
                with requests.Session() as session:
                    target: engine.Target = engine.Remote(url.rstrip("/"), session, signer=signer)
                    results = engine.replay(
                        paths, target, options, options.profile or "seed", progress.report, progress.start
                    )
            else:
                ruleset = load_ruleset(settings.cards_dir)
                with FhirClient(settings) as client:
                    target = engine.InProcess(ruleset, client)
                    results = engine.replay(
                        paths, target, options, options.profile or "seed", progress.report, progress.start
                    )
        except D3K2Error as exc:
            raise click.ClickException(exc.detail) from exc
    if fmt == "json":
        click.echo(json.dumps(reports.json_report(results), indent=2, ensure_ascii=False))
    elif fmt == "junit":
        click.echo(reports.junit_report(results))
    click.echo(reports.summary_line(results), err=fmt != "text")
    if any(r.status in ("failed", "error") for r in results):
        sys.exit(1)


class _Progress:
    """A progress bar on a terminal; plain lines otherwise. Failures are always printed in full."""

    def __init__(self, fmt: str) -> None:
        self._fmt = fmt
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> _Progress:
        stream = sys.stdout if self._fmt == "text" else sys.stderr
        if stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            console = Console(file=stream)
            self._bar = Progress(
                TextColumn("replay"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                console=console,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task("", total=None)
        return self

    def start(self, total: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def __exit__(self, *_exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def report(self, result: Any) -> None:
        from d3k2.tools.replay_report import text_report

        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=result.name)
            if self._fmt == "text" and (result.status in ("failed", "error") or result.message):
                for line in text_report(result):
                    self._bar.console.print(line, markup=False, highlight=False)
        elif self._fmt == "text":
            for line in text_report(result):
                click.echo(line)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--hook", type=_HOOKS, default=None, help="Hook for a plain FHIR Bundle (default patient-view)."
)
@click.option(
    "--patient", default=None, help="Patient id for a plain FHIR Bundle (default: its only Patient)."
)
@click.option(
    "--profile", default=None, help="Threshold profile (default: the golden's, else D3K2_PROFILE or seed)."
)
@click.option(
    "--today", callback=_date_option, help="Today (YYYY-MM-DD; default: the golden's, else the UTC date)."
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="NAME=VALUE",
    help="What-if: vitd=18ng/mL, vitd=45nmol/L, egfr=25, calcium=11.2mg/dL, warfarin=on|off, k2=on|off, "
    "pregnant=yes|no. Repeatable.",
)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="Show the service's logs (fetch failures and the like).")
def explain(
    path: Path,
    hook: str | None,
    patient: str | None,
    profile: str | None,
    today: date | None,
    overrides: tuple[str, ...],
    fmt: str,
    verbose: bool,
) -> None:
    """Explain one FHIR Bundle or CDS Hooks request: the facts read (and from which resource), every
    rule's verdict with its reasons, and the cards."""
    from d3k2 import whatif
    from d3k2.core.loader import load_ruleset
    from d3k2.fhir.client import FhirClient
    from d3k2.tools import replay as engine

    settings = _settings()
    try:
        ruleset = load_ruleset(settings.cards_dir)
        data = engine.read_json(path) if path.is_file() else None
        if data is None:
            raise engine.ReplayError(f"{path}: no such file")
        golden = engine.read_expected(engine.golden_for(path)) or {}
        if isinstance(data, dict) and data.get("resourceType") == "Bundle":
            hook = hook or "patient-view"
            service = f"d3k2-{hook}"
            keys = list(ruleset.services[service].prefetch) if service in ruleset.services else []
            payload: Any = whatif.request_from_bundle(
                data,
                hook=hook,
                patient_id=patient or golden.get("patient"),
                prefetch_keys=keys,
                content=path.read_bytes(),
            )
        elif isinstance(data, dict) and isinstance(data.get("hook"), str):
            payload = data
            service = str(golden.get("service") or f"d3k2-{data['hook']}")
        else:
            raise engine.ReplayError(f"{path.name}: not a CDS Hooks request and not a FHIR Bundle")
        when = today or (
            date.fromisoformat(golden["today"]) if golden.get("today") else datetime.now(UTC).date()
        )
        chosen = profile or golden.get("profile") or settings.profile
        parsed = [whatif.parse_override(text, ruleset) for text in overrides]
        with _quiet_logs(verbose), FhirClient(settings) as client:
            explanation = whatif.explain(
                ruleset, service, payload, today=when, profile=chosen, fetcher=client, overrides=parsed
            )
    except (D3K2Error, engine.ReplayError, ValueError) as exc:
        raise click.ClickException(exc.detail if isinstance(exc, D3K2Error) else str(exc)) from exc
    report = whatif.report(explanation, ruleset)
    if fmt == "json":
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        _print_explanation(report)


def _print_explanation(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160, highlight=False)
    console.print(
        f"{report['service']}: patient {report['patient']}, "
        f"today {report['today']}, profile {report['profile']}",
        markup=False,
    )
    for applied in report["overrides"]:
        removed = ", ".join(applied["removed"]) or "nothing"
        console.print(
            f"what-if {applied['override']}: added {applied['added'] or 'nothing'}; removed {removed}",
            markup=False,
        )
    facts = report["facts"]
    labs = Table(title="Facts: labs (newest result used)", title_justify="left")
    for column in ("lab", "value", "reported", "date", "status", "source", "notes"):
        labs.add_column(column)
    for name in ("vitd", "egfr", "calcium"):
        m = facts[name]
        if m is None:
            labs.add_row(name, "no result", "", "", "", "", "")
        else:
            notes = "; ".join([*m["notes"], *(["stale"] if m["stale"] else [])])
            labs.add_row(name, m["value"], m["reported"], m["date"], m["status"], m["source"], notes)
    console.print(labs)
    meds = Table(title="Facts: medications", title_justify="left")
    for column in ("category", "name", "status", "source", "matched by", "dose"):
        meds.add_column(column)
    for med in facts["medications"]:
        meds.add_row(
            med["category"], med["name"], med["status"], med["source"], med["matched_by"], med["dose"]
        )
    console.print(meds if facts["medications"] else "Facts: medications: none")
    current = report["values"]["vitamin_d.current_daily"]
    shown = "unknown" if current is None else f"{current} IU/day"
    console.print(f"current vitamin D (vitamin_d.current_daily): {shown}", markup=False)
    evidence = [(name, e) for name, items in facts["conditions"].items() for e in items]
    evidence += [("pregnancy", e) for e in facts["pregnancy"]]
    evidence += [("lactation", e) for e in facts["lactation"]]
    conditions = Table(title="Facts: conditions", title_justify="left")
    for column in ("fact", "evidence", "source", "date"):
        conditions.add_column(column)
    for name, e in evidence:
        conditions.add_row(name, e["text"], e["source"], e["date"] or "")
    console.print(conditions if evidence else "Facts: conditions: none")
    for label, key in (
        ("data issues", "issues"),
        ("missing", "missing"),
        ("incomplete", "incomplete"),
        ("copies of one record", "copies"),
    ):
        for item in facts[key]:
            console.print(f"{label}: {item}", markup=False)
    for med in facts["unknown_medications"]:
        console.print(
            f"medication of unknown kind: {med['name'] or '(no name)'} ({med['source']}: {med['reason']})",
            markup=False,
        )
    rules = Table(title=f"Rules for {report['hook']}", title_justify="left")
    for column in ("verdict", "rule", "draft", "why"):
        rules.add_column(column)
    for rule in report["rules"]:
        verdict = "FIRED" if rule["verdict"] == "fired" else rule["verdict"]
        rules.add_row(verdict, rule["rule"], rule["draft"] or "", "\n".join(rule["reasons"]))
    console.print(rules)
    cards = Table(title="Cards", title_justify="left")
    for column in ("indicator", "topic", "summary"):
        cards.add_column(column)
    for card in report["cards"]:
        cards.add_row(card["indicator"], card["topic"], card["summary"])
    console.print(cards if report["cards"] else "Cards: none")


# ---------------------------------------------------------------- feedback


@main.group()
def feedback() -> None:
    """The feedback database (D3K2_DATABASE_URL, else SQLite under D3K2_DATA_DIR)."""


@feedback.command("report")
@click.option(
    "--since", callback=_date_option, help="Only cards served and feedback received from this day on (UTC)."
)
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json", "html"]), default="text", show_default=True
)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Write to this file.")
def feedback_report(since: date | None, fmt: str, output: Path | None) -> None:
    """Per rule: cards shown, accepted, overridden, top override reasons, trend by week (html: one page)."""
    from d3k2.tools.governance import write_report

    write_report(_settings(), since, fmt, output)


@feedback.command("migrate")
def feedback_migrate() -> None:
    """Bring the schema to the newest migration (the service also does this when it starts)."""
    from d3k2.store.feedback import FeedbackStore

    store = FeedbackStore(_settings().database)
    try:
        store.migrate()
    except D3K2Error as exc:
        raise click.ClickException(exc.detail) from exc
    finally:
        store.close()
    click.echo(f"d3k2: feedback database {store.display_url} is at the newest schema")


if __name__ == "__main__":
    main()
