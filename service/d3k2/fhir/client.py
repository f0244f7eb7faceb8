"""Fallback FHIR client: fetches the prefetch keys an EHR did not send, in parallel, within one time budget.

This module is the I/O edge of prefetch resolution; the pure core never imports it (nor ``requests``).
Failures are per key: every query yields a FetchOutcome, and only a fhirServer outside the allow-list
raises (before any connection is made).
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from fnmatch import fnmatchcase
from http.cookiejar import DefaultCookiePolicy
from types import TracebackType
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import orjson
import requests
import urllib3.connection
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from d3k2.config import Settings
from d3k2.core.errors import FhirServerNotAllowed

log = logging.getLogger("d3k2.fhir")

ACCEPT = "application/fhir+json"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CHUNK = 64 * 1024
_HOST = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?")
_IPV6 = re.compile(r"[0-9a-f:.]+")
_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
# "," (the FHIR OR separator) and the other sub-delimiters stay as the template wrote them; "|" is not allowed
# unescaped in a URI and "+" would be decoded as a space by servers that use form decoding (sekmet does):
# both are percent-encoded, and escapes already in the template are kept as they are.
_QUERY_SAFE = "&=,:/;@!$'()*-._~"
_PATH_SAFE = "/:@!$'()*,;=-._~"


@dataclass(frozen=True)
class FetchOutcome:
    key: str
    resource: dict[str, Any] | None
    error: str | None
    pages: int
    elapsed_ms: float
    truncated: bool = False


class _FetchFailed(Exception):
    """A per-key failure; its message is a short reason free of URLs, tokens and patient data."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status


def origin(url: str) -> str | None:
    """``scheme://host:port``, default port filled in; None unless a plain http(s) URL without userinfo."""
    if any(ch.isspace() or ord(ch) < 0x20 or ch == "\\" for ch in url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or "@" in parts.netloc:
        return None
    host = parts.hostname or ""
    if ":" in host:
        if not _IPV6.fullmatch(host):
            return None
        host = f"[{host}]"
    elif not _HOST.fullmatch(host):
        return None
    if port == 0:
        return None
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS[scheme]}"


def is_allowed(base_url: str, patterns: Sequence[str]) -> bool:
    """Whether the origin of ``base_url`` matches one of the origin patterns (``*`` and ``?`` wildcards).

    Brackets in a pattern are literal so that ``http://[::1]:*`` names the IPv6 loopback instead of
    being read as an fnmatch character class.
    """
    found = origin(base_url)
    if found is None or "?" in base_url or "#" in base_url:
        return False
    return any(fnmatchcase(found, pattern.rstrip("/").lower().replace("[", "[[]")) for pattern in patterns)


def _requote(text: str, safe: str) -> str:
    """Percent-encode what is unsafe in ``text`` while keeping escapes the template already contains."""
    out: list[str] = []
    pos = 0
    for escape in _PERCENT_ESCAPE.finditer(text):
        out.append(quote(text[pos : escape.start()], safe=safe))
        out.append(escape.group())
        pos = escape.end()
    out.append(quote(text[pos:], safe=safe))
    return "".join(out)


def build_url(base_url: str, query: str) -> str:
    """``base_url`` joined with a relative query such as ``Observation?code=http://loinc.org|1989-3``.

    Joined by concatenation, never ``urljoin``, so that no query can move the request to another origin.
    """
    path, sep, params = query.lstrip("/").partition("?")
    url = f"{base_url.rstrip('/')}/{_requote(path, _PATH_SAFE)}"
    return f"{url}?{_requote(params, _QUERY_SAFE)}" if sep else url


def _reason(exc: BaseException) -> str:
    """A short reason for a transport failure, read from the exception chain (never its message)."""
    causes = list(_chain(exc))

    def found(*kinds: type[BaseException]) -> bool:
        return any(isinstance(cause, kinds) for cause in causes)

    if found(ConnectionRefusedError):
        return "connection refused"
    if found(urllib3.exceptions.NameResolutionError, socket.gaierror):
        return "host name not resolved"
    if found(urllib3.exceptions.SSLError):
        return "TLS error"
    # urllib3 derives NewConnectionError from ConnectTimeoutError for compatibility: it is no timeout.
    timeouts = (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)
    if any(
        isinstance(cause, timeouts) and not isinstance(cause, urllib3.exceptions.NewConnectionError)
        for cause in causes
    ):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    return "request failed"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        todo.extend(item for item in linked if isinstance(item, BaseException))


def _no_request_lines(record: logging.LogRecord) -> bool:
    """urllib3 logs each request line at DEBUG, query string (the patient id) included: never let it out."""
    return record.levelno > logging.DEBUG


# ---------------------------------------------------------------- the budget inside reads
#
# A read timeout bounds each recv, not a response: a server that sends a byte every 1.5 s keeps a 2 s
# timeout from ever firing, and its fetch thread blocked long after the answer went out (the next calls
# on the worker then found no free thread). Each fetch therefore has a _Guard: every socket it reads from
# is registered while it reads, and when the budget is spent fetch_many shuts those sockets down, which
# ends a blocked read at once, whatever phase (status line, headers, body) it is in.


class _Guard:
    """The socket one fetch is reading from; ``abort`` shuts it down, now and on any later read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._aborted = False

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._aborted:
                self._sockets.append(sock)
                return
        _shut(sock)

    def release(self) -> None:
        """The read is over: its connection goes back to the pool, for another fetch to reuse."""
        with self._lock:
            self._sockets.clear()

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    # The plain socket's shutdown (also under TLS): it wakes a recv blocked in another thread, which
    # close() does not, and the pool sees the connection dropped and does not reuse it.
    with contextlib.suppress(OSError):  # already closed by the reader or the server
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


_fetching = threading.local()  # .guard: the _Guard of the fetch this thread runs


def _watch_response(sock: socket.socket | None) -> None:
    guard: _Guard | None = getattr(_fetching, "guard", None)
    if guard is not None and sock is not None:
        guard.watch(sock)


def _done_reading() -> None:
    guard: _Guard | None = getattr(_fetching, "guard", None)
    if guard is not None:
        guard.release()


class _GuardedHTTPConnection(urllib3.connection.HTTPConnection):
    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]
        # The request is sent (the connection new or reused); what may drip from here on is guarded.
        _watch_response(self.sock)
        return super().getresponse()


class _GuardedHTTPSConnection(urllib3.connection.HTTPSConnection):
    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]
        _watch_response(self.sock)
        return super().getresponse()


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}


def _new_session(settings: Settings) -> requests.Session:
    return configure_session(requests.Session(), settings)


def configure_session(session: requests.Session, settings: Settings) -> requests.Session:
    """The fetcher's transport on ``session``: guarded sockets (see ``read_deadline``), no retries, and
    nothing taken from the environment (the SMART app's own requests use it too)."""
    # No retries: a refused connection does not heal within milliseconds, and a retried connect timeout
    # would spend the whole budget twice over; the key is reported missing and the next hook call tries again.
    adapter = _GuardedAdapter(pool_connections=4, pool_maxsize=settings.fhir_workers, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    # One session serves every patient and user: no cookie may carry state from one call to the next, and
    # no ~/.netrc entry or proxy variable may add credentials or reroute requests behind the allow-list.
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    session.trust_env = False
    return session


@contextlib.contextmanager
def read_deadline(seconds: float) -> Iterator[None]:
    """Requests this thread makes on a ``configure_session`` session end once ``seconds`` have passed: the
    socket is shut down whatever phase the answer is in (a read timeout bounds each recv, not an answer)."""
    guard = _Guard()
    previous = getattr(_fetching, "guard", None)
    _fetching.guard = guard
    timer = threading.Timer(seconds, guard.abort)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        guard.release()
        _fetching.guard = previous


class FhirClient:
    """Thread-safe; create one per application and close it at shutdown."""

    def __init__(self, settings: Settings, session: requests.Session | None = None) -> None:
        self._settings = settings
        self._owns_session = session is None
        self._session = session if session is not None else _new_session(settings)
        self._pool = ThreadPoolExecutor(max_workers=settings.fhir_workers, thread_name_prefix="d3k2-fhir")
        logging.getLogger("urllib3.connectionpool").addFilter(_no_request_lines)

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._owns_session:
            self._session.close()

    def fetch_many(
        self, base_url: str, queries: Mapping[str, str], access_token: str | None
    ) -> dict[str, FetchOutcome]:
        """Run every query against ``base_url`` in parallel; return one outcome per key within the budget."""
        base_origin = origin(base_url)
        if base_origin is None or not is_allowed(base_url, self._settings.fhir_allowed):
            raise FhirServerNotAllowed(
                "fhirServer is not in the allow-list; nothing was fetched", origin=base_origin
            )
        started = time.monotonic()
        deadline = started + self._settings.fhir_budget
        guards = {key: _Guard() for key in queries}
        futures: dict[str, Future[FetchOutcome]] = {
            key: self._pool.submit(
                self._guarded,
                guards[key],
                key,
                build_url(base_url, query),
                base_origin,
                access_token,
                deadline,
            )
            for key, query in queries.items()
        }
        wait(futures.values(), timeout=max(0.0, deadline - time.monotonic()))
        outcomes: dict[str, FetchOutcome] = {}
        for key, future in futures.items():
            if future.done():
                outcomes[key] = future.result()
                continue
            # Not started: cancelled. Running: its socket is shut down, so the thread is free at once.
            future.cancel()
            guards[key].abort()
            outcome = FetchOutcome(
                key=key,
                resource=None,
                error=f"timed out after {self._settings.fhir_budget:g} s budget",
                pages=0,
                elapsed_ms=(time.monotonic() - started) * 1000,
            )
            _log(outcome, status=None)
            outcomes[key] = outcome
        return outcomes

    def _guarded(
        self, guard: _Guard, key: str, url: str, base_origin: str, access_token: str | None, deadline: float
    ) -> FetchOutcome:
        _fetching.guard = guard
        try:
            return self._fetch_one(key, url, base_origin, access_token, deadline)
        finally:
            _fetching.guard = None

    def _fetch_one(
        self, key: str, url: str, base_origin: str, access_token: str | None, deadline: float
    ) -> FetchOutcome:
        started = time.monotonic()
        pages = 0
        status: int | None = None
        merged: dict[str, Any] | None = None
        truncated = False
        try:
            while True:
                status, resource = self._get(url, access_token, deadline)
                pages += 1
                if merged is None:
                    if resource.get("resourceType") != "Bundle" or resource.get("type") != "searchset":
                        merged = resource
                        break
                    merged = {k: v for k, v in resource.items() if k not in ("link", "entry")}
                    merged["link"] = [link for link in _links(resource) if link.get("relation") == "self"]
                    merged["entry"] = []
                elif resource.get("resourceType") != "Bundle":
                    raise _FetchFailed(f"page {pages} is not a Bundle")
                merged["entry"].extend(resource.get("entry") or [])
                next_url = _next_link(resource, url)
                if next_url is None:
                    break
                if pages >= max(1, self._settings.fhir_max_pages):
                    truncated = True
                    break
                if origin(next_url) != base_origin:
                    raise _FetchFailed("next link to another origin not followed")
                url = next_url
            outcome = FetchOutcome(key, merged, None, pages, _ms_since(started), truncated)
        except _FetchFailed as failed:
            status = failed.status
            outcome = FetchOutcome(key, None, str(failed), pages, _ms_since(started))
        _log(outcome, status)
        return outcome

    def _get(self, url: str, access_token: str | None, deadline: float) -> tuple[int, dict[str, Any]]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _FetchFailed(self._budget_spent())
        timeout = min(self._settings.fhir_timeout, remaining)
        headers = {"Accept": ACCEPT}
        if access_token:
            headers["Authorization"] = f"Bearer {access_token}"
        try:
            with self._session.get(
                url, headers=headers, timeout=timeout, stream=True, allow_redirects=False
            ) as response:
                status = response.status_code
                if 300 <= status < 400:
                    raise _FetchFailed(f"redirect not followed (HTTP {status})", status)
                if status >= 400:
                    raise _FetchFailed(f"HTTP {status}", status)
                body = self._read_bounded(response, deadline)
        except requests.RequestException as exc:
            if time.monotonic() >= deadline:  # the guard shut the socket: the budget, not the server
                raise _FetchFailed(self._budget_spent()) from exc
            reason = _reason(exc)
            if reason == "timed out" and timeout < self._settings.fhir_timeout:
                reason = self._budget_spent()
            elif reason == "timed out":
                reason = f"timed out after {timeout:g} s"
            raise _FetchFailed(reason) from exc
        finally:
            _done_reading()
        try:
            resource = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise _FetchFailed(f"response is not JSON (HTTP {status})", status) from None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise _FetchFailed(f"response is not a FHIR resource (HTTP {status})", status)
        if resource["resourceType"] == "OperationOutcome":
            raise _FetchFailed(f"OperationOutcome (HTTP {status})", status)
        return status, resource

    def _read_bounded(self, response: requests.Response, deadline: float) -> bytes:
        limit = self._settings.fhir_max_bytes
        too_large = f"response larger than {limit} bytes"
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _FetchFailed(too_large)
        chunks: list[bytes] = []
        size = 0
        # Decoded bytes are counted, so a compressed body cannot expand past the bound either.
        for chunk in response.iter_content(chunk_size=_CHUNK):
            size += len(chunk)
            if size > limit:
                raise _FetchFailed(too_large)
            if time.monotonic() > deadline:
                raise _FetchFailed(self._budget_spent())
            chunks.append(chunk)
        return b"".join(chunks)

    def _budget_spent(self) -> str:
        return f"timed out after {self._settings.fhir_budget:g} s budget"


def _links(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    links = bundle.get("link")
    return [link for link in links if isinstance(link, dict)] if isinstance(links, list) else []


def _next_link(bundle: dict[str, Any], current_url: str) -> str | None:
    for link in _links(bundle):
        url = link.get("url")
        if link.get("relation") == "next" and isinstance(url, str) and url:
            return urljoin(current_url, url)
    return None


def _ms_since(started: float) -> float:
    return (time.monotonic() - started) * 1000


def _log(outcome: FetchOutcome, status: int | None) -> None:
    if outcome.error is None:
        log.info(
            "fhir fetch key=%s status=%s pages=%d truncated=%s elapsed_ms=%.1f",
            outcome.key,
            status,
            outcome.pages,
            outcome.truncated,
            outcome.elapsed_ms,
        )
    else:
        log.warning(
            "fhir fetch key=%s status=%s pages=%d elapsed_ms=%.1f error=%s",
            outcome.key,
            status,
            outcome.pages,
            outcome.elapsed_ms,
            outcome.error,
        )
